"""Every `python -m cwdpo.train|eval|doctor` command in the docs composes, with every swept value.

The docs promise "exact commands"; a renamed config key or group would otherwise only show up
on a user's cluster. Shell variables set in the same code block are expanded, `<placeholders>`
become paths, and each comma-swept override is composed value by value (nothing is run).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cwdpo.run.config import CONFIG_DIR
from cwdpo.run.pipeline import stages_to_run
from cwdpo.run.stage_nodes import check_stage_node
from cwdpo.utils.overrides import plain_group_overrides

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "experiments/README.md", "docs/scaling.md", "docs/reliability.md")
ENV = {"SLURM_JOB_ID": "1", "NNODES": "2", "OPENAI_API_KEY": "x"}


def _commands(doc: str) -> list[tuple[str, str, list[str]]]:
    """(doc, entry point, argv) for each cwdpo.train/eval command in the doc's bash blocks."""
    text = (ROOT / doc).read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = dict(ENV)
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"<[^<>]+>", "/tmp/x", line).replace("...", "")
            words = shlex.split(
                re.sub(r"\$(\w+)", lambda m, env=env: env.get(m.group(1), "/tmp/x"), line)
            )
            if words[0] == "export":
                words = words[1:]
            if all("=" in w for w in words):  # VAR=value assignments
                env.update(w.split("=", 1) for w in words)
                continue
            for i, w in enumerate(words):
                if (
                    w in ("cwdpo.train", "cwdpo.eval", "cwdpo.doctor")
                    and i > 0
                    and words[i - 1] == "-m"
                ):
                    args = [a for a in words[i + 1 :] if a not in ("-m", "--multirun")]
                    out.append((doc, w.split(".")[1], args))
    return out


def _split_sweep(value: str) -> list[str]:
    """Top-level comma alternatives of an override value (not inside [] or {})."""
    parts, depth, cur = [], 0, ""
    for ch in value:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _variants(args: list[str]) -> list[list[str]]:
    base = [
        a.split("=", 1)[0] + "=" + _split_sweep(a.split("=", 1)[1])[0] if "=" in a else a
        for a in args
    ]
    out = [base]
    for i, a in enumerate(args):
        if "=" in a:
            key, value = a.split("=", 1)
            for alt in _split_sweep(value)[1:]:
                out.append([*base[:i], f"{key}={alt}", *base[i + 1 :]])
    return out


COMMANDS = [c for d in DOCS for c in _commands(d)]


def test_the_docs_have_commands():
    entry = {e for _, e, _ in COMMANDS}
    assert {"train", "eval"} <= entry <= {"train", "eval", "doctor"} and len(COMMANDS) >= 12


@pytest.mark.parametrize(
    ("doc", "entry", "args"), COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, _, a in COMMANDS]
)
def test_documented_command_composes(doc, entry, args, tmp_path, tiny_cache_dir, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for variant in _variants(args):
        hydra_cfg = any(a.lstrip("+~").startswith("hydra") for a in variant)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                config_name=entry,
                return_hydra_config=hydra_cfg,
                overrides=[
                    *(plain_group_overrides(variant) if entry == "train" else variant),
                    f"paths.output_dir={tmp_path}",
                    f"paths.cache_dir={tiny_cache_dir}",
                ],
            )
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.to_container(job, resolve=True, throw_on_missing=True)  # no ??? left, all resolve
        if entry == "train":
            for name in stages_to_run(cfg):
                check_stage_node(name, cfg)
