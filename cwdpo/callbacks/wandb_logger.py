"""W&B for a pipeline of several trainers: one run, stage-prefixed keys, offline by default.

The pipeline builds one Trainer (and one set of loggers) per stage. Lightning's `WandbLogger`
reuses the live `wandb.run` when one exists, so every stage's logger writes into the same run;
this subclass prefixes every key with the stage (`cw_dpo/train/loss`) and logs the stage-local
step as `<stage>/step`, the x-axis of that stage's panels. It never prompts for a login: mode
comes from `WANDB_MODE` or the config (default "offline"), and "online" without credentials
falls back to offline with a warning. Nothing else depends on W&B: the CSV logger is always on
and the plots / notebook read the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

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
        log.warning("W&B mode 'online' but no API key (WANDB_API_KEY / netrc): logging offline; "
                    "`wandb sync <run>/wandb/offline-run-*` uploads it later")
        mode = "offline"
    return mode


class StageWandbLogger(WandbLogger):
    """`WandbLogger` with stage-prefixed keys and a per-stage step metric.

    `config_file`: a JSON file (the pipeline's `<run>/config.json`) sent as the run's config
    when the run is created.
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
        """Later stages attach to the pipeline's live run; the first stage never does."""
        self.stage = stage
        wandb = sys.modules.get("wandb")
        live = getattr(wandb, "run", None) if wandb is not None else None
        if live is not None and self._experiment is None:
            if first:  # left open by an earlier pipeline in this process (e.g. a crashed job)
                log.warning("finishing wandb run %s left open by an earlier run", live.id)
                wandb.finish()
            else:
                self._experiment = live

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            cfg = Path(self.config_file) if self.config_file else Path(self.save_dir or ".") / "config.json"
            if cfg.is_file() and "config" not in self._wandb_init:
                self._wandb_init["config"] = json.loads(cfg.read_text())
            Path(self.save_dir or ".").mkdir(parents=True, exist_ok=True)
        exp = WandbLogger.experiment.fget(self)
        if self.stage and self.stage not in self._defined and hasattr(exp, "define_metric"):
            exp.define_metric(f"{self.stage}/step")
            exp.define_metric(f"{self.stage}/*", step_metric=f"{self.stage}/step")
            self._defined.add(self.stage)
        return exp

    def _key(self, k: str) -> str:
        k = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k
        return f"{self.stage}/{k}" if self.stage else k

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.log_media(metrics, step)

    @rank_zero_only
    def log_media(self, data: Mapping[str, Any], step: int | None = None, prefix: bool = True) -> None:
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


def log_media(trainer: L.Trainer, data: Mapping[str, Any], step: int | None = None,
              prefix: bool = True) -> None:
    """Histograms / tables / line series to the W&B loggers only (the CSV logger takes scalars)."""
    for lg in wandb_loggers(trainer):
        if isinstance(lg, StageWandbLogger):
            lg.log_media(data, step, prefix=prefix)
        else:
            lg.experiment.log(dict(data))


def finish_run(summary: Mapping[str, Any] | None = None) -> None:
    """End the pipeline's wandb run (if any) after writing `summary` into its summary."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    if summary:
        wandb.run.summary.update(_flatten(summary))
    wandb.finish()


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
            history.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                            for it in rec.history.item})
        elif which == "summary":
            for it in rec.summary.update:
                summary[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif which == "exit":
            complete = True
    return {"history": history, "summary": summary, "complete": complete}
