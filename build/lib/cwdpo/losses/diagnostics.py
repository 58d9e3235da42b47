"""Learning-dynamics diagnostics as pure tensor functions (no Lightning, no HF, no I/O).

They explain *why* a run drifts: Δlogp group statistics (displacement / squeezing), how far
next-token distributions moved from the stage start (TV / JS), how peaked they became (entropy,
top-1 probability), how many DPO pairs sit in the vulnerable region, and which part of the DPO
gradient comes from the chosen vs the rejected responses. The callbacks only feed them tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

VULNERABLE_REGION = (0.8, 0.99)


# ---------------------------------------------------------------- group statistics
def quantile_key(q: float) -> str:
    """0.1 → "q10", 0.5 → "q50", 0.975 → "q97.5": column names of the probe CSV."""
    v = round(100 * q, 6)
    return f"q{int(v)}" if float(v).is_integer() else f"q{v:g}"


def group_stats(
    values: torch.Tensor, quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> dict[str, float]:
    """Mean and quantiles (linear interpolation, as numpy's default) of a 1-D tensor."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        return {"mean": float("nan"), **{quantile_key(q): float("nan") for q in quantiles}}
    qs = torch.quantile(v, torch.tensor(list(quantiles), dtype=torch.float64)) if quantiles else []
    return {"mean": float(v.mean()), **{quantile_key(q): float(x) for q, x in zip(quantiles, qs)}}


# ---------------------------------------------------------------- next-token distributions
def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p over the last dim, from log-probabilities (nats)."""
    logp = logp.float()
    return -(logp.exp() * logp).sum(-1)


def top1_prob(logp: torch.Tensor) -> torch.Tensor:
    """Probability of the most likely token: rises when DPO squeezes mass onto the top-1."""
    return logp.float().max(-1).values.exp()


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ |p − q| between probability vectors (last dim), in [0, 1]."""
    return 0.5 * (p.float() - q.float()).abs().sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats, in [0, ln 2]) between probability vectors (last dim).

    Uses xlogy so zero-probability bins (e.g. an empty "rest" bucket) contribute exactly 0.
    """
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def support(logp: torch.Tensor, k: int | None) -> torch.Tensor | None:
    """Indices of the top-k tokens per position, or None for the full vocabulary.

    With a 150k-token vocabulary the stage-start distributions of a probe set would not fit in
    memory; keeping the start's top-k tokens plus one "rest" bucket does, and by the data
    processing inequality TV/JS on the coarsened distributions are lower bounds of the exact
    ones (exact when k ≥ vocabulary size).
    """
    if k is None or k >= logp.shape[-1]:
        return None
    return logp.topk(k, dim=-1).indices


def coarsen(probs: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Probabilities on `index` plus a final "rest" bucket (the full vector if index is None)."""
    if index is None:
        return probs.float()
    kept = probs.float().gather(-1, index)
    rest = (1.0 - kept.sum(-1, keepdim=True)).clamp(min=0.0)
    return torch.cat([kept, rest], dim=-1)


def distribution_stats(
    logp: torch.Tensor, start: torch.Tensor | None = None, index: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-averaged entropy, top-1 probability and (if `start` is given) TV / JS from it.

    `logp`: [N, V] log-probabilities at N response positions; `start`: the coarsened stage-start
    probabilities of the same positions (`coarsen(start_probs, index)`).
    """
    out = {"entropy": float(entropy(logp).mean()), "top1": float(top1_prob(logp).mean())}
    if start is not None:
        now = coarsen(logp.float().exp(), index)
        out["tv"] = float(tv_distance(now, start).mean())
        out["js"] = float(js_divergence(now, start).mean())
    return out


# ---------------------------------------------------------------- DPO dynamics
def vulnerable_fraction(
    logits: torch.Tensor, beta: float, region: Sequence[float] = VULNERABLE_REGION
) -> torch.Tensor:
    """Fraction of pairs with a = σ(β·logits) in DPO's vulnerable region (default [0.8, 0.99]).

    There the loss is already small but the loser's gradient is still large and misdirected.
    """
    lo, hi = region
    a = torch.sigmoid(beta * logits.float())
    return ((a >= lo) & (a <= hi)).float().mean()


@dataclass
class GradSplit:
    """‖g_w‖, ‖g_l‖, ‖g_w + g_l‖ and cos(g_w, g_l); per-parameter grads when asked for."""

    norm_w: float
    norm_l: float
    norm_total: float
    cosine: float
    grads_w: list[torch.Tensor | None] | None = None
    grads_l: list[torch.Tensor | None] | None = None
    residual: float | None = None  # ‖g_w + g_l − g‖/‖g‖ against the optimizer's gradient

    def as_dict(self) -> dict[str, float]:
        return {
            "norm_w": self.norm_w,
            "norm_l": self.norm_l,
            "norm_total": self.norm_total,
            "cosine": self.cosine,
        }


def gradient_split(
    loss: torch.Tensor,
    rows: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    n_chosen: int,
    retain_graph: bool = True,
    return_grads: bool = False,
) -> GradSplit:
    """Split ∇_θ L into the part that flows through the chosen rows and the rejected rows.

    `rows` are tensors whose first dim is [chosen (n_chosen rows) ; rejected] — e.g. the
    per-token log-probs of `collate_pairs` batches — and `loss` must reach the parameters only
    through them. With u = ∂L/∂rows, g_w = J_wᵀ u_w and g_l = J_lᵀ u_l, so g_w + g_l = ∇_θ L
    exactly (chain rule, linearity). Two vector–Jacobian products; the graph is kept
    (`retain_graph`) so the training step's own backward still runs afterwards.
    """
    rows = list(rows)
    params = list(params)
    upstream = torch.autograd.grad(loss, rows, retain_graph=True, allow_unused=True)
    ups = [torch.zeros_like(r) if u is None else u for r, u in zip(rows, upstream)]

    def vjp(chosen: bool, retain: bool) -> list[torch.Tensor | None]:
        outs = []
        for u in ups:
            m = torch.zeros_like(u)
            if chosen:
                m[:n_chosen] = u[:n_chosen]
            else:
                m[n_chosen:] = u[n_chosen:]
            outs.append(m)
        return list(
            torch.autograd.grad(
                rows, params, grad_outputs=outs, retain_graph=retain, allow_unused=True
            )
        )

    g_w = vjp(True, True)
    g_l = vjp(False, retain_graph)
    ww = ll = wl = 0.0
    for a, b in zip(g_w, g_l):
        if a is not None:
            ww += float(a.double().pow(2).sum())
        if b is not None:
            ll += float(b.double().pow(2).sum())
        if a is not None and b is not None:
            wl += float((a.double() * b.double()).sum())
    total = max(ww + ll + 2 * wl, 0.0) ** 0.5
    cos = wl / (ww**0.5 * ll**0.5) if ww > 0 and ll > 0 else float("nan")
    return GradSplit(
        ww**0.5, ll**0.5, total, cos, g_w if return_grads else None, g_l if return_grads else None
    )
