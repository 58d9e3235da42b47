"""Probe measurement: ℓ̄, Σ log π and next-token distributions of a probe set, and the
Δ statistics of one probes.csv row against the stage start and the run's baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cwdpo.callbacks.probes.sets import ProbeSet
from cwdpo.losses.diagnostics import coarsen, distribution_stats, group_stats, support
from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.modes import eval_mode
from cwdpo.utils.run_files import read_json

STATE_JSON = "probes_state.json"  # the run-wide baseline of every probe set
START_KEYS = ("ell", "sum", "index", "dist")


@torch.no_grad()
def measure(backbone: Any, ps: ProbeSet) -> dict[str, torch.Tensor]:
    """ℓ̄ and log π per text, and next-token log-probs at every response position."""
    ells, sums, dists = [], [], []
    with eval_mode(backbone.model):
        for enc in ps.batches:
            enc = {k: v.to(backbone.device) for k, v in enc.items()}
            lp, logits, labels = backbone.logps_and_logits(enc)
            ells.append(lp.mean.float().cpu())
            sums.append(lp.sum.float().cpu())
            mask = labels != -100
            dists.append(torch.log_softmax(logits[mask].float(), -1).cpu())
    return {"ell": torch.cat(ells), "sum": torch.cat(sums), "logp": torch.cat(dists)}


def start_point(m: dict[str, torch.Tensor], topk: int | None) -> dict[str, torch.Tensor]:
    """What later probes of a stage are compared with: ℓ̄, Σ and the coarsened distributions."""
    index = support(m["logp"], topk)
    return {
        "ell": m["ell"],
        "sum": m["sum"],
        "index": index,
        "dist": coarsen(m["logp"].exp(), index),
    }


def delta_stats(
    m: dict[str, torch.Tensor], start: dict[str, Any], base: dict[str, Any], quantiles: list
) -> dict[str, float]:
    """Stage-relative Δℓ̄ stats, run-relative ones, Σ and how far the distributions moved."""
    row: dict[str, float] = {"ell": float(m["ell"].mean())}
    row.update(group_stats(m["ell"] - start["ell"], quantiles))
    run = group_stats(m["ell"] - base["ell"], quantiles)
    row.update({f"run_{k}": v for k, v in run.items()})
    row["sum_mean"] = float((m["sum"] - start["sum"]).mean())
    row["run_sum_mean"] = float((m["sum"] - base["sum"]).mean())
    row.update(distribution_stats(m["logp"], start["dist"], start["index"]))
    return row


def run_baseline(
    out_dir: Path, stage: str, ps: ProbeSet, ell: torch.Tensor, sums: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The run-wide baseline: the first stage that probed these very texts (its start).

    Kept in `<run>/probes_state.json`; a set whose texts changed starts its own baseline (and
    leaves the saved one alone)."""
    state_path = out_dir / STATE_JSON
    state = read_json(state_path, {})
    saved = state.get(ps.group)
    if saved and saved.get("key") == ps.key:
        return {"ell": torch.tensor(saved["ell"]), "sum": torch.tensor(saved["sum"])}
    if not saved:
        state[ps.group] = {"key": ps.key, "stage": stage, "ell": ell.tolist(), "sum": sums.tolist()}
        if is_rank_zero():  # every rank measured the same; one writes
            atomic_write_text(state_path, json.dumps(state) + "\n")
    return {"ell": ell, "sum": sums}
