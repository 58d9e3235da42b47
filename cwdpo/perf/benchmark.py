"""One bench run (`python -m cwdpo.bench`): build the variants, time them interleaved, measure
their memory, and compute the ratios against the targets; written to one JSON file.

Interleaved round-robin in a fresh random order each round, so that machine noise hits every
variant alike; the median over rounds is reported. See `cwdpo.bench` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cwdpo.perf.memory import PeakMemory
from cwdpo.perf.variants import (
    Variant,
    generation,
    objective_overhead,
    our_variants,
    shapes_pairs,
    trl_variant,
)

TARGET_CW_OVERHEAD = 0.03
TARGET_VS_TRL = 1.5
PATHS = ("plain", "prefix", "prefix+cache")


def bench_device(args: argparse.Namespace) -> torch.device:
    """`--device`: auto is CUDA where there is one, else the CPU."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if args.device == "auto" else args.device)


@contextlib.contextmanager
def bench_threads(args: argparse.Namespace):
    """`--threads` torch threads while measuring (0: as they are), restored afterwards."""
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole bench with `args` (`cwdpo.bench.parse_args`); returns what it wrote to args.out."""
    t_start = time.time()
    with bench_threads(args):
        return _run(args, bench_device(args), t_start)


def _run(args: argparse.Namespace, device: torch.device, t_start: float) -> dict[str, Any]:
    from cwdpo.utils.io import atomic_write_json

    path = model_path(args)
    pairs = shapes_pairs(args.pairs, args.seed)
    variants, composition, trl_info = build_variants(args, path, pairs, device)
    for v in variants:  # warm-up (first-call allocations, kernel selection)
        for _ in range(args.warmup):
            v.step()
    # Clock: on CPU the process CPU time (time.process_time) — on a shared machine wall time
    # mostly measures other tenants, CPU time measures the step's work; on CUDA wall time
    # (synchronised). Both are recorded.
    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    time_rounds(variants, args.rounds, args.seed)
    for v in variants:  # memory in a separate pass: the sampler would perturb the timings
        with PeakMemory(device) as pm:
            v.step()
        v.peak, v.total = pm.peak, pm.total

    res: dict[str, Any] = {"clock": clock, "variants": {}}
    times = {v.name: (v.cpu if clock == "cpu" else v.wall) for v in variants}
    res["variants"] = {v.name: variant_stats(v, times[v.name], args.pairs) for v in variants}
    res["ratios"] = ratios(times, res["variants"], args.pairs)
    res["targets"] = targets(res)
    if not args.no_generation:
        res["generation"] = generation(args, path, pairs, device)
    res["setup"] = setup(args, device, path, composition, trl_info, t_start)
    out = Path(args.out)
    atomic_write_json(out, res)
    res["setup"]["json"] = str(out)
    return res


def model_path(args: argparse.Namespace) -> Path:
    """The model dir: --model, a tiny family build (`tiny:<family>`), the image-heavy tiny LLaVA
    (--image-tokens, which also raises args.max_length to fit), or the embedded tiny VLM."""
    from cwdpo.model.tiny import ensure_tiny_vlm

    if args.model and args.model.startswith("tiny:"):  # a tiny family build (cwdpo.model.families)
        from cwdpo.model.families import ensure_family

        return ensure_family(args.model.split(":", 1)[1], args.cache)
    if args.image_tokens:  # the image-heavy shape: same tiny LLaVA, bigger images
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
        return path
    return Path(args.model) if args.model else ensure_tiny_vlm(args.cache)


def build_variants(
    args: argparse.Namespace, path: Path, pairs: list, device: torch.device
) -> tuple[list[Variant], dict[str, Any], dict[str, Any] | None]:
    """(ours, TRL's unless --no-trl, LoRA unless --no-lora; our batch's composition; TRL info)."""
    variants, composition = our_variants(args, path, pairs, device, lora=False)
    trl_info = None
    if not args.no_trl:
        try:
            v, trl_info = trl_variant(args, path, pairs, device)
            variants.append(v)
        except Exception as e:  # TRL cannot run every family (its processor calls): say so
            trl_info = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(
                f"bench: TRL's DPOTrainer failed on this model, ours only: {trl_info['error']}",
                file=sys.stderr,
            )
    if not args.no_lora:
        variants += our_variants(args, path, pairs, device, lora=True)[0]
    return variants, composition, trl_info


def time_rounds(variants: list[Variant], rounds: int, seed: int) -> None:
    """Interleaved rounds in a fresh random order, so that machine noise hits every variant
    alike. Cooling on/off of one path run back to back (in random order): their per-round
    ratio compares adjacent steps, the tightest estimate of the CW-DPO overhead."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.name.replace("cwdpo/", "dpo/"), []).append(v)
    order = random.Random(seed)
    for _ in range(rounds):
        for g in order.sample(list(groups.values()), len(groups)):
            for v in order.sample(g, len(g)):
                w, c = time.perf_counter(), time.process_time()
                v.step()
                v.wall.append(time.perf_counter() - w)
                v.cpu.append(time.process_time() - c)


def variant_stats(v: Variant, t: list[float], pairs: int) -> dict[str, Any]:
    """Median, quartiles and throughput of one variant on the chosen clock's times `t`."""
    med = statistics.median(t)
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
    return {
        "median_s": med,
        "p25_s": q[0],
        "p75_s": q[2],
        "min_s": min(t),
        "samples_per_s": pairs / med,  # samples = preference pairs
        "wall_median_s": statistics.median(v.wall),
        "cpu_median_s": statistics.median(v.cpu),
        "peak_step_mb": v.peak / 2**20,
        "state_mb": {
            k: (x / 2**20 if k != "trainable_params" else x)
            for k, x in (v.state() if v.state else {}).items()
        },
    }


def ratios(
    times: dict[str, list[float]], stats: dict[str, dict[str, Any]], pairs: int
) -> dict[str, Any]:
    """CW-DPO's overhead per path, throughput vs TRL, the prefix / cache speed-ups, and the
    objective's own extra cost."""

    def ratio(a: str, b: str) -> float:  # time(a) / time(b), medians of the chosen clock
        return statistics.median(times[a]) / statistics.median(times[b])

    out: dict[str, Any] = {
        "cw_overhead_vs_our_dpo": {},
        "cw_overhead_iqr": {},
        "cw_overhead_ratio_of_medians": {},
        "throughput_vs_trl": {},
    }
    for p in PATHS:
        pr = [x / y for x, y in zip(times[f"cwdpo/{p}"], times[f"dpo/{p}"])]
        q = statistics.quantiles(pr, n=4) if len(pr) > 1 else [pr[0]] * 3
        out["cw_overhead_vs_our_dpo"][p] = statistics.median(pr) - 1.0  # adjacent pairs
        out["cw_overhead_iqr"][p] = [q[0] - 1.0, q[2] - 1.0]
        out["cw_overhead_ratio_of_medians"][p] = ratio(f"cwdpo/{p}", f"dpo/{p}") - 1.0
    if "trl/dpo" in times:
        for name in times:
            if name != "trl/dpo":
                out["throughput_vs_trl"][name] = ratio("trl/dpo", name)
    out["prefix_speedup_vs_plain"] = ratio("dpo/plain", "dpo/prefix")
    out["cache_speedup_vs_prefix"] = ratio("dpo/prefix", "dpo/prefix+cache")
    obj = objective_overhead(pairs)
    out["cw_objective_extra_us"] = obj["extra_us_per_step"]
    out["cw_objective_extra_frac_of_step"] = (
        obj["extra_us_per_step"] * 1e-6 / stats["dpo/prefix+cache"]["median_s"]
    )
    return out


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """The two targets: CW-DPO overhead ≤ 3% over our DPO; our best DPO ≥ 1.5× TRL's."""
    r = res["ratios"]
    best = max((f"dpo/{p}" for p in PATHS), key=lambda k: res["variants"][k]["samples_per_s"])
    cw_over = r["cw_overhead_vs_our_dpo"]["prefix+cache"]
    return {
        "cw_overhead_max": TARGET_CW_OVERHEAD,
        "cw_overhead_measured": cw_over,
        "cw_overhead_met": cw_over <= TARGET_CW_OVERHEAD,
        "vs_trl_min": TARGET_VS_TRL,
        "our_best_dpo": best,
        "vs_trl_measured": r["throughput_vs_trl"].get(best),
        "vs_trl_met": (r["throughput_vs_trl"].get(best) or 0) >= TARGET_VS_TRL,
    }


def setup(args, device, path, composition, trl_info, t_start: float) -> dict[str, Any]:
    """What the numbers were measured on: command, device, model, settings, versions."""
    return {
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
        "versions": versions(),
        "seconds": time.time() - t_start,
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {}
    for pkg in ("torch", "transformers", "trl", "peft", "lightning"):
        with contextlib.suppress(md.PackageNotFoundError):
            v[pkg] = md.version(pkg)
    return v
