"""`python -m cwdpo.gpu_check` (`make gpu-check`): everything that needs a GPU, in one command.

GPU time is short and rare, so this is one prepared run that prints and writes everything:
1. the GPU test suite (`pytest -m gpu`: bf16-mixed steps of the tiny families with prefix
   sharing and the reference cache, LoRA and full fine-tuning, gradient checkpointing,
   generation, fast path = plain path in bf16);
2. `cwdpo.bench` on the GPU in bf16, for the embedded tiny VLM and every tiny family, with
   TRL's `DPOTrainer` beside ours;
3. one realistic shape (off with `--no-realistic`): Qwen2.5-VL-3B's architecture with random
   bf16 weights (`build_realistic`), benchmarked the same way;
4. the bench's on-policy section (`cwdpo.bench --on-policy`): plain vs shared-prefill sampling
   tokens/s at K = 2, 4 and a short on-policy CW-DPO stage at two dataset sizes (≤ 4 min).
It writes `<out>/gpu_check.json` and `<out>/gpu_check.md`. Without CUDA it exits at once with
status 2 and says why, before importing anything heavy.
"""
# A thin CLI (its --help is this docstring): the work is in cwdpo.perf.gpu_suite.

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cwdpo.perf.gpu_suite import cuda_status, run_gpu_check

EXIT_NO_CUDA = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, what = cuda_status()
    print(f"gpu-check: {what}", flush=True)
    if not ok:
        print(
            "gpu-check: nothing run; this needs a CUDA GPU (make gpu-check on a GPU machine)",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    return run_gpu_check(
        Path(args.out),
        Path(args.cache).expanduser(),
        what,
        realistic=not args.no_realistic,
        rounds=args.rounds,
        budget_s=args.budget_s,
    )


if __name__ == "__main__":
    sys.exit(main())
