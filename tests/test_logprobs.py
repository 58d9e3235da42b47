"""`LogProbs` needs of its host exactly `PolicyWithReference` (a policy `model` and a
`_reference_ctx()` yielding the reference): a bare host with only those gives the backbone's
numbers, and a host without a reference context fails naming the contract."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from cwdpo.model.logprobs import LogProbs, PolicyWithReference


class BareHost(LogProbs):
    """Nothing but the contract: no processor, no LoRA, no nn.Module."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module) -> None:
        self.model, self.reference = model, reference

    @contextmanager
    def _reference_ctx(self):
        yield self.reference


def test_a_bare_host_gets_the_backbones_log_probs(backbone, pair_batch, perturb):
    batch = backbone.collate_pairs(
        pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    backbone.snapshot_reference()
    perturb(backbone.model, 0.05)  # policy ≠ reference, so a mix-up shows
    backbone.model.eval()
    host = BareHost(backbone.model, backbone.reference)
    assert isinstance(backbone, PolicyWithReference) and isinstance(host, PolicyWithReference)
    n = len(pair_batch)
    with torch.no_grad():
        for reference in (False, True):
            ours, theirs = host.logps(batch, reference), backbone.logps(batch, reference)
            assert torch.equal(ours.sum, theirs.sum), reference
            for shared in (False, True):
                got = host.pair_logps(batch, n, reference, prefix_sharing=shared).sum
                assert torch.equal(got, backbone.pair_logps(batch, n, reference, shared).sum)
        policy, ref = host.logps(batch).sum, host.logps(batch, reference=True).sum
    assert (policy - ref).abs().max() > 1e-3  # the two paths run different weights


def test_a_host_without_a_reference_context_names_the_contract(backbone, pair_batch):
    class NoReference(LogProbs):
        def __init__(self, model):
            self.model = model

    batch = backbone.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])
    host = NoReference(copy.deepcopy(backbone.model))
    with torch.no_grad():
        assert host.logps(batch).sum.shape == (1,)  # the policy path needs only `model`
    with pytest.raises(NotImplementedError, match=r"NoReference .*_reference_ctx.*WithReference"):
        host.logps(batch, reference=True)
