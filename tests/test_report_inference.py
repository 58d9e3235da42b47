"""Small-sample inference of `cwdpo.report --compare` (cwdpo.analysis.inference): t-interval,
t-test, sign-flip test, Holm, MDE, McNemar, each against values computed by hand or brute force,
and the report rows / markdown that carry them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cwdpo.analysis.caption_tests import CAPTION_RATES, pooled_mcnemar
from cwdpo.analysis.inference import (
    holm,
    mcnemar_exact,
    mde_paired_t,
    paired_t_interval,
    paired_t_pvalue,
    sign_flip_pvalue,
)
from cwdpo.analysis.report import write_report
from tests.test_report_protocol import _run

NAN = float("nan")


def _t4_two_sided_p(t: float) -> float:
    """2 ∫_|t|^∞ f(x) dx for Student's t with ν = 4, by numeric integration of its density
    f(x) = Γ(5/2) / (√(4π) Γ(2)) (1 + x²/4)^(−5/2) = 0.375 (1 + x²/4)^(−5/2)
    (Γ(5/2) = 3√π/4, so the constant is (3√π/4) / (2√π) = 3/8). Tail past 1e4 ≈ 3e-16."""
    x = np.geomspace(abs(t), 1e4, 400_001)
    f = 0.375 * (1 + x**2 / 4) ** -2.5
    return float(2 * np.sum((f[1:] + f[:-1]) / 2 * np.diff(x)))


def test_t_interval_and_p_by_hand():
    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    # mean 3, sd = √(Σ(x−3)²/4) = √(10/4) = √2.5, se = √2.5/√5 = √0.5 = 0.7071068;
    # t_{4, 0.975} = 2.776445 (tables) → half-width 2.776445 · 0.7071068 = 1.963243
    lo, hi = paired_t_interval(d)
    assert lo == pytest.approx(3 - 1.963243, abs=1e-5) and hi == pytest.approx(
        3 + 1.963243, abs=1e-5
    )
    # t = 3 / 0.7071068 = 4.242641, df 4
    p = paired_t_pvalue(d)
    assert p == pytest.approx(_t4_two_sided_p(4.242641), rel=1e-5)
    assert 0.01 < p < 0.02  # sanity on the integration itself (tables: t=4.60 ↔ 0.01, 3.75 ↔ 0.02)
    # a 99% interval is wider; t_{4, 0.995} = 4.604095 → half-width 3.255588
    lo99, hi99 = paired_t_interval(d, level=0.99)
    assert hi99 - 3 == pytest.approx(3.255588, abs=1e-5)


def test_t_edge_cases():
    assert all(math.isnan(x) for x in paired_t_interval([2.0])) and math.isnan(paired_t_pvalue([]))
    assert paired_t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)  # sd 0: the interval collapses
    assert paired_t_pvalue([0.5, 0.5, 0.5]) == 0.0 and paired_t_pvalue([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        paired_t_pvalue([1.0, NAN])


def test_sign_flip_exact_by_hand():
    # [1..5]: only all-plus and all-minus reach |sum| = 15 → 2/32; the n = 5 floor
    assert sign_flip_pvalue([1.0, 2.0, 3.0, 4.0, 5.0]) == 2 / 32 == 0.0625
    # [1,−1,1,−1,0.5]: observed |sum| 0.5; the four ±1 sum to an even k, so |k ± 0.5| ≥ 0.5
    # for every one of the 32 flips → p = 1
    assert sign_flip_pvalue([1.0, -1.0, 1.0, -1.0, 0.5]) == 1.0
    # [3,1,1,1,−1]: observed sum 5; the four ±1 sum k ∈ {−4,−2,0,2,4} (1,4,6,4,1 ways);
    # +3: |3+k| ≥ 5 for k ∈ {2, 4} (4+1 = 5 ways); −3: k ∈ {−2, −4} (5 ways) → 10/32
    assert sign_flip_pvalue([3.0, 1.0, 1.0, 1.0, -1.0]) == 10 / 32
    assert math.isnan(sign_flip_pvalue([]))


def test_sign_flip_monte_carlo_path_n18():
    # ±1 entries: a flip's sum is 2K − 18, K ~ Bin(18, 1/2). Observed 12 − 6 = 6, so
    # p = P(|2K − 18| ≥ 6) = 2 P(K ≤ 6) = 2 (1+18+153+816+3060+8568+18564) / 2^18 = 62360/262144
    d = [1.0] * 12 + [-1.0] * 6
    exact = 62360 / 262144
    assert sign_flip_pvalue(d, exact_max=18) == exact  # enumeration at n = 18
    mc = sign_flip_pvalue(d)  # n > 16: 100k Monte Carlo flips; sd of the estimate ≈ 0.00135
    assert mc == pytest.approx(exact, abs=0.006) and mc != exact
    assert sign_flip_pvalue(d) == mc  # fixed seed: reproducible


def test_holm_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # nan passed through and not counted: m = 2 → 0.01·2 = 0.02, 0.2·1 = 0.2
    out = holm([0.2, NAN, 0.01])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5·2 capped at 1, then max
    p = np.random.default_rng(0).uniform(0, 0.2, 30)
    adj = np.array(holm(p))
    order = np.argsort(p)
    assert (np.diff(adj[order]) >= 0).all() and (adj >= p).all() and (adj <= 1).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def test_mde_reaches_its_power_by_simulation():
    n, sd = 5, 1.0
    mde = mde_paired_t(sd, n)
    # 20k paired t-tests with normal diffs at δ = MDE: rejection rate ≈ 0.8 (sd of it 0.0028);
    # critical value t_{4, 0.975} = 2.776445 from tables, not scipy
    x = np.random.default_rng(1).normal(mde, sd, size=(20_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > 2.776445) == pytest.approx(0.8, abs=0.015)
    # the normal approximation (z_.975 + z_.8) sd/√n = 2.801585 sd/√n ignores the t's heavier
    # tails: below the exact MDE at n = 5, within 1% of it at n = 200
    assert mde > 2.801585 * sd / math.sqrt(n)
    big = mde_paired_t(sd, 200)
    assert 2.801585 / math.sqrt(200) < big < 1.01 * 2.801585 / math.sqrt(200)
    assert mde_paired_t(3.0, n) == pytest.approx(3 * mde)  # scales with sd
    assert math.isnan(mde_paired_t(1.0, 1)) and math.isnan(mde_paired_t(NAN, 5))
    assert mde_paired_t(0.0, 5) == 0.0


def test_mcnemar_by_hand():
    # b=1, c=9: 2 · P(X ≤ 1), X ~ Bin(10, 1/2) = 2 (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == 0.021484375 == mcnemar_exact(9, 1)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == 2 / 32  # 2 · (1/2)^5
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_pooled_mcnemar_on_hand_built_flags():
    # seed 0: caption 0 only A (b), caption 2 not at risk for A (skipped), caption 3 both
    # seed 1: captions 0, 1 only B (c) → b = 1, c = 2, p = 2 (1 + 3)/8 → capped at 1
    pairs = [
        ([True, False, None, True], [False, False, True, True]),
        ([False, False], [True, True]),
    ]
    assert pooled_mcnemar(pairs) == {"b": 1, "c": 2, "p": 1.0}
    # 6 seeds each with one caption only B has: b = 0, c = 6 → 2/64
    assert pooled_mcnemar([([False], [True])] * 6) == {"b": 0, "c": 6, "p": 2 / 64}
    with pytest.raises(ValueError, match="caption by caption"):
        pooled_mcnemar([([True], [True, False])])


def test_chair_s_and_malformed_flags_per_caption():
    from cwdpo.data.sources import ShapesSource

    rec = ShapesSource(seed=0, sizes={"test": 1}).captions("test")[0]
    scene = rec.meta["scene"]
    assert ("green", "circle") not in {(o.colour, o.shape) for o in scene.objects}
    # the reference: nothing absent; a green circle: absent → hallucinated; pink / hexagon are
    # not in ShapesWorld's vocabulary → unparsed (malformed), no object mentioned
    caps = [rec.references[0], "a large green circle on the bottom .", "a pink hexagon ."]
    assert CAPTION_RATES["chair_s"](caps, [scene] * 3, None) == [False, True, False]
    assert CAPTION_RATES["malformed"](caps, [scene] * 3, None) == [False, False, True]
    assert CAPTION_RATES["companion_halluc"](caps, [scene] * 3, None) is None  # no cooc rule


F1 = {
    "cw_dpo": [70.0, 72.0, 68.0, 75.0, 71.0],
    "dpo": [66.0, 71.0, 69.0, 70.0, 64.0],
    "ipo": [67.0, 71.5, 70.0, 70.5, 65.0],
}


def test_report_rows_carry_the_inference(tmp_path):
    for exp, vals in F1.items():
        for seed, v in enumerate(vals):
            _run(tmp_path / f"{exp}{seed}", exp, seed, {"f1": v, "fact_accuracy": v - 10})
    table = write_report(
        [tmp_path],
        tmp_path / "rep",
        baseline=None,
        comparisons=["cw_dpo:dpo", "ipo:dpo"],
        metrics=["f1", "fact_accuracy"],
        n_boot=2000,
    )
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["paired"]
    assert [(r["a"], r["b"], r["metric"]) for r in rows] == [
        ("cw_dpo", "dpo", "f1"),
        ("cw_dpo", "dpo", "fact_accuracy"),
        ("ipo", "dpo", "f1"),
        ("ipo", "dpo", "fact_accuracy"),
    ]
    for r in rows:
        a, b = F1[r["a"]], F1[r["b"]]
        d = [x - y for x, y in zip(a, b)]
        assert r["diffs"] == pytest.approx(d)
        assert r["t_ci95"] == pytest.approx(list(paired_t_interval(d)))
        assert r["t_p"] == pytest.approx(paired_t_pvalue(d))
        assert r["perm_p"] == pytest.approx(sign_flip_pvalue(d))
        assert r["mde80"] == pytest.approx(mde_paired_t(float(np.std(d, ddof=1)), 5))
        # Holm's strictest level over the 4 rows: α/4, so a larger effect is needed
        holm_mde = mde_paired_t(float(np.std(d, ddof=1)), 5, alpha=0.05 / 4)
        assert r["mde80_holm"] == pytest.approx(holm_mde) and holm_mde > r["mde80"]
        assert len(r["ci95"]) == 2 and "mcnemar" not in r  # f1: not a per-caption rate
    # Holm over all 4 rows of the table, not per comparison. f1 and facts diffs are identical
    # (tied p). ipo − dpo = [1, .5, 1, .5, 1] (t ≈ 6.5) has the smaller p → ×4 for both of its
    # rows; cw_dpo − dpo = [4, 1, −1, 5, 7] → ×2 (3rd and 4th smallest), then the running max
    assert [r["holm_p"] for r in rows] == pytest.approx(holm([r["t_p"] for r in rows]))
    p_cw, p_ipo = rows[0]["t_p"], rows[2]["t_p"]
    assert p_ipo < p_cw and 4 * p_ipo < 2 * p_cw < 1
    assert [r["holm_p"] for r in rows] == pytest.approx([2 * p_cw] * 2 + [4 * p_ipo] * 2)
    # sign flips of |d| = 4,1,1,5,7 (total 18): flipping a set of sum f gives 18 − 2f, and
    # |18 − 2f| ≥ 16 ⇔ f ≤ 1 or f ≥ 17: {}, {1}, {1'} and their 3 complements → 6/32
    assert rows[0]["perm_p"] == 6 / 32
    for col in ("t 95% CI", "t p", "Holm p", "sign-flip p", "MDE (80%) α / α/m", "McNemar b/c, p"):
        assert f" {col} |" in table
    assert "bootstrap 95% CI" not in table and "2^(1−n)" in table
    lo, hi = rows[0]["t_ci95"]
    assert (
        f"| cw_dpo − dpo | F1 % | 5 | +4, +1, -1, +5, +7 | +3.2 | [{lo:+.3g}, {hi:+.3g}] |" in table
    )


def test_help_says_any_comparison_gets_the_inference(capsys):
    from cwdpo.report import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("any two settings", "t 95% CI", "Holm p", "sign-flip p", "MDE", "McNemar"):
        assert words in text, words


def _caption_run(d: Path, exp: str, seed: int, outputs: list[str], halluc: float) -> None:
    """A run as the pipeline leaves it, with saved test captions of a co-occurrence world."""
    import yaml

    _run(d, exp, seed, {"companion_halluc": halluc})
    source = {
        "_target_": "cwdpo.data.sources.ShapesSource",
        "seed": seed,
        "sizes": {"test": len(outputs)},
        "world": {"cooc_trigger": ["red", "circle"]},
    }
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"data": {"source": source}, "eval": {"split": "test", "n_records": len(outputs)}}
        )
    )
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "cw_dpo.done.json").write_text(json.dumps({"outputs": outputs}))


def test_companion_halluc_mcnemar_from_saved_captions(tmp_path):
    from cwdpo.data.sources import ShapesSource

    n, comp, other = (
        16,
        "a small blue square in the middle .",
        "a large pink hexagon in the middle .",
    )
    at_risk = {}  # trigger (red circle) present, companion (blue square) absent
    for s in (0, 1):
        recs = ShapesSource(
            seed=s, sizes={"test": n}, world={"cooc_trigger": ["red", "circle"]}
        ).captions("test")
        ids = [{(o.colour, o.shape) for o in r.meta["scene"].objects} for r in recs]
        at_risk[s] = [
            i for i, x in enumerate(ids) if ("red", "circle") in x and ("blue", "square") not in x
        ]
    assert at_risk == {0: [0, 5, 8, 12], 1: [4, 11, 14]}
    for s in (0, 1):
        # A names the companion on the first at-risk image only, and on every image NOT at risk
        # (must be ignored); B names it on every at-risk image and nowhere else
        a = [comp if (i in at_risk[s][:1] or i not in at_risk[s]) else other for i in range(n)]
        b = [comp if i in at_risk[s] else other for i in range(n)]
        _caption_run(tmp_path / f"cw{s}", "cw_dpo", s, a, 25.0 + s)
        _caption_run(tmp_path / f"dpo{s}", "dpo", s, b, 100.0)
    # at risk: concordant on the first image of each seed; only B on the rest: b = 0,
    # c = 3 + 2 = 5 → p = 2 · (1/2)^5 = 0.0625
    table = write_report(
        [tmp_path],
        tmp_path / "rep",
        baseline=None,
        comparisons=["cw_dpo:dpo"],
        metrics=["companion_halluc"],
        n_boot=500,
    )
    (row,) = json.loads((tmp_path / "rep" / "report.json").read_text())["paired"]
    assert row["mcnemar"] == {"b": 0, "c": 5, "p": 0.0625}
    assert "| 0/5, 0.0625 |" in table
    # one seed's captions gone: no McNemar (a partial pool would not match the row), no crash
    (tmp_path / "dpo1" / "checkpoints" / "cw_dpo.done.json").unlink()
    table = write_report(
        [tmp_path],
        tmp_path / "rep2",
        baseline=None,
        comparisons=["cw_dpo:dpo"],
        metrics=["companion_halluc"],
        n_boot=500,
    )
    (row,) = json.loads((tmp_path / "rep2" / "report.json").read_text())["paired"]
    assert "mcnemar" not in row and table.splitlines()[-3].endswith("| 0/2 | – |")
