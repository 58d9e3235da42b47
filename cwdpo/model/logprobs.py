"""Response log-probs of a VLM: the forward pass DPO-style objectives read.

`LogProbs` is mixed into `cwdpo.model.backbone.VLMBackbone`. What it needs of its host is the
`PolicyWithReference` protocol below — the policy as `model` and `_reference_ctx()`, a context
that yields the reference model — and nothing else (tests/test_logprobs.py runs it on a bare
host). It adds: logits only from the first response position on, per-sequence sums / means
under the policy or the reference, and the shared-prefix pair path.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from cwdpo.batch import IGNORE_INDEX
from cwdpo.losses.sequence import SeqLogps, sequence_logps


@runtime_checkable
class PolicyWithReference(Protocol):
    """The host contract of `LogProbs`: the policy and a context yielding the reference."""

    model: nn.Module

    def _reference_ctx(self) -> AbstractContextManager[nn.Module]:
        """Enter to run the reference (no grad is the caller's job); raise when there is none."""
        ...


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`model`'s logits only from the first response position on (skips the LM head on image
    tokens), and that start position."""
    labels = batch["labels"]
    is_resp = labels != IGNORE_INDEX
    first = int(is_resp.float().argmax(-1).min().item()) if is_resp.any() else 1
    start = max(first - 1, 0)
    keep = labels.shape[1] - start
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    return out.logits, start


class LogProbs:
    """Policy / reference log-probs of collated batches, for a `PolicyWithReference` host."""

    model: nn.Module  # the host's policy (the contract above)

    def _reference_ctx(self) -> AbstractContextManager[nn.Module]:
        raise NotImplementedError(
            f"{type(self).__name__} mixes in LogProbs but has no _reference_ctx() "
            "(see cwdpo.model.logprobs.PolicyWithReference)"
        )

    def logps(self, batch: dict[str, torch.Tensor], reference: bool = False) -> SeqLogps:
        """Per-sequence response log-probs under the policy (or the reference, no grad)."""
        ctx = self._reference_ctx() if reference else nullcontext(self.model)
        with ctx as model, torch.no_grad() if reference else nullcontext():
            logits, start = response_logits(model, batch)
        labels = batch["labels"][:, start + 1 :]
        return sequence_logps(logits[:, :-1], labels)

    def logps_and_logits(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[SeqLogps, torch.Tensor, torch.Tensor]:
        """Policy log-probs plus the aligned (logits, labels) for smoothing / calibration."""
        logits, labels = self.aligned_logits(batch)
        return sequence_logps(logits, labels), logits, labels

    def aligned_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's response logits and their labels, shifted once (logits[t] predicts
        labels[t]), not yet normalised: for callers that take one log-softmax themselves."""
        logits, start = response_logits(self.model, batch)
        return logits[:, :-1], batch["labels"][:, start + 1 :]

    def pair_logps(
        self,
        batch: dict[str, torch.Tensor],
        n: int,
        reference: bool = False,
        prefix_sharing: bool = False,
    ) -> SeqLogps:
        """Log-probs of a `collate_pairs` batch (n pairs, 2n rows). prefix_sharing=True runs
        image + prompt once per pair (`cwdpo.model.prefix`: one packed row per pair, gradient
        checkpointing included) where the model supports it, else the plain `logps` path."""
        if prefix_sharing:
            from cwdpo.model.prefix import shared_prefix_logps, supports_prefix_sharing

            ctx = self._reference_ctx() if reference else nullcontext(self.model)
            with ctx as model, torch.no_grad() if reference else nullcontext():
                if supports_prefix_sharing(model, batch):
                    return shared_prefix_logps(model, batch, n)
        return self.logps(batch, reference=reference)
