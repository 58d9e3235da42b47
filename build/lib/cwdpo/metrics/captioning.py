"""COCO-style caption metrics (CIDEr-D, BLEU-1..4, METEOR, ROUGE-L) as a ``torchmetrics.Metric``.

Why a Metric that stores *strings*: CIDEr's IDF and BLEU's brevity penalty are corpus-level
statistics, so per-rank scores cannot be averaged under DDP. The captions are therefore kept as
UTF-8 bytes in ``uint8`` list states with ``dist_reduce_fx="cat"``; torchmetrics' sync gathers
them from every rank and :meth:`CaptionMetrics.compute` decodes and scores the whole corpus with
pycocoevalcap's own scorers, exactly as ``COCOEvalCap`` does (PTB tokenization, then each scorer's
``compute_score``).

Scale: every score is multiplied by 100, as on the COCO leaderboard and in papers ("CIDEr 142.6",
"BLEU-4 41.2"), not pycocoevalcap's raw 0..1 (0..10 for CIDEr) numbers.

Tokenization: the Stanford PTB tokenizer shipped with pycocoevalcap (Java). Without Java, a
pure-Python approximation (:func:`python_ptb_tokenize`) is used and METEOR (a Java program) is
reported as NaN; :attr:`CaptionMetrics.last_info` says which tokenizer ran and why METEOR is
missing, so numbers from the two paths are never silently mixed.

The pieces live apart (`caption_tokenizer`, `coco_scorers`: scorers and the shared METEOR JVM,
`string_codec`: strings as tensors) and are re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from cwdpo.metrics.caption_tokenizer import (
    TokenizerName,
    java_available,
    ptb_tokenize,
    python_ptb_tokenize,
    resolve_tokenizer,
    tokenize_captions,
)
from cwdpo.metrics.coco_scorers import close_shared_meteor, coco_caption_scores, shared_meteor
from cwdpo.metrics.string_codec import decode_nested, decode_strings, encode_nested, encode_strings

__all__ = [
    "METRIC_NAMES",
    "CaptionMetrics",
    "TokenizerName",
    "close_shared_meteor",
    "coco_caption_scores",
    "decode_nested",
    "decode_strings",
    "encode_nested",
    "encode_strings",
    "java_available",
    "ptb_tokenize",
    "python_ptb_tokenize",
    "resolve_tokenizer",
    "shared_meteor",
    "tokenize_captions",
]

METRIC_NAMES: tuple[str, ...] = (
    "cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l",
)  # fmt: skip
SCALE = 100.0


class CaptionMetrics(Metric):
    """Corpus-level COCO caption metrics, DDP-safe, with optional per-group breakdown.

    Args:
        tokenizer: ``"auto"`` (PTB if Java is available, else the Python fallback), ``"ptb"`` or
            ``"python"``.
        meteor: compute METEOR (needs Java, ~20 s JVM start-up once per process; the JVM is started
            in ``__init__`` so it warms up while you train). ``False`` reports NaN.

    ``update(predictions, references, groups=None)`` takes one prediction and >= 1 reference per
    item and an optional group label per item (e.g. NoCaps ``in-domain``/``near-domain``/
    ``out-domain``). ``compute()`` returns ``{"cider", "bleu_1".."bleu_4", "meteor", "rouge_l"}``
    over all items, ×100 (COCO-leaderboard scale), plus ``"{metric}/{group}"`` for every group,
    each scored on that subset alone (CIDEr's IDF comes from the subset, like NoCaps' per-domain
    evaluation). Information about how the numbers were made (tokenizer, METEOR status, item
    counts) is stored in :attr:`last_info` after each ``compute()`` so the return value stays a
    flat ``dict[str, float]`` for ``log_dict``.

    Scoring runs Java programs, so call ``update`` per batch and ``compute`` once per epoch;
    ``forward`` (``metric(...)``) therefore only updates and returns None. Under DDP every rank
    gathers all strings and computes the same result. With a ``DistributedSampler`` that pads the
    last batch, the padded duplicates are scored too (as with any gathered metric).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STRING_STATES = ("pred_bytes", "ref_bytes", "group_bytes")

    def __init__(self, tokenizer: str = "auto", meteor: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tokenizer not in ("auto", "ptb", "python"):
            raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.meteor = meteor
        self.last_info: dict[str, Any] = {}
        for name in self._STRING_STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        if meteor and java_available():
            with contextlib.suppress(OSError):  # a failure is reported at compute time
                shared_meteor()  # non-blocking: only spawns the JVM

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str] | str],
        groups: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: ``predictions[i]`` is scored against ``references[i]`` (group ``groups[i]``)."""
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings, not a single string")
        if len(predictions) != len(references):
            raise ValueError(
                f"got {len(predictions)} predictions but {len(references)} reference lists"
            )
        if groups is not None and len(groups) != len(predictions):
            raise ValueError(f"got {len(groups)} groups for {len(predictions)} predictions")
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        for i, r in enumerate(refs):
            if not r or not all(isinstance(x, str) for x in r):
                raise ValueError(f"item {i}: references must be a non-empty list of strings")
        if not predictions:
            return
        self.pred_bytes.append(encode_strings([str(p) for p in predictions], self.device))
        self.ref_bytes.append(encode_nested(refs, self.device))
        grp = [""] * len(predictions) if groups is None else [str(g) for g in groups]
        self.group_bytes.append(encode_strings(grp, self.device))

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate only; per-batch caption scores would start a JVM every step."""
        self.update(*args, **kwargs)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        # torchmetrics replaces an empty list state by an empty *float* tensor before gathering;
        # a rank without data would then send float32 while the others send uint8. Use uint8.
        for name in self._STRING_STATES:
            if not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=torch.uint8, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _decoded(self) -> tuple[list[str], list[list[str]], list[str]]:
        def flat(state: list[Tensor] | Tensor) -> Tensor:
            if isinstance(state, list):
                if not state:
                    return torch.zeros(0, dtype=torch.uint8)
                state = dim_zero_cat([s.to(torch.uint8) for s in state])
            return state

        preds = decode_strings(flat(self.pred_bytes))
        refs = decode_nested(flat(self.ref_bytes))
        groups = decode_strings(flat(self.group_bytes))
        if not (len(preds) == len(refs) == len(groups)):
            raise RuntimeError(
                f"corrupt CaptionMetrics state: {len(preds)} predictions, {len(refs)} reference "
                f"lists, {len(groups)} groups"
            )
        return preds, refs, groups

    def _meteor_scorer(self) -> tuple[Any, str]:
        """(the shared METEOR scorer or None, why not) for this compute: disabled, no Java, or
        a JVM that would not start all become NaN METEOR, never a failed evaluation."""
        if not self.meteor:
            return None, "disabled (meteor=False)"
        if not java_available():
            return None, "unavailable: METEOR is a Java program and `java` is not on PATH"
        try:
            return shared_meteor(), "ok"
        except OSError as err:
            return None, f"unavailable: could not start METEOR ({err})"

    def compute(self) -> dict[str, float]:
        """Score everything seen so far (all ranks); see the class docstring for keys and scale."""
        preds, refs, groups = self._decoded()
        if not preds:
            raise ValueError(
                "CaptionMetrics.compute() has no data: call update(predictions, references) first"
            )
        flat_refs = [r for rs in refs for r in rs]
        tokens, tok_name = tokenize_captions(preds + flat_refs, self.tokenizer)
        res = {i: [tokens[i]] for i in range(len(preds))}
        gts: dict[int, list[str]] = {}
        pos = len(preds)
        for i, rs in enumerate(refs):
            gts[i] = tokens[pos : pos + len(rs)]
            pos += len(rs)

        meteor_scorer, meteor_status = self._meteor_scorer()

        def score(ids: list[int]) -> dict[str, float]:
            nonlocal meteor_scorer, meteor_status
            sub_gts = {i: gts[i] for i in ids}
            sub_res = {i: res[i] for i in ids}
            try:
                out = coco_caption_scores(sub_gts, sub_res, meteor_scorer)
            except (OSError, ValueError) as err:
                if meteor_scorer is None:
                    raise
                close_shared_meteor()  # broken JVM: drop it, report NaN, keep the other metrics
                meteor_scorer, meteor_status = None, f"failed: {type(err).__name__}: {err}"
                out = coco_caption_scores(sub_gts, sub_res, None)
            return {k: v * SCALE for k, v in out.items()}

        result = score(list(range(len(preds))))
        group_names = sorted({g for g in groups if g})
        group_sizes: dict[str, int] = {}
        for g in group_names:
            ids = [i for i, gi in enumerate(groups) if gi == g]
            group_sizes[g] = len(ids)
            result.update({f"{k}/{g}": v for k, v in score(ids).items()})
        self.last_info = {
            "tokenizer": tok_name,
            "meteor": meteor_status,
            "scale": SCALE,
            "n_items": len(preds),
            "n_references": len(flat_refs),
            "groups": group_sizes,
        }
        return result
