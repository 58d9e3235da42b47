"""W&B for a pipeline of several trainers: one run, stage-prefixed keys, offline by default.

The pipeline builds one Trainer (and one set of loggers) per stage. The first stage's logger
opens the pipeline's own run (id kept in `<run>/wandb_run_id`, so a resume continues it) and
every later stage's logger attaches to it; this subclass prefixes every key with the stage (`cw_dpo/train/loss`) and logs the stage-local
step as `<stage>/step`, the x-axis of that stage's panels. It never prompts for a login: mode
comes from `WANDB_MODE` or the config (default "offline"), and "online" without credentials
falls back to offline with a warning. Nothing else depends on W&B: the CSV logger is always on
and the plots / notebook read the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from cwdpo.utils.dist import is_rank_zero
from cwdpo.utils.io import atomic_write_text
from cwdpo.utils.safe_log import FAILURES

log = logging.getLogger(__name__)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """WANDB_MODE wins over the config; "online" without an API key becomes "offline"."""
    mode = os.environ.get("WANDB_MODE") or mode or "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode == "online" and not _has_credentials():
        log.warning(
            "W&B mode 'online' but no API key (WANDB_API_KEY / netrc): logging offline; "
            "`wandb sync <run>/wandb/offline-run-*` uploads it later"
        )
        mode = "offline"
    return mode


RUN_ID_FILE = "wandb_run_id"

# The W&B runs this process opened, by run directory: {dir: (pid, run)}. Stages of one pipeline
# share their run through it; a forked child (pid differs) never touches its parent's run, and
# nothing here ever reads or finishes the global `wandb.run` someone else opened.
_OPEN: dict[str, tuple[int, Any]] = {}


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve())


def run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run directory, kept in `<run>/wandb_run_id`, so a resumed run
    (`resume=<run dir>`) continues the same W&B run. A fresh run drops the file first
    (`RunState.clear`) and gets a new id."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if is_rank_zero():
        atomic_write_text(path, rid + "\n")
    return rid


class StageWandbLogger(WandbLogger):
    """`WandbLogger` with stage-prefixed keys and a per-stage step metric.

    `config_file`: a JSON file (the pipeline's `<run>/config.json`) sent as the run's config
    when the run is created. The run is created with `reinit="create_new"`: it is this
    pipeline's own, never the global `wandb.run` of a notebook or an earlier job.
    """

    def __init__(
        self,
        project: str = "cwdpo",
        name: str | None = None,
        save_dir: str = ".",
        mode: str | None = "offline",
        stage: str | None = None,
        config_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        mode = resolve_mode(mode)
        os.environ["WANDB_MODE"] = mode  # resolved from this env var first; keeps them in sync
        super().__init__(project=project, name=name, save_dir=save_dir, mode=mode, **kwargs)
        if not self._wandb_init.get("anonymous"):  # wandb >= 0.2x warns on anonymous=None
            self._wandb_init.pop("anonymous", None)
        self.stage = stage
        self.config_file = config_file
        self._defined: set[str] = set()

    def set_stage(self, stage: str, out_dir: Any = None, first: bool | None = None) -> None:
        self.stage = stage

    @property
    def run_dir(self) -> Path:
        return Path(self.save_dir or ".")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            opened = _OPEN.get(_key(self.run_dir))
            if opened is not None and opened[0] == os.getpid():
                self._experiment = opened[1]  # a later stage of the same pipeline
            else:
                self._experiment = self._open()
        exp = self._experiment
        if self.stage and self.stage not in self._defined and hasattr(exp, "define_metric"):
            exp.define_metric(f"{self.stage}/step")
            exp.define_metric(f"{self.stage}/*", step_metric=f"{self.stage}/step")
            self._defined.add(self.stage)
        return exp

    def _open(self) -> Any:
        import wandb

        init = dict(self._wandb_init)
        cfg = Path(self.config_file) if self.config_file else self.run_dir / "config.json"
        if cfg.is_file() and "config" not in init:
            init["config"] = json.loads(cfg.read_text())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init["id"] = init.get("id") or run_id(self.run_dir)
        init.update(resume="allow", reinit="create_new")
        run = wandb.init(**init)
        if hasattr(run, "define_metric"):  # Lightning's default x-axis
            run.define_metric("trainer/global_step")
            run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        _OPEN[_key(self.run_dir)] = (os.getpid(), run)
        return run

    def _key(self, k: str) -> str:
        k = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k
        return f"{self.stage}/{k}" if self.stage else k

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.log_media(metrics, step)

    @rank_zero_only
    def log_media(
        self, data: Mapping[str, Any], step: int | None = None, prefix: bool = True
    ) -> None:
        """Log anything wandb accepts (scalars, Histogram, Table, custom charts)."""
        out = {(self._key(k) if prefix else k): v for k, v in data.items()}
        if step is not None:
            out[self._key("step")] = step
            out["trainer/global_step"] = step
        self.experiment.log(out)


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def has_wandb(trainer: L.Trainer) -> bool:
    return bool(wandb_loggers(trainer))


def log_media(
    trainer: L.Trainer, data: Mapping[str, Any], step: int | None = None, prefix: bool = True
) -> None:
    """Histograms / tables / line series to the W&B loggers only (the CSV logger takes scalars).

    Never raises: a failure is recorded under the keys it was logging (`cwdpo.utils.safe_log`).
    """
    data = {k: v for k, v in data.items() if v is not None}
    if not data:
        return
    for lg in wandb_loggers(trainer):
        with FAILURES.guard(f"wandb {', '.join(data)}"):
            if isinstance(lg, StageWandbLogger):
                lg.log_media(data, step, prefix=prefix)
            else:
                lg.experiment.log(dict(data))


def finish_run(
    run_dir: str | Path, summary: Mapping[str, Any] | None = None, exit_code: int = 0
) -> None:
    """End the W&B run this process opened for `run_dir`, if any, after writing `summary`.

    The pipeline calls it in a `finally` (success, error, Ctrl-C); runs it did not open are
    never touched. A failure here is recorded, never raised.
    """
    opened = _OPEN.pop(_key(run_dir), None)
    if opened is None or opened[0] != os.getpid():
        return
    run = opened[1]
    with FAILURES.guard("wandb summary"):
        if summary:
            run.summary.update(_flatten(summary))
    with FAILURES.guard("wandb finish"):
        run.finish(exit_code=exit_code)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


# ---------------------------------------------------------------- reading offline runs
def offline_run_dirs(root: str | Path) -> list[Path]:
    """`<root>/wandb/offline-run-*` directories (or `root` itself if it is one)."""
    root = Path(root)
    if root.name.startswith("offline-run-"):
        return [root]
    return sorted(root.glob("**/wandb/offline-run-*"))


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> dict[str, Any]:
    """History rows and the final summary of an offline run, from its `run-*.wandb` file.

    Offline runs write no `files/wandb-summary.json` (wandb 0.31), and the SDK no longer ships
    a reader, so this parses the file directly: a 7-byte header, then LevelDB-log framed
    records (32 KiB blocks; per chunk a 4-byte CRC, 2-byte length, 1-byte type) holding
    `wandb_internal_pb2.Record` protobufs. CRCs are not checked. `wandb.finish()` can return
    before the service has written the last records, so this waits (up to `wait_s`) for the
    run's exit record; `complete` says whether it was seen.
    """
    import time

    deadline = time.monotonic() + wait_s
    while True:
        out = _parse_run_file(next(Path(run_dir).glob("run-*.wandb")))
        if out["complete"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse_run_file(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    history, summary, complete = [], {}, False
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        which = rec.WhichOneof("record_type")
        if which == "history":
            history.append(
                {
                    (it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                    for it in rec.history.item
                }
            )
        elif which == "summary":
            for it in rec.summary.update:
                summary[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif which == "exit":
            complete = True
    return {"history": history, "summary": summary, "complete": complete}
