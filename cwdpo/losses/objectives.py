"""The math of CW-DPO as pure tensor functions (no Lightning, no HF, no I/O).

Notation follows DESIGN.md / arXiv 2510.11978:
  ℓ̄_θ(y|x) = (1/L) Σ_l log π_θ(y_l | x, y_<l)          (confidence, `SeqLogps.mean`)
  Δ(y)      = log π_θ(y|x) − log π_ref(y|x)              (sequence sums)
  SFT-C:  L = E[−log π_θ(y⁺|x)] + λ · ReLU(C − E[−log π_θ(y⁻|x)])
  CW-DPO: L = −E[log σ(β(Δ(y_w) − w_c · Δ(y_l)))],  w_c = sg[σ((ℓ̄_θ(y_l|x) − ℓ_floor)/τ)]

Stage 2 picks its objective by `LossType` through `preference_loss` (one function per
objective, as open-instruct's `dpo_utils` dispatches on its loss enum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from cwdpo.losses.config import LossType, PreferenceConfig, SFTCConfig


@dataclass
class SFTCOutput:
    loss: torch.Tensor
    pos_nll: torch.Tensor  # batch-mean NLL of positives
    neg_nll: torch.Tensor  # batch-mean NLL of negatives (nan if none)
    penalty: torch.Tensor  # λ · ReLU(C − neg_nll), or the active hard-constraint term
    violated: torch.Tensor  # 1.0 when neg_nll < C


def sft_c_loss(
    pos_nll: torch.Tensor,
    neg_nll: torch.Tensor | None,
    lam: float,
    margin_c: float,
    constraint: Literal["soft", "hard"] = "soft",
) -> SFTCOutput:
    """`sft_c_objective` from loose knobs (checked here, once, by building `SFTCConfig`)."""
    cfg = SFTCConfig(lam=lam, margin_c=margin_c, constraint=constraint)
    return sft_c_objective(pos_nll, neg_nll, cfg)


def sft_c_objective(
    pos_nll: torch.Tensor, neg_nll: torch.Tensor | None, cfg: SFTCConfig
) -> SFTCOutput:
    """Constrained SFT: fit positives subject to E[NLL(y⁻)] ≥ C (`cfg`: a checked config).

    soft: the Lagrangian form L = E[NLL⁺] + λ·ReLU(C − E[NLL⁻]); λ = 0 is plain SFT.
    hard: feasibility first — while the constraint is violated the step only restores it
          (L = C − E[NLL⁻]), otherwise L = E[NLL⁺]. This is the paper's "w/o soft penalty".
    """
    lam, margin_c = cfg.lam, cfg.margin_c
    pos = pos_nll.mean()
    zero = pos.new_zeros(())
    if neg_nll is None or neg_nll.numel() == 0:
        return SFTCOutput(pos, pos.detach(), pos.new_full((), float("nan")), zero, zero)
    neg = neg_nll.mean()
    gap = margin_c - neg
    violated = (gap > 0).to(pos.dtype)
    if cfg.constraint == "soft" and lam == 0:  # exactly plain SFT, but still report it
        return SFTCOutput(pos, pos.detach(), neg.detach(), zero, violated.detach())
    if cfg.constraint == "soft":
        penalty = lam * F.relu(gap)
        loss = pos + penalty
    else:  # hard
        penalty = F.relu(gap)
        loss = torch.where(gap > 0, penalty, pos)
    return SFTCOutput(loss, pos.detach(), neg.detach(), penalty.detach(), violated.detach())


def cooling_weight(
    neg_mean_logps: torch.Tensor, floor: float | torch.Tensor, tau: float
) -> torch.Tensor:
    """w_c = sg[σ((ℓ̄_θ(y_l|x) − ℓ_floor)/τ)]: easy negatives (ℓ̄ ≪ floor) → 0, hard → 1.

    Stop-gradient: the weight rescales the loser's signal but is not itself optimised —
    otherwise the policy could lower the loss by pushing ℓ̄(y_l) down to shrink w_c.
    """
    if tau <= 0:
        raise ValueError(f"cooling temperature tau must be > 0, got {tau}")
    return _cooling(neg_mean_logps, floor, tau)


def _cooling(ell: torch.Tensor, floor: float | torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sigmoid((ell.detach().float() - floor) / tau)


def resolve_floor(
    floor: float | Literal["mean"] | torch.Tensor,
    neg_mean_logps: torch.Tensor,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_floor as a float32 scalar tensor: the ℓ̄ at which the cooling weight w_c is ½.

    `stage.cw_dpo.objective.floor` is this one quantity; only where its value comes from differs:
    - a number (the config's default, -2.0): a fixed ℓ_floor in nats per token;
    - "mean": the batch mean of ℓ̄_θ(y_l|x) over the negatives that survive
      `filter_threshold` (all of them when none survive or no filter is set), so w_c
      centres on the batch: half the negatives are "easier than average";
    - a tensor: a value the caller computed (e.g. a running mean), used as is.
    It is not `filter_threshold` (a hard cut that drops pairs) and not the Δℓ̄ threshold of
    the squeezing probe rule (callbacks.probes.rules.squeezing.threshold).
    """
    ell = neg_mean_logps.detach()
    if isinstance(floor, str):
        if floor != "mean":
            raise ValueError(f"floor must be a number or 'mean', got {floor!r}")
        pool = ell if kept is None or not kept.any() else ell[kept]  # filtered pairs don't count
        return pool.float().mean()
    return torch.as_tensor(floor, dtype=torch.float32, device=ell.device)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # β·Δ(y_w), detached
    rejected_rewards: torch.Tensor  # β·w_c·Δ(y_l), detached
    logits: torch.Tensor  # Δ(y_w) − w_c·Δ(y_l), detached
    weights: torch.Tensor  # w_c used ([B], ones for vanilla DPO)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    mask: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO on sequence log-probs, with the loser's log-ratio scaled by `weights` (w_c).

    weights=None is vanilla DPO (TRL's "sigmoid" loss). `loss_type="ipo"` is IPO's squared
    loss (logits − 1/(2β))² on the same (weighted) logits. `mask` drops filtered pairs.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    w = torch.ones_like(rejected_ratio) if weights is None else weights.to(rejected_ratio.dtype)
    logits = chosen_ratio - w * rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if mask is None:
        loss = losses.mean()
    else:
        m = mask.to(losses.dtype)
        loss = (losses * m).sum() / m.sum().clamp(min=1.0)
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * w * rejected_ratio).detach(),
        logits=logits.detach(),
        weights=w.detach(),
    )


@dataclass
class CWDPOOutput(DPOOutput):
    kept: torch.Tensor | None = None  # [B] bool: pairs surviving negative filtering
    floor: torch.Tensor | None = None  # ℓ_floor actually used


def cw_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    beta: float,
    cooling: bool = True,
    floor: float | Literal["mean"] | torch.Tensor = -2.0,
    tau: float = 0.5,
    filter_threshold: float | None = None,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    loser_weight: float | None = None,
    permutation: torch.Tensor | None = None,
) -> CWDPOOutput:
    """`cw_dpo_terms` from loose knobs, checked here once by building a `PreferenceConfig`."""
    cfg = PreferenceConfig(
        loss_type=loss_type,
        beta=beta,
        cooling=cooling,
        floor=floor,
        tau=tau,
        filter_threshold=filter_threshold,
        loser_weight=loser_weight,
    )
    if permutation is not None and (loser_weight is not None or not cooling):
        raise ValueError(
            "a w_c permutation needs cooling=True and no loser_weight (got cooling="
            f"{cooling}, loser_weight={loser_weight})"
        )
    return cw_dpo_terms(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        policy_rejected_mean,
        cfg,
        cfg.loss_type.value,
        permutation,
    )


def cw_dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    cfg: PreferenceConfig,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    permutation: torch.Tensor | None = None,
) -> CWDPOOutput:
    """CW-DPO: −log σ(β(Δ_w − w_c·Δ_l)), w_c from the policy's ℓ̄ on the negative.

    `cfg.floor` is ℓ_floor, the centre of the cooling sigmoid, in one of three forms (see
    `resolve_floor`): a number, "mean" (batch mean of ℓ̄ over the kept negatives), or a tensor
    a caller computed (e.g. a running mean). cooling=False sets w_c ≡ 1: exactly vanilla DPO.
    filter_threshold drops pairs whose negative has ℓ̄ < threshold (already-easy negatives).
    Controls for "is it the cooling?": `loser_weight=c` sets w_c ≡ c for every pair (0 = chosen
    only, CW-DPO's mean w_c = DPO with the same average loser weight); `permutation` reorders
    the cooling weights within the batch (same distribution, not tied to the pair's ℓ̄).
    `cfg` was checked when it was built: nothing is checked again here, every step.
    """
    ell = policy_rejected_mean.detach()
    kept = None if cfg.filter_threshold is None else ell >= cfg.filter_threshold
    floor_t = resolve_floor(cfg.floor, ell, kept)
    weights = _cooling(ell, floor_t, cfg.tau) if cfg.cooling else None
    if weights is not None and permutation is not None:
        weights = weights[permutation]
    if cfg.loser_weight is not None:
        weights = torch.full_like(ell, float(cfg.loser_weight), dtype=torch.float32)
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        cfg.beta,
        weights=weights,
        loss_type=loss_type,
        mask=kept,
    )
    return CWDPOOutput(**vars(out), kept=kept, floor=floor_t.detach())


# ---------------------------------------------------------------- stage-2 objectives
class PairLogps(Protocol):
    """What the objectives read of the policy's `SeqLogps` over 2n rows (chosen, then rejected)."""

    sum: torch.Tensor  # [2n] log π_θ(y|x)
    mean: torch.Tensor  # [2n] ℓ̄_θ(y|x)
    count: torch.Tensor  # [2n] response tokens L


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar: what the step minimises (RPO term included)
    terms: CWDPOOutput  # the (CW-)DPO terms: logged, and read by the dynamics callback
    rpo_nll: torch.Tensor | None = None  # token-mean NLL of the chosen when rpo_alpha > 0


def _cw_terms(
    logps: torch.Tensor,
    ref: torch.Tensor,
    policy_mean: torch.Tensor,
    n: int,
    cfg: PreferenceConfig,
    loss_type: Literal["sigmoid", "ipo"],
    permutation: torch.Tensor | None,
) -> CWDPOOutput:
    """`cw_dpo_loss` on 2n rows (chosen, then rejected) of policy / reference log-probs."""
    return cw_dpo_terms(
        logps[:n], logps[n:], ref[:n], ref[n:], policy_mean[n:], cfg, loss_type, permutation
    )


def sigmoid_objective(
    policy: PairLogps,
    ref: torch.Tensor,
    n: int,
    cfg: PreferenceConfig,
    permutation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CWDPOOutput]:
    """CW-DPO (vanilla DPO with cooling off) on sequence log-probs: −log σ(β(Δ_w − w_c·Δ_l))."""
    out = _cw_terms(policy.sum, ref, policy.mean, n, cfg, "sigmoid", permutation)
    return out.loss, out


def ipo_objective(
    policy: PairLogps,
    ref: torch.Tensor,
    n: int,
    cfg: PreferenceConfig,
    permutation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CWDPOOutput]:
    """IPO (as in TRL): (logits − 1/(2β))² on per-token average log-ratios, log π / L."""
    count = policy.count.clamp(min=1).to(policy.sum.dtype)
    out = _cw_terms(policy.sum / count, ref / count, policy.mean, n, cfg, "ipo", permutation)
    return out.loss, out


def sft_objective(
    policy: PairLogps,
    ref: torch.Tensor,
    n: int,
    cfg: PreferenceConfig,
    permutation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CWDPOOutput]:
    """The chosen's per-token NLL, −mean ℓ̄_θ(y_w|x); the DPO terms are computed for logging."""
    out = _cw_terms(policy.sum, ref, policy.mean, n, cfg, "sigmoid", permutation)
    return -policy.mean[:n].mean(), out


def rpo_nll(policy: PairLogps, n: int) -> torch.Tensor:
    """RPO's (as in TRL) NLL term: −Σ log π_θ(y_w|x) / Σ L_w, token mean over the chosen."""
    return -policy.sum[:n].sum() / policy.count[:n].sum().clamp(min=1)


OBJECTIVES = {
    LossType.SIGMOID: sigmoid_objective,
    LossType.IPO: ipo_objective,
    LossType.SFT: sft_objective,
}


def preference_loss(
    policy: PairLogps, ref: torch.Tensor, n: int, cfg: PreferenceConfig
) -> PreferenceOutput:
    """Stage 2's loss: the objective of `cfg.loss_type`, plus RPO's α·NLL when rpo_alpha > 0.

    `policy` holds 2n rows (n chosen, then n rejected), `ref` the reference's sequence sums.
    `shuffle_weights` draws the w_c permutation here (torch.randperm, the global RNG). `cfg`
    was checked when it was built (`PreferenceConfig.__post_init__`), not again here.
    """
    objective = OBJECTIVES[cfg.loss_type]
    perm = torch.randperm(n, device=policy.sum.device) if cfg.shuffle_weights else None
    loss, terms = objective(policy, ref, n, cfg, perm)
    nll = None
    if cfg.rpo_alpha > 0:
        nll = rpo_nll(policy, n)
        loss = loss + cfg.rpo_alpha * nll
    return PreferenceOutput(loss=loss, terms=terms, rpo_nll=nll)
