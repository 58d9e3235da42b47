"""`DeltaLogpProbe`: when to probe, what to record, and what the rules make it do.

Measurement (`measure`), probe sets (`sets`), rules (`rules`), W&B media (`media`) and the
run directory's shared files (`cwdpo.utils.run_files`) live apart; this module holds the
Lightning hooks, the cost bound, the cross-rank rule decisions and the checkpoint state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from cwdpo.callbacks.probes.config import ProbeConfig
from cwdpo.callbacks.probes.measure import (
    START_KEYS,
    STATE_JSON,
    delta_stats,
    measure,
    run_baseline,
    start_point,
)
from cwdpo.callbacks.probes.media import log_curves, log_samples
from cwdpo.callbacks.probes.rules import (
    ProbeRule,
    describe_firing,
    parse_rules,
    rule_due,
    rule_fires,
)
from cwdpo.callbacks.probes.sets import ProbeSet, build_probe_sets
from cwdpo.utils.dist import any_rank, is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.run_files import (
    StageAware,
    append_csv,
    numeric_row,
    read_csv,
    read_json,
    record_stage,
    stage_offset,
)
from cwdpo.utils.safe_log import log_scalars

log = logging.getLogger(__name__)

PROBES_CSV = "probes.csv"
EVENTS_JSON = "probe_events.json"
HEADER = ("stage", "step", "run_step", "group", "n", "seconds")  # row keys that are no metric


class DeltaLogpProbe(StageAware, L.Callback):
    """Δlogp probes + probe-driven control (see the package docstring).

    Settings are a `ProbeConfig` (pass one as `config`, or its fields as keywords, as the
    Hydra config does); `rules` are `ProbeRule`s or their config mapping.

    Cost is bounded: `n_items` records per group, one no-grad forward per `batch_size` texts,
    every `every_n_steps` steps; if the recurring probes take more than `max_cost_frac` of the
    stage's wall time the interval doubles (None disables). Seconds and the share of the stage
    spent probing are logged and saved in results.
    """

    def __init__(
        self,
        *,
        rules: Mapping[str, Any] | Sequence[Any] | None = None,
        config: ProbeConfig | None = None,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise TypeError(f"DeltaLogpProbe: pass `config` or its fields, not both: {settings}")
        self.cfg = config if config is not None else ProbeConfig(**settings)
        # the live schedule: the cost bound doubles the interval (and it is checkpointed)
        self.every_n_steps = self.cfg.every_n_steps
        self.max_cost_frac = self.cfg.max_cost_frac
        self.rules: list[ProbeRule] = parse_rules(rules)
        self._init_state()

    def _init_state(self) -> None:
        self.sets: dict[str, ProbeSet] = {}
        self.start: dict[str, dict[str, Any]] = {}
        self.run_base: dict[str, dict[str, torch.Tensor]] = {}
        self.trajectory: list[dict[str, Any]] = []
        self.last_probe_step: int | None = None
        self.offset = 0
        self.probe_seconds = 0.0  # all probing: set building, stage-start, periodic, final
        self.periodic_seconds = 0.0  # what the cost bound acts on
        self.t_begin: float | None = None  # on_train_start
        self.t_start: float | None = None  # after the stage-start probe
        self.t_end: float | None = None
        self.stop_reason: str | None = None
        self.events: list[dict[str, Any]] = []
        self._last_fired: dict[str, int] = {}
        self._holding: dict[str, bool] = {}  # rule condition at the previous probe ("log")
        self._restored: dict[str, Any] | None = None  # from a checkpoint (resumed stage)

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_stage(trainer, pl_module)
        self.t_begin = time.perf_counter()
        if self.first and self._restored is None:  # a fresh run: stale files of this dir go
            self.clear_run_files(PROBES_CSV, EVENTS_JSON, STATE_JSON)
        self.offset = stage_offset(self.out_dir, self.stage, bool(self.first))
        t = time.perf_counter()
        self.sets = self.build_sets(trainer, pl_module)
        self.probe_seconds += time.perf_counter() - t
        if self._restored is not None:  # rules see the whole stage, not just since the resume
            rows = read_csv(self.out_dir / PROBES_CSV)
            self.trajectory = [numeric_row(r) for r in rows if r["stage"] == self.stage]
            self.last_probe_step = self._restored.get("last_probe_step")
        if not self._restore_starts():  # a resumed stage probes on as if never interrupted
            self.probe(trainer, pl_module)
        self.t_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_probe_step and self.sets:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.sets:
            return
        if trainer.global_step != self.last_probe_step:
            self.probe(trainer, pl_module, final=True)
        self.t_end = time.perf_counter()
        log_samples(trainer, pl_module, self.cfg, self.stage, self.out_dir)
        log_curves(trainer, self.stage, list(self.sets), self.trajectory, self.out_dir / PROBES_CSV)
        s = self.summary()
        record_stage(
            self.out_dir,
            self.stage,
            self.offset,
            trainer.global_step,
            stop_reason=self.stop_reason,
            probe_seconds=s["probe_seconds"],
            probe_cost_frac=s["probe_cost_frac"],
        )

    def build_sets(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, ProbeSet]:
        saved = (self._restored or {}).get("on_policy")
        return build_probe_sets(self.cfg, trainer.datamodule, pl_module.backbone, saved)

    # ------------------------------------------------------------ measuring
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> None:
        t0 = time.perf_counter()
        step = trainer.global_step
        rows = []
        for group, ps in self.sets.items():
            m = measure(pl_module.backbone, ps)
            if group not in self.start:
                self.start[group] = start_point(m, self.cfg.dist_topk)
                self.run_base[group] = run_baseline(
                    self.out_dir, self.stage, ps, m["ell"], m["sum"]
                )
            rows.append(self.group_row(group, ps, m, step))
        self.last_probe_step = step
        dt = time.perf_counter() - t0
        self.probe_seconds += dt
        if self.t_start is not None and not final:
            self.periodic_seconds += dt
        metrics = {}
        for r in rows:
            r["seconds"] = round(dt, 4)
            metrics.update({f"probe/{r['group']}/{k}": v for k, v in r.items() if k not in HEADER})
        append_csv(self.out_dir / PROBES_CSV, rows)
        self.trajectory.extend(rows)
        metrics.update(
            {
                "probe/seconds": dt,
                "probe/periodic_cost_frac": self.cost_frac(),
                "probe/every_n_steps": self.every_n_steps,
                "probe/run_step": self.offset + step,
            }
        )
        log_scalars(trainer, metrics, step)
        self._bound_cost(trainer, step)
        if not final:
            self.apply_rules(trainer, pl_module, step)

    def _restore_starts(self) -> bool:
        """Resumed stage: take the checkpointed stage-start measurements of unchanged sets.
        True when every group is restored (then no extra probe is taken at the resume step)."""
        saved = (self._restored or {}).get("start") or {}
        for group, ps in self.sets.items():
            st = saved.get(group)
            if st and st.get("key") == ps.key:
                self.start[group] = {k: st[k] for k in START_KEYS}
                self.run_base[group] = run_baseline(
                    self.out_dir, self.stage, ps, st["ell"], st["sum"]
                )
        return bool(self.sets) and all(g in self.start for g in self.sets)

    def group_row(
        self, group: str, ps: ProbeSet, m: dict[str, torch.Tensor], step: int
    ) -> dict[str, Any]:
        """One probes.csv row: stage-relative Δℓ̄ stats, run-relative ones, Σ and distributions."""
        head = {"stage": self.stage, "step": step, "run_step": self.offset + step}
        stats = delta_stats(m, self.start[group], self.run_base[group], self.cfg.quantiles)
        return {**head, "group": group, "n": len(ps), **stats}

    def cost_frac(self) -> float:
        """Share of the wall time since the stage-start probe spent in periodic probes."""
        if self.t_start is None:
            return 0.0
        return self.periodic_seconds / max(time.perf_counter() - self.t_start, 1e-9)

    def _bound_cost(self, trainer: L.Trainer, step: int) -> None:
        """One-off costs (building the sets, the stage-start and final probes) are excluded:
        the bound is on the recurring share, which is what grows with the stage length."""
        frac = self.cost_frac()
        too_costly = bool(step > 0 and self.max_cost_frac and frac > self.max_cost_frac)
        if any_rank(trainer, too_costly):  # timings differ per rank; the schedule must not
            self.every_n_steps *= 2
            log.info(
                "periodic probes took %.0f%% of the stage's time: probing every %d steps now",
                100 * frac,
                self.every_n_steps,
            )

    # ------------------------------------------------------------ control
    def series(self, group: str, column: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.trajectory if r["group"] == group]
        return [r["step"] for r in rows], [float(r.get(column, float("nan"))) for r in rows]

    def apply_rules(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Check every rule after a probe (when each acts: `rules.rule_due`)."""
        for rule in self.rules:
            if not rule.applies_to(self.stage) or rule.group not in self.sets:
                continue
            steps, values = self.series(rule.group, rule.column)
            # every rank probes the same weights, but float noise (GPU kernels) can put one rank
            # across a threshold alone: decide together, or a rank-local refresh (a collective)
            # or stop would hang the others
            here = rule_fires(rule, steps, values)
            holds = any_rank(trainer, here)
            was_holding, self._holding[rule.name] = self._holding.get(rule.name, False), holds
            if not rule_due(rule, holds, was_holding, self._last_fired.get(rule.name), step):
                continue
            reason = (
                describe_firing(rule, steps, values)
                if here
                else f"{rule.name}: held on another rank at step {step}"
            )
            self._fire(trainer, pl_module, rule, step, reason)

    def _fire(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        rule: ProbeRule,
        step: int,
        reason: str,
    ) -> None:
        self._last_fired[rule.name] = step
        event = {"stage": self.stage, "step": step, "rule": rule.name, "action": rule.action}
        self.events.append({**event, "reason": reason})
        log.info("probe rule fired (%s): %s", rule.action, reason)
        if rule.action == "stop" and self.stop_reason is None:
            self.stop_reason = reason
            trainer.should_stop = True
        elif rule.action == "refresh":
            self.refresh(trainer, pl_module)
        self._write_events()
        log_scalars(trainer, {f"probe/fired/{rule.name}": 1.0}, step)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Curriculum hook: resample on-policy negatives now (through the refresh callback)."""
        from cwdpo.callbacks.on_policy import OnPolicyNegatives

        for cb in trainer.callbacks:
            if isinstance(cb, OnPolicyNegatives):
                cb.refresh(trainer, pl_module)
                return
        dm = trainer.datamodule
        if hasattr(dm, "set_negatives"):  # no schedule: one window of the configured length
            OnPolicyNegatives(dm.neg.refresh_every_n_steps).refresh(trainer, pl_module)
        else:
            log.warning("probe rule asked for a refresh, but this stage has no on-policy negatives")

    def _write_events(self) -> None:
        if not is_rank_zero():  # every rank fires the same rules (apply_rules): one writes
            return
        path = self.out_dir / EVENTS_JSON
        events = [e for e in read_json(path, []) if e["stage"] != self.stage] + self.events
        atomic_write_text(path, json.dumps(events, indent=2) + "\n")

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed stage needs to continue the same curves (tensors and plain
        types only: loadable with `torch.load(weights_only=True)`)."""
        start = {
            g: {"key": self.sets[g].key, **{k: st[k] for k in START_KEYS}}
            for g, st in self.start.items()
            if g in self.sets
        }
        op = self.sets.get("on_policy")
        return {
            "every_n_steps": self.every_n_steps,
            "stop_reason": self.stop_reason,
            "events": self.events,
            "last_fired": self._last_fired,
            "holding": self._holding,
            "start": start,
            "last_probe_step": self.last_probe_step,
            "on_policy": {"image_ids": op.image_ids, "texts": op.texts} if op else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.every_n_steps = int(state_dict.get("every_n_steps", self.every_n_steps))
        self.stop_reason = state_dict.get("stop_reason")
        self.events = list(state_dict.get("events", []))
        self._last_fired = dict(state_dict.get("last_fired", {}))
        self._holding = dict(state_dict.get("holding", {}))

    # ------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """What the pipeline saves in results.json for this stage."""
        wall = (self.t_end or time.perf_counter()) - (self.t_begin or time.perf_counter())
        return {
            "early_stop": self.stop_reason,
            "probe_events": list(self.events),
            "probe_seconds": round(self.probe_seconds, 3),
            "probe_cost_frac": round(self.probe_seconds / max(wall, 1e-9), 4),
            "probe_every_n_steps": self.every_n_steps,
        }


def probe_summary(trainer: L.Trainer) -> dict[str, Any]:
    """The probe callback's summary for results.json ({} when no probe callback ran)."""
    for cb in trainer.callbacks:
        if isinstance(cb, DeltaLogpProbe):
            return cb.summary()
    return {}
