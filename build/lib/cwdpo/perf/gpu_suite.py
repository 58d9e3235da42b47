"""What `python -m cwdpo.gpu_check` runs on a GPU: the GPU test suite and `cwdpo.bench` in bf16
for the embedded tiny VLM, every tiny family and one realistic shape (Qwen2.5-VL-3B's
architecture with random bf16 weights), the bench's on-policy section (`--on-policy`), and the
markdown summary of it all.

Only the standard library at import: torch loads in `cuda_status` and the realistic build, so a
machine without CUDA is told so at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def cuda_status() -> tuple[bool, str]:
    """(available, a line saying what was found) — the reason when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU build)"
        return False, (
            f"no CUDA device visible to torch {torch.__version__} (CUDA build: "
            f"{build}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"{len(names)} CUDA device(s): {', '.join(names)}; torch {torch.__version__}"


def run_logged(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run `cmd`, its output into `log` (tail printed); rc, seconds, the command and the log."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    log.write_text(out)
    print(out[-4000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "log": str(log)}


# Qwen2.5-VL-3B-Instruct's published text and vision dimensions (config.json of the hub
# checkpoint), typed in so nothing is downloaded: the realistic shape of the paper's model family.
QWEN2_5_VL_3B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
REALISTIC = "Qwen2.5-VL-3B shape"


def build_realistic(cache: Path) -> Path:
    """Qwen2.5-VL-3B's architecture with random bf16 weights (initialised on the GPU), with the
    tiny qwen2_5_vl build's processor (its tokenizer ids fit inside the real vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from cwdpo.model.families import ensure_family
    from cwdpo.utils.io import atomic_save_dir

    out = cache / "qwen2_5_vl_3b_shape"
    if (out / "config.json").is_file():
        return out
    tiny = ensure_family("qwen2_5_vl", cache)
    cfg = AutoConfig.from_pretrained(tiny)
    for k, v in QWEN2_5_VL_3B["text"].items():
        setattr(cfg.text_config, k, v)
    for k, v in QWEN2_5_VL_3B["vision"].items():
        setattr(cfg.vision_config, k, v)
    cfg.vision_config.out_hidden_size = cfg.text_config.hidden_size
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(tiny)
    processor.image_processor.patch_size = QWEN2_5_VL_3B["vision"]["patch_size"]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return atomic_save_dir(out, write)


def bench_targets(cache: Path, realistic: bool) -> list[tuple[str, str | None]]:
    """(name, `--model` value; None = the embedded tiny VLM) of every model to benchmark."""
    from cwdpo.model.families import FAMILIES

    targets: list[tuple[str, str | None]] = [("tiny-llava (embedded)", None)]
    targets += [(f"tiny {name}", f"tiny:{name}") for name in FAMILIES if name != "llava"]
    if realistic:
        targets.append((f"{REALISTIC} (random bf16 weights)", str(build_realistic(cache))))
    return targets


def run_gpu_check(
    out: Path, cache: Path, device: str, realistic: bool, rounds: int, budget_s: float
) -> int:
    """The GPU suite, then the bench of every `bench_targets` model until `budget_s` is spent;
    writes `<out>/gpu_check.json` and `.md`. 0 when all passed, 1 otherwise."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"device": device, "suite": None, "bench": []}
    summary["suite"] = run_logged(SUITE, out / "suite.log", 150)
    for name, path in bench_targets(cache, realistic):
        if time.time() - t0 > budget_s:
            summary["bench"].append({"model": name, "skipped": "time budget spent"})
            continue
        summary["bench"].append({"model": name, **run_bench(name, path, out, cache, rounds)})
    summary["on_policy"] = run_on_policy_bench(out, cache)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    failed = summary["suite"]["rc"] != 0 or summary["on_policy"]["rc"] != 0
    failed = failed or any(b.get("rc", 0) != 0 for b in summary["bench"])
    return 1 if failed else 0


SUITE = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-m",
    "gpu",
    "-p",
    "no:cacheprovider",
    "tests/test_gpu.py",
]


def run_bench(name: str, path: str | None, out: Path, cache: Path, rounds: int) -> dict[str, Any]:
    """`cwdpo.bench` on CUDA in bf16 for one model, in a subprocess; its throughput, peak
    memory and ratio vs TRL read back from the bench JSON."""
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
    cmd = [
        sys.executable,
        "-m",
        "cwdpo.bench",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--rounds",
        str(rounds),
        "--warmup",
        "2",
        "--out",
        str(out / f"{slug}.json"),
    ]
    if path:
        cmd += ["--model", path, "--cache", str(cache)]
    res = run_logged(cmd, out / f"{slug}.log", 120)
    bench_json = out / f"{slug}.json"
    if bench_json.is_file():
        b = json.loads(bench_json.read_text())
        res["samples_per_s"] = {
            k: round(v["samples_per_s"], 2) for k, v in b.get("variants", {}).items()
        }
        res["peak_step_mb"] = {
            k: round(v["peak_step_mb"], 1) for k, v in b.get("variants", {}).items()
        }
        res["vs_trl"] = b.get("targets", {}).get("vs_trl_measured")
    return res


def run_on_policy_bench(out: Path, cache: Path) -> dict[str, Any]:
    """`cwdpo.bench --on-policy` on CUDA in bf16 (every tiny family and the 576-image-token
    LLaVA: plain vs shared-prefill sampling at K = 2, 4; a short on-policy CW-DPO stage at 400
    and 4,000 ShapesWorld images); its markdown table read back."""
    js = out / "on_policy.json"
    cmd = [sys.executable, "-m", "cwdpo.bench", "--on-policy", "--device", "cuda"]
    cmd += ["--precision", "bf16", "--gen-rounds", "3", "--on-policy-sizes", "400", "4000"]
    cmd += ["--cache", str(cache), "--out", str(js)]
    res = run_logged(cmd, out / "on_policy.log", 240)
    if js.is_file():
        from cwdpo.perf.summary import on_policy_text

        res["table"] = on_policy_text(json.loads(js.read_text()))
    return res


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"# gpu-check ({s['device']})",
        "",
        f"GPU suite: rc={s['suite']['rc']} in {s['suite']['seconds']} s",
        "",
        "| model | rc | best ours samples/s | TRL samples/s | ours vs TRL | peak MB (ours) |",
        "|---|---|---|---|---|---|",
    ]
    for b in s["bench"]:
        if "skipped" in b:
            lines.append(f"| {b['model']} | skipped: {b['skipped']} | | | | |")
            continue
        sps = b.get("samples_per_s", {})
        ours = {k: v for k, v in sps.items() if not k.startswith("trl")}
        best = max(ours, key=ours.get) if ours else None
        peak = b.get("peak_step_mb", {}).get(best, "") if best else ""
        vs = f"{b['vs_trl']:.2f}×" if b.get("vs_trl") else "–"
        lines.append(
            f"| {b['model']} | {b['rc']} | {best}: {ours.get(best, '–')} | "
            f"{sps.get('trl/dpo', '–')} | {vs} | {peak} |"
        )
    op = s.get("on_policy") or {}
    if op:
        lines += ["", f"## on-policy sampling (rc={op.get('rc')}, {op.get('seconds')} s)", ""]
        lines.append(op.get("table") or f"no table: see {op.get('log')}")
    return "\n".join(lines) + f"\n\ntotal {s.get('seconds')} s\n"
