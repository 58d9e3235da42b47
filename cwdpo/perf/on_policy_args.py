"""The on-policy bench section's command-line options, apart from its measuring code so that
`cwdpo.bench --summarize` builds its parser without importing torch."""

from __future__ import annotations

import argparse


def add_on_policy_args(p: argparse.ArgumentParser) -> None:
    """The on-policy section's options (`--on-policy`, cwdpo.perf.on_policy)."""
    p.add_argument("--on-policy", action="store_true", help="the on-policy section only")
    p.add_argument(
        "--on-policy-models",
        nargs="+",
        default=None,
        help="tiny family names, llava@<image tokens>, or model dirs "
        "(default: every tiny family and llava@576)",
    )
    p.add_argument("--on-policy-k", type=int, nargs="+", default=[2, 4], help="samples/record")
    p.add_argument("--on-policy-records", type=int, default=8, help="records per sampling call")
    p.add_argument(
        "--on-policy-sizes",
        type=int,
        nargs="*",
        default=[200, 2000],
        help="ShapesWorld training sizes of the stage-2 runs (none: skip them)",
    )
    p.add_argument("--on-policy-steps", type=int, default=2, help="stage-2 steps per run")
    p.add_argument("--on-policy-batch", type=int, default=8, help="stage-2 pairs per step")
