"""`python -m cwdpo.gpu_check` (`make gpu-check`): everything that needs a GPU, in one command.

GPU time is short and rare, so this is one prepared run that prints and writes everything:
1. the GPU test suite (`pytest -m gpu`: bf16-mixed steps of the tiny families with prefix
   sharing and the reference cache, LoRA and full fine-tuning, gradient checkpointing,
   generation, fast path = plain path in bf16);
2. `cwdpo.bench` on the GPU in bf16, for the embedded tiny VLM and every tiny family, with
   TRL's `DPOTrainer` beside ours;
3. one realistic shape (off with `--no-realistic`): Qwen2.5-VL-3B's architecture with random
   bf16 weights (`build_realistic`), benchmarked the same way.
It writes `<out>/gpu_check.json` and `<out>/gpu_check.md`. Without CUDA it exits at once with
status 2 and says why, before importing anything heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_NO_CUDA = 2


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


def _run(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="directory for the summary and logs")
    p.add_argument("--cache", default=os.environ.get("CWDPO_CACHE", "~/.cache/cwdpo"))
    p.add_argument("--no-realistic", action="store_true", help="skip the realistic-shape bench")
    p.add_argument("--rounds", type=int, default=10, help="bench rounds per model")
    p.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="stop starting new benches after this many seconds",
    )
    args = p.parse_args(argv)

    ok, what = cuda_status()
    print(f"gpu-check: {what}", flush=True)
    if not ok:
        print(
            "gpu-check: nothing run; this needs a CUDA GPU (make gpu-check on a GPU machine)",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser()
    summary: dict[str, Any] = {"device": what, "suite": None, "bench": []}
    summary["suite"] = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "tests/test_gpu.py",
        ],
        out / "suite.log",
        150,
    )
    for name, path in bench_targets(cache, not args.no_realistic):
        if time.time() - t0 > args.budget_s:
            summary["bench"].append({"model": name, "skipped": "time budget spent"})
            continue
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
            str(args.rounds),
            "--warmup",
            "2",
            "--out",
            str(out / f"{slug}.json"),
        ]
        if path:
            cmd += ["--model", path, "--cache", str(cache)]
        res = _run(cmd, out / f"{slug}.log", 120)
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
        summary["bench"].append({"model": name, **res})
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    failed = summary["suite"]["rc"] != 0 or any(b.get("rc", 0) != 0 for b in summary["bench"])
    return 1 if failed else 0


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
    return "\n".join(lines) + f"\n\ntotal {s.get('seconds')} s\n"


if __name__ == "__main__":
    sys.exit(main())
