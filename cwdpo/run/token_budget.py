"""Every row's token budget, checked when the data is read, before any `trainer.fit` (issue 24).

Why: an over-long prompt, an image placeholder in the prompt text or an image the family's
processor refuses used to surface at collate time, mid-training (stage 1 finished, stage 2 died
on its first batch) as "batch row 0" or a raw transformers error; responses that did not fit
were cut silently. Here every row of every stage (base SFT, SFT-C, CW-DPO), of validation and of
the end-of-stage evaluation is measured with the family's own processor (cwdpo.model.budget:
image sizes from the file headers, counts cached per (sizes, prompt)):

- `model.max_length` above the model's position limit → `ConfigError` (one line).
- an image placeholder in the prompt, an image the processor refuses, a prompt that leaves no
  room for a response → `DataError` naming file, row, image and the numbers, or with
  `data.skip_unfit_rows=true` the row is skipped and counted (`skipped_*`).
- prompt + the longest response the stage can train on > max_length → `model.truncation`:
  error (default: `DataError` as above), warn (the row trains cut: counted `cut_over_length`),
  drop_pair (the row is dropped: counted `dropped_over_length`).

The longest response of a row: its references, its own `rejected` (TRL pairs), for stages that
draw dataset negatives from other rows the longest reference of the stage's rows (an easy
negative is another image's caption), for on-policy negatives `negatives.max_new_tokens` + the
turn end. A synthesized hard negative (a one-word edit) can still be longer by a token or two;
collate handles it by the same policy (cwdpo.model.truncation), counted per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from omegaconf import DictConfig

from cwdpo.data.records import record_images, record_prompt
from cwdpo.errors import DataError
from cwdpo.model.budget import TokenCounter, position_limit
from cwdpo.run.config_schema import ConfigError

log = logging.getLogger(__name__)

SKIP_REASONS = ("placeholder", "image_refused", "long_prompt")
Candidate = tuple[str, int]  # (what the response is, its tokens)


def check_position_limit(backbone: Any) -> None:
    """`model.max_length` within the positions the language model was built for (beyond them
    RoPE extrapolates: the run trains, with only a tokenizer warning, on garbage positions)."""
    limit = position_limit(backbone.model)
    if limit is not None and backbone.max_length > limit:
        raise ConfigError(
            f"model.max_length={backbone.max_length} is above the model's position limit "
            f"{limit} (max_position_embeddings of its text config): set model.max_length<={limit}"
        )


def row_name(source: Any, rec: Any) -> str:
    """File and row of a record, as its reader names them."""
    meta = rec.meta if isinstance(getattr(rec, "meta", None), dict) else {}
    if "file" in meta and "row" in meta:
        return f"{meta['file']}: row {meta['row']} ({rec.image_id})"
    where = getattr(source, "annotations", None) or getattr(source, "path", None)
    imgid = f" (imgid={meta['imgid']})" if meta.get("imgid") is not None else ""
    head = f"{where}: " if where else f"{type(source).__name__} split {rec.split!r}: "
    return f"{head}image {rec.image_id}{imgid}"


def image_sizes(records: list[Any], workers: int = 8) -> dict[int, tuple]:
    """{id(record): (w, h) of each of its images}, from file headers (a bounded thread pool)."""
    uniq = list({id(r): r for r in records}.values())

    def sizes(r: Any) -> tuple:
        return tuple(ref.size() for ref in record_images(r))

    if len(uniq) < 64:
        return {id(r): sizes(r) for r in uniq}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cwdpo-sizes") as pool:
        return {id(r): s for r, s in zip(uniq, pool.map(sizes, uniq))}


class BudgetCheck:
    """The measurements of one run, shared by its row groups (a record is measured once)."""

    def __init__(self, backbone: Any, source: Any, skip: bool, sizes: dict[int, tuple]) -> None:
        self.counter = TokenCounter(backbone)
        self.max_length, self.policy = backbone.max_length, backbone.truncation
        self.source, self.skip, self.sizes = source, skip, sizes
        self.model_type = backbone.model_type

    def unfit(self, rec: Any) -> tuple[str, str, int] | None:
        """(reason, message, prompt tokens) when the row cannot train at all, else None."""
        prompt = record_prompt(rec, self.source.prompt)
        where, sizes = row_name(self.source, rec), self.sizes[id(rec)]
        images = ", ".join(str(r.path or r.name or "<bytes>") for r in record_images(rec))
        hit = self.counter.placeholder_in(prompt)
        if hit is not None:
            return (
                "placeholder",
                (
                    f"{where}: the prompt {prompt[:80]!r} contains {hit!r}, an image placeholder of "
                    f"{self.model_type}'s processor: cwdpo places the row's image(s) itself (write "
                    "`<image k>` to put image k inside the text); remove it"
                ),
                0,
            )
        n = self.counter.prompt(sizes, prompt)
        if isinstance(n, str):
            return (
                "image_refused",
                (
                    f"{where}: image {images} ({' / '.join(f'{w}×{h}' for w, h in sizes)}) is "
                    f"refused by the {self.model_type} processor: {n}"
                ),
                0,
            )
        if n >= self.max_length:
            return (
                "long_prompt",
                (
                    f"{where}: the prompt has {n} tokens (image tokens included; image {images}, "
                    f"{' / '.join(f'{w}×{h}' for w, h in sizes)}), model.max_length={self.max_length}"
                    " leaves no room for a response: raise model.max_length"
                ),
                n,
            )
        return None

    def group(
        self, name: str, rows: list[Any], extra: Callable[[Any], list[Candidate]]
    ) -> tuple[list[Any], dict[str, int]]:
        """`rows` that can train, and the counts: unfit rows are an error or (skip) skipped;
        over-long ones follow model.truncation. `extra(rec)`: its negatives beside references."""
        counts = {f"skipped_{r}": 0 for r in SKIP_REASONS} | {"rows": len(rows)}
        counts |= {"cut_over_length": 0, "dropped_over_length": 0, "max_row_tokens": 0}
        keep, errors = [], []
        self.counter.responses([t for r in rows for t in r.references])  # one batched call
        for rec in rows:
            bad = self.unfit(rec)
            if bad is not None:
                counts[f"skipped_{bad[0]}"] += 1
                errors.append((True, bad[1]))
                continue
            p = int(
                self.counter.prompt(self.sizes[id(rec)], record_prompt(rec, self.source.prompt))
            )
            refs = self.counter.responses(rec.references)
            cands = [(f"reference {k}", n) for k, n in enumerate(refs)] + extra(rec)
            what, r = max(cands, key=lambda c: c[1])
            counts["max_row_tokens"] = max(counts["max_row_tokens"], p + r)
            if p + r > self.max_length:
                msg = (
                    f"{row_name(self.source, rec)}: prompt {p} + {what} {r} tokens (turn end "
                    f"included) = {p + r} > model.max_length={self.max_length}"
                )
                if self.policy == "error":
                    errors.append(
                        (False, f"{msg}; raise model.max_length, or set model.truncation=warn "
                         "(cut, counted) or drop_pair (dropped, counted)")
                    )  # fmt: skip
                    continue
                if self.policy == "warn" and self.cut_pair_identical(rec, self.max_length - p):
                    errors.append(
                        (
                            False,
                            f"{msg}: model.truncation=warn would cut chosen and "
                            "rejected to identical label rows; raise model.max_length",
                        )
                    )
                    continue  # fmt: skip
                counts["cut_over_length" if self.policy == "warn" else "dropped_over_length"] += 1
                if self.policy == "drop_pair":
                    continue
            keep.append(rec)
        self._report(name, errors, counts)
        return keep, counts

    def cut_pair_identical(self, rec: Any, room: int) -> bool:
        """Would a cut to `room` tokens make a reference and the row's own rejected identical
        (collate refuses such a pair mid-training, so it is refused here)?"""
        if "rejected" not in rec.meta:
            return False
        ids = self.counter.backbone.response_ids
        rej = ids(rec.meta["rejected"])[:room]
        return any(ids(t)[:room] == rej for t in rec.references)

    def _report(self, name: str, errors: list[tuple[bool, str]], counts: dict[str, int]) -> None:
        """Raise for the first error (skippable ones only without data.skip_unfit_rows), else
        log what was skipped, cut or dropped."""
        hard = [e for skippable, e in errors if not skippable]
        if hard or (errors and not self.skip):
            first = (hard or [e for _, e in errors])[0]
            more = f" (and {len(errors) - 1} more row(s) of {name})" if len(errors) > 1 else ""
            hint = (
                "" if hard else "; or set data.skip_unfit_rows=true to skip (and count) such rows"
            )
            raise DataError(f"token budget of {name}: {first}{more}{hint}")
        skipped = {
            k: v for k, v in counts.items() if k.startswith(("skipped_", "cut_", "dropped_")) and v
        }
        if skipped:
            log.warning("token budget of %s: %s of %d rows", name, skipped, counts["rows"])
        log.info(
            "token budget of %s: %d rows, the longest %d tokens of model.max_length=%d",
            name, counts["rows"], counts["max_row_tokens"], self.max_length,
        )  # fmt: skip


def stage_candidates(name: str, cfg: DictConfig, check: BudgetCheck, pool: list[Any]):
    """`extra(rec)` of stage `name`: the negatives it can pair a row with (module docstring)."""
    neg = cfg.get("negatives") or {}
    pairs = name == "cw_dpo" or bool(cfg.stage[name].datamodule.get("gentle_negatives", False))
    dataset = pairs and (name != "cw_dpo" or float(neg.get("dataset_fraction", 1.0)) > 0)
    on_policy = name == "cw_dpo" and (
        float(neg.get("dataset_fraction", 1.0)) < 1.0 or neg.get("kind") == "self_judged"
    )
    longest: Candidate | None = None
    check.counter.responses([r.meta["rejected"] for r in pool if "rejected" in r.meta])
    if dataset and not any("rejected" in r.meta for r in pool):
        texts = [t for r in pool for t in r.references]
        n = max(check.counter.responses(texts), default=0)
        longest = ("the longest dataset negative (another row's reference)", n)

    def extra(rec: Any) -> list[Candidate]:
        out: list[Candidate] = []
        if dataset and "rejected" in rec.meta:
            out.append(("rejected", check.counter.responses([rec.meta["rejected"]])[0]))
        if longest is not None:
            out.append(longest)
        if on_policy:
            n = int(neg.get("max_new_tokens", 0)) + 1
            out.append((f"an on-policy sample (negatives.max_new_tokens={n - 1} + turn end)", n))
        return out

    return extra


def check_token_budgets(
    cfg: DictConfig, backbone: Any, source: Any, records: dict[str, list], test: list, run: list
) -> tuple[dict[str, list], list, dict[str, dict[str, int]]]:
    """(records, test) minus the rows that cannot train (skipped / dropped, counted), and the
    counts per group (each stage of `run`, `val`, `eval`); raises before any training."""
    check_position_limit(backbone)
    skip = bool(cfg.data.get("skip_unfit_rows", False))
    every = [r for key in {*run, "val"} for r in records[key]] + list(test)
    check = BudgetCheck(backbone, source, skip, image_sizes(every))
    out, report = dict(records), {}
    for name in run:
        extra = stage_candidates(name, cfg, check, records[name])
        out[name], report[name] = check.group(f"stage {name}", records[name], extra)
        if not out[name]:
            raise DataError(f"stage {name} has no rows left after the token budget: {report[name]}")
    val_extra = [stage_candidates(n, cfg, check, records[n]) for n in run]
    out["val"], report["val"] = check.group(
        "validation", records["val"], lambda r: [c for f in val_extra for c in f(r)]
    )
    test, report["eval"] = check.group("evaluation", test, lambda r: [])
    return out, test, report
