"""Stage-2 baselines and controls: objective math on literal tensors, configs that compose."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from cwdpo.batch import PairBatch
from cwdpo.losses.objectives import cw_dpo_loss
from tests.helpers import bare_cw_dpo_module, compose_cfg

# two pairs: Δ_w = pc − rc, Δ_l = pr − rr
PC, PR = torch.tensor([-4.0, -6.0]), torch.tensor([-9.0, -5.0])
RC, RR = torch.tensor([-5.0, -6.5]), torch.tensor([-8.0, -5.5])
ELL = torch.tensor([-1.0, -3.0])  # policy ℓ̄ on the negatives
BETA = 0.5
DW, DL = [1.0, 0.5], [-1.0, 0.5]


def _ls(x: float) -> float:  # −log σ(x)
    return math.log1p(math.exp(-x))


def _wc(ell: float, floor: float = -2.0, tau: float = 0.5) -> float:
    return 1 / (1 + math.exp(-(ell - floor) / tau))


def test_constant_loser_weight_literal():
    for c in (0.0, 0.3, 1.0):
        out = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False, loser_weight=c)
        want = [_ls(BETA * (dw - c * dl)) for dw, dl in zip(DW, DL)]
        assert out.losses.tolist() == pytest.approx(want)
        assert out.weights.tolist() == pytest.approx([c, c])
    # w_c ≡ 0 is the chosen-only loss −log σ(β Δ_w): independent of the rejected log-probs
    a = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False, loser_weight=0.0).loss
    b = cw_dpo_loss(PC, PR - 7.0, RC, RR, ELL, beta=BETA, cooling=False, loser_weight=0.0).loss
    assert float(a) == pytest.approx(float(b)) == pytest.approx(sum(_ls(BETA * d) for d in DW) / 2)


def test_constant_one_is_vanilla_dpo_and_matched_weight_uses_the_mean():
    dpo = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False)
    one = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False, loser_weight=1.0)
    assert torch.equal(dpo.losses, one.losses)
    cw = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA)
    mean_wc = float(cw.weights.mean())
    assert mean_wc == pytest.approx((_wc(-1.0) + _wc(-3.0)) / 2)
    matched = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False, loser_weight=mean_wc)
    assert float(matched.weights.mean()) == pytest.approx(mean_wc)
    assert not torch.allclose(matched.losses, cw.losses)  # same mean weight, different per pair


def test_shuffled_weights_are_a_permutation_of_the_cooling_weights():
    perm = torch.tensor([1, 0])
    out = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, permutation=perm)
    w = [_wc(-3.0), _wc(-1.0)]  # pair 0 gets pair 1's weight and vice versa
    assert out.weights.tolist() == pytest.approx(w)
    assert out.losses.tolist() == pytest.approx(
        [_ls(BETA * (dw - wi * dl)) for dw, dl, wi in zip(DW, DL, w)]
    )
    ident = cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, permutation=torch.tensor([0, 1]))
    assert torch.equal(ident.losses, cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA).losses)
    with pytest.raises(ValueError, match="cooling"):
        cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, cooling=False, permutation=perm)
    with pytest.raises(ValueError, match="loser_weight"):
        cw_dpo_loss(PC, PR, RC, RR, ELL, beta=BETA, loser_weight=-1.0)


class _LP:
    def __init__(self, s, mean, count):
        self.sum, self.mean, self.count = s, mean, count


def _module(**kw):
    pol = _LP(
        torch.cat([PC, PR]),
        torch.cat([torch.tensor([-0.4, -0.8]), ELL]),
        torch.tensor([10, 5, 9, 5]),
    )
    return bare_cw_dpo_module(lambda batch: (pol, torch.cat([RC, RR]), 2), beta=BETA, **kw)


def test_sft_loss_type_is_the_chosen_per_token_nll_and_shuffle_permutes():
    loss, metrics = _module(loss_type="sft").compute(PairBatch({}, 2))
    assert float(loss) == pytest.approx((0.4 + 0.8) / 2)  # −mean over pairs of ℓ̄(y_w)
    assert "cooling/mean" in metrics  # the DPO terms are still logged for comparison
    torch.manual_seed(0)
    _, m_shuf = _module(shuffle_weights=True).compute(PairBatch({}, 2))
    _, m_cw = _module().compute(PairBatch({}, 2))
    assert float(m_shuf["cooling/mean"]) == pytest.approx(float(m_cw["cooling/mean"]))


def test_module_rejects_inconsistent_baseline_knobs(backbone):
    from cwdpo.stages import CWDPOModule

    opt = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="stage.cw_dpo.objective.shuffle_weights"):
        CWDPOModule(backbone, optimizer=opt, cooling=False, shuffle_weights=True)
    with pytest.raises(ValueError, match="stage.cw_dpo.objective.loss_type"):
        CWDPOModule(backbone, optimizer=opt, loss_type="kto")


@pytest.mark.parametrize(
    "name, key, want",
    [
        ("sft_continue", "loss_type", "sft"),
        ("rft", "loss_type", "sft"),
        ("chosen_only", "loser_weight", 0.0),
        ("dpo_matched", "loser_weight", 0.5),
        ("cw_dpo_shuffled", "shuffle_weights", True),
    ],
)
def test_baseline_experiments_compose_and_change_only_their_knob(name, key, want, tmp_path):
    base = compose_cfg([], tmp_path, tmp_path)
    cfg = compose_cfg([f"+experiment={name}", "data=shapes_cooc"], tmp_path, tmp_path)
    assert cfg.experiment_name == name and cfg.stage.cw_dpo.objective[key] == want
    assert cfg.stage.cw_dpo.steps == base.stage.cw_dpo.steps  # the same step budget
    assert cfg.negatives.kind == {"rft": "self_judged"}.get(name, "dataset")
    b, c = (OmegaConf.to_container(x.stage.cw_dpo, resolve=False) for x in (base, cfg))
    changed = {k for k in b["objective"] if b["objective"][k] != c["objective"][k]}
    assert all(b[k] == c[k] for k in b if k != "objective")  # module, datamodule, optimisation
    assert changed <= {key, "cooling"}, changed
