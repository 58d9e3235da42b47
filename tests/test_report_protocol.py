"""The study protocol in `cwdpo.report`: per-seed paired differences, bootstrap CIs, val selection."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cwdpo.analysis.runs import find_runs
from cwdpo.analysis.stats import (
    bootstrap_ci,
    group_rows,
    load_all,
    paired_differences,
    select_on_val,
)
from cwdpo.report import main


def _run(
    d: Path, exp: str, seed: int, metrics: dict[str, float], overrides: tuple[str, ...] = ()
) -> None:
    import yaml

    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"+experiment={exp}", f"seed={seed}", *overrides])
    )
    (d / "results.json").write_text(
        json.dumps({"config": {"experiment": exp, "seed": seed}, "stages": {"cw_dpo": metrics}})
    )


def _exact_bootstrap(d: list[float], level: float = 0.95) -> tuple[float, float]:
    """Every resample of n seeds (n^n, equally likely) enumerated: the exact bootstrap quantiles
    (of the discrete distribution, i.e. the inverse CDF; no interpolation between atoms)."""
    means = sorted(np.mean(c) for c in itertools.product(d, repeat=len(d)))
    a = (1 - level) / 2
    return (
        float(np.quantile(means, a, method="inverted_cdf")),
        float(np.quantile(means, 1 - a, method="inverted_cdf")),
    )


@pytest.mark.parametrize(
    "d", [[1.0, 3.0], [2.0, -1.0, 4.0], [0.5, 0.5, 0.5, 0.5], [-3.0, 1.0, 2.0, 6.0, 0.0]]
)
def test_bootstrap_ci_matches_exact_enumeration(d):
    lo, hi = bootstrap_ci(d, n_boot=40_000, seed=3)
    elo, ehi = _exact_bootstrap(d)
    spread = max(d) - min(d)
    assert lo == pytest.approx(elo, abs=0.05 * spread + 1e-9) and hi == pytest.approx(
        ehi, abs=0.05 * spread + 1e-9
    )
    assert lo <= np.mean(d) <= hi


def test_paired_differences_on_a_synthetic_run_set(tmp_path):
    f1 = {"cw_dpo": [70.0, 72.0, 68.0, 75.0, 71.0], "dpo": [66.0, 71.0, 69.0, 70.0, 64.0]}
    for exp, vals in f1.items():
        for seed, v in enumerate(vals):
            _run(tmp_path / f"{exp}{seed}", exp, seed, {"f1": v, "fact_accuracy": v - 10})
    _run(tmp_path / "dpo9", "dpo", 9, {"f1": 0.0})  # a seed the other setting lacks: not paired
    groups = group_rows(load_all(find_runs([tmp_path]), baseline=None))
    r = paired_differences(groups, "cw_dpo", "dpo", "f1", n_boot=20_000)
    diffs = [a - b for a, b in zip(f1["cw_dpo"], f1["dpo"])]
    assert r["seeds"] == [0.0, 1.0, 2.0, 3.0, 4.0] and r["diffs"] == pytest.approx(diffs)
    assert r["mean"] == pytest.approx(np.mean(diffs)) and r["wins"] == 4
    elo, ehi = _exact_bootstrap(diffs)
    assert r["ci95"][0] == pytest.approx(elo, abs=0.3) and r["ci95"][1] == pytest.approx(
        ehi, abs=0.3
    )
    with pytest.raises(KeyError, match="sft_only"):
        paired_differences(groups, "cw_dpo", "sft_only", "f1")
    table = main(
        [
            str(tmp_path),
            "--baseline",
            "",
            "--compare",
            "cw_dpo:dpo",
            "--metric",
            "f1",
            "--metric",
            "fact_accuracy",
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert "| cw_dpo − dpo | F1 % | 5 |" in table and "| cw_dpo − dpo | facts % | 5 |" in table
    assert "+3.2" in table  # the mean difference, 16/5
    assert "skipped: --compare cw_dpo:nope" in main(
        [
            str(tmp_path),
            "--baseline",
            "",
            "--compare",
            "cw_dpo:nope",
            "--out",
            str(tmp_path / "rep2"),
        ]
    )
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["paired"][0]["diffs"] == pytest.approx(diffs)


def test_plus_and_plain_group_spellings_are_one_setting(tmp_path):
    """Runs recorded as `+debug=fast` (before conf/train.yaml listed debug as a null default)
    and as `debug=fast` (cwdpo.train's spelling since) share a setting, so the report groups
    them together and a baseline of either spelling matches."""
    from cwdpo.analysis.runs import run_setting

    _run(tmp_path / "old", "cw_dpo", 0, {"f1": 1.0}, ("+debug=fast", "+hparams_search=optuna"))
    _run(tmp_path / "new", "cw_dpo", 1, {"f1": 2.0}, ("debug=fast", "hparams_search=optuna"))
    settings = set()
    for d in (tmp_path / "old", tmp_path / "new"):
        name, overrides = run_setting(d, json.loads((d / "results.json").read_text()))
        settings.add((name, tuple(overrides)))
    assert settings == {("cw_dpo", ("debug=fast", "hparams_search=optuna"))}


def test_selection_uses_val_runs_only(tmp_path):
    # val: beta=0.3 is best for cw_dpo; on test beta=0.1 would have been better (must not matter)
    for seed in (0, 1):
        for beta, v_val, v_test in (("0.1", 60.0, 90.0), ("0.3", 70.0, 50.0)):
            ov = (f"stage.cw_dpo.beta={beta}",)
            _run(
                tmp_path / "val" / f"b{beta}s{seed}",
                "cw_dpo",
                seed,
                {"f1": v_val},
                (*ov, "eval.split=val"),
            )
            _run(tmp_path / "test" / f"b{beta}s{seed}", "cw_dpo", seed, {"f1": v_test}, ov)
        _run(tmp_path / "test" / f"dpo{seed}", "dpo", seed, {"f1": 40.0})
    sel = select_on_val(find_runs([tmp_path / "val"]), "f1")
    assert sel == {"cw_dpo": {"stage.cw_dpo.beta=0.3"}}
    table = main(
        [
            str(tmp_path / "test"),
            "--baseline",
            "",
            "--select",
            str(tmp_path / "val"),
            "--compare",
            "cw_dpo:dpo",
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert "Selected on val (f1): cw_dpo: stage.cw_dpo.beta=0.3" in table
    assert (
        "| cw_dpo stage.cw_dpo.beta=0.3 − dpo | F1 % | 2 | +10, +10 | +10 | [+10, +10] |" in table
    )  # not 90 − 40
