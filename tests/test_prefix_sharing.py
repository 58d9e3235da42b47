"""The prefix-shared pair forward (cwdpo.model.prefix) equals the plain `collate_pairs` + `logps`
path: log-probs AND parameter gradients, equal and unequal prompt lengths, policy and
reference, full fine-tuning and LoRA, gradient checkpointing; unsupported attention
implementations fall back to the plain path."""

from __future__ import annotations

import pytest
import torch

from cwdpo.batch import PairBatch
from cwdpo.model.loading import LoRASettings
from cwdpo.model.prefix import shared_prefix_logps, split_pairs, supports_prefix_sharing

LORA = LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "linear_1"])
TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


def _batch(bb, pb, prompts=None):
    return bb.collate_pairs(pb.images, prompts or pb.prompts, pb.chosen, pb.rejected)


def _grads(model):
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _check_equal(bb, batch, n):
    """Same weighted objective through both paths: logps and every parameter gradient agree."""
    w = torch.linspace(0.5, 2.0, 2 * n)  # distinct row weights: chosen/rejected grads differ
    plain = bb.logps(batch)
    ((plain.sum * w).sum() + plain.mean.sum()).backward()
    g_plain = _grads(bb.model)
    shared = shared_prefix_logps(bb.model, batch, n)
    ((shared.sum * w).sum() + shared.mean.sum()).backward()
    g_shared = _grads(bb.model)
    torch.testing.assert_close(shared.sum, plain.sum, **TOL)
    torch.testing.assert_close(shared.mean, plain.mean, **TOL)
    assert torch.equal(shared.count, plain.count)
    assert g_plain.keys() == g_shared.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_shared[k], g_plain[k], **GRAD_TOL, msg=k)
    return g_plain


def test_split_pairs_layout(backbone, pair_batch):
    batch = _batch(backbone, pair_batch)
    n = len(pair_batch)
    sp = split_pairs(batch, n, backbone.model)
    assert sp.inputs["input_ids"].shape[0] == n  # one packed row per pair
    assert sp.inputs["pixel_values"].shape[0] == n  # the vision tower sees each image once
    labels = torch.cat([sp.labels_c, sp.labels_r])
    for r in range(2 * n):  # every response token is in its continuation, in order
        resp = batch["labels"][r][batch["labels"][r] != -100]
        assert labels[r][labels[r] != -100].tolist() == resp.tolist()
    # a response never sees the other response; both see the whole (real) prefix
    P, Tc = sp.P, sp.Tc
    assert not sp.allowed[:, P + Tc :, P : P + Tc].any()
    assert not sp.allowed[:, P : P + Tc, P + Tc :].any()
    real = sp.inputs["input_ids"][:, :P] != backbone.tokenizer.pad_token_id
    assert torch.equal(sp.allowed[:, P, :P], real) and torch.equal(sp.allowed[:, P + Tc, :P], real)
    # both responses continue the prefix's positions
    plen = (batch["labels"][:n] == -100).long().cumprod(-1).sum(-1)
    assert torch.equal(sp.positions_1d[:, P], plen) and torch.equal(
        sp.positions_1d[:, P + Tc], plen
    )


def test_policy_logps_and_grads_equal_plain(backbone, pair_batch):
    g = _check_equal(backbone, _batch(backbone, pair_batch), len(pair_batch))
    # the vision tower / projector get gradients through the shared prefix's KV cache
    assert any("vision_tower" in k for k in g) and any("multi_modal_projector" in k for k in g)


def test_unequal_prompt_lengths(backbone, pair_batch):
    prompts = list(pair_batch.prompts)
    prompts[1] = "Describe."
    prompts[2] = "What is in this picture? Describe the image, please, in one sentence."
    batch = _batch(backbone, pair_batch, prompts)
    sp = split_pairs(batch, len(prompts), backbone.model)
    pad = backbone.tokenizer.pad_token_id
    assert (
        len(set((sp.inputs["input_ids"][:, : sp.P] != pad).sum(-1).tolist())) == 3
    )  # really unequal prefixes
    _check_equal(backbone, batch, len(prompts))


def test_reference_and_lora(tiny_vlm_path, pair_batch, perturb):
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, lora=LORA)
    bb.snapshot_reference()
    perturb(bb.model, scale=0.05)  # adapters ≠ 0: policy and reference differ
    batch, n = _batch(bb, pair_batch), len(pair_batch)
    _check_equal(bb, batch, n)  # LoRA grads through the shared prefix
    ref_plain = bb.logps(batch, reference=True)
    ref_shared = bb.pair_logps(batch, n, reference=True, prefix_sharing=True)
    torch.testing.assert_close(ref_shared.sum, ref_plain.sum, **TOL)
    assert not ref_shared.sum.requires_grad
    pol = bb.pair_logps(batch, n, prefix_sharing=True).sum
    assert (pol - ref_shared.sum).abs().max() > 1e-3  # the adapters really were disabled


def test_full_finetune_reference_copy(backbone, pair_batch, perturb):
    backbone.snapshot_reference()
    perturb(backbone.model)
    batch, n = _batch(backbone, pair_batch), len(pair_batch)
    torch.testing.assert_close(
        backbone.pair_logps(batch, n, reference=True, prefix_sharing=True).sum,
        backbone.logps(batch, reference=True).sum,
        **TOL,
    )


def test_gradient_checkpointing_uses_the_fast_path(tiny_vlm_path, pair_batch):
    """The packed row is one ordinary forward: exact under gradient checkpointing too (it used
    to fall back to the plain path there, transformers dropping the KV cache)."""
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, gradient_checkpointing=True)
    bb.model.train()
    assert supports_prefix_sharing(bb.model)
    batch, n = _batch(bb, pair_batch), len(pair_batch)
    _check_equal(bb, batch, n)


def test_unsupported_attention_falls_back(backbone, pair_batch, monkeypatch):
    batch, n = _batch(backbone, pair_batch), len(pair_batch)
    monkeypatch.setattr(backbone.model.config, "_attn_implementation", "flash_attention_2")
    assert not supports_prefix_sharing(backbone.model, batch)
    monkeypatch.undo()
    video = {**batch, "pixel_values_videos": torch.zeros(5, 8)}  # packed inputs it cannot split
    assert supports_prefix_sharing(backbone.model, batch)
    assert not supports_prefix_sharing(backbone.model, video)
    calls = []
    monkeypatch.setattr("cwdpo.model.prefix.supports_prefix_sharing", lambda m, b=None: False)
    real = backbone.logps
    monkeypatch.setattr(backbone, "logps", lambda b, **kw: calls.append(1) or real(b, **kw))
    backbone.pair_logps(batch, n, prefix_sharing=True)
    assert calls == [1]  # the plain path ran


def test_eager_attention_equals_plain(tiny_vlm_path, pair_batch):
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, attn_implementation="eager")
    assert bb.model.config._attn_implementation == "eager"
    _check_equal(bb, _batch(bb, pair_batch), len(pair_batch))


def test_split_pairs_literal_layout():
    """TRL-style: a hand-made 2-pair batch (no model: plain 0..W-1 positions) and the packed
    rows written out. Pair 0: prompt [11 12 13], chosen [21 22], rejected [31]; pair 1: prompt
    [14 15], chosen [23], rejected [32 33 34]. P = 3 (pair 1's prefix right-aligned behind one
    pad column), Tc = 2, Tr = 3."""
    I = -100  # noqa: E741
    batch = {
        "input_ids": torch.tensor(
            [[11, 12, 13, 21, 22], [14, 15, 23, 0, 0], [11, 12, 13, 31, 0], [14, 15, 32, 33, 34]]
        ),
        "attention_mask": torch.tensor(
            [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
        ),
        "labels": torch.tensor(
            [[I, I, I, 21, 22], [I, I, 23, I, I], [I, I, I, 31, I], [I, I, 32, 33, 34]]
        ),
        "token_type_ids": torch.tensor(
            [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
        ),
    }
    sp = split_pairs(batch, 2)
    assert (sp.P, sp.Tc, sp.Tr) == (3, 2, 3)
    #                        | prefix   | chosen | rejected |
    want_ids = torch.tensor([[11, 12, 13, 21, 22, 31, 0, 0], [0, 14, 15, 23, 0, 32, 33, 34]])
    want_pos = torch.tensor([[0, 1, 2, 3, 4, 3, 0, 0], [0, 0, 1, 2, 0, 2, 3, 4]])
    want_tt = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    assert sp.inputs.keys() == {"input_ids", "position_ids", "token_type_ids"}
    assert torch.equal(sp.inputs["input_ids"], want_ids)
    assert torch.equal(sp.inputs["position_ids"], want_pos)
    assert torch.equal(sp.positions_1d, want_pos)
    assert torch.equal(sp.inputs["token_type_ids"], want_tt)
    assert torch.equal(sp.labels_c, torch.tensor([[21, 22], [23, I]]))
    assert torch.equal(sp.labels_r, torch.tensor([[31, I, I], [32, 33, 34]]))
    # query rows × key columns; a padding query (pair 0 cols 6-7, pair 1 cols 0 and 4) sees
    # only itself, and padding is no other query's key
    want_mask = torch.tensor(
        [
            [
                [1, 0, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0, 1, 0, 0],
                [1, 1, 1, 0, 0, 1, 1, 0],
                [1, 1, 1, 0, 0, 1, 0, 1],
            ],
            [
                [1, 0, 0, 0, 0, 0, 0, 0],
                [0, 1, 0, 0, 0, 0, 0, 0],
                [0, 1, 1, 0, 0, 0, 0, 0],
                [0, 1, 1, 1, 0, 0, 0, 0],
                [0, 1, 1, 1, 1, 0, 0, 0],
                [0, 1, 1, 0, 0, 1, 0, 0],
                [0, 1, 1, 0, 0, 1, 1, 0],
                [0, 1, 1, 0, 0, 1, 1, 1],
            ],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sp.allowed, want_mask)


def test_mismatched_pairs_rejected(backbone, pair_batch):
    bad = backbone.collate(  # rows i and n+i with different images / prompts
        pair_batch.images + pair_batch.images[::-1],
        pair_batch.prompts + ["Describe."] * len(pair_batch),
        pair_batch.chosen + pair_batch.rejected,
    )
    with pytest.raises(ValueError, match="prompt"):
        split_pairs(bad, len(pair_batch))


def test_cw_dpo_module_prefix_flag(backbone, pair_batch, perturb):
    from functools import partial

    from cwdpo.stages import CWDPOModule

    backbone.snapshot_reference()
    perturb(backbone.model)
    batch = PairBatch(inputs=_batch(backbone, pair_batch), n=len(pair_batch))
    losses = []
    for shared in (False, True):
        m = CWDPOModule(backbone, optimizer=partial(torch.optim.SGD, lr=0.1), prefix_sharing=shared)
        loss, metrics = m.compute(batch)
        losses.append((loss, metrics["cooling/mean"]))
    torch.testing.assert_close(losses[0][0], losses[1][0], **TOL)
    torch.testing.assert_close(losses[0][1], losses[1][1], **TOL)


def test_gradient_split_through_the_fast_path(backbone, pair_batch):
    """The dynamics callback splits ∇L into chosen / rejected parts through `SeqLogps.token`:
    the fast path's loss must reach the parameters through it, giving the plain path's split."""
    from cwdpo.losses.diagnostics import gradient_split

    batch, n = _batch(backbone, pair_batch), len(pair_batch)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    w = torch.linspace(0.5, 2.0, 2 * n)
    splits = []
    for lp in (backbone.logps(batch), shared_prefix_logps(backbone.model, batch, n)):
        loss = (lp.sum * w).sum()
        splits.append(gradient_split(loss, [lp.token], params, n, return_grads=True))
    (plain, fast) = splits
    assert any(g.abs().max() > 0 for g in fast.grads_l)
    for gp, gf in zip(plain.grads_w + plain.grads_l, fast.grads_w + fast.grads_l):
        torch.testing.assert_close(gf, gp, **GRAD_TOL)
