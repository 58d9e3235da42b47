"""End-of-stage evaluation: generate captions, score them, compare with the stage's start.

Kept outside Lightning so `cwdpo.eval` and the training pipeline share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cwdpo.analysis.caption_winrate import win_rate
from cwdpo.data.records import CaptionRecord, load_images, record_images
from cwdpo.data.sources import CaptionSource
from cwdpo.metrics.generation import generate_captions
from cwdpo.metrics.teacher_forced import teacher_forced_batches
from cwdpo.model.backbone import VLMBackbone
from cwdpo.utils.modes import eval_mode


@torch.no_grad()
def teacher_forced_calibration(
    backbone: VLMBackbone, records: Sequence[CaptionRecord], prompt: str, batch_size: int = 64
) -> dict[str, float]:
    """Token-level ECE / entropy / top-1 prob on the first reference of each held-out image."""
    from cwdpo.metrics.calibration import TokenCalibration

    metric = TokenCalibration()
    for enc in teacher_forced_batches(
        backbone, records, prompt, [r.references[0] for r in records], batch_size
    ):
        _, logits, labels = backbone.logps_and_logits(enc)
        metric.update(logits.float().cpu(), labels.cpu())
    return {k: float(v) for k, v in metric.compute().items()}


def evaluate_captioning(
    backbone: VLMBackbone,
    source: CaptionSource,
    records: Sequence[CaptionRecord],
    baseline: Sequence[str] | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    calibration: bool = True,
    caption_metrics: bool = True,
    meteor: bool = True,
    judge: Any = None,
) -> tuple[dict[str, Any], list[str]]:
    """Metrics for one model state, plus its outputs (the next stage's win-rate baseline)."""
    outputs = generate_captions(backbone, records, source.prompt, batch_size, max_new_tokens)
    res: dict[str, Any] = {}
    scores = [source.score(o, r) for o, r in zip(outputs, records)]
    if all(s is not None for s in scores):
        res["fact_accuracy"] = 100.0 * sum(scores) / len(scores)
        res["exact"] = (
            100.0 * sum(source.is_positive(o, r) for o, r in zip(outputs, records)) / len(records)
        )
    if caption_metrics:
        from cwdpo.metrics.captioning import CaptionMetrics

        m = CaptionMetrics(meteor=meteor)
        groups = [r.meta.get("domain") for r in records]
        m.update(
            outputs,
            [r.references for r in records],
            groups=groups if all(g is not None for g in groups) else None,
        )
        res.update({k: float(v) for k, v in m.compute().items()})
    if calibration:
        res.update(
            {
                f"calib/{k}": v
                for k, v in teacher_forced_calibration(
                    backbone, records, source.prompt, batch_size
                ).items()
            }
        )
    if records and all("scene" in r.meta for r in records):  # ShapesWorld: ground-truth metrics
        res.update(scene_metrics(backbone, source, records, outputs, batch_size, calibration))
    if baseline is not None:
        res.update(win_rate(source, records, outputs, baseline, judge))
    res["samples"] = [
        {"image_id": r.image_id, "output": o, "reference": r.references[0]}
        for r, o in list(zip(records, outputs))[:8]
    ]
    return res, outputs


def scene_metrics(
    backbone: VLMBackbone,
    source: CaptionSource,
    records: Sequence[CaptionRecord],
    outputs: Sequence[str],
    batch_size: int = 64,
    calibration: bool = True,
) -> dict[str, Any]:
    """CHAIR, POPE-style probe, attribute F1, malformed rate, length (cwdpo.metrics.hallucination);
    content-token calibration and, once π_ref exists, likelihood displacement (.teacher_forced)."""
    from cwdpo.metrics.hallucination import caption_metrics, pope
    from cwdpo.metrics.teacher_forced import (
        content_calibration,
        gold_texts,
        likelihood_displacement,
    )

    scenes = [r.meta["scene"] for r in records]
    cooc = getattr(source, "cooc", None)
    res: dict[str, Any] = {
        **caption_metrics(outputs, scenes, cooc),
        **pope(outputs, scenes, 0, cooc),
    }
    if calibration:
        res.update(
            content_calibration(backbone, records, source.prompt, gold_texts(records), batch_size)
        )
    if backbone.has_reference:
        res.update(likelihood_displacement(backbone, records, source.prompt, outputs, batch_size))
    return res


def mc_prompt(q: Any) -> str:
    """MMBench/MMMU-style prompt: hint, question, lettered options, answer-with-letter.

    MMMU's `<image k>` placeholders (k = the image_k column) are renumbered to the position of
    that image among the question's images, which `VLMBackbone` then puts where they stand."""
    parts = [q.hint] if q.hint else []
    parts.append(q.question)
    parts += [f"{k}. {v}" for k, v in sorted(q.options.items())]
    parts.append("Answer with the option's letter from the given choices directly.")
    text = "\n".join(parts)
    numbers = q.meta.get("image_numbers")
    if numbers:
        from cwdpo.data.multiple_choice import IMAGE_PLACEHOLDER
        from cwdpo.errors import DataError

        def pos(m: Any) -> str:
            k = int(m.group(1))
            if k not in numbers:
                raise DataError(
                    f"question {q.qid}: <image {k}> refers to an image it does not have"
                )
            return f"<image {numbers.index(k) + 1}>"

        text = IMAGE_PLACEHOLDER.sub(pos, text)
    return text


@torch.no_grad()
def predict_multiple_choice(
    backbone: VLMBackbone, questions: Sequence[Any], scoring: str = "letter", batch_size: int = 32
) -> list[str]:
    """Pick the option with the highest log-likelihood: of its letter, or (scoring="text") of
    its text's average token log-prob — one teacher-forced forward per (question, option)."""
    from cwdpo.errors import DataError

    if scoring not in ("letter", "text"):
        raise ValueError(f"scoring must be 'letter' or 'text', got {scoring!r}")
    rows: list[tuple[int, str, Any, str, str]] = []
    for i, q in enumerate(questions):
        if not record_images(q):
            raise DataError(f"question {q.qid}: no image (multiple-choice evaluation needs one)")
        for letter, text in sorted(q.options.items()):
            rows.append((i, letter, q, mc_prompt(q), letter if scoring == "letter" else text))
    scores: list[float] = []
    with eval_mode(backbone.model):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            enc = backbone.collate(
                [load_images(r[2]) for r in chunk], [r[3] for r in chunk], [r[4] for r in chunk]
            )
            enc = {k: v.to(backbone.device) for k, v in enc.items()}
            lp = backbone.logps(enc)
            # letter: the letter token(s) only, without each row's appended end-of-turn token
            last = lp.mask & (lp.mask.cumsum(-1) == lp.count[:, None])
            vals = (lp.token * (lp.mask & ~last)).sum(-1) if scoring == "letter" else lp.mean
            scores += vals.float().cpu().tolist()
    best: dict[int, tuple[float, str]] = {}
    for (i, letter, *_), sc in zip(rows, scores):
        if i not in best or sc > best[i][0]:
            best[i] = (sc, letter)
    return [best[i][1] for i in range(len(questions))]


def evaluate_multiple_choice(
    backbone: VLMBackbone,
    questions: Sequence[Any],
    circular: bool = False,
    scoring: str = "letter",
    batch_size: int = 32,
) -> dict[str, float]:
    from cwdpo.data.multiple_choice import circular_variants
    from cwdpo.metrics.multiple_choice import MultipleChoiceAccuracy

    qs = [v for q in questions for v in circular_variants(q)] if circular else list(questions)
    groups = [q.meta.get("circular_group", q.qid) if circular else q.qid for q in qs]
    preds = predict_multiple_choice(backbone, qs, scoring, batch_size)
    m = MultipleChoiceAccuracy()
    m.update(preds, [q.answer for q in qs], [q.category for q in qs], [str(g) for g in groups])
    return m.compute()


@torch.no_grad()
def preference_calibration(
    backbone: VLMBackbone, dm: Any, beta: float, max_batches: int = 8
) -> dict[str, float]:
    """Preference-level ECE on held-out pairs: p = σ(β·margin) vs "chosen is preferred"."""
    from cwdpo.metrics.calibration import PreferenceCalibration

    loader = dm.val_dataloader()
    if not loader:
        return {}
    metric = PreferenceCalibration()
    with eval_mode(backbone.model), dm.evaluating():
        for b, raw in enumerate(loader):
            if b >= max_batches:
                break
            batch = dm.on_before_batch_transfer(raw, 0)
            enc = {k: v.to(backbone.device) for k, v in batch.inputs.items()}
            n = batch.n
            pol = backbone.logps(enc).sum
            ref = backbone.logps(enc, reference=True).sum
            margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
            metric.update(margin.float().cpu(), beta)
    return {f"pref_calib/{k}": float(v) for k, v in metric.compute().items()}
