"""The GPU suite (`pytest -m gpu`, run by `make gpu-check`; skipped without CUDA).

bf16-mixed CW-DPO steps with the prefix-shared forward and the reference cache, full
fine-tuning and LoRA, with and without gradient checkpointing; the fast path equal to the
plain path in bf16 within a stated tolerance; generation on the GPU, K samples per record from
the shared prefill included.
"""

from __future__ import annotations

import pytest
import torch

from cwdpo.model.backbone import VLMBackbone
from cwdpo.model.families import FAMILIES
from tests.test_ddp import _initial_weights, _load_script

pytestmark = pytest.mark.gpu

# bf16 keeps 8 bits of mantissa (~2–3 significant digits): per-token mean log-probs of the fast
# and the plain path, computed with different kernels and summation orders, agree to this.
BF16_MEAN_TOL = 0.05  # nats per token
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    from tests.test_ddp import SCRIPT

    p = tmp_path_factory.mktemp("gpu") / "run.py"
    p.write_text(SCRIPT)
    return _load_script(p)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-gc", "grad-ckpt"])
def test_bf16_mixed_cw_dpo_steps_with_prefix_sharing_and_ref_cache(
    script, tiny_vlm_path, tmp_path, lora, ckpt
):
    bb = script.run(
        str(tiny_vlm_path),
        str(tmp_path),
        devices=1,
        batch_size=4,
        steps=3,
        prefix_sharing=True,
        ref_cache=True,
        lora=lora,
        accelerator="cuda",
        precision="bf16-mixed",
        gradient_checkpointing=ckpt,
    )
    after = {k: v.float().cpu() for k, v in bb.model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    shards = list((tmp_path / "ref_cache").rglob("*.safetensors"))
    assert shards  # the reference log-probs were cached
    if not lora:
        before = _initial_weights(tiny_vlm_path)
        assert max((after[k] - before[k].float()).abs().max().item() for k in before) > 1e-4
    else:
        assert max(after[k].abs().max().item() for k in after if "lora_B" in k) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_path_equals_plain_path_on_gpu(tiny_vlm_path, pair_batch, dtype):
    from cwdpo.model.prefix import shared_prefix_logps

    bb = VLMBackbone.from_pretrained(tiny_vlm_path, dtype=dtype, max_length=128).to("cuda")
    batch = {
        k: v.to("cuda")
        for k, v in bb.collate_pairs(
            pair_batch.images, pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
        ).items()
    }
    n = len(pair_batch)
    with torch.no_grad():
        plain = bb.logps(batch)
        fast = shared_prefix_logps(bb.model, batch, n)
    assert torch.equal(fast.count, plain.count)
    if dtype == "float32":
        torch.testing.assert_close(fast.sum, plain.sum, **FP32_TOL)
    else:
        diff = (fast.mean.float() - plain.mean.float()).abs().max().item()
        assert diff <= BF16_MEAN_TOL, f"bf16 fast vs plain: {diff:.4f} nats/token"


def test_generation_on_gpu_batched_equals_per_row(tiny_vlm_path, pair_batch):
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128).to("cuda")
    images, prompts = pair_batch.images, pair_batch.prompts
    batched = bb.generate(images, prompts, max_new_tokens=8)
    single = [bb.generate([im], [p], max_new_tokens=8)[0] for im, p in zip(images, prompts)]
    assert batched == single and all(isinstance(s, str) for s in batched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shared_prefill_sampling_on_gpu_equals_the_plain_path(tiny_vlm_path, pair_batch, dtype):
    """K samples per record from one shared prefill on CUDA (static continuation cache, no
    auto-compile): greedy rows equal the plain path's; sampled rows are K per record."""
    bb = VLMBackbone.from_pretrained(tiny_vlm_path, max_length=128).to("cuda", dtype)
    images, prompts = pair_batch.images, pair_batch.prompts
    plain = bb.generate(images, prompts, max_new_tokens=8)
    shared = bb.generate(images, prompts, max_new_tokens=8, num_return_sequences=3)
    if dtype == torch.float32:  # bf16: kernels of other shapes may flip a near-tie argmax
        assert shared == [t for t in plain for _ in range(3)]
    sampled = bb.generate(images, prompts, 8, do_sample=True, num_return_sequences=4)
    assert len(sampled) == 4 * len(images) and all(isinstance(t, str) for t in sampled)


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_mixed_steps_and_generation_on_every_family(script, family, family_cache, tmp_path):
    """Every tiny family: bf16-mixed CW-DPO steps with the fast path and the reference cache
    (LoRA), then greedy generation on the GPU."""
    from cwdpo.model.families import ensure_family

    path = ensure_family(family, family_cache)
    bb = script.run(
        str(path),
        str(tmp_path),
        devices=1,
        batch_size=2,
        steps=2,
        prefix_sharing=True,
        ref_cache=True,
        lora=True,
        accelerator="cuda",
        precision="bf16-mixed",
    )
    assert all(torch.isfinite(v.float()).all() for v in bb.model.state_dict().values())
    from cwdpo.data.shapes import ShapesWorld

    p = ShapesWorld().pairs("val", 1)[0]
    out = bb.to("cuda").generate([p.image.load()], [p.prompt], max_new_tokens=6)
    assert len(out) == 1 and isinstance(out[0], str)
