"""Scale: trainer configs compose, our datamodules shard under DistributedSampler, and a real
2-process DDP run (gloo, CPU) of the CW-DPO stage equals the 1-process run with the same global
batch, with outputs (checkpoint, logs, saved policy) written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.gloo import LEAVE, free_port, run_ranks

REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp", "fsdp2", "fsdp_cpu", "deepspeed", "multinode")

# One CW-DPO stage on fixed ShapesWorld pairs, run by the test in-process (1 device) and as a
# subprocess under Lightning's DDP launcher (2 CPU processes, gloo). Rank-zero-only outputs are
# recorded in writes.log so the test can check each is written exactly once.
SCRIPT = textwrap.dedent(
    '''
    import json, sys
    from functools import partial
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, DistributedSampler, Sampler

    from cwdpo.batch import PairBatch
    from cwdpo.model.backbone import VLMBackbone
    from cwdpo.data.shapes import ShapesWorld
    from cwdpo.stages import CWDPOModule


    class GlobalOrder(Sampler):
        """Single process: the order in which `world` DDP ranks (per-rank batch b) see the data
        under the DistributedSampler Lightning injects (shuffle, seed = PL_GLOBAL_SEED):
        step s = rank 0's batch s, then rank 1's batch s, ..."""

        def __init__(self, n, world, b, seed=0):
            self.n, self.world, self.b, self.seed = n, world, b, seed

        def __iter__(self):
            shards = [list(DistributedSampler(range(self.n), num_replicas=self.world, rank=r,
                                              shuffle=True, seed=self.seed))
                      for r in range(self.world)]
            for s in range(len(shards[0]) // self.b):
                for r in range(self.world):
                    yield from shards[r][s * self.b:(s + 1) * self.b]

        def __len__(self):
            return self.n


    class FixedPairs(L.LightningDataModule):
        """Fixed dataset pairs; under DDP Lightning shards them with its DistributedSampler."""

        def __init__(self, backbone, n_pairs, batch_size, mirror_world=None):
            super().__init__()
            self.pairs = ShapesWorld().pairs("train", n_pairs)
            self.images = [p.image.load() for p in self.pairs]
            self.backbone, self.batch_size, self.mirror = backbone, batch_size, mirror_world

        def train_dataloader(self):
            ds = list(range(len(self.pairs)))
            if self.mirror:  # 1 process with the global batch of `mirror` DDP ranks
                b = self.batch_size // self.mirror
                return DataLoader(ds, batch_size=self.batch_size, collate_fn=list,
                                  sampler=GlobalOrder(len(ds), self.mirror, b))
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, collate_fn=list)

        def on_before_batch_transfer(self, idx, dataloader_idx):
            ps = [self.pairs[i] for i in idx]
            enc = self.backbone.collate_pairs([self.images[i] for i in idx], [p.prompt for p in ps],
                                              [p.chosen for p in ps], [p.rejected for p in ps])
            return PairBatch(enc, len(ps), neg_is_dataset=torch.ones(len(ps)),
                             neg_is_easy=torch.zeros(len(ps)))


    def make_strategy(name, devices):
        """ddp | fsdp over gloo CPU processes (1 device: no strategy)."""
        if devices == 1:
            return "auto"
        if name == "fsdp":  # FSDP2, the settings of conf/trainer/fsdp_cpu.yaml
            from cwdpo.utils.strategies import FSDP2Strategy

            return FSDP2Strategy(process_group_backend="gloo")
        return DDPStrategy(process_group_backend="gloo", find_unused_parameters=True)


    def run(tiny, out, devices, batch_size, steps=3, prefix_sharing=False, ref_cache=False,
            mirror_world=None, strategy="ddp", lora=False, ckpt_path=None, data_steps=None,
            accelerator="cpu", precision="32-true", gradient_checkpointing=False):
        torch.set_num_threads(1)
        out = Path(out)
        L.seed_everything(0)
        bb = VLMBackbone.from_pretrained(
            tiny, max_length=128, gradient_checkpointing=gradient_checkpointing,
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"} if lora else None)
        bb.snapshot_reference()
        module = CWDPOModule(bb, optimizer=partial(torch.optim.AdamW, lr=2e-3), beta=0.5,
                             prefix_sharing=prefix_sharing,
                             ref_cache=str(out / "ref_cache") if ref_cache else None)
        strategy = make_strategy(strategy, devices)
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, max_steps=steps,
            precision=precision,
            logger=CSVLogger(str(out), name="logs", version="cw_dpo"), log_every_n_steps=1,
            callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, save_top_k=0,
                                       every_n_train_steps=steps)],
            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
            default_root_dir=str(out),
        )
        dm = FixedPairs(bb, (data_steps or steps) * batch_size * devices, batch_size, mirror_world)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if getattr(module, "_sharded", False):  # FSDP2: what each rank holds of the weights
            from torch.distributed.tensor import DTensor

            def numel(m, local):
                return sum((p.to_local() if local and isinstance(p, DTensor) else p).numel()
                           for p in m.parameters())

            ref = bb.reference if bb.reference is not None else bb.model
            (out / f"sharding{trainer.global_rank}.json").write_text(json.dumps({
                "local": numel(bb.model, True), "full": numel(bb.model, False),
                "ref_local": numel(ref, True), "ref_full": numel(ref, False)}))
        if trainer.is_global_zero:  # what the pipeline does: rank zero writes the outputs once
            with open(out / "writes.log", "a") as f:
                f.write(f"rank{trainer.global_rank}\\n")
            torch.save({k: v.detach().clone() for k, v in bb.model.state_dict().items()},
                       out / "weights.pt")
            (out / "results.json").write_text(json.dumps(
                {"world_size": trainer.world_size, "steps": trainer.global_step}))
        return bb


    if __name__ == "__main__":
        a = json.loads(sys.argv[1])
        run(**a)
    '''
)


def _launcher_env() -> dict[str, str]:
    """This environment for a script that Lightning's DDP launcher starts: the repo importable,
    and no rank variables of an outer launcher that would make it think it is already rank r."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch(args: list[str], cwd: Path, timeout: float) -> None:
    """`python *args` in `_launcher_env()`, as Lightning's launcher would start it; fails with
    the tail of its output."""
    proc = subprocess.run(
        [sys.executable, *args],
        env=_launcher_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ddp") / "ddp_run.py"
    p.write_text(SCRIPT)
    return p


def test_trainer_configs_compose():
    import hydra
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for name in TRAINERS:
            t = compose("train", overrides=[f"trainer={name}"]).trainer
            assert t._target_ == "lightning.Trainer"
            for key in ("precision", "accumulate_grad_batches", "num_nodes", "strategy"):
                assert key in t, (name, key)
            if name in ("ddp", "ddp_cpu", "fsdp", "fsdp2", "fsdp_cpu", "multinode"):
                strategy = hydra.utils.instantiate(t.strategy)  # constructible without GPUs
                assert type(strategy).__name__ in ("DDPStrategy", "FSDPStrategy", "FSDP2Strategy")
        # the wrap policy reaches FSDP as a working size rule: a block at the threshold is its
        # own shard unit, one parameter less stays with its parent
        t = compose("train", overrides=["trainer=fsdp"]).trainer
        policy = hydra.utils.instantiate(t.strategy).kwargs["auto_wrap_policy"]
        at = t.strategy.auto_wrap_policy.min_num_params
        block = torch.nn.Linear(1, 1)
        assert policy(module=block, recurse=False, nonwrapped_numel=at)
        assert not policy(module=block, recurse=False, nonwrapped_numel=at - 1)
        # the CPU trainers build as Lightning sees them: 2 CPU processes on a backend this
        # torch has (what the gloo tests below launch)
        for name, kind in (("ddp_cpu", "DDPStrategy"), ("fsdp_cpu", "FSDP2Strategy")):
            trainer = hydra.utils.instantiate(
                compose("train", overrides=[f"trainer={name}"]).trainer, logger=False
            )
            assert type(trainer.strategy).__name__ == kind, name
            assert type(trainer.accelerator).__name__ == "CPUAccelerator", name
            assert trainer.num_devices == 2 and trainer.world_size == 2, name
            assert torch.distributed.is_backend_available(trainer.strategy.process_group_backend)


def test_multinode_reads_slurm_and_torchrun_env(monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cwdpo.run.config import CONFIG_DIR

    for var in ("SLURM_NNODES", "NNODES", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):

        def trainer():
            t = compose("train", overrides=["trainer=multinode"]).trainer
            return OmegaConf.to_container(t, resolve=True)

        assert (trainer()["num_nodes"], trainer()["devices"]) == (1, "auto")
        monkeypatch.setenv("SLURM_NNODES", "4")
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
        assert (trainer()["num_nodes"], trainer()["devices"]) == (4, 8)
        monkeypatch.delenv("SLURM_NNODES")
        monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
        monkeypatch.setenv("NNODES", "2")  # torchrun: export NNODES; LOCAL_WORLD_SIZE is set
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert (trainer()["num_nodes"], trainer()["devices"]) == (2, 4)


def test_datamodule_loader_shards_under_distributed_sampler():
    """Lightning re-creates our DataLoader with its distributed sampler (exactly as under
    `Trainer(strategy="ddp")`): it must accept our loader (sampler, generator, collate_fn,
    drop_last) and give each rank a disjoint shard, together covering the data."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    from cwdpo.data.datamodules import PreferenceDataModule
    from cwdpo.data.sources import ShapesSource

    src = ShapesSource(sizes={"train": 16, "val": 4, "test": 4, "probe": 4})
    dm = PreferenceDataModule(src, src.captions("train"), batch_size=4)
    loader = dm.train_dataloader()
    shards = []
    for rank in range(2):
        sampler = _get_distributed_sampler(
            loader,
            shuffle=True,
            overfit_batches=0,
            mode=RunningStage.TRAINING,
            num_replicas=2,
            rank=rank,
        )
        dl = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        shards.append([i for idx, _ in dl for i in idx])
        assert all(len(idx) == 4 for idx, _ in dl)  # per-rank batch size kept
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(16))


def _load_script(script: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.dist
def test_two_process_ddp_equals_single_process(script, tiny_vlm_path, tmp_path):
    """Global batch 4: 1 process × 4 pairs vs 2 gloo processes × 2 pairs, 3 AdamW steps.
    The DDP run also uses the prefix-shared forward and the reference cache."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _load_script(script).run(
        str(tiny_vlm_path), str(single), devices=1, batch_size=4, mirror_world=2
    )

    args = {
        "tiny": str(tiny_vlm_path),
        "out": str(ddp),
        "devices": 2,
        "batch_size": 2,
        "prefix_sharing": True,
        "ref_cache": True,
    }
    launch([str(script), json.dumps(args)], cwd=tmp_path, timeout=600)

    assert json.loads((ddp / "results.json").read_text()) == {"world_size": 2, "steps": 3}
    # outputs written once: one rank wrote, one checkpoint set, one metrics log
    assert (ddp / "writes.log").read_text().split() == ["rank0"]
    assert sorted(p.name for p in (ddp / "ckpt").iterdir()) == sorted(
        p.name for p in (single / "ckpt").iterdir()
    )
    assert len(list(ddp.rglob("metrics.csv"))) == 1
    # each rank keeps its own reference-cache shard (2 pairs × 3 steps each)
    shards = sorted(p.name for p in (ddp / "ref_cache").rglob("*.safetensors"))
    assert shards == ["rank0.safetensors", "rank1.safetensors"]

    w1 = torch.load(single / "weights.pt")
    w2 = torch.load(ddp / "weights.pt")
    w0 = _initial_weights(tiny_vlm_path)
    assert w1.keys() == w2.keys()
    moved = max((w1[k].float() - w0[k].float()).abs().max().item() for k in w1)
    assert moved > 1e-3  # training really changed the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4, msg=k)


def _initial_weights(path):
    from cwdpo.model.backbone import VLMBackbone

    bb = VLMBackbone.from_pretrained(path, max_length=128)
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


ON_POLICY_SCRIPT = (
    textwrap.dedent(
        """
    import json, os, sys
    import torch.distributed as dist
    from cwdpo.callbacks.on_policy import policy_sampler, refresh_negatives
    from cwdpo.data.datamodules import NegativeConfig, PreferenceDataModule
    from cwdpo.data.shapes import WorldConfig
    from cwdpo.data.sources import ShapesSource

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    src = ShapesSource(WorldConfig(), seed=0, sizes={"train": 10, "val": 2, "test": 2, "probe": 2})
    dm = PreferenceDataModule(src, src.captions("train"), batch_size=2,
                              negatives=NegativeConfig(kind="on_policy", dataset_fraction=0.0))
    seen = []

    def generate(images, prompts, num_return_sequences=1, **kw):
        seen.append(len(images))  # a deterministic stand-in: the prompt index, per sample
        return [f"a red circle on the left {len(seen)}-{i}-{rank}"
                for i in range(len(images) * num_return_sequences)]

    stats = refresh_negatives(dm, policy_sampler(generate), step=0)
    with open(out, "w") as f:
        json.dump({"buffer": dm.buffer, "generated": sum(seen), "kept": stats["on_policy/kept"]}, f)
    """
    )
    + LEAVE
)


@pytest.mark.dist
def test_on_policy_refresh_shards_generation_and_merges_buffers(tmp_path):
    """Each rank generates for its own shard of the images; after the gather every rank holds
    the negatives of every image, and the kept count is global."""
    script = tmp_path / "onpolicy.py"
    script.write_text(ON_POLICY_SCRIPT)
    port = free_port()
    run_ranks(script, [[str(r), "2", port, str(tmp_path / f"r{r}.json")] for r in range(2)])
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["generated"] == 5 and r1["generated"] == 5  # 10 images split 5 / 5
    assert r0["buffer"] == r1["buffer"] and len(r0["buffer"]) == 10
    assert r0["kept"] == r1["kept"] == 20.0  # 10 images × 2 samples, summed over ranks
    # rank 0 sampled the even images, rank 1 the odd ones
    ids = [f"shapes-train-{i}" for i in range(10)]
    assert all(r0["buffer"][ids[i]][0].endswith(f"-{i % 2}") for i in range(10))


PROBE_RULES_SCRIPT = textwrap.dedent(
    '''
    import json, sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from cwdpo.callbacks.probes import DeltaLogpProbe

    out = Path(sys.argv[1])


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, i):
            return self.lin(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)


    class Rules(L.Callback):
        """At step 2 each rank applies the probe rules to its own trajectory: only rank 1's
        positives have fallen (float noise on a GPU could do that to one rank alone)."""

        def __init__(self):
            self.probe = DeltaLogpProbe(rules={"displacement": {
                "kind": "drop_from_best", "threshold": 0.5, "stages": ["cw_dpo"]}})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            if trainer.global_step != 2:
                return
            p = self.probe
            (out / "run").mkdir(exist_ok=True)
            p.set_stage("cw_dpo", out / "run", first=True)
            p.sets = {"positives": None}
            vals = [0.0, 0.8, 0.1] if trainer.global_rank == 1 else [0.0, 0.3, 0.5]
            p.trajectory = [{"group": "positives", "step": s, "mean": v}
                            for s, v in zip([0, 20, 40], vals)]
            p.apply_rules(trainer, pl_module, trainer.global_step)


    rules = Rules()
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=20, logger=False,
                        strategy=DDPStrategy(process_group_backend="gloo"), callbacks=[rules],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(torch.randn(200, 2), batch_size=2))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"steps": trainer.global_step, "stop_reason": rules.probe.stop_reason}))
    '''
)


@pytest.mark.dist
def test_probe_rules_fire_on_every_rank_under_real_ddp(tmp_path):
    """2 gloo processes under Lightning's DDP: a stop rule that holds on rank 1 only stops both
    ranks at the same step (a rank-local stop would leave rank 0 waiting in its next all-reduce)."""
    script = tmp_path / "probe_rules.py"
    script.write_text(PROBE_RULES_SCRIPT)
    launch([str(script), str(tmp_path)], cwd=tmp_path, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] < 20  # stopped early, together
    assert r1["stop_reason"].startswith("displacement: positives mean fell 0.700")
    assert r0["stop_reason"] == "displacement: held on another rank at step 2"
