"""Stage-2 dispatcher (`objectives.preference_loss`) on literal tensors: each `LossType` returns
what its own function returns and what the formula gives; RPO adds α·NLL on any loss type;
`resolve_floor`'s three sources; what a training step logs and hands to callbacks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cwdpo.batch import PairBatch
from cwdpo.losses.config import LossType, PreferenceConfig
from cwdpo.losses.objectives import (
    OBJECTIVES,
    ipo_objective,
    preference_loss,
    resolve_floor,
    rpo_nll,
    sft_objective,
    sigmoid_objective,
)
from tests.helpers import bare_cw_dpo_module

# two pairs, rows = (chosen 0, chosen 1, rejected 0, rejected 1)
POL = SimpleNamespace(
    sum=torch.tensor([-4.0, -6.0, -9.0, -5.0]),
    mean=torch.tensor([-0.4, -0.8, -1.0, -3.0]),
    count=torch.tensor([10, 5, 9, 5]),
)
REF = torch.tensor([-5.0, -6.5, -8.0, -5.5])
N, BETA = 2, 0.5
WC = [1 / (1 + math.exp(-(e + 2.0) / 0.5)) for e in (-1.0, -3.0)]  # floor -2, τ 0.5


def _ls(x: float) -> float:  # −log σ(x)
    return math.log1p(math.exp(-x))


def _cfg(**kw) -> PreferenceConfig:
    return PreferenceConfig(**{"beta": BETA, "floor": -2.0, "tau": 0.5, **kw})


def test_every_loss_type_has_one_function():
    assert set(OBJECTIVES) == set(LossType)
    assert [t.value for t in LossType] == ["sigmoid", "ipo", "sft"]


def test_sigmoid_dispatch_is_its_function_and_the_formula():
    res = preference_loss(POL, REF, N, _cfg(loss_type="sigmoid"))
    loss, out = sigmoid_objective(POL, REF, N, _cfg())
    assert torch.equal(res.loss, loss) and torch.equal(res.terms.losses, out.losses)
    dw, dl = [1.0, 0.5], [-1.0, 0.5]  # Δ_w, Δ_l on sequence sums
    want = [_ls(BETA * (w_ - c * l_)) for w_, l_, c in zip(dw, dl, WC)]
    assert res.terms.losses.tolist() == pytest.approx(want)
    assert float(res.loss) == pytest.approx(sum(want) / 2)
    assert res.terms.weights.tolist() == pytest.approx(WC)
    assert res.rpo_nll is None


def test_ipo_dispatch_is_its_function_on_per_token_log_ratios():
    res = preference_loss(POL, REF, N, _cfg(loss_type=LossType.IPO))
    loss, out = ipo_objective(POL, REF, N, _cfg())
    assert torch.equal(res.loss, loss) and torch.equal(res.terms.losses, out.losses)
    dw = [-4 / 10 + 5 / 10, -6 / 5 + 6.5 / 5]  # (log π − log π_ref) / L
    dl = [-9 / 9 + 8 / 9, -5 / 5 + 5.5 / 5]
    want = [(w_ - c * l_ - 1 / (2 * BETA)) ** 2 for w_, l_, c in zip(dw, dl, WC)]
    assert res.terms.losses.tolist() == pytest.approx(want)
    assert float(res.loss) == pytest.approx(sum(want) / 2)


def test_sft_dispatch_is_its_function_and_keeps_the_dpo_terms_for_logging():
    res = preference_loss(POL, REF, N, _cfg(loss_type="sft"))
    loss, out = sft_objective(POL, REF, N, _cfg())
    assert torch.equal(res.loss, loss)
    assert float(res.loss) == pytest.approx((0.4 + 0.8) / 2)  # −mean ℓ̄(y_w)
    sig = preference_loss(POL, REF, N, _cfg(loss_type="sigmoid"))
    assert torch.equal(res.terms.losses, sig.terms.losses) and torch.equal(
        out.logits, sig.terms.logits
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft"])
def test_rpo_adds_alpha_times_the_chosen_token_mean_nll(loss_type):
    base = preference_loss(POL, REF, N, _cfg(loss_type=loss_type))
    res = preference_loss(POL, REF, N, _cfg(loss_type=loss_type, rpo_alpha=0.3))
    nll = (4.0 + 6.0) / (10 + 5)
    assert float(rpo_nll(POL, N)) == pytest.approx(nll) == pytest.approx(float(res.rpo_nll))
    assert float(res.loss) == pytest.approx(float(base.loss) + 0.3 * nll)


def test_loser_weight_and_shuffle_reach_cw_dpo_loss():
    res = preference_loss(POL, REF, N, _cfg(cooling=False, loser_weight=0.0))
    assert res.terms.weights.tolist() == [0.0, 0.0]
    assert float(res.loss) == pytest.approx((_ls(BETA * 1.0) + _ls(BETA * 0.5)) / 2)
    torch.manual_seed(3)
    perm = torch.randperm(N)
    torch.manual_seed(3)
    res = preference_loss(POL, REF, N, _cfg(shuffle_weights=True))
    assert res.terms.weights.tolist() == pytest.approx([WC[i] for i in perm.tolist()])


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="kto"):
        preference_loss(POL, REF, N, _cfg(loss_type="kto"))


def test_resolve_floor_sources():
    ell = torch.tensor([-1.0, -3.0, -8.0])
    assert float(resolve_floor(-2.0, ell)) == -2.0
    assert float(resolve_floor("mean", ell)) == pytest.approx(-4.0)
    kept = torch.tensor([True, True, False])
    assert float(resolve_floor("mean", ell, kept)) == pytest.approx(-2.0)  # filtered don't count
    none = torch.tensor([False, False, False])
    assert float(resolve_floor("mean", ell, none)) == pytest.approx(-4.0)
    assert float(resolve_floor(torch.tensor(-1.25), ell)) == -1.25
    assert resolve_floor(-2.0, ell).dtype == torch.float32
    with pytest.raises(ValueError, match="floor"):
        resolve_floor("median", ell)


def _module(**kw):
    return bare_cw_dpo_module(lambda batch: (POL, REF, N), beta=BETA, **kw)


def _train_step(module):
    """`training_step` with its logged train/ metrics captured (no trainer needed)."""
    logged = {}
    module.log_metrics = lambda prefix, m, n: logged.update(
        {f"{prefix}/{k}": v for k, v in m.items()}
    )
    return module.training_step(PairBatch({}, N), 0), logged


def test_training_step_hands_callbacks_its_terms_and_logs_floor_and_rpo_nll():
    # a = σ(β·logits) ≈ [0.719, 0.555]: none in the default [0.8, 0.99], one in [0.7, 0.99]
    out, logged = _train_step(_module(rpo_alpha=0.3))
    assert float(out["vulnerable_frac"]) == 0.0 and out["beta"] == BETA
    want = preference_loss(POL, REF, N, _cfg(rpo_alpha=0.3))
    assert torch.equal(out["loss"], want.loss) and out["terms"].weights.tolist() == pytest.approx(
        WC
    )
    assert out["logps"] is POL  # the policy log-probs the gradient split differentiates
    # ℓ_floor as used and RPO's NLL are logged; the vulnerable fraction is not (the dynamics
    # callback logs it once, as dynamics/vulnerable_frac, from `out`)
    assert float(logged["train/floor"]) == -2.0
    assert float(logged["train/rpo_nll"]) == pytest.approx((4.0 + 6.0) / (10 + 5))
    assert "train/vulnerable_frac" not in logged and "train/cooling/min" in logged
    region, _ = _train_step(_module(vulnerable_region=(0.7, 0.99)))
    assert float(region["vulnerable_frac"]) == 0.5
    floor_mean, logged = _train_step(_module(floor="mean"))
    assert float(logged["train/floor"]) == pytest.approx(-2.0)  # mean ℓ̄ of the rejected
    assert "train/rpo_nll" not in logged  # rpo_alpha = 0: no RPO term


def test_the_module_checks_its_objective_once_at_build():
    from cwdpo.losses.config import PreferenceConfig

    module = _module(tau=0.25)
    assert module.objective == PreferenceConfig(beta=BETA, tau=0.25)
    with pytest.raises(ValueError, match=r"stage\.cw_dpo\.objective\.tau=0"):
        _module(tau=0)
    with pytest.raises(ValueError, match="not both"):
        _module(objective=PreferenceConfig())
