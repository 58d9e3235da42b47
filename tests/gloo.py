"""Hand-started gloo ranks for the multi-process tests: one launcher and one way to leave.

A gloo child can pass its final barrier, destroy its group and still die at interpreter exit
with "terminate called without an active exception" (native threads torn down during
finalization: the likely cause of two full-suite CI failures, never reproduced here in 80
back-to-back runs). So a rank script ends with `LEAVE`: barrier, destroy, flush, `os._exit(0)`.
A crash *before* the outputs are written still fails the test, and every child runs under
`-X faulthandler`, so any abort names the Python frame it happened in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: the end of a rank script: outputs are written by now; leave the group, then exit at once
LEAVE = """
import os as _os, sys as _sys
import torch.distributed as _dist
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_ranks(script: Path, argvs: list[list[str]], timeout: float = 300) -> None:
    """`python -X faulthandler script *argv` for each rank's argv, concurrently, with the repo
    importable and one intra-op thread; fails naming the rank, its exit code and its output.
    Output goes to files, not pipes: a rank blocked on a full pipe would hang the others."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        paths = [Path(tmp) / f"rank{r}.log" for r in range(len(argvs))]
        logs = [files.enter_context(path.open("wb")) for path in paths]
        procs = [
            subprocess.Popen(
                [sys.executable, "-X", "faulthandler", str(script), *argv],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for argv, log in zip(argvs, logs, strict=True)
        ]
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                p.kill()
        texts = [path.read_text(errors="replace") for path in paths]
    for rank, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{text[-4000:]}"
