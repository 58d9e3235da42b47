"""The prefix-shared pair forward (cwdpo.prefix) equals the plain `collate_pairs` + `logps`
path: log-probs AND parameter gradients, equal and unequal prompt lengths, policy and
reference, full fine-tuning and LoRA; unsupported settings fall back to the plain path."""

from __future__ import annotations

import pytest
import torch

from cwdpo.backbone import LoRASettings
from cwdpo.prefix import shared_prefix_logps, split_pairs, supports_prefix_sharing

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
    sp = split_pairs(batch, n)
    assert sp.prefix_ids.shape[0] == n and sp.cont_ids.shape[0] == 2 * n
    assert sp.vision["pixel_values"].shape[0] == n  # the vision tower sees each image once
    for r in range(2 * n):  # every response token is in the continuation, in order
        resp = batch["labels"][r][batch["labels"][r] != -100]
        assert sp.labels[r][sp.labels[r] != -100].tolist() == resp.tolist()


def test_policy_logps_and_grads_equal_plain(backbone, pair_batch):
    g = _check_equal(backbone, _batch(backbone, pair_batch), len(pair_batch))
    # the vision tower / projector get gradients through the shared prefix's KV cache
    assert any("vision_tower" in k for k in g) and any("multi_modal_projector" in k for k in g)


def test_unequal_prompt_lengths(backbone, pair_batch):
    prompts = list(pair_batch.prompts)
    prompts[1] = "Describe."
    prompts[2] = "What is in this picture? Describe the image, please, in one sentence."
    batch = _batch(backbone, pair_batch, prompts)
    sp = split_pairs(batch, len(prompts))
    assert len(set(sp.prefix_mask.sum(-1).tolist())) == 3  # really unequal prefixes
    _check_equal(backbone, batch, len(prompts))


def test_reference_and_lora(tiny_vlm_path, pair_batch, perturb):
    from cwdpo.backbone import VLMBackbone

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
        backbone.logps(batch, reference=True).sum, **TOL,
    )


def test_gradient_checkpointing_falls_back(tiny_vlm_path, pair_batch):
    from cwdpo.backbone import VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, gradient_checkpointing=True)
    bb.model.train()
    assert not supports_prefix_sharing(bb.model)  # transformers would drop the KV cache
    batch, n = _batch(bb, pair_batch), len(pair_batch)
    out = bb.pair_logps(batch, n, prefix_sharing=True)
    torch.testing.assert_close(out.sum, bb.logps(batch).sum, **TOL)
    bb.model.eval()
    assert supports_prefix_sharing(bb.model)


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
    batch = {"pairs": _batch(backbone, pair_batch), "n": len(pair_batch)}
    losses = []
    for shared in (False, True):
        m = CWDPOModule(backbone, optimizer=partial(torch.optim.SGD, lr=0.1), prefix_sharing=shared)
        loss, metrics = m.compute(batch)
        losses.append((loss, metrics["cooling/mean"]))
    torch.testing.assert_close(losses[0][0], losses[1][0], **TOL)
    torch.testing.assert_close(losses[0][1], losses[1][1], **TOL)
