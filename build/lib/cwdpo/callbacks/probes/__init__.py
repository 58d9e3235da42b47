"""Δlogp probes: fixed held-out probe sets whose confidence ℓ̄ is tracked through training.

Every `every_n_steps` optimizer steps (and at the stage start and end) the policy scores a fixed
set of texts without gradients, in eval mode: held-out positives (a reference caption), gentle
negatives (one fact wrong), easy negatives (another image's caption / shuffled / off-topic) and,
when the stage trains on on-policy negatives, samples drawn from the policy at the stage start.
Per group it records ℓ̄_t − ℓ̄_0 (mean and quantiles; stage-relative and run-relative), the
sequence-sum Δ log π, and how far the next-token distributions moved (entropy, top-1 prob,
TV / JS from the stage start). Rows go to `<run>/probes.csv` — the plots and the notebook read
that file, never W&B — and to every attached logger.

Probe-driven control: `ProbeRule`s are checked after each probe; a rule can stop the stage
(early stopping / "switch to the next stage"), refresh on-policy negatives (curriculum) or only
log. The rule logic is the pure function `rule_fires`, testable on a constructed trajectory.

One concern per module:
- `config`   `ProbeConfig`: the callback's settings, validated;
- `rules`    `ProbeRule`, `rule_fires`, `rule_due`, `describe_firing`, `parse_rules` (pure);
- `sets`     `ProbeSet` and building the groups' fixed texts and batches;
- `measure`  scoring a set, the Δ statistics of a row, the run-wide baseline;
- `media`    W&B Δlogp line series and sample captions;
- `callback` `DeltaLogpProbe`: hooks, cost bound, cross-rank rule decisions, checkpoint state.
The run directory's shared files (`stages.json`, CSV appends) are `cwdpo.utils.run_files`'.
"""

from cwdpo.callbacks.probes.callback import EVENTS_JSON, PROBES_CSV, DeltaLogpProbe, probe_summary
from cwdpo.callbacks.probes.config import GROUPS, ProbeConfig
from cwdpo.callbacks.probes.measure import STATE_JSON
from cwdpo.callbacks.probes.rules import (
    ProbeRule,
    describe_firing,
    parse_rules,
    rule_due,
    rule_fires,
)
from cwdpo.callbacks.probes.sets import ProbeSet, probe_records, probe_texts
from cwdpo.losses.diagnostics import quantile_key
from cwdpo.utils.run_files import (
    STAGES_JSON,
    StageAware,
    append_csv,
    read_stages,
    record_stage,
    stage_offset,
)
from cwdpo.utils.safe_log import log_scalars

__all__ = [
    "EVENTS_JSON",
    "GROUPS",
    "PROBES_CSV",
    "STAGES_JSON",
    "STATE_JSON",
    "DeltaLogpProbe",
    "ProbeConfig",
    "ProbeRule",
    "ProbeSet",
    "StageAware",
    "append_csv",
    "describe_firing",
    "log_scalars",
    "parse_rules",
    "probe_records",
    "probe_summary",
    "probe_texts",
    "quantile_key",
    "read_stages",
    "record_stage",
    "rule_due",
    "rule_fires",
    "stage_offset",
]
