"""cwdpo.losses.objectives against independent references: brute-force loops, torch's cross_entropy,
closed-form gradients, finite differences and the DESIGN.md formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cwdpo.batch import IGNORE_INDEX
from cwdpo.losses.objectives import cooling_weight, cw_dpo_loss, dpo_loss, sft_c_loss
from cwdpo.losses.sequence import sequence_logps, smoothed_nll, token_logps


def _logits_labels(b=3, t=7, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    # ragged response masks: a prompt prefix and right padding, different per row
    labels[0, :2] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    labels[2, 0] = IGNORE_INDEX
    return logits, labels


def _pairs(b=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc = -20 + 5 * torch.randn(b, generator=g, dtype=dtype)
    pr = -25 + 5 * torch.randn(b, generator=g, dtype=dtype)
    rc = pc + torch.randn(b, generator=g, dtype=dtype)
    rr = pr + torch.randn(b, generator=g, dtype=dtype)
    ell = -3 + 1.5 * torch.randn(b, generator=g, dtype=dtype)
    return pc, pr, rc, rr, ell


# ------------------------------------------------------------------------- log-probs
def test_sequence_logps_matches_bruteforce_python_loop():
    logits, labels = _logits_labels()
    out = sequence_logps(logits, labels)
    b, t, _ = logits.shape
    for i in range(b):
        total, n = 0.0, 0
        for j in range(t):
            y = int(labels[i, j])
            if y == IGNORE_INDEX:
                assert out.token[i, j] == 0 and not out.mask[i, j]
                continue
            row = [float(x) for x in logits[i, j]]
            lse = max(row) + math.log(sum(math.exp(x - max(row)) for x in row))
            lp = row[y] - lse
            assert out.token[i, j].item() == pytest.approx(lp, abs=1e-5)
            assert out.mask[i, j]
            total += lp
            n += 1
        assert out.sum[i].item() == pytest.approx(total, abs=1e-4)
        assert out.count[i].item() == n
        assert out.mean[i].item() == pytest.approx(total / n, abs=1e-5)


def test_sequence_logps_all_masked_row_is_zero_not_nan():
    logits, labels = _logits_labels()
    labels[0] = IGNORE_INDEX
    out = sequence_logps(logits, labels)
    assert out.count[0] == 0 and out.sum[0] == 0 and out.mean[0] == 0
    assert torch.isfinite(out.mean).all()


def test_token_logps_bf16_logits_are_normalised_in_float32():
    logits, labels = _logits_labels()
    lp_bf16, mask = token_logps(logits.bfloat16(), labels)
    assert lp_bf16.dtype == torch.float32
    ref, _ = token_logps(logits.bfloat16().float(), labels)
    torch.testing.assert_close(lp_bf16, ref, rtol=0, atol=0)
    assert torch.equal(mask, labels != IGNORE_INDEX)


def test_smoothed_nll_eps0_is_minus_sum_and_minus_mean_logps():
    logits, labels = _logits_labels()
    seq = sequence_logps(logits, labels)
    torch.testing.assert_close(smoothed_nll(logits, labels), -seq.sum, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        smoothed_nll(logits, labels, reduction="mean"), -seq.mean, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_smoothed_nll_matches_torch_cross_entropy_label_smoothing(eps):
    logits, labels = _logits_labels(v=13, seed=3)
    got_sum = smoothed_nll(logits, labels, label_smoothing=eps)
    got_mean = smoothed_nll(logits, labels, label_smoothing=eps, reduction="mean")
    for i in range(logits.shape[0]):
        ref_sum = F.cross_entropy(
            logits[i], labels[i], label_smoothing=eps, reduction="sum", ignore_index=IGNORE_INDEX
        )
        ref_mean = F.cross_entropy(
            logits[i], labels[i], label_smoothing=eps, reduction="mean", ignore_index=IGNORE_INDEX
        )
        assert got_sum[i].item() == pytest.approx(ref_sum.item(), abs=1e-5)
        assert got_mean[i].item() == pytest.approx(ref_mean.item(), abs=1e-5)
    # smoothing really changes the value (a test that could fail)
    assert not torch.allclose(got_sum, smoothed_nll(logits, labels))


def test_smoothed_nll_bad_reduction_raises():
    logits, labels = _logits_labels()
    with pytest.raises(ValueError, match="reduction"):
        smoothed_nll(logits, labels, reduction="none")


# ------------------------------------------------------------------------- SFT-C
def test_sft_c_lambda0_is_plain_sft_loss_and_grads():
    g = torch.Generator().manual_seed(0)
    pos = (10 * torch.rand(6, generator=g)).requires_grad_()
    neg = (0.1 * torch.rand(6, generator=g)).requires_grad_()  # far below C: would be violated
    out = sft_c_loss(pos, neg, lam=0.0, margin_c=5.0)
    assert torch.equal(out.loss, pos.mean())
    gp, gn = torch.autograd.grad(out.loss, [pos, neg], allow_unused=True)
    torch.testing.assert_close(gp, torch.full_like(pos, 1 / 6), rtol=0, atol=0)
    assert gn is None or torch.count_nonzero(gn) == 0
    assert out.penalty == 0
    assert out.neg_nll.item() == pytest.approx(neg.mean().item())


def test_sft_c_lambda0_still_reports_violation():
    """`violated` is a diagnostic ("1.0 when neg_nll < C"): the λ = 0 baseline is exactly the run
    where one wants to see negatives sinking below C, so it must not be hard-wired to 0."""
    pos = torch.tensor([3.0, 4.0])
    neg = torch.tensor([0.5, 1.0])
    out = sft_c_loss(pos, neg, lam=0.0, margin_c=5.0)
    assert out.violated.item() == 1.0


def test_sft_c_soft_hinge_active_and_inactive():
    pos = torch.tensor([2.0, 4.0], requires_grad=True)
    neg = torch.tensor([1.0, 3.0], requires_grad=True)  # mean 2.0
    lam = 0.7
    # active: C = 5 > 2
    out = sft_c_loss(pos, neg, lam=lam, margin_c=5.0)
    assert out.loss.item() == pytest.approx(3.0 + lam * (5.0 - 2.0))
    assert out.penalty.item() == pytest.approx(lam * 3.0)
    assert out.violated.item() == 1.0
    gp, gn = torch.autograd.grad(out.loss, [pos, neg])
    torch.testing.assert_close(gp, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(gn, torch.tensor([-lam / 2, -lam / 2]))
    # inactive: C = 1.5 < 2 → pure SFT, no gradient on negatives
    out = sft_c_loss(pos, neg, lam=lam, margin_c=1.5)
    assert out.loss.item() == pytest.approx(3.0)
    assert out.penalty.item() == 0 and out.violated.item() == 0
    gp, gn = torch.autograd.grad(out.loss, [pos, neg])
    torch.testing.assert_close(gp, torch.tensor([0.5, 0.5]))
    assert torch.count_nonzero(gn) == 0


def test_sft_c_hard_constraint_switches_terms():
    pos = torch.tensor([2.0, 4.0], requires_grad=True)
    neg = torch.tensor([1.0, 3.0], requires_grad=True)
    # violated: only the constraint is restored, positives get no gradient
    out = sft_c_loss(pos, neg, lam=123.0, margin_c=5.0, constraint="hard")
    assert out.loss.item() == pytest.approx(3.0)  # C − E[NLL⁻] = 5 − 2, λ ignored
    gp, gn = torch.autograd.grad(out.loss, [pos, neg])
    assert torch.count_nonzero(gp) == 0
    torch.testing.assert_close(gn, torch.tensor([-0.5, -0.5]))
    # feasible: plain SFT
    out = sft_c_loss(pos, neg, lam=123.0, margin_c=1.0, constraint="hard")
    assert out.loss.item() == pytest.approx(3.0)
    gp, gn = torch.autograd.grad(out.loss, [pos, neg])
    torch.testing.assert_close(gp, torch.tensor([0.5, 0.5]))
    assert torch.count_nonzero(gn) == 0
    assert out.violated.item() == 0


def test_sft_c_without_negatives():
    pos = torch.tensor([1.0, 2.0, 3.0])
    for neg in (None, torch.tensor([])):
        out = sft_c_loss(pos, neg, lam=1.0, margin_c=5.0)
        assert out.loss.item() == pytest.approx(2.0)
        assert math.isnan(out.neg_nll.item())
        assert out.penalty.item() == 0


def test_sft_c_bad_constraint_raises():
    pos, neg = torch.tensor([1.0]), torch.tensor([1.0])
    with pytest.raises(ValueError, match="constraint"):
        sft_c_loss(pos, neg, lam=1.0, margin_c=5.0, constraint="medium")


def test_sft_c_bad_constraint_raises_even_without_negatives():
    """A typo in the config must fail on the first batch, not on the first batch with negatives."""
    with pytest.raises(ValueError, match="constraint"):
        sft_c_loss(torch.tensor([1.0]), None, lam=1.0, margin_c=5.0, constraint="medium")


# ------------------------------------------------------------------------- cooling weight
def test_cooling_weight_formula_limits_and_stop_gradient():
    ell = torch.tensor([-12.0, -3.0, -2.0, -1.0, 0.5], requires_grad=True)
    w = cooling_weight(ell, floor=-2.0, tau=0.5)
    ref = 1 / (1 + torch.exp(-(ell.detach() + 2.0) / 0.5))
    torch.testing.assert_close(w, ref)
    assert w[0] < 1e-7  # easy negative: cooled to ~0
    assert w[2].item() == pytest.approx(0.5)
    assert w[-1] > 0.99  # hard negative keeps its weight
    assert not w.requires_grad and w.grad_fn is None  # sg[·]


def test_cooling_weight_bad_tau_raises():
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="tau"):
            cooling_weight(torch.zeros(2), -2.0, tau)


# ------------------------------------------------------------------------- DPO / CW-DPO
def test_dpo_loss_matches_formula():
    pc, pr, rc, rr, _ = _pairs()
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta)
    z = (pc - rc) - (pr - rr)
    ref = torch.stack([-torch.log(1 / (1 + torch.exp(-beta * zi))) for zi in z])
    torch.testing.assert_close(out.losses, ref)
    torch.testing.assert_close(out.loss, ref.mean())
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))
    torch.testing.assert_close(out.logits, z)
    assert torch.equal(out.weights, torch.ones_like(pc))


def test_ipo_loss_matches_formula():
    pc, pr, rc, rr, _ = _pairs()
    beta = 0.2
    out = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    z = (pc - rc) - (pr - rr)
    torch.testing.assert_close(out.losses, (z - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(out.loss, ((z - 2.5) ** 2).mean())
    w = torch.tensor([0.1, 0.5, 1.0, 0.0, 0.9], dtype=pc.dtype)
    out = dpo_loss(pc, pr, rc, rr, beta, weights=w, loss_type="ipo")
    zw = (pc - rc) - w * (pr - rr)
    torch.testing.assert_close(out.losses, (zw - 2.5) ** 2)


def test_cw_dpo_ipo_uses_cooled_logits():
    pc, pr, rc, rr, ell = _pairs()
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.2, floor=-3.0, tau=0.5, loss_type="ipo")
    w = torch.sigmoid((ell - (-3.0)) / 0.5)
    zw = (pc - rc) - w * (pr - rr)
    torch.testing.assert_close(out.loss, ((zw - 2.5) ** 2).mean(), rtol=1e-6, atol=1e-6)


def test_cooling_off_equals_vanilla_dpo_exactly():
    for dtype in (torch.float32, torch.float64):
        pc, pr, rc, rr, ell = _pairs(dtype=dtype)
        a = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, cooling=False)
        b = dpo_loss(pc, pr, rc, rr, beta=0.1)
        assert torch.equal(a.loss, b.loss)
        assert torch.equal(a.losses, b.losses)
        assert torch.equal(a.chosen_rewards, b.chosen_rewards)
        assert torch.equal(a.rejected_rewards, b.rejected_rewards)
        assert torch.equal(a.weights, torch.ones_like(pc))


def test_cooling_with_tiny_tau_and_hard_negatives_is_dpo():
    pc, pr, rc, rr, _ = _pairs(dtype=torch.float32)
    ell = torch.full_like(pc, -1.0)  # ℓ̄ ≫ floor
    a = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor=-2.0, tau=1e-3)
    b = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(a.weights, torch.ones_like(pc), rtol=0, atol=1e-7)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-7)
    # and the other extreme: every negative easy → the loser term vanishes
    ell = torch.full_like(pc, -50.0)
    c = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor=-2.0, tau=1e-3)
    torch.testing.assert_close(c.losses, -F.logsigmoid(0.1 * (pc - rc)), rtol=0, atol=1e-7)


def test_cw_dpo_cooling_weight_is_stop_gradient_and_loser_grad_is_analytic():
    """ℓ̄(y_l) is computed from the same policy log-probs: the gradient w.r.t. the loser's
    log-prob must be β·w_c·σ(−β·z)/B — with no extra term through w_c."""
    pc, pr, rc, rr, _ = _pairs()
    pc.requires_grad_()
    pr.requires_grad_()
    lengths = torch.tensor([4.0, 8.0, 5.0, 12.0, 7.0], dtype=pr.dtype)
    ell = pr / lengths  # the policy's ℓ̄ on the negative, inside the graph
    beta, floor, tau = 0.5, -3.5, 0.4
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=beta, floor=floor, tau=tau)
    g_pc, g_pr = torch.autograd.grad(out.loss, [pc, pr])
    b = len(pc)
    w_formula = torch.sigmoid((ell.detach() - floor) / tau)
    torch.testing.assert_close(out.weights, w_formula, rtol=1e-6, atol=1e-7)
    w = out.weights  # the value used (cooling_weight works in float32)
    z = (pc - rc).detach() - w * (pr - rr).detach()
    torch.testing.assert_close(g_pr, beta * w * torch.sigmoid(-beta * z) / b)
    torch.testing.assert_close(g_pc, -beta * torch.sigmoid(-beta * z) / b)
    # without the stop-gradient there would be an extra −β·σ(−βz)·Δ_l·∂w/∂ℓ̄·(1/L) term
    extra = beta * torch.sigmoid(-beta * z) * (pr - rr).detach() * w * (1 - w) / tau / lengths / b
    assert extra.abs().max() > 1e-3


def test_cw_dpo_has_no_gradient_wrt_confidence_input():
    pc, pr, rc, rr, ell = _pairs()
    ell.requires_grad_()
    pr.requires_grad_()
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor=-3.0, tau=0.5)
    (g,) = torch.autograd.grad(out.loss, [ell], allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0
    assert not out.weights.requires_grad
    # floor="mean" is computed from ℓ̄ too: still no gradient path
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor="mean", tau=0.5)
    (g,) = torch.autograd.grad(out.loss, [ell], allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("cooling", [True, False])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_cw_dpo_grads_match_central_finite_differences(cooling, loss_type):
    pc, pr, rc, rr, ell = _pairs(b=4, seed=5)
    beta = 0.25

    def f(pc_, pr_):
        return cw_dpo_loss(
            pc_,
            pr_,
            rc,
            rr,
            ell,
            beta=beta,
            cooling=cooling,
            floor=-3.0,
            tau=0.7,
            loss_type=loss_type,
        ).loss

    pcg, prg = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    g_pc, g_pr = torch.autograd.grad(f(pcg, prg), [pcg, prg])
    h = 1e-6
    for k in range(len(pc)):
        e = torch.zeros_like(pc)
        e[k] = h
        fd_c = (f(pc + e, pr) - f(pc - e, pr)) / (2 * h)
        fd_r = (f(pc, pr + e) - f(pc, pr - e)) / (2 * h)
        assert g_pc[k].item() == pytest.approx(fd_c.item(), rel=1e-5, abs=1e-8)
        assert g_pr[k].item() == pytest.approx(fd_r.item(), rel=1e-5, abs=1e-8)
    if cooling:  # the cooled loser gradient is really smaller than DPO's
        (g_dpo,) = torch.autograd.grad(
            dpo_loss(pcg, prg, rc, rr, beta, loss_type=loss_type).loss, [prg]
        )
        assert not torch.allclose(g_pr, g_dpo)


def test_cw_dpo_floor_mean_uses_batch_mean_of_negative_confidence():
    pc, pr, rc, rr, ell = _pairs()
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor="mean", tau=0.5)
    assert out.floor.item() == pytest.approx(ell.mean().item(), abs=1e-6)
    torch.testing.assert_close(
        out.weights, torch.sigmoid((ell - ell.mean()) / 0.5), rtol=1e-6, atol=1e-6
    )
    # a running mean passed as a tensor is used as is
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor=torch.tensor(-1.25), tau=0.5)
    assert out.floor.item() == pytest.approx(-1.25)
    torch.testing.assert_close(out.weights, torch.sigmoid((ell + 1.25) / 0.5), rtol=1e-6, atol=1e-6)


def test_cw_dpo_filter_threshold_masks_pairs():
    pc, pr, rc, rr, ell = _pairs(b=6, seed=2)
    ell = torch.tensor([-1.0, -6.0, -2.0, -9.0, -3.5, -0.2], dtype=pc.dtype)
    pc.requires_grad_()
    pr.requires_grad_()
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.2, floor=-3.0, tau=0.5, filter_threshold=-4.0)
    keep = torch.tensor([True, False, True, False, True, True])
    assert torch.equal(out.kept, keep)
    torch.testing.assert_close(out.loss, out.losses[keep].mean())
    g_pc, g_pr = torch.autograd.grad(out.loss, [pc, pr])
    assert torch.count_nonzero(g_pc[~keep]) == 0 and torch.count_nonzero(g_pr[~keep]) == 0
    assert torch.count_nonzero(g_pc[keep]) == keep.sum()
    # the kept pairs' loss equals the unfiltered loss on the kept subset
    sub = cw_dpo_loss(
        pc[keep], pr[keep], rc[keep], rr[keep], ell[keep], beta=0.2, floor=-3.0, tau=0.5
    )
    torch.testing.assert_close(out.loss, sub.loss)


def test_cw_dpo_all_filtered_gives_zero_loss_and_zero_grads():
    pc, pr, rc, rr, _ = _pairs()
    pc.requires_grad_()
    pr.requires_grad_()
    ell = torch.full_like(pc, -10.0)
    out = cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, filter_threshold=-4.0)
    assert out.loss.item() == 0.0
    g_pc, g_pr = torch.autograd.grad(out.loss, [pc, pr])
    assert torch.count_nonzero(g_pc) == 0 and torch.count_nonzero(g_pr) == 0
    assert torch.isfinite(g_pc).all() and torch.isfinite(g_pr).all()


def test_bad_args_raise_value_error():
    pc, pr, rc, rr, ell = _pairs()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="loss_type"):
        cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="floor"):
        cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, floor="median")
    with pytest.raises(ValueError, match="tau"):
        cw_dpo_loss(pc, pr, rc, rr, ell, beta=0.1, tau=0.0)
