"""`python -m cwdpo.perturb input.format=<karpathy|nocaps|trl> input.path=<file> perturb.model=<name>
perturb.output=<pairs.jsonl>`: minimal perturbations of each positive written by an LLM behind an
OpenAI-compatible endpoint, as TRL-style preference pairs (see conf/perturb.yaml)."""

# A thin Hydra CLI: the work is cwdpo.run.perturb.run_perturb.
from __future__ import annotations

import json

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from cwdpo.errors import DataError
from cwdpo.run.config import CONFIG_DIR


class InputError(CompactHydraException, DataError):
    """A `DataError` as the CLI shows it: its one line (the traceback with HYDRA_FULL_ERROR=1)."""


class ServiceError(CompactHydraException):
    """The endpoint refused in a way every row would meet (bad key, unknown model): one line."""


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="perturb")
def main(cfg: DictConfig) -> None:
    from cwdpo.metrics.http_judge import HttpChatError
    from cwdpo.run.perturb import run_perturb

    try:
        summary = run_perturb(cfg)
    except DataError as e:  # it names file, row and field: print that line, not a traceback
        raise InputError(str(e)) from e
    except HttpChatError as e:  # it names the URL and status (never the key)
        raise ServiceError(str(e)) from e
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"pairs: {summary['output']}")


if __name__ == "__main__":
    main()
