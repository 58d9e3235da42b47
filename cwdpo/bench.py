"""`python -m cwdpo.bench`: step throughput and memory of CW-DPO vs our DPO vs TRL's DPOTrainer.

One run, one model (the embedded tiny LLaVA by default, or --model PATH), one set of ShapesWorld
pairs, one batch. Measured, interleaved round-robin so that machine noise hits every variant
alike (the median over rounds is reported):

- our training step (CWDPOModule.compute + backward + AdamW step), for cooling on (CW-DPO) and
  off (vanilla DPO), on three paths: `plain` (collate_pairs + one forward, like TRL),
  `prefix` (image + prompt once per pair, cwdpo.model.prefix) and `prefix+cache` (plus the reference
  log-prob cache, warm: what every epoch after the first costs);
- TRL's `DPOTrainer.training_step` + optimizer step on the same pairs, batch and precision;
- LoRA vs full fine-tuning (reference = adapters disabled vs a frozen copy): time and memory;
- on-policy generation tokens/s (`VLMBackbone.generate`, sampling, as the refresh does).

Prints a table and the ratios against the targets (CW-DPO overhead ≤ 3% over our DPO; our DPO
≥ 1.5× TRL's throughput) and writes everything to a JSON file. Memory: on CUDA the peak of
`torch.cuda.max_memory_allocated` during a step; on CPU the peak RSS increase during a step
(sampled every ~0.5 ms, after `malloc_trim` so that re-used free heap pages count again);
plus the exact bytes of weights, reference, gradients and optimizer state.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TARGET_CW_OVERHEAD = 0.03
TARGET_VS_TRL = 1.5


# ----------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_memory_eagerly() -> None:
    """glibc: give free heap pages back to the OS (malloc_trim), so that a step re-using freed
    heap memory faults its pages in again and shows up in RSS."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _return_memory_eagerly()
            self.base = _rss_bytes()
            self._stop = threading.Event()
            self._max = self.base

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, _rss_bytes())
                    time.sleep(0.0005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.total = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self.base
            self.total = self._max


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(model: torch.nn.Module, reference: torch.nn.Module | None, opt) -> dict[str, int]:
    """Exact bytes held between steps: weights, reference copy, gradients, optimizer state."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt_state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    out = {
        "weights": _bytes(params),
        "reference": _bytes(reference.parameters()) if reference is not None else 0,
        "grads": _bytes(trainable),
        "optimizer": _bytes(opt_state),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    out["total"] = out["weights"] + out["reference"] + out["grads"] + out["optimizer"]
    return out


@dataclass
class Variant:
    name: str
    step: Callable[[], Any]
    group: str  # "ours" | "trl" | "lora"
    state: Callable[[], dict[str, int]] | None = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak: int = 0
    total: int = 0


# ----------------------------------------------------------------------------- setup
def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pairs(n: int, seed: int):
    from cwdpo.data.shapes import ShapesWorld

    pairs = ShapesWorld(seed=seed).pairs("train", n + 4)[:n]
    if len(pairs) < n:
        raise RuntimeError(f"ShapesWorld gave {len(pairs)} pairs, wanted {n}")
    return pairs


def _our_batch(bb, pairs, device):
    from cwdpo.batch import PairBatch

    images = [p.image.load() for p in pairs]
    enc = bb.collate_pairs(
        images, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    )
    n = len(pairs)
    return PairBatch(
        inputs={k: v.to(device) for k, v in enc.items()},
        n=n,
        neg_is_dataset=torch.ones(n, device=device),
        neg_is_easy=torch.tensor(
            [float(p.source.startswith("easy")) for p in pairs], device=device
        ),
    )


def _our_variants(args, path, pairs, device, lora) -> tuple[list[Variant], dict[str, Any]]:
    from cwdpo.model.backbone import LoRASettings, VLMBackbone
    from cwdpo.model.ref_cache import RefLogpCache, reference_fingerprint
    from cwdpo.stages import CWDPOModule

    torch.manual_seed(args.seed)
    settings = LoRASettings() if lora else None
    bb = VLMBackbone.from_pretrained(
        path,
        max_length=args.max_length,
        lora=settings,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    bb.model.to(device)
    bb.snapshot_reference()
    bb.model.train()
    params = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batch = _our_batch(bb, pairs, device)
    info = _composition(bb, batch)
    cache_dir = tempfile.mkdtemp(prefix="cwdpo-bench-refcache-")
    fp = reference_fingerprint(bb)

    def make(cooling: bool, prefix: bool, cache: bool) -> Callable[[], Any]:
        m = CWDPOModule(
            bb,
            optimizer=partial(torch.optim.AdamW, lr=args.lr),
            beta=0.1,
            cooling=cooling,
            prefix_sharing=prefix,
            ref_cache=RefLogpCache(cache_dir).bind(fp) if cache else None,
        )

        def step() -> None:
            with _autocast(device, args.precision):
                loss, _ = m.compute(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)

        if cache:  # warm: the first epoch fills it (cost = one reference forward per pair)
            with torch.no_grad(), _autocast(device, args.precision):
                m.compute(batch)
        return step

    def state() -> dict[str, int]:
        return state_bytes(bb.model, bb.reference, opt)

    out = []
    if lora:
        for cooling, name in ((True, "cwdpo"), (False, "dpo")):
            out.append(
                Variant(f"lora/{name}/prefix+cache", make(cooling, True, True), "lora", state)
            )
        return out, info
    for path_name, prefix, cache in (
        ("plain", False, False),
        ("prefix", True, False),
        ("prefix+cache", True, True),
    ):
        for cooling, name in ((False, "dpo"), (True, "cwdpo")):
            out.append(Variant(f"{name}/{path_name}", make(cooling, prefix, cache), "ours", state))
    return out, info


def _composition(bb, batch) -> dict[str, Any]:
    from cwdpo.batch import IGNORE_INDEX

    enc = batch.inputs
    image_id = getattr(bb.model.config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(bb.model.config, "image_token_index", -1)
    real = enc["attention_mask"].bool()
    resp = enc["labels"] != IGNORE_INDEX
    img = (enc["input_ids"] == image_id) & real
    rows = real.shape[0]
    return {
        "rows": rows,
        "image_tokens_per_row": img.sum().item() / rows,
        "prompt_text_tokens_per_row": (real & ~resp & ~img).sum().item() / rows,
        "response_tokens_per_row": resp.sum().item() / rows,
        "padded_width": real.shape[1],
    }


def _trl_variant(args, path, pairs, device) -> tuple[Variant, dict[str, Any]]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    from cwdpo.model.processing import load_processor

    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(path)
    ref = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)  # AutoProcessor, or without its video processor

    def user(p):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]

    def assistant(t):
        return [{"role": "assistant", "content": [{"type": "text", "text": t}]}]

    ds = Dataset.from_dict(
        {
            "images": [[p.image.load()] for p in pairs],
            "prompt": [user(p.prompt) for p in pairs],
            "chosen": [assistant(p.chosen) for p in pairs],
            "rejected": [assistant(p.rejected) for p in pairs],
        }
    )
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="cwdpo-bench-trl-"),
        per_device_train_batch_size=len(pairs),
        learning_rate=args.lr,
        beta=0.1,
        max_length=None,
        report_to="none",
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.precision == "bf16",
        use_cpu=device.type == "cpu",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=args.seed,
        logging_steps=1,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=processor
    )
    batch = next(iter(trainer.get_train_dataloader()))  # TRL's own collation (all pairs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        _sync(device)

    def state() -> dict[str, int]:
        return state_bytes(trainer.model, trainer.ref_model, trainer.optimizer)

    real = batch["attention_mask"].bool()
    info = {
        "version": trl.__version__,
        "rows": real.shape[0],
        "padded_width": real.shape[1],
        "completion_tokens_per_row": batch["completion_mask"].sum().item() / real.shape[0],
    }
    return Variant("trl/dpo", step, "trl", state), info


def _generation(args, path, pairs, device) -> dict[str, Any]:
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(args.seed)
    bb = VLMBackbone.from_pretrained(path, max_length=args.max_length)
    bb.model.to(device)
    images = [p.image.load() for p in pairs]
    prompts = [p.prompt for p in pairs]
    kw = {"max_new_tokens": args.gen_tokens, "do_sample": True, "num_return_sequences": 2}
    bb.generate(images[:2], prompts[:2], **kw)  # warm-up
    times, tokens = [], 0
    for _ in range(args.gen_rounds):
        _sync(device)
        t = time.perf_counter()
        with _autocast(device, args.precision):
            outs = bb.generate(images, prompts, **kw)
        _sync(device)
        times.append(time.perf_counter() - t)
        # re-tokenized samples (+ EOS), capped at max_new_tokens
        tokens += sum(min(len(bb.response_ids(o)) if o else 1, args.gen_tokens) for o in outs)
    total = sum(times)
    return {
        "sequences_per_round": len(pairs) * 2,
        "max_new_tokens": args.gen_tokens,
        "tokens": tokens,
        "seconds": total,
        "tokens_per_s": tokens / total,
    }


def _objective_overhead(n: int, reps: int = 500) -> dict[str, float]:
    """Noise-free view of the cooling cost: the objective alone, cooling on vs off."""
    from cwdpo.losses.objectives import cw_dpo_loss

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(n, generator=g) * 50 for _ in range(4)]
    ell = torch.randn(n, generator=g) - 3
    best = {False: float("inf"), True: float("inf")}
    for _ in range(5):  # alternate, keep the fastest repeat of each (noise only adds time)
        for cooling in (False, True):
            t = time.process_time()
            for _ in range(reps):
                cw_dpo_loss(*x, ell, beta=0.1, cooling=cooling)
            best[cooling] = min(best[cooling], (time.process_time() - t) / reps)
    out = {"dpo": best[False], "cooling": best[True]}
    out["extra_us_per_step"] = (out["cooling"] - out["dpo"]) * 1e6
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cwdpo.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="HF image-text-to-text dir, or tiny:<family> "
        "(a cwdpo.model.families build, e.g. tiny:qwen2_vl; default: tiny LLaVA)",
    )
    p.add_argument("--cache", default=None, help="cache dir for the tiny VLM (default CWDPO_CACHE)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per batch (batch = 2× rows)")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch default). 1 gives stable timings on small "
        "or shared CPUs",
    )
    p.add_argument("--precision", choices=("32", "bf16"), default="32")
    p.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="auto: process CPU time on CPU, synchronised wall time on CUDA",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--gen-rounds", type=int, default=2)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="gradient checkpointing on (ours and TRL's): the real-model configs' setting",
    )
    p.add_argument(
        "--image-tokens",
        type=int,
        default=None,
        help="tiny LLaVA with this many image tokens per row (a square number; 576 = "
        "LLaVA-1.5's shape, where prefix sharing matters most)",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print one markdown table over saved bench JSONs and exit (make bench)",
    )
    p.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA variants")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="logs/bench/bench.json", help="JSON results path")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device, t_start: float) -> dict[str, Any]:
    from cwdpo.model.tiny import ensure_tiny_vlm
    from cwdpo.utils.io import atomic_write_json

    if args.model and args.model.startswith("tiny:"):  # a tiny family build (cwdpo.model.families)
        from cwdpo.model.families import ensure_family

        path = ensure_family(args.model.split(":", 1)[1], args.cache)
    elif args.image_tokens:  # the image-heavy shape: same tiny LLaVA, bigger images
        import math

        from cwdpo.model.tiny import TinySpec

        side = math.isqrt(args.image_tokens)
        if side * side != args.image_tokens:
            raise SystemExit(f"--image-tokens must be a square number, got {args.image_tokens}")
        base = TinySpec()
        path = ensure_tiny_vlm(
            args.cache,
            TinySpec(image_size=side * base.patch_size, max_positions=args.image_tokens + 256),
        )
        args.max_length = max(args.max_length, args.image_tokens + 96)
    else:
        path = Path(args.model) if args.model else ensure_tiny_vlm(args.cache)
    pairs = _pairs(args.pairs, args.seed)

    variants, composition = _our_variants(args, path, pairs, device, lora=False)
    trl_info = None
    if not args.no_trl:
        try:
            v, trl_info = _trl_variant(args, path, pairs, device)
            variants.append(v)
        except Exception as e:  # TRL cannot run every family (its processor calls): say so
            trl_info = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(
                f"bench: TRL's DPOTrainer failed on this model, ours only: {trl_info['error']}",
                file=sys.stderr,
            )
    if not args.no_lora:
        variants += _our_variants(args, path, pairs, device, lora=True)[0]

    for v in variants:  # warm-up (first-call allocations, kernel selection)
        for _ in range(args.warmup):
            v.step()
    # Clock: on CPU the process CPU time (time.process_time) — on a shared machine wall time
    # mostly measures other tenants, CPU time measures the step's work; on CUDA wall time
    # (synchronised). Both are recorded.
    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    # Interleaved rounds in a fresh random order, so that machine noise hits every variant
    # alike. Cooling on/off of one path run back to back (in random order): their per-round
    # ratio compares adjacent steps, the tightest estimate of the CW-DPO overhead.
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.name.replace("cwdpo/", "dpo/"), []).append(v)
    order = random.Random(args.seed)
    for _ in range(args.rounds):
        for g in order.sample(list(groups.values()), len(groups)):
            for v in order.sample(g, len(g)):
                w, c = time.perf_counter(), time.process_time()
                v.step()
                v.wall.append(time.perf_counter() - w)
                v.cpu.append(time.process_time() - c)
    for v in variants:  # memory in a separate pass: the sampler would perturb the timings
        with PeakMemory(device) as pm:
            v.step()
        v.peak, v.total = pm.peak, pm.total

    res: dict[str, Any] = {"clock": clock, "variants": {}}
    times = {}
    for v in variants:
        t = v.cpu if clock == "cpu" else v.wall
        times[v.name] = t
        med = statistics.median(t)
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
        res["variants"][v.name] = {
            "median_s": med,
            "p25_s": q[0],
            "p75_s": q[2],
            "min_s": min(t),
            "samples_per_s": args.pairs / med,  # samples = preference pairs
            "wall_median_s": statistics.median(v.wall),
            "cpu_median_s": statistics.median(v.cpu),
            "peak_step_mb": v.peak / 2**20,
            "state_mb": {
                k: (x / 2**20 if k != "trainable_params" else x)
                for k, x in (v.state() if v.state else {}).items()
            },
        }

    def ratio(a: str, b: str) -> float:  # time(a) / time(b), medians of the chosen clock
        return statistics.median(times[a]) / statistics.median(times[b])

    ratios: dict[str, Any] = {
        "cw_overhead_vs_our_dpo": {},
        "cw_overhead_iqr": {},
        "cw_overhead_ratio_of_medians": {},
        "throughput_vs_trl": {},
    }
    for p in ("plain", "prefix", "prefix+cache"):
        pr = [x / y for x, y in zip(times[f"cwdpo/{p}"], times[f"dpo/{p}"])]
        q = statistics.quantiles(pr, n=4) if len(pr) > 1 else [pr[0]] * 3
        ratios["cw_overhead_vs_our_dpo"][p] = statistics.median(pr) - 1.0  # adjacent pairs
        ratios["cw_overhead_iqr"][p] = [q[0] - 1.0, q[2] - 1.0]
        ratios["cw_overhead_ratio_of_medians"][p] = ratio(f"cwdpo/{p}", f"dpo/{p}") - 1.0
    if "trl/dpo" in times:
        for name in times:
            if name != "trl/dpo":
                ratios["throughput_vs_trl"][name] = ratio("trl/dpo", name)
    ratios["prefix_speedup_vs_plain"] = ratio("dpo/plain", "dpo/prefix")
    ratios["cache_speedup_vs_prefix"] = ratio("dpo/prefix", "dpo/prefix+cache")
    obj = _objective_overhead(args.pairs)
    ratios["cw_objective_extra_us"] = obj["extra_us_per_step"]
    ratios["cw_objective_extra_frac_of_step"] = (
        obj["extra_us_per_step"] * 1e-6 / res["variants"]["dpo/prefix+cache"]["median_s"]
    )
    res["ratios"] = ratios
    best = max(
        ("dpo/plain", "dpo/prefix", "dpo/prefix+cache"),
        key=lambda k: res["variants"][k]["samples_per_s"],
    )
    cw_over = ratios["cw_overhead_vs_our_dpo"]["prefix+cache"]
    res["targets"] = {
        "cw_overhead_max": TARGET_CW_OVERHEAD,
        "cw_overhead_measured": cw_over,
        "cw_overhead_met": cw_over <= TARGET_CW_OVERHEAD,
        "vs_trl_min": TARGET_VS_TRL,
        "our_best_dpo": best,
        "vs_trl_measured": ratios["throughput_vs_trl"].get(best),
        "vs_trl_met": (ratios["throughput_vs_trl"].get(best) or 0) >= TARGET_VS_TRL,
    }
    if not args.no_generation:
        res["generation"] = _generation(args, path, pairs, device)
    res["setup"] = {
        "command": ("python -m cwdpo.bench " + " ".join(sys.argv[1:]))
        if getattr(args, "_cli", False)
        else None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, load avg {os.getloadavg()[0]:.1f})",
        "model": str(path),
        "pairs": args.pairs,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "precision": args.precision,
        "optimizer": f"AdamW(lr={args.lr})",
        "gradient_checkpointing": args.gradient_checkpointing,
        "composition": composition,
        "trl": trl_info,
        "versions": _versions(),
        "seconds": time.time() - t_start,
    }
    out = Path(args.out)
    atomic_write_json(out, res)
    res["setup"]["json"] = str(out)
    return res


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {}
    for pkg in ("torch", "transformers", "trl", "peft", "lightning"):
        with contextlib.suppress(md.PackageNotFoundError):
            v[pkg] = md.version(pkg)
    return v


def report(res: dict[str, Any]) -> str:
    s = res["setup"]
    c = s["composition"]
    lines = [
        f"device: {s['device']}  precision: {s['precision']}  pairs/batch: {s['pairs']}  "
        f"rounds: {s['rounds']}, medians of {res['clock']} time",
        f"sequence: {c['image_tokens_per_row']:.0f} image + {c['prompt_text_tokens_per_row']:.0f} "
        f"prompt + {c['response_tokens_per_row']:.1f} response tokens per row",
        "",
        f"{'variant':<26}{'step s':>8}{'IQR s':>14}{'wall s':>8}{'pairs/s':>9}{'vs TRL':>8}"
        f"{'peak MB':>9}{'state MB':>10}",
    ]
    vs = res["ratios"]["throughput_vs_trl"]
    for name, v in res["variants"].items():
        r = "1.00" if name == "trl/dpo" else (f"{vs[name]:.2f}" if name in vs else "–")
        st = v["state_mb"].get("total", float("nan"))
        iqr = f"{v['p25_s']:.3f}-{v['p75_s']:.3f}"
        lines.append(
            f"{name:<26}{v['median_s']:>8.3f}{iqr:>14}{v['wall_median_s']:>8.3f}"
            f"{v['samples_per_s']:>9.1f}{r:>8}"
            f"{v['peak_step_mb']:>9.1f}{st:>10.2f}"
        )
    r = res["ratios"]
    lines += [
        "",
        "CW-DPO overhead over our DPO (median of adjacent-step ratios [IQR]): "
        + ", ".join(
            f"{k} {100 * x:+.1f}% [{100 * a:+.1f}, {100 * b:+.1f}]"
            for (k, x), (a, b) in zip(
                r["cw_overhead_vs_our_dpo"].items(), r["cw_overhead_iqr"].values()
            )
        )
        + f"; objective alone: {r['cw_objective_extra_us']:.0f} µs/step "
        f"({100 * r['cw_objective_extra_frac_of_step']:.3f}% of a step)",
        f"prefix sharing: {r['prefix_speedup_vs_plain']:.2f}× plain; ref cache: "
        f"{r['cache_speedup_vs_prefix']:.2f}× prefix",
    ]
    t = res["targets"]
    lines.append(
        f"targets: CW overhead {100 * t['cw_overhead_measured']:+.1f}% (≤ 3%: "
        f"{'met' if t['cw_overhead_met'] else 'NOT met'}); our DPO ({t['our_best_dpo']}) vs TRL "
        + (
            f"{t['vs_trl_measured']:.2f}× (≥ 1.5×: {'met' if t['vs_trl_met'] else 'NOT met'})"
            if t["vs_trl_measured"]
            else "not measured"
        )
    )
    if "generation" in res:
        g = res["generation"]
        lines.append(
            f"on-policy generation: {g['tokens_per_s']:.0f} tokens/s "
            f"({g['sequences_per_round']} samples × ≤{g['max_new_tokens']} tokens)"
        )
    lines.append(f"json: {s.get('json')}  ({s['seconds']:.0f} s)")
    return "\n".join(lines)


def summarize(paths: list[str | Path]) -> str:
    """One markdown table over bench JSONs (one row per model × checkpointing setting):
    samples/s of our plain / prefix / prefix+cache DPO and TRL's, speed-ups vs TRL, CW-DPO's
    overhead and peak step memory vs TRL's."""
    cols = [
        "model",
        "image+prompt+response tokens",
        "grad ckpt",
        "plain",
        "prefix",
        "prefix+cache",
        "TRL",
        "prefix vs TRL",
        "prefix+cache vs TRL",
        "CW-DPO overhead",
        "peak MB ours / TRL",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in paths:
        r = json.loads(Path(p).read_text())
        s, v, c = r["setup"], r["variants"], r["setup"]["composition"]
        sps = {k: x["samples_per_s"] for k, x in v.items()}
        trl = sps.get("trl/dpo")

        def vs(k: str, sps: dict = sps, trl: float | None = trl) -> str:
            return f"{sps[k] / trl:.2f}×" if trl and k in sps else "–"

        peak = v.get("dpo/prefix+cache", {}).get("peak_step_mb", float("nan"))
        tpeak = v.get("trl/dpo", {}).get("peak_step_mb")
        name = re.sub(r"^tiny-(.+)-[0-9a-f]{12}$", r"tiny \1", Path(s["model"]).name)
        row = [
            name,
            f"{c['image_tokens_per_row']:.0f}+{c['prompt_text_tokens_per_row']:.0f}+"
            f"{c['response_tokens_per_row']:.1f}",
            "on" if s.get("gradient_checkpointing") else "off",
            *(
                f"{sps[k]:.1f}" if k in sps else "–"
                for k in ("dpo/plain", "dpo/prefix", "dpo/prefix+cache", "trl/dpo")
            ),
            vs("dpo/prefix"),
            vs("dpo/prefix+cache"),
            f"{100 * r['ratios']['cw_overhead_vs_our_dpo']['prefix+cache']:+.1f}%",
            f"{peak:.1f} / {tpeak:.1f}" if tpeak else f"{peak:.1f} / –",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    args._cli = argv is None
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    res = run(args)
    print(report(res))
    return res


if __name__ == "__main__":
    main()
