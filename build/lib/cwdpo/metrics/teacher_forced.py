"""Teacher-forced diagnostics on held-out gold captions: content-token calibration and
per-example likelihood displacement.

Why content tokens on one deterministic template: the old token ECE was teacher-forced on
`references[0]` (any template, scene order), so most tokens were template words ("a", "on",
"the") the model predicts with certainty; the facts live in the colour / shape / size /
position / number words. Signed calibration error = mean confidence − accuracy (> 0:
overconfident), which ECE's absolute value hides.

Likelihood displacement (Razin et al. 2024, "Unintentional Unalignment"): DPO can lower the
log-probability of the chosen response too. We report the share of held-out gold captions whose
log π_θ falls below log π_ref, and where the mass went: the mean change on the gold caption, on
a one-fact edit of it and on the policy's own greedy caption.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cwdpo.data import shapes as S
from cwdpo.data.records import CaptionRecord, load_images, record_prompt
from cwdpo.data.verifier import minimal_negative
from cwdpo.utils.modes import eval_mode

if TYPE_CHECKING:
    from cwdpo.model.backbone import VLMBackbone

CONTENT_WORDS = (
    frozenset(S.COLOURS) | set(S.SHAPES) | set(S.SIZES) | set(S.POSITIONS) | set(S.NUMBERS)
)
DISPLACEMENT_TOL = 1e-4  # nats: a "fall" is a drop beyond float noise


def teacher_forced_batches(
    backbone: VLMBackbone,
    records: Sequence[CaptionRecord],
    prompt: str,
    texts: Sequence[str],
    batch_size: int = 64,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated (image, prompt, text) batches on the backbone's device, with the model in eval
    mode while they are consumed (restored after): the teacher-forced metrics' one loop."""
    with eval_mode(backbone.model):
        for s in range(0, len(records), batch_size):
            chunk = records[s : s + batch_size]
            enc = backbone.collate(
                [load_images(r) for r in chunk],
                [record_prompt(r, prompt) for r in chunk],
                list(texts[s : s + batch_size]),
            )
            yield {k: v.to(backbone.device) for k, v in enc.items()}


def gold_texts(records: Sequence[Any]) -> list[str]:
    """The deterministic-template (template 0) gold caption of each ShapesWorld record."""
    return [S.caption(r.meta["scene"], 0) for r in records]


def content_token_mask(
    labels: torch.Tensor, tokenizer: Any, words: frozenset[str] = CONTENT_WORDS
) -> torch.Tensor:
    """True where the label token, decoded alone and stripped, is a content word."""
    ids = labels[labels >= 0].unique().tolist()
    keep = {i for i in ids if tokenizer.decode([i]).strip().lower() in words}
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for i in keep:
        mask |= labels == i
    return mask


@torch.no_grad()
def content_calibration(
    backbone: Any, records: Sequence[Any], prompt: str, texts: Sequence[str], batch_size: int = 64
) -> dict[str, float]:
    """`calib/content_ece`, `calib/content_sce` (signed), accuracy and confidence on content tokens."""
    from cwdpo.metrics.calibration import TokenCalibration

    metric = TokenCalibration()
    for enc in teacher_forced_batches(backbone, records, prompt, texts, batch_size):
        _, logits, labels = backbone.logps_and_logits(enc)
        labels = labels.cpu()
        labels = labels.masked_fill(~content_token_mask(labels, backbone.tokenizer), -100)
        metric.update(logits.float().cpu(), labels)
    c = metric.compute()
    return {
        "calib/content_ece": c["ece"],
        "calib/content_sce": c["mean_top1_prob"] - c["accuracy"],
        "calib/content_accuracy": c["accuracy"],
        "calib/content_confidence": c["mean_top1_prob"],
        "calib/content_tokens": float(c["n_tokens"]),
    }


def displacement_stats(
    policy: torch.Tensor, reference: torch.Tensor, tol: float = DISPLACEMENT_TOL
) -> dict[str, float]:
    """Share (percent) of examples with log π_θ < log π_ref − tol, and the mean change (nats)."""
    d = policy.double() - reference.double()
    return {"fell": 100.0 * float((d < -tol).double().mean()), "delta": float(d.mean())}


@torch.no_grad()
def _seq_logps(
    backbone: Any,
    records: Sequence[Any],
    prompt: str,
    texts: Sequence[str],
    reference: bool,
    batch_size: int,
) -> torch.Tensor:
    return torch.cat(
        [
            backbone.logps(enc, reference=reference).sum.float().cpu()
            for enc in teacher_forced_batches(backbone, records, prompt, texts, batch_size)
        ]
    )


@torch.no_grad()
def likelihood_displacement(
    backbone: Any, records: Sequence[Any], prompt: str, outputs: Sequence[str], batch_size: int = 64
) -> dict[str, float]:
    """`disp/chosen_fell` (% of gold captions whose log-prob fell vs π_ref) and the mean Δ log-prob
    of the gold caption, a one-fact edit of it and the policy's greedy output."""
    gold = gold_texts(records)
    edits = []
    for i, (g, r) in enumerate(zip(gold, records)):
        e = minimal_negative(g, r.meta["scene"], random.Random(i))
        edits.append(e[0] if e else g)
    res: dict[str, float] = {}
    for name, texts in (
        ("chosen", gold),
        ("rejected", edits),
        ("output", [o or "." for o in outputs]),
    ):
        st = displacement_stats(
            _seq_logps(backbone, records, prompt, texts, False, batch_size),
            _seq_logps(backbone, records, prompt, texts, True, batch_size),
        )
        res[f"disp/{name}_delta"] = st["delta"]
        if name == "chosen":
            res["disp/chosen_fell"] = st["fell"]
    return res
