"""VLMBackbone on the tiny LLaVA: masks, truncation, log-probs, reference policy, LoRA,
generation and save/load."""

from __future__ import annotations

import inspect

import pytest
import torch

from cwdpo.batch import IGNORE_INDEX
from cwdpo.data.records import DataError
from cwdpo.losses.sequence import sequence_logps
from cwdpo.model.backbone import VLMBackbone
from cwdpo.model.loading import LoRASettings, ModelLoadError, load_model_and_processor

LORA = LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _full_forward_logps(model, batch):
    """Reference implementation: plain full forward, shift once, no logits_to_keep."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits[:, :-1], batch["labels"][:, 1:])


def _pairs2(bb, pb):
    """Two pairs (four rows): enough for the optimizer-step tests, half the CPU time."""
    return bb.collate_pairs(pb.images[:2], pb.prompts[:2], pb.chosen[:2], pb.rejected[:2])


def _sgd_step(bb, batch, lr=0.05):
    params = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    loss = -bb.logps(batch).mean.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return params


# ------------------------------------------------------------------------- collation
def test_collate_labels_only_on_response_tokens(backbone, pair_batch):
    bb = backbone
    batch = bb.collate(pair_batch.images, pair_batch.prompts, pair_batch.chosen)
    ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == att.shape == lab.shape and ids.shape[0] == len(pair_batch)
    assert batch["pixel_values"].shape[0] == len(pair_batch)
    image_id = bb.model.config.image_token_id
    prompt_ids = bb.tokenizer(bb.prompt_text(pair_batch.prompts[0]), add_special_tokens=False)
    for i, resp in enumerate(pair_batch.chosen):
        n = int(att[i].sum())
        assert att[i, :n].all() and not att[i, n:].any()  # right padding
        expected_resp = bb.tokenizer(resp, add_special_tokens=False)["input_ids"]
        expected_resp = expected_resp + [bb.tokenizer.eos_token_id]
        resp_mask = lab[i] != IGNORE_INDEX
        assert lab[i][resp_mask].tolist() == expected_resp
        assert ids[i][resp_mask].tolist() == expected_resp  # labels are the input ids
        # the response is the contiguous tail of the real tokens
        start = n - len(expected_resp)
        assert resp_mask[start:n].all() and not resp_mask[:start].any()
        assert not resp_mask[n:].any()
        # prompt = chat template with the image expanded to 64 image tokens, all masked
        assert int((ids[i, :start] == image_id).sum()) == 64
        assert (lab[i][ids[i] == image_id] == IGNORE_INDEX).all()
        prompt = ids[i, :start].tolist()
        assert bb.tokenizer.decode([t for t in prompt if t != image_id]) == (
            bb.prompt_text(pair_batch.prompts[i]).replace("<image>", "")
        )
        assert len(prompt) == len(prompt_ids["input_ids"]) + 63  # "<image>" → 64 tokens


def test_collate_truncation_cuts_only_the_response(backbone, pair_batch):
    bb = backbone
    full = bb.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])
    n_prompt = int(
        (full["labels"][0] == IGNORE_INDEX).logical_and(full["attention_mask"][0].bool()).sum()
    )
    n_resp = int((full["labels"][0] != IGNORE_INDEX).sum())
    assert n_resp > 3
    bb.truncation = "warn"  # a cut is a stated policy (test_token_budget.py: error by default)
    bb.max_length = n_prompt + 3
    cut = bb.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])
    assert cut["input_ids"].shape[1] == n_prompt + 3
    assert torch.equal(cut["input_ids"][0, :n_prompt], full["input_ids"][0, :n_prompt])
    assert torch.equal(cut["labels"][0, n_prompt:], full["labels"][0, n_prompt : n_prompt + 3])
    # still exactly one response token fits
    bb.max_length = n_prompt + 1
    one = bb.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])
    assert int((one["labels"] != IGNORE_INDEX).sum()) == 1
    # no room for any response token, or a prompt longer than max_length: DataError
    for m in (n_prompt, n_prompt - 10):
        bb.max_length = m
        with pytest.raises(DataError, match="max_length"):
            bb.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])


def test_collate_rejects_bad_input(backbone, pair_batch):
    with pytest.raises(DataError, match="empty response"):
        backbone.collate(pair_batch.images[:1], pair_batch.prompts[:1], ["   "])
    with pytest.raises(ValueError, match="same length"):
        backbone.collate(pair_batch.images[:2], pair_batch.prompts[:1], pair_batch.chosen[:1])


def test_collate_pairs_is_chosen_then_rejected(backbone, pair_batch):
    b = len(pair_batch)
    pb = backbone.collate_pairs(
        pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    assert pb["input_ids"].shape[0] == 2 * b
    assert torch.equal(pb["pixel_values"][:b], pb["pixel_values"][b:])
    for i in range(b):
        for row, text in ((i, pair_batch.chosen[i]), (b + i, pair_batch.rejected[i])):
            resp = pb["labels"][row][pb["labels"][row] != IGNORE_INDEX].tolist()
            assert backbone.tokenizer.decode(resp[:-1]) == text


# ------------------------------------------------------------------------- log-probs
def test_logps_with_logits_to_keep_equals_full_forward(backbone, pair_batch):
    bb = backbone
    batch = bb.collate_pairs(
        pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    with torch.no_grad():
        got = bb.logps(batch)
    ref = _full_forward_logps(bb.model, batch)
    # sums are ~ -130: float32 resolution there is 1.5e-5, so compare relative to 1 ulp
    torch.testing.assert_close(got.sum, ref.sum, rtol=2e-7, atol=1e-5)
    torch.testing.assert_close(got.mean, ref.mean, rtol=2e-7, atol=1e-6)
    assert torch.equal(got.count, ref.count)
    assert torch.equal(got.count, (batch["labels"] != IGNORE_INDEX).sum(-1))
    # the per-token slice lines up with the response positions of the full grid
    width = got.token.shape[1]
    torch.testing.assert_close(got.token, ref.token[:, -width:], rtol=0, atol=1e-5)
    assert ref.token[:, :-width].abs().sum() == 0
    # logps_and_logits agrees and hands out aligned logits / labels
    seq, logits, labels = bb.logps_and_logits(batch)
    torch.testing.assert_close(seq.sum, ref.sum, rtol=2e-7, atol=1e-5)
    torch.testing.assert_close(sequence_logps(logits, labels).sum, seq.sum, rtol=0, atol=0)


def test_chosen_and_rejected_in_one_forward_equal_separate_forwards(backbone, pair_batch):
    bb = backbone
    b = len(pair_batch)
    with torch.no_grad():
        both = bb.logps(
            bb.collate_pairs(
                pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
            )
        )
        ch = bb.logps(bb.collate(pair_batch.images, pair_batch.prompts, pair_batch.chosen))
        rj = bb.logps(bb.collate(pair_batch.images, pair_batch.prompts, pair_batch.rejected))
        one = bb.logps(
            bb.collate(pair_batch.images[2:3], pair_batch.prompts[2:3], pair_batch.rejected[2:3])
        )
    torch.testing.assert_close(both.sum[:b], ch.sum, rtol=0, atol=1e-4)
    torch.testing.assert_close(both.sum[b:], rj.sum, rtol=0, atol=1e-4)
    torch.testing.assert_close(both.mean[b:], rj.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.sum[0], rj.sum[2], rtol=0, atol=1e-4)  # padding-invariant
    assert not torch.allclose(both.sum[:b], both.sum[b:])


def test_logps_are_differentiable_wrt_the_policy(backbone, pair_batch):
    batch = backbone.collate(pair_batch.images[:2], pair_batch.prompts[:2], pair_batch.chosen[:2])
    out = backbone.logps(batch)
    out.sum.sum().backward()
    grads = [p.grad for p in backbone.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------- reference policy
def test_reference_requires_a_snapshot(backbone, pair_batch):
    batch = backbone.collate(pair_batch.images[:1], pair_batch.prompts[:1], pair_batch.chosen[:1])
    with pytest.raises(RuntimeError, match="reference"):
        backbone.logps(batch, reference=True)


def test_reference_is_a_frozen_copy_without_lora(backbone, pair_batch):
    bb = backbone
    batch = _pairs2(bb, pair_batch)
    bb.snapshot_reference()
    assert bb.reference is not None and bb.reference is not bb.model
    assert not any(p.requires_grad for p in bb.reference.parameters())
    ref0 = bb.logps(batch, reference=True)
    assert ref0.sum.grad_fn is None
    with torch.no_grad():
        pol0 = bb.logps(batch)
    torch.testing.assert_close(pol0.sum, ref0.sum, rtol=0, atol=0)
    bb.model.train()  # Lightning puts the whole module in train mode: the copy must stay eval
    bb.train()
    _sgd_step(bb, batch)
    ref1 = bb.logps(batch, reference=True)
    with torch.no_grad():
        pol1 = bb.logps(batch)
    assert torch.equal(ref1.sum, ref0.sum)
    assert (pol1.sum - pol0.sum).abs().max() > 1e-3
    assert not bb.reference.training


def test_reference_with_lora_is_the_adapter_free_model(tiny_vlm_path, pair_batch):
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, lora=LORA)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = _pairs2(bb, pair_batch)
    # a first "stage 1" step so the snapshot really has to fold the adapters in
    _sgd_step(bb, batch, lr=0.5)
    with torch.no_grad():
        stage1 = bb.logps(batch)
    bb.snapshot_reference()
    assert bb.reference is None and bb.has_reference  # no deep copy of the model
    ref0 = bb.logps(batch, reference=True)
    with torch.no_grad():
        pol0 = bb.logps(batch)
    torch.testing.assert_close(ref0.sum, pol0.sum, rtol=0, atol=1e-6)  # π_ref = π_θ at snapshot
    torch.testing.assert_close(ref0.sum, stage1.sum, rtol=0, atol=1e-4)  # = stage-1 policy
    _sgd_step(bb, batch, lr=0.5)
    ref1 = bb.logps(batch, reference=True)
    with torch.no_grad():
        pol1 = bb.logps(batch)
    torch.testing.assert_close(ref1.sum, ref0.sum, rtol=0, atol=1e-6)
    assert (pol1.sum - pol0.sum).abs().max() > 1e-3
    # lora settings may come from a config dict as well
    bb2 = VLMBackbone.from_pretrained(tiny_vlm_path, lora={"r": 2, "target_modules": ["q_proj"]})
    assert isinstance(bb2.lora, LoRASettings) and bb2.lora.r == 2


# ------------------------------------------------------------------------- generation
def test_generate_returns_b_times_n_strings_and_greedy_is_deterministic(
    backbone, pair_batch, perturb
):
    bb = backbone
    # the seed-0 random init greedily repeats one token whatever the input: noise makes the
    # output depend on image and prompt, so the comparisons below can fail
    perturb(bb.model, scale=0.2, seed=1)
    bb.model.train()
    imgs = pair_batch.images[:3]
    prompts = ["Describe the image.", "Describe the image in many words.", "a"]
    a = bb.generate(imgs, prompts, max_new_tokens=6)
    b = bb.generate(imgs, prompts, max_new_tokens=6)
    assert len(a) == 3 and all(isinstance(t, str) and t for t in a)
    assert a == b
    assert len(set(a)) == 3  # input-dependent
    assert bb.model.training  # train/eval mode restored
    # left padding: each prompt gives in the batch what it gives alone
    for i in range(3):
        assert bb.generate(imgs[i : i + 1], prompts[i : i + 1], max_new_tokens=6) == a[i : i + 1]
    assert bb.tokenizer.padding_side == "right"
    torch.manual_seed(0)
    s = bb.generate(imgs, prompts, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert len(s) == 6 and s[::2] != a


# ------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip(backbone, pair_batch, tmp_path, perturb):
    bb = backbone
    perturb(bb.model)
    batch = _pairs2(bb, pair_batch)
    with torch.no_grad():
        before = bb.logps(batch)
    bb.save_pretrained(tmp_path / "out")
    re = VLMBackbone.from_pretrained(tmp_path / "out", max_length=128)
    with torch.no_grad():
        after = re.logps(_pairs2(re, pair_batch))
    torch.testing.assert_close(after.sum, before.sum, rtol=0, atol=1e-5)


def test_save_pretrained_with_lora_saves_merged_weights(tiny_vlm_path, pair_batch, tmp_path):
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, lora=LORA)
    batch = _pairs2(bb, pair_batch)
    with torch.no_grad():
        base = bb.logps(batch)
    _sgd_step(bb, batch, lr=0.5)
    with torch.no_grad():
        before = bb.logps(batch)
    assert (before.sum - base.sum).abs().max() > 1e-3
    bb.save_pretrained(tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("adapter_*"))
    re = VLMBackbone.from_pretrained(tmp_path / "merged", max_length=128)
    assert not any("lora_" in n for n, _ in re.model.named_parameters())
    with torch.no_grad():
        after = re.logps(batch)
    torch.testing.assert_close(after.sum, before.sum, rtol=0, atol=1e-4)
    # saving did not merge the live model: training can go on with adapters
    assert any("lora_" in n for n, _ in bb.model.named_parameters())


def test_from_pretrained_errors_name_the_path(tiny_vlm_path, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        VLMBackbone.from_pretrained(missing)
    # a directory with model weights but no processor files
    from transformers import AutoModelForImageTextToText

    bare = tmp_path / "weights-only"
    AutoModelForImageTextToText.from_pretrained(tiny_vlm_path).save_pretrained(bare)
    with pytest.raises(ModelLoadError, match="weights-only") as e:
        VLMBackbone.from_pretrained(bare)
    assert "processor" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty"):
        VLMBackbone.from_pretrained(empty)


def test_trust_remote_code_defaults_to_false(tiny_vlm_path, monkeypatch):
    for fn in (VLMBackbone.from_pretrained, load_model_and_processor):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    import transformers

    seen = []
    for cls in (transformers.AutoProcessor, transformers.AutoModelForImageTextToText):
        orig = cls.from_pretrained

        def spy(*a, _orig=orig, **k):
            seen.append(k.get("trust_remote_code", "<not passed>"))
            return _orig(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    VLMBackbone.from_pretrained(tiny_vlm_path)
    assert len(seen) == 2 and all(v is False or v == "<not passed>" for v in seen)


def test_processor_without_chat_template_needs_model_chat_template(tiny_vlm_path, tmp_path):
    import shutil

    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.model.loading import ModelLoadError

    d = tmp_path / "no-template"
    shutil.copytree(tiny_vlm_path, d)
    (d / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="no chat template"):
        VLMBackbone.from_pretrained(d)
    b = VLMBackbone.from_pretrained(d, chat_template="{{ messages[0]['content'][1]['text'] }}|")
    assert b.prompt_text("Describe.") == "Describe.|"


@pytest.mark.parametrize("disable", [True, False])
def test_cw_dpo_turns_policy_dropout_off(tiny_vlm_path, pair_batch, perturb, disable):
    """With LoRA dropout the train-mode policy is noisy; `disable_dropout` (the default) makes
    it deterministic and equal to its own eval-mode output."""
    from functools import partial

    from cwdpo.stages.cw_dpo import CWDPOModule

    lora = LoRASettings(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"])
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128, lora=lora)
    bb.snapshot_reference()
    perturb(bb.model, 0.05, 2)  # LoRA's B starts at 0: make the adapters (and dropout) matter
    module = CWDPOModule(bb, optimizer=partial(torch.optim.SGD, lr=0.1), disable_dropout=disable)
    module.on_fit_start()
    module.train()
    batch = _pairs2(bb, pair_batch)
    with torch.no_grad():
        a, b = bb.logps(batch).sum, bb.logps(batch).sum
    module.eval()
    with torch.no_grad():
        evaluated = bb.logps(batch).sum
    if disable:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, evaluated, rtol=0, atol=1e-5)
    else:
        assert (a - b).abs().max() > 1e-4
