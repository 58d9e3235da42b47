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

`--on-policy` runs the on-policy section instead (`cwdpo.perf.on_policy`): sampling tokens/s
of the plain path vs the shared prefill (image + prompt prefilled once per record) at each K
on every tiny family and the 576-image-token LLaVA, and the cost of a short CW-DPO stage with
on-policy negatives at two dataset sizes (seconds before the first step, samples per pair).

Prints a table and the ratios against the targets (CW-DPO overhead ≤ 3% over our DPO; our DPO
≥ 1.5× TRL's throughput) and writes everything to a JSON file. Memory: on CUDA the peak of
`torch.cuda.max_memory_allocated` during a step; on CPU the peak RSS increase during a step
(sampled every ~0.5 ms, after `malloc_trim` so that re-used free heap pages count again);
plus the exact bytes of weights, reference, gradients and optimizer state.

The measuring is done in `cwdpo.perf` (memory, variants, benchmark, summary).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from typing import Any

from cwdpo.perf.on_policy_args import add_on_policy_args
from cwdpo.perf.summary import on_policy_text, report_text, summarize


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
    add_on_policy_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="logs/bench/bench.json", help="JSON results path")
    return p.parse_args(argv)


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
    if args.on_policy:  # the on-policy section alone
        from cwdpo.perf.on_policy import run as run_on_policy

        res = run_on_policy(args)
        print(on_policy_text(res))
        return res
    from cwdpo.perf.benchmark import run  # torch and the model layer: not for --summarize

    res = run(args)
    print(report_text(res))
    return res


def cli() -> None:
    """The `cwdpo-bench` console script: the benchmark, exit status 0 on success (a script's return
    value would be taken as the exit status)."""
    main()


if __name__ == "__main__":
    main()
