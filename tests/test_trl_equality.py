"""Our DPO / IPO loss and log-probs against TRL's own code on the same tiny-VLM batch.

TRL 1.16 has no standalone `dpo_loss`: the loss is computed inline in
`DPOTrainer._compute_loss(self, model, inputs, return_outputs)`, which reads a handful of trainer
attributes and asks a model patched by `trl.trainer.utils.add_fused_lm_head` for per-token
log-probs (`model(..., labels=..., fused_lm_head=True).log_probs`). We run that method unbound
with a `SimpleNamespace` standing in for the trainer, so the numbers are TRL's, not a re-typed
copy:
  * end to end — TRL's fused LM head computes the policy and reference log-probs itself;
  * on identical inputs — a stub model hands TRL *our* four log-prob tensors, so only the loss
    arithmetic is compared, to 1e-6 (per pair, one pair per call, to read TRL's per-pair
    rewards, which it only logs as batch means).
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, selective_log_softmax  # noqa: E402

from cwdpo.batch import IGNORE_INDEX  # noqa: E402
from cwdpo.losses.objectives import dpo_loss  # noqa: E402
from cwdpo.losses.sequence import sequence_logps  # noqa: E402

BETA = 0.1


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m

    def autocast(self):
        return contextlib.nullcontext()


def _fake_trainer(model, ref_model=None, loss_type="sigmoid", beta=BETA):
    """The attributes `DPOTrainer._compute_loss` reads (TRL 1.16), with DPOConfig defaults."""
    return types.SimpleNamespace(
        model=model,
        ref_model=ref_model,
        accelerator=_Accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=ref_model is None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _trl_inputs(batch, ref_chosen=None, ref_rejected=None):
    """TRL's batch format: [chosen; rejected] rows with a completion mask instead of labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["completion_mask"] = (batch["labels"] != IGNORE_INDEX).long()
    if ref_chosen is not None:
        inputs["ref_chosen_logps"] = ref_chosen
        inputs["ref_rejected_logps"] = ref_rejected
    return inputs


def _metrics(fake):
    (mode,) = [m for m, d in fake._metrics.items() if d]
    return {k: v[-1] for k, v in fake._metrics[mode].items()}


@pytest.fixture
def setup(backbone, pair_batch, perturb):
    """Policy = reference + small noise, one [chosen; rejected] batch of 4 ShapesWorld pairs."""
    bb = backbone
    bb.snapshot_reference()
    perturb(bb.model, scale=0.02, seed=3)
    batch = bb.collate_pairs(
        pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    with torch.no_grad():
        pol = bb.logps(batch)
    ref = bb.logps(batch, reference=True)
    b = len(pair_batch)
    assert (pol.sum - ref.sum).abs().max() > 1e-2  # the two policies really differ
    return bb, batch, pol, ref, b


class _StubModel:
    """Stands in for a fused-LM-head model: returns given per-token log-probs on TRL's grid."""

    training = True

    def __init__(self, token_logps, mask):
        self.token_logps, self.mask = token_logps, mask

    def __call__(self, *, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        assert torch.equal(labels[:, 1:] != IGNORE_INDEX, self.mask)  # same response tokens
        zeros = torch.zeros_like(self.token_logps)
        return types.SimpleNamespace(
            log_probs=self.token_logps,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(self.mask),
        )


def _on_trl_grid(seq, width):
    """TRL's per-token grid [rows, T − 1] carrying exactly our sequence sums: each row's whole
    log π(y|x) sits on its last response token, zeros elsewhere, so TRL's `.sum(dim=1)` gives back
    our float32 value bit for bit (a re-summation in another order would differ by a few ulps of
    ~130, i.e. ~1e-5) while the response mask stays the real one."""
    pad = width - seq.token.shape[1]
    mask = torch.nn.functional.pad(seq.mask, (pad, 0))
    last = width - 1 - mask.flip(1).float().argmax(1)
    grid = torch.zeros(mask.shape, dtype=seq.sum.dtype)
    grid[torch.arange(len(grid)), last] = seq.sum.detach()
    assert torch.equal(grid.sum(1), seq.sum.detach())
    return grid, mask


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl_on_identical_logps_per_pair(setup, beta):
    bb, batch, pol, ref, b = setup
    tok, mask = _on_trl_grid(pol, batch["input_ids"].shape[1] - 1)
    ours = dpo_loss(pol.sum[:b], pol.sum[b:], ref.sum[:b], ref.sum[b:], beta=beta)
    for i in range(b):
        rows = [i, b + i]
        sub = {k: v[rows] for k, v in batch.items()}
        stub = _StubModel(tok[rows], mask[rows])
        fake = _fake_trainer(stub, beta=beta)
        loss = DPOTrainer._compute_loss(
            fake, stub, _trl_inputs(sub, ref.sum[i : i + 1], ref.sum[b + i : b + i + 1]), False
        )
        m = _metrics(fake)
        assert loss.item() == pytest.approx(ours.losses[i].item(), abs=1e-6)
        assert m["rewards/chosen"] == pytest.approx(ours.chosen_rewards[i].item(), abs=1e-6)
        assert m["rewards/rejected"] == pytest.approx(ours.rejected_rewards[i].item(), abs=1e-6)
        assert m["logps/chosen"] == pytest.approx(pol.sum[i].item(), abs=1e-4)
        assert m["logps/rejected"] == pytest.approx(pol.sum[b + i].item(), abs=1e-4)


def test_dpo_loss_equals_trl_end_to_end_with_trl_logps(setup):
    """TRL computes the policy and reference log-probs itself (fused LM head on copies of our
    policy and reference) and its loss on the whole batch equals ours."""
    bb, batch, pol, ref, b = setup
    trl_pol = copy.deepcopy(bb.model)
    trl_ref = copy.deepcopy(bb.reference)
    add_fused_lm_head(trl_pol, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(trl_ref)
    trl_pol.train()
    fake = _fake_trainer(trl_pol, ref_model=trl_ref)
    inputs = _trl_inputs(batch)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(fake, trl_pol, inputs, False)
        ref_c, ref_r = DPOTrainer.compute_ref_log_probs(fake, trl_ref, inputs)
        lab = batch["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        model_inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        trl_pol_logps = trl_pol(**model_inputs, labels=lab, fused_lm_head=True).log_probs.sum(1)
    m = _metrics(fake)
    ours = dpo_loss(pol.sum[:b], pol.sum[b:], ref.sum[:b], ref.sum[b:], beta=BETA)
    # per-sequence log-probs (sums of ~20 float32 terms of ~-6, ~-130 in all) are computed by
    # different kernels (TRL: chunked fused head; ours: log_softmax on sliced logits), so they
    # agree to a few float32 ulps of 130 (1.5e-5 each); loss and rewards inherit β times that.
    torch.testing.assert_close(trl_pol_logps, pol.sum, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(torch.cat([ref_c, ref_r]), ref.sum, rtol=1e-6, atol=1e-4)
    assert loss.item() == pytest.approx(ours.loss.item(), abs=2e-5)
    assert m["rewards/chosen"] == pytest.approx(ours.chosen_rewards.mean().item(), abs=2e-5)
    assert m["rewards/rejected"] == pytest.approx(ours.rejected_rewards.mean().item(), abs=2e-5)
    assert m["rewards/margins"] == pytest.approx(
        (ours.chosen_rewards - ours.rejected_rewards).mean().item(), abs=2e-5
    )
    acc = (ours.chosen_rewards > ours.rejected_rewards).float().mean().item()
    assert m["rewards/accuracies"] == pytest.approx(acc)


def test_sequence_logps_equals_trl_selective_log_softmax(setup):
    bb, batch, pol, ref, b = setup
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = bb.model(**inputs, use_cache=False).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    completion = shift_labels != IGNORE_INDEX
    trl_tok = selective_log_softmax(shift_logits, batch["input_ids"][:, 1:])
    trl_sum = (trl_tok * completion).sum(1)
    ours = sequence_logps(shift_logits, shift_labels)
    torch.testing.assert_close(ours.sum, trl_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.token, trl_tok * completion, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.sum, pol.sum, rtol=1e-6, atol=1e-4)


def test_ipo_equals_trl_ipo_on_mean_logps(setup):
    """TRL's IPO divides each sequence log-ratio by its completion length (per-token average,
    'confirmed with the IPO authors'): our `dpo_loss(loss_type="ipo")` fed mean log-probs
    (`SeqLogps.mean`) is the same loss. Fed sequence sums it is a different (unnormalised) one."""
    bb, batch, pol, ref, b = setup
    tok, mask = _on_trl_grid(pol, batch["input_ids"].shape[1] - 1)
    stub = _StubModel(tok, mask)
    beta = 0.5
    fake = _fake_trainer(stub, loss_type="ipo", beta=beta)
    loss = DPOTrainer._compute_loss(fake, stub, _trl_inputs(batch, ref.sum[:b], ref.sum[b:]), False)
    ours_mean = dpo_loss(
        pol.mean[:b], pol.mean[b:], ref.mean[:b], ref.mean[b:], beta=beta, loss_type="ipo"
    )
    assert loss.item() == pytest.approx(ours_mean.loss.item(), rel=1e-5, abs=1e-6)
    ours_sum = dpo_loss(
        pol.sum[:b], pol.sum[b:], ref.sum[:b], ref.sum[b:], beta=beta, loss_type="ipo"
    )
    assert abs(loss.item() - ours_sum.loss.item()) > 1e-3
