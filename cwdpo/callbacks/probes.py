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
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cwdpo.data.records import load_images
from cwdpo.diagnostics import coarsen, distribution_stats, group_stats, quantile_key, support
from cwdpo.utils.dist import any_rank, is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.safe_log import FAILURES, never_fatal

log = logging.getLogger(__name__)

GROUPS = ("positives", "gentle", "easy", "on_policy")
PROBES_CSV = "probes.csv"
EVENTS_JSON = "probe_events.json"
STAGES_JSON = "stages.json"
STATE_JSON = "probes_state.json"


# ================================================================ run-dir bookkeeping
class StageAware:
    """Knows its stage name, run dir and whether it is the run's first stage.

    The pipeline calls `set_stage` (base SFT and SFT-C share a LightningModule class, so the
    module cannot tell them apart); used alone, the stage comes from `pl_module.stage_name`
    and the run dir from `trainer.default_root_dir`.
    """

    stage: str | None = None
    out_dir: Path | None = None
    first: bool | None = None

    def set_stage(self, stage: str, out_dir: str | Path, first: bool) -> None:
        self.stage, self.out_dir, self.first = stage, Path(out_dir), first

    def resolve_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage is None:
            self.stage = getattr(pl_module, "stage_name", "stage")
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir)
        if self.first is None:  # a fresh dir, or this stage run again in the same dir
            done = [s["stage"] for s in read_stages(self.out_dir)]
            self.first = not done or self.stage in done
        self.out_dir.mkdir(parents=True, exist_ok=True)


def read_stages(out_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(out_dir) / STAGES_JSON
    return json.loads(p.read_text()) if p.is_file() else []


def stage_offset(out_dir: str | Path, stage: str, first: bool) -> int:
    """Run-wide step at which `stage` starts: the sum of the earlier stages' steps."""
    if first:
        return 0
    offset = 0
    for s in read_stages(out_dir):
        if s["stage"] == stage:
            return int(s["offset"])
        offset = int(s["offset"]) + int(s["steps"])
    return offset


def record_stage(out_dir: str | Path, stage: str, offset: int, steps: int, **extra: Any) -> None:
    """Add/update this stage's entry in `<run>/stages.json` (offset, steps, stop reason…)."""
    if not is_rank_zero():
        return
    stages = read_stages(out_dir)
    entry = next((s for s in stages if s["stage"] == stage), None)
    if entry is None:
        entry = {"stage": stage}
        stages.append(entry)
    entry.update({"offset": int(offset), "steps": int(steps), **extra})
    stages.sort(key=lambda s: s["offset"])
    atomic_write_text(Path(out_dir) / STAGES_JSON, json.dumps(stages, indent=2) + "\n")


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows; the header is the first writer's (later unknown keys are dropped)."""
    if not rows or not is_rank_zero():  # under DDP one rank writes the run dir
        return
    with FAILURES.guard(f"csv {path.name}"):
        _append_csv(path, rows)


def _append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    exists = path.is_file() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            fields = next(csv.reader(f))
    else:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not exists:
            w.writeheader()
        w.writerows(rows)


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """To every logger directly: also allowed in hooks where `LightningModule.log` is not."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for lg in trainer.loggers:
        with FAILURES.guard(f"{type(lg).__name__} scalars"):
            lg.log_metrics(clean, step=step)


# ================================================================ rules (pure)
@dataclass
class ProbeRule:
    """A condition on one probe statistic's trajectory, and what to do when it holds.

    kind:     "drop_from_best" — best-so-far minus current > threshold (likelihood displacement
              of positives); "below" — current < threshold (squeezing: negatives collapsing);
              "above" — current > threshold.
    group:    probe group (positives / gentle / easy / on_policy).
    stat:     mean | q10 | q50 | q90 | … (Δℓ̄ columns), sum_mean, ell (absolute ℓ̄), entropy,
              top1, tv, js.
    baseline: "stage" (Δ from this stage's start) or "run" (from the run's first stage start).
    patience: the condition must hold at this many consecutive probes.
    min_step: probes before this stage-local step are ignored (warm-up).
    stages:   stage names the rule applies to (None: all).
    action:   "stop" (end this stage; the pipeline moves on), "refresh" (resample on-policy
              negatives), "log" (record only).
    cooldown: steps before a "refresh"/"log" rule may fire again.
    """

    name: str
    kind: str
    group: str = "positives"
    stat: str = "mean"
    threshold: float = 0.0
    baseline: str = "stage"
    patience: int = 1
    min_step: int = 0
    stages: Sequence[str] | None = None
    action: str = "stop"
    cooldown: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("drop_from_best", "below", "above"):
            raise ValueError(f"probe rule {self.name!r}: kind must be drop_from_best|below|above")
        if self.action not in ("stop", "refresh", "log"):
            raise ValueError(f"probe rule {self.name!r}: action must be stop|refresh|log")
        if self.baseline not in ("stage", "run"):
            raise ValueError(f"probe rule {self.name!r}: baseline must be stage|run")
        if self.patience < 1:
            raise ValueError(f"probe rule {self.name!r}: patience must be >= 1")

    @property
    def column(self) -> str:
        """The probes.csv column the rule reads."""
        relative = self.stat in ("mean", "sum_mean") or re.fullmatch(r"q[\d.]+", self.stat)
        return f"run_{self.stat}" if self.baseline == "run" and relative else self.stat

    def applies_to(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages


def _holds(kind: str, threshold: float, values: Sequence[float], i: int) -> bool:
    v = values[i]
    if not math.isfinite(v):
        return False
    if kind == "below":
        return v < threshold
    if kind == "above":
        return v > threshold
    best = max((x for x in values[: i + 1] if math.isfinite(x)), default=v)
    return best - v > threshold


def rule_fires(rule: ProbeRule, steps: Sequence[int], values: Sequence[float]) -> bool:
    """Does `rule` hold at the last probe of this trajectory (with patience and warm-up)?

    `steps`/`values`: the stage-local steps and the rule's statistic at every probe so far.
    "drop_from_best" compares with the best value since the stage start (warm-up included,
    since the best is what displacement is measured from).
    """
    if len(values) < rule.patience:
        return False
    idx = range(len(values) - rule.patience, len(values))
    return all(
        steps[i] >= rule.min_step and _holds(rule.kind, rule.threshold, values, i) for i in idx
    )


def describe_firing(rule: ProbeRule, steps: Sequence[int], values: Sequence[float]) -> str:
    """Human-readable reason, saved in results.json and stages.json."""
    v = values[-1]
    if rule.kind == "drop_from_best":
        best = max(x for x in values if math.isfinite(x))
        what = f"{rule.group} {rule.column} fell {best - v:.3f} from its best {best:.3f} (> {rule.threshold})"
    else:
        rel = "<" if rule.kind == "below" else ">"
        what = f"{rule.group} {rule.column} = {v:.3f} {rel} {rule.threshold}"
    return f"{rule.name}: {what} at step {steps[-1]}"


def parse_rules(rules: Mapping[str, Any] | Sequence[Any] | None) -> list[ProbeRule]:
    """Rules from config: a mapping name → fields (null entries are disabled) or a list."""
    if not rules:
        return []
    out = []
    items = rules.items() if isinstance(rules, Mapping) else ((r.get("name"), r) for r in rules)
    for name, spec in items:
        if spec is None or (isinstance(spec, Mapping) and spec.get("enabled", True) is False):
            continue
        if isinstance(spec, ProbeRule):
            out.append(spec)
            continue
        spec = {k: v for k, v in dict(spec).items() if k != "enabled"}
        spec.setdefault("name", name)
        if spec.get("stages") is not None:
            spec["stages"] = list(spec["stages"])
        out.append(ProbeRule(**spec))
    return out


# ================================================================ probe sets
@dataclass
class ProbeSet:
    """One fixed group: texts, their image ids and the pre-collated batches."""

    group: str
    image_ids: list[str]
    texts: list[str]
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        """Content hash: a run-wide baseline is only reused for the very same texts."""
        h = hashlib.sha1()
        for i, t in zip(self.image_ids, self.texts):
            h.update(f"{i}\t{t}\n".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)


def _prompt(source: Any, record: Any) -> str:
    return (record.meta or {}).get("prompt") or source.prompt


def probe_records(source: Any, split: str = "probe", fallback: str = "val", n: int = 64) -> list:
    """The first `n` records of the probe split (or of `fallback` if the source has none)."""
    try:
        recs = source.captions(split)
    except Exception as e:  # sources raise DataError for unknown / empty splits
        log.warning("probe split %r unavailable (%s); probing on %r", split, e, fallback)
        recs = source.captions(fallback)
    return list(recs)[:n]


def probe_texts(
    source: Any, records: Sequence[Any], group: str, seed: int
) -> list[tuple[int, str]]:
    """(record index, text) for a dataset group, drawn with a per-group seeded RNG.

    The RNG is seeded by (seed, group) so every stage (and every run with that seed) probes
    the very same texts, and adding a group does not change the others.
    """
    rng = random.Random(f"{seed}-{group}")
    out = []
    for i, rec in enumerate(records):
        if group == "positives":
            out.append((i, rng.choice(rec.references)))
            continue
        hard = group == "gentle"
        for _ in range(5):
            text, _src = source.negative(rec, rng, hard=hard)
            if text.strip() and text not in rec.references and not source.is_positive(text, rec):
                out.append((i, text))
                break
    return out


# ================================================================ the callback
class DeltaLogpProbe(StageAware, L.Callback):
    """Δlogp probes + probe-driven control (see the module docstring).

    Cost is bounded: `n_items` records per group, one no-grad forward per `batch_size` texts,
    every `every_n_steps` steps; if the recurring probes take more than `max_cost_frac` of the
    stage's wall time the interval doubles (None disables). Seconds and the share of the stage
    spent probing are logged and saved in results.
    """

    def __init__(
        self,
        every_n_steps: int = 20,
        n_items: int = 64,
        batch_size: int = 32,
        split: str = "probe",
        fallback_split: str = "val",
        seed: int = 0,
        groups: Sequence[str] = ("positives", "gentle", "easy"),
        on_policy: bool | str = "auto",
        on_policy_temperature: float = 1.0,
        on_policy_max_new_tokens: int = 32,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        dist_topk: int | None = 512,
        max_cost_frac: float | None = 0.25,
        rules: Mapping[str, Any] | Sequence[Any] | None = None,
        n_samples: int = 8,
        sample_max_new_tokens: int = 32,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"probes.every_n_steps must be >= 1, got {every_n_steps}")
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown probe group(s) {unknown}; choose from {list(GROUPS)}")
        self.every_n_steps = int(every_n_steps)
        self.n_items, self.batch_size = int(n_items), int(batch_size)
        self.split, self.fallback_split, self.seed = split, fallback_split, int(seed)
        self.groups = [g for g in groups if g != "on_policy"]
        self.on_policy = on_policy if isinstance(on_policy, str) else bool(on_policy)
        if "on_policy" in groups and self.on_policy is False:
            self.on_policy = True
        self.on_policy_temperature = on_policy_temperature
        self.on_policy_max_new_tokens = on_policy_max_new_tokens
        self.quantiles = [float(q) for q in quantiles]
        self.dist_topk = dist_topk
        self.max_cost_frac = max_cost_frac
        self.rules = parse_rules(rules)
        self.n_samples, self.sample_max_new_tokens = int(n_samples), int(sample_max_new_tokens)
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
            for name in (PROBES_CSV, EVENTS_JSON, STAGES_JSON, STATE_JSON):
                (self.out_dir / name).unlink(missing_ok=True)
        self.offset = stage_offset(self.out_dir, self.stage, bool(self.first))
        t = time.perf_counter()
        self.sets = self.build_sets(trainer, pl_module)
        self.probe_seconds += time.perf_counter() - t
        if self._restored is not None:  # rules see the whole stage, not just since the resume
            self.trajectory = [
                _numeric(r)
                for r in _read_csv(self.out_dir / PROBES_CSV)
                if r["stage"] == self.stage
            ]
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
        self.log_samples(trainer, pl_module)
        self.log_curves(trainer)
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

    # ------------------------------------------------------------ building
    def build_sets(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, ProbeSet]:
        dm = trainer.datamodule
        source = getattr(dm, "source", None)
        if source is None:
            log.warning("probes: the datamodule has no `source`; no probe sets")
            return {}
        backbone = pl_module.backbone
        records = probe_records(source, self.split, self.fallback_split, self.n_items)
        sets: dict[str, ProbeSet] = {}
        for group in self.groups:
            rows = probe_texts(source, records, group, self.seed)
            if rows:
                sets[group] = self._collate(group, backbone, source, records, rows)
        want_op = self.on_policy is True or (
            self.on_policy == "auto" and bool(getattr(dm, "needs_on_policy", False))
        )
        if want_op:
            saved = (self._restored or {}).get("on_policy")
            if saved:  # resumed: the stage-start samples, not fresh ones from the resumed policy
                where = {r.image_id: i for i, r in enumerate(records)}
                rows = [
                    (where[i], t) for i, t in zip(saved["image_ids"], saved["texts"]) if i in where
                ]
            else:
                rows = self._on_policy_rows(backbone, source, records)
            if rows:
                sets["on_policy"] = self._collate("on_policy", backbone, source, records, rows)
            else:
                log.info("probes: the policy produced no usable on-policy negatives")
        return sets

    def _collate(self, group, backbone, source, records, rows) -> ProbeSet:
        ps = ProbeSet(group, [records[i].image_id for i, _ in rows], [t for _, t in rows])
        images = {}
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            ims = []
            for i, _ in chunk:
                if i not in images:
                    images[i] = load_images(records[i])
                ims.append(images[i])
            ps.batches.append(
                backbone.collate(
                    ims, [_prompt(source, records[i]) for i, _ in chunk], [t for _, t in chunk]
                )
            )
        return ps

    def _on_policy_rows(self, backbone, source, records) -> list[tuple[int, str]]:
        """One sample per probe image from the stage-start policy, seeded and then frozen."""
        out: list[tuple[int, str]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for s in range(0, len(records), self.batch_size):
                chunk = records[s : s + self.batch_size]
                texts = backbone.generate(
                    [load_images(r) for r in chunk],
                    [_prompt(source, r) for r in chunk],
                    max_new_tokens=self.on_policy_max_new_tokens,
                    do_sample=True,
                    temperature=self.on_policy_temperature,
                )
                for j, (r, t) in enumerate(zip(chunk, texts)):
                    if t.strip() and not source.is_positive(t, r):
                        out.append((s + j, t))
        return out

    # ------------------------------------------------------------ measuring
    @torch.no_grad()
    def measure(self, backbone: Any, ps: ProbeSet) -> dict[str, torch.Tensor]:
        """ℓ̄ and log π per text, and next-token log-probs at every response position."""
        model = backbone.model
        was = model.training
        model.eval()
        ells, sums, dists = [], [], []
        try:
            for enc in ps.batches:
                enc = {k: v.to(backbone.device) for k, v in enc.items()}
                lp, logits, labels = backbone.logps_and_logits(enc)
                ells.append(lp.mean.float().cpu())
                sums.append(lp.sum.float().cpu())
                mask = labels != -100
                dists.append(torch.log_softmax(logits[mask].float(), -1).cpu())
        finally:
            model.train(was)
        return {"ell": torch.cat(ells), "sum": torch.cat(sums), "logp": torch.cat(dists)}

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> None:
        t0 = time.perf_counter()
        step = trainer.global_step
        rows, metrics = [], {}
        for group, ps in self.sets.items():
            m = self.measure(pl_module.backbone, ps)
            if group not in self.start:
                self._set_start(group, ps, m)
            rows.append(self.group_row(group, ps, m, step))
        self.last_probe_step = step
        dt = time.perf_counter() - t0
        self.probe_seconds += dt
        if self.t_start is not None and not final:
            self.periodic_seconds += dt
        for r in rows:
            r["seconds"] = round(dt, 4)
            for k, v in r.items():
                if k not in ("stage", "step", "run_step", "group", "n", "seconds"):
                    metrics[f"probe/{r['group']}/{k}"] = v
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

    def _set_start(self, group: str, ps: ProbeSet, m: dict[str, torch.Tensor]) -> None:
        index = support(m["logp"], self.dist_topk)
        self.start[group] = {
            "ell": m["ell"],
            "sum": m["sum"],
            "index": index,
            "dist": coarsen(m["logp"].exp(), index),
        }
        self._set_run_base(group, ps, m["ell"], m["sum"])

    def _set_run_base(
        self, group: str, ps: ProbeSet, ell: torch.Tensor, sums: torch.Tensor
    ) -> None:
        """The run-wide baseline: the first stage that probed these very texts (its start)."""
        state_path = self.out_dir / STATE_JSON
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        saved = state.get(group)
        if saved and saved.get("key") == ps.key:
            self.run_base[group] = {
                "ell": torch.tensor(saved["ell"]),
                "sum": torch.tensor(saved["sum"]),
            }
            return
        self.run_base[group] = {"ell": ell, "sum": sums}
        if not saved:
            state[group] = {
                "key": ps.key,
                "stage": self.stage,
                "ell": ell.tolist(),
                "sum": sums.tolist(),
            }
            if is_rank_zero():  # every rank measured the same; one writes
                atomic_write_text(state_path, json.dumps(state) + "\n")

    def _restore_starts(self) -> bool:
        """Resumed stage: take the checkpointed stage-start measurements of unchanged sets.
        True when every group is restored (then no extra probe is taken at the resume step)."""
        saved = (self._restored or {}).get("start") or {}
        for group, ps in self.sets.items():
            st = saved.get(group)
            if st and st.get("key") == ps.key:
                self.start[group] = {k: st[k] for k in ("ell", "sum", "index", "dist")}
                self._set_run_base(group, ps, st["ell"], st["sum"])
        return bool(self.sets) and all(g in self.start for g in self.sets)

    def group_row(
        self, group: str, ps: ProbeSet, m: dict[str, torch.Tensor], step: int
    ) -> dict[str, Any]:
        """One probes.csv row: stage-relative Δℓ̄ stats, run-relative ones, Σ and distributions."""
        st, base = self.start[group], self.run_base[group]
        row: dict[str, Any] = {
            "stage": self.stage,
            "step": step,
            "run_step": self.offset + step,
            "group": group,
            "n": len(ps),
            "ell": float(m["ell"].mean()),
        }
        row.update(group_stats(m["ell"] - st["ell"], self.quantiles))
        run = group_stats(m["ell"] - base["ell"], self.quantiles)
        row.update({f"run_{k}": v for k, v in run.items()})
        row["sum_mean"] = float((m["sum"] - st["sum"]).mean())
        row["run_sum_mean"] = float((m["sum"] - base["sum"]).mean())
        row.update(distribution_stats(m["logp"], st["dist"], st["index"]))
        return row

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
        """Check every rule after a probe. "stop" fires once; "refresh" whenever its condition
        holds (at most once per `cooldown` steps); "log" when its condition starts to hold."""
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
            last = self._last_fired.get(rule.name)
            if not holds or (rule.action == "stop" and last is not None):
                continue
            if rule.action == "log" and was_holding:
                continue
            if last is not None and step - last < max(rule.cooldown, 1):
                continue
            reason = (
                describe_firing(rule, steps, values)
                if here
                else f"{rule.name}: held on another rank at step {step}"
            )
            self._last_fired[rule.name] = step
            self.events.append(
                {
                    "stage": self.stage,
                    "step": step,
                    "rule": rule.name,
                    "action": rule.action,
                    "reason": reason,
                }
            )
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
                cb._refresh(trainer, pl_module)
                return
        dm = trainer.datamodule
        if hasattr(dm, "refresh_on_policy"):
            dm.refresh_on_policy(pl_module.backbone.generate, trainer.global_step)
        else:
            log.warning("probe rule asked for a refresh, but this stage has no on-policy negatives")

    def _write_events(self) -> None:
        if not is_rank_zero():  # every rank fires the same rules (apply_rules): one writes
            return
        path = self.out_dir / EVENTS_JSON
        events = json.loads(path.read_text()) if path.is_file() else []
        events = [e for e in events if e["stage"] != self.stage] + self.events
        atomic_write_text(path, json.dumps(events, indent=2) + "\n")

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed stage needs to continue the same curves (tensors and plain
        types only: loadable with `torch.load(weights_only=True)`)."""
        start = {
            g: {"key": self.sets[g].key, **{k: st[k] for k in ("ell", "sum", "index", "dist")}}
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

    @never_fatal("probe/delta_logp curves")
    def log_curves(self, trainer: L.Trainer) -> None:
        """W&B line series of the Δlogp curves: this stage, and the run so far."""
        from cwdpo.callbacks.wandb_logger import has_wandb, log_media

        if not has_wandb(trainer):
            return
        import wandb

        data = {}
        groups = list(self.sets)
        steps = sorted({r["step"] for r in self.trajectory})
        ys = [[float(self._at(g, s, "mean")) for s in steps] for g in groups]
        data["probe/delta_logp"] = wandb.plot.line_series(
            xs=steps,
            ys=ys,
            keys=groups,
            title=f"{self.stage}: Δℓ̄ from the stage start",
            xname=f"{self.stage}/step",
        )
        rows = _read_csv(self.out_dir / PROBES_CSV)
        run_steps = sorted({int(r["run_step"]) for r in rows})
        by = {(r["group"], int(r["run_step"])): float(r["run_mean"]) for r in rows}
        run_groups = list(dict.fromkeys(r["group"] for r in rows))
        ys = [[by.get((g, s), float("nan")) for s in run_steps] for g in run_groups]
        log_media(
            trainer,
            {
                "run/probe/delta_logp": wandb.plot.line_series(
                    xs=run_steps,
                    ys=ys,
                    keys=run_groups,
                    title="Δℓ̄ from the run start (all stages)",
                    xname="run step",
                )
            },
            trainer.global_step,
            prefix=False,
        )
        log_media(trainer, data, trainer.global_step)

    def _at(self, group: str, step: int, column: str) -> float:
        for r in self.trajectory:
            if r["group"] == group and r["step"] == step:
                return r[column]
        return float("nan")

    @never_fatal("samples/captions")
    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A few greedy captions of probe images: `<run>/samples/<stage>.json` + a W&B table."""
        if self.n_samples <= 0:
            return
        source = getattr(trainer.datamodule, "source", None)
        if source is None:
            return
        recs = probe_records(source, self.split, self.fallback_split, self.n_samples)
        images = [load_images(r) for r in recs]
        outs = pl_module.backbone.generate(
            images, [_prompt(source, r) for r in recs], max_new_tokens=self.sample_max_new_tokens
        )
        rows = []
        for r, o in zip(recs, outs):
            score = source.score(o, r)
            rows.append(
                {
                    "image_id": r.image_id,
                    "reference": r.references[0],
                    "generated": o,
                    "score": score,
                    "positive": bool(source.is_positive(o, r)),
                }
            )
        if (
            not is_rank_zero()
        ):  # all ranks generate (FSDP needs every rank in a forward); one writes
            return
        d = self.out_dir / "samples"
        d.mkdir(exist_ok=True)
        atomic_write_text(d / f"{self.stage}.json", json.dumps(rows, indent=2) + "\n")
        from cwdpo.callbacks.wandb_logger import has_wandb, log_media

        if has_wandb(trainer):
            import wandb

            table = wandb.Table(columns=["image", "image_id", "reference", "generated", "score"])
            for im, row in zip(images, rows):
                table.add_data(
                    wandb.Image(im),
                    row["image_id"],
                    row["reference"],
                    row["generated"],
                    row["score"],
                )
            log_media(trainer, {"samples/captions": table}, trainer.global_step)


def _numeric(row: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k in ("step", "run_step", "n") else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def probe_summary(trainer: L.Trainer) -> dict[str, Any]:
    """The probe callback's summary for results.json ({} when no probe callback ran)."""
    for cb in trainer.callbacks:
        if isinstance(cb, DeltaLogpProbe):
            return cb.summary()
    return {}


__all__ = [
    "GROUPS",
    "DeltaLogpProbe",
    "ProbeRule",
    "ProbeSet",
    "StageAware",
    "append_csv",
    "describe_firing",
    "parse_rules",
    "probe_records",
    "probe_summary",
    "probe_texts",
    "quantile_key",
    "read_stages",
    "record_stage",
    "rule_fires",
    "stage_offset",
]
