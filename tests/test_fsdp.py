"""FSDP on CPU: 2 gloo processes under FSDP2 (`cwdpo.utils.strategies.FSDP2Strategy`, i.e.
`trainer=fsdp_cpu`; torch refuses FSDP1 on CPU, pinned below) train the CW-DPO stage to the same
weights as 1 process with the same global batch, with full fine-tuning (the frozen reference
copy is sharded with the policy) and with LoRA (the reference is the base with the adapters
disabled); a checkpoint saved under FSDP2 resumes to the uninterrupted result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gloo import LEAVE, run_ranks
from tests.test_ddp import _initial_weights, _load_script, launch


def _fsdp(script: Path, tmp: Path, tiny: Path, out: Path, **kw) -> None:
    args = {
        "tiny": str(tiny),
        "out": str(out),
        "devices": 2,
        "batch_size": 2,
        "strategy": "fsdp",
        **kw,
    }
    launch([str(script), json.dumps(args)], cwd=tmp, timeout=600)


def _ckpt_policy(path: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a Lightning checkpoint (FSDP `state_dict_type=full`: one file)."""
    from cwdpo.utils.checkpoint_io import safe_torch_load

    state = safe_torch_load(path)["state_dict"]
    pre = "backbone.model."
    return {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    from tests.test_ddp import SCRIPT

    p = tmp_path_factory.mktemp("fsdp") / "dist_run.py"
    p.write_text(SCRIPT)
    return p


@pytest.mark.dist
@pytest.mark.parametrize(
    ("lora", "prefix"),
    [(False, False), (True, False), (False, True)],
    ids=["full", "lora", "full-prefix-sharing"],
)
def test_two_process_fsdp_equals_single_process(script, tiny_vlm_path, tmp_path, lora, prefix):
    """prefix: the FSDP2 run uses the packed shared-prefix forward (root `forward` only), the
    single-process run the plain path: same weights after 3 steps."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    _load_script(script).run(
        str(tiny_vlm_path), str(single), devices=1, batch_size=4, mirror_world=2, lora=lora
    )
    _fsdp(script, tmp_path, tiny_vlm_path, fsdp, lora=lora, prefix_sharing=prefix)
    assert json.loads((fsdp / "results.json").read_text()) == {"world_size": 2, "steps": 3}
    assert (fsdp / "writes.log").read_text().split() == ["rank0"]
    for rank in (0, 1):  # each rank holds about half of the policy and of the reference
        sh = json.loads((fsdp / f"sharding{rank}.json").read_text())
        assert 0.4 < sh["local"] / sh["full"] < 0.6, sh
        assert 0.4 < sh["ref_local"] / sh["ref_full"] < 0.6, sh
    w1, w2 = _ckpt_policy(single / "ckpt" / "last.ckpt"), _ckpt_policy(fsdp / "ckpt" / "last.ckpt")
    assert w1.keys() == w2.keys() and len(w1) > 0
    if not lora:  # training moved the weights, so equality below is not trivially true
        w0 = _initial_weights(tiny_vlm_path)
        assert max((w1[k].float() - w0[k].float()).abs().max().item() for k in w1) > 1e-3
    else:
        lora_keys = [k for k in w1 if "lora_B" in k]
        assert lora_keys and max(w1[k].abs().max().item() for k in lora_keys) > 1e-4
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.dist
def test_fsdp_checkpoint_resumes_to_the_uninterrupted_run(script, tiny_vlm_path, tmp_path):
    """4 steps over 2 epochs of 2 steps: stop after epoch 0 (step 2), resume from that FSDP
    checkpoint to step 4; the weights equal a 4-step run without the stop."""
    full, part = tmp_path / "full", tmp_path / "part"
    _fsdp(script, tmp_path, tiny_vlm_path, full, steps=4, data_steps=2)
    _fsdp(script, tmp_path, tiny_vlm_path, part, steps=2, data_steps=2)
    ckpt = part / "ckpt" / "last.ckpt"
    stopped = _ckpt_policy(ckpt)
    resumed = tmp_path / "resumed"
    _fsdp(script, tmp_path, tiny_vlm_path, resumed, steps=4, data_steps=2, ckpt_path=str(ckpt))
    assert json.loads((resumed / "results.json").read_text())["steps"] == 4
    w_full, w_res = (
        _ckpt_policy(full / "ckpt" / "last.ckpt"),
        _ckpt_policy(resumed / "ckpt" / "last.ckpt"),
    )
    moved = max((w_full[k] - stopped[k]).abs().max().item() for k in w_full)
    assert moved > 1e-4  # steps 3–4 changed the weights after the stop
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.subprocess
def test_fsdp1_cannot_run_on_cpu_which_is_why_fsdp_cpu_is_fsdp2(tmp_path):
    """`trainer=fsdp` (Lightning's FSDPStrategy) is torch's FSDP1, which refuses CPU devices;
    FSDP2 does not, so the CPU tests run `trainer=fsdp_cpu` (FSDP2). If torch ever lifts this,
    this test fails and docs/scaling.md should say FSDP1 runs on CPU too."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0, world_size=1)\n"
        "try:\n"
        "    FSDP(torch.nn.Linear(4, 4))\n"
        "    print('FSDP1 ran on CPU')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
        "dist.destroy_process_group()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: FSDP needs a non-CPU accelerator device" in out.stdout, out.stdout + out.stderr


@pytest.mark.dist
def test_pipeline_under_fsdp_cpu_saves_and_evaluates_the_unsharded_policy(tiny_vlm_path, tmp_path):
    """`python -m cwdpo.train trainer=fsdp_cpu` (2 gloo processes): both stages train sharded,
    and what the pipeline saves and evaluates after each stage is the full trained policy (the
    saved HF weights equal the full Lightning checkpoint of the same step)."""
    from tests.test_ddp import REPO

    run = tmp_path / "run"
    args = [
        "+debug=fast",
        "trainer=fsdp_cpu",
        "num_threads=1",
        "stage.run=[sft_c,cw_dpo]",
        "stage.sft_c.steps=2",
        "stage.cw_dpo.steps=2",
        "trainer.limit_val_batches=0",
        f"model.path={tiny_vlm_path}",
        f"paths.cache_dir={Path(tiny_vlm_path).parent}",
        "eval.caption_metrics=false",
        "eval.n_records=4",
        "eval.max_new_tokens=4",
        "eval.winrate=false",
        "callbacks.probes.n_items=4",
        "callbacks.probes.n_samples=0",
        "callbacks.dynamics.grad_split_every_n_steps=0",
        f"hydra.run.dir={run}",
    ]
    launch(["-m", "cwdpo.train", *args], cwd=REPO, timeout=900)
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["cw_dpo"]["steps"] == 2
    assert "pref_calib/ece" in results["stages"]["cw_dpo"]  # the reference scored after fit
    from cwdpo.model.backbone import VLMBackbone

    for stage in ("sft_c", "cw_dpo"):
        hf = run / "checkpoints" / f"{stage}_hf"
        saved = VLMBackbone.from_pretrained(hf, max_length=128).model.state_dict()
        ckpt = _ckpt_policy(run / "checkpoints" / stage / "last.ckpt")
        assert saved.keys() == ckpt.keys()
        for k in saved:
            torch.testing.assert_close(saved[k], ckpt[k], atol=0, rtol=0, msg=k)
    final = VLMBackbone.from_pretrained(run / "checkpoints" / "cw_dpo_hf", max_length=128)
    final = final.model.state_dict()
    start = _initial_weights(tiny_vlm_path)
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-4


MIXED_SCRIPT = (
    """
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from cwdpo.model.backbone import VLMBackbone
from cwdpo.data.shapes import ShapesWorld
from cwdpo.utils.strategies import shard_model

rank, tiny, out, init = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
bb = VLMBackbone.from_pretrained(tiny, max_length=128)
pair = ShapesWorld().pairs("train", 1)[0]
with_image = dict(bb.collate([pair.image.load()], [pair.prompt], [pair.chosen]))
text_only = dict(bb.tokenizer(["a red circle on the left ."], return_tensors="pt"))
batches = [with_image, text_only]  # rank 1's batch has no image at all

def loss_of(model, b):
    b = {k: v for k, v in b.items() if k != "labels"}
    return model(**b).logits.float().logsumexp(-1).mean()

ref = VLMBackbone.from_pretrained(tiny, max_length=128).model
(sum(loss_of(ref, b) for b in batches) / 2).backward()  # FSDP2 averages gradients over ranks
shard_model(bb.model, init_device_mesh("cpu", (2,)))
loss_of(bb.model, batches[rank]).backward()
worst = 0.0
for (name, p), q in zip(bb.model.named_parameters(), ref.parameters()):
    g = p.grad.full_tensor() if p.grad is not None else torch.zeros_like(q)
    worst = max(worst, (g - (q.grad if q.grad is not None else 0)).abs().max().item())
if rank == 0:
    with open(out, "w") as f:
        json.dump({"max_grad_diff": worst}, f)
"""
    + LEAVE
)


@pytest.mark.dist
def test_a_rank_without_images_does_not_hang_fsdp2_and_gradients_stay_exact(
    tiny_vlm_path, tmp_path
):
    """Rank 0 trains on an image row, rank 1 on a text-only row: with the vision tower in the
    root unit both ranks all-gather the same units, the step finishes, and the averaged
    gradients equal one process's gradient of both rows."""
    script = tmp_path / "mixed.py"
    script.write_text(MIXED_SCRIPT)
    out, init = tmp_path / "mixed.json", f"file://{tmp_path}/pg"
    run_ranks(script, [[str(r), str(tiny_vlm_path), str(out), init] for r in (0, 1)], 240)
    assert json.loads(out.read_text())["max_grad_diff"] < 1e-5
