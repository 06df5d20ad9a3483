"""AWQ (Lin et al., 2023) scale search as pure functions: statistics in, per-channel scales out.

A *balance group* is an op whose output can absorb a per-channel scale (a norm's weight, a linear's
output rows) and the linears that read that output. Scaling the readers' input columns by ``s`` and
the op's output by ``1/s`` leaves the float model unchanged; quantizing ``W diag(s)`` instead of
``W`` moves rounding error away from the channels with large activations. The scales follow AWQ's
"duo" rule ``s = x_mean**a / w_mean**(1-a)`` (normalized so that ``sqrt(max s * min s) = 1``),
with ``a`` searched on a grid, and the identity ``s = 1`` always a candidate (so the search never
loses to plain rounding on its own loss). With the weight term the search also tries the
activation-only scales ``s = x_mean**a`` on the same grid, per member, keeping whichever scores
best: neither family wins everywhere (on the demo model, duo is better at W3 g64 and activation-only
at W4 g128, by up to 9% of the KL).

Everything is batched over a leading dim ``B`` (all experts of a layer at once for the per-expert
``up -> down`` groups; ``B = 1`` otherwise): no Python loop over experts per grid point.

``pow2`` rounds every scale to a power of two: dividing a norm weight by it and multiplying a
router's columns by it is an exponent shift, exact in every float format, so whatever reads the
folded op without being quantized (routers) computes bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .rtn import check_finite, fake_quantize, search_qparams
from .spec import QuantSpec

_EPS = 1e-4  # AutoAWQ's floor under the weight term and the scales (avoids 0 ** negative)


def alpha_grid(n: int) -> list[float]:
    """``n`` points ``i / n`` in ``[0, 1)``: AWQ's grid (n = 20 by default)."""
    if n < 1:
        raise ValueError("the alpha grid needs at least one point")
    return [i / n for i in range(n)]


def per_reader(spec: QuantSpec | list[QuantSpec], n: int) -> list[QuantSpec]:
    """One scheme per reader: ``spec`` for all, or the list itself (readers with their own schemes)."""
    if isinstance(spec, QuantSpec):
        return [spec] * n
    if len(spec) != n:
        raise ValueError(f"{len(spec)} schemes for {n} readers")
    return list(spec)


def weight_mean(ws: list[torch.Tensor], spec: QuantSpec | list[QuantSpec]) -> torch.Tensor:
    """Per input channel mean of ``|W| / max|W| over its quantization group``: ``[B, K]`` from ``[B, N_i, K]``.

    Every reader of the group contributes its rows (AWQ concatenates the readers' weights)."""
    parts, rows = [], 0
    for w, sp in zip(ws, per_reader(spec, len(ws))):
        b, n, k = w.shape
        gs = sp.group_for(k)
        a = w.float().abs().reshape(b, n, k // gs, gs)
        a = a / a.amax(-1, keepdim=True).clamp_min(1e-12)
        parts.append(a.reshape(b, n, k).sum(1))
        rows += n
    return torch.stack(parts).sum(0) / rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, pow2: bool) -> torch.Tensor:
    """AWQ's scales ``[B, K]`` at ``alpha``: ``x**a / w**(1-a)`` (``w_mean=None``: ``x**a``), normalized."""
    x = x_mean.float().clamp_min(_EPS)
    s = x.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1.0 - alpha) + _EPS)
    s = s.clamp_min(_EPS)
    s = s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()
    if pow2:
        s = torch.exp2(torch.round(torch.log2(s)))
    return s


def fake_quant(w: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Round to nearest with ``spec``'s clip search, each column's squared error weighted by ``col_weight
    [B, K]`` (None: equally). The scale search scores candidates with it: a proxy of what ``--method awq``
    then quantizes with (``rtn_quantize`` scoring each group's clip by its whole Hessian block, which
    costs ``gs`` times more per candidate; scoring the search that way too moved the KL by under 2%
    either way on the wide demo model and took 40% more time). ``w [B, N, K]``."""
    k = w.shape[-1]
    gs = spec.group_for(k)
    wg = w.float().reshape(*w.shape[:-1], k // gs, gs)
    wt = None if col_weight is None else col_weight.float().reshape(col_weight.shape[0], 1, k // gs, gs)
    scale, zero = search_qparams(wg, spec, wt)
    return fake_quantize(wg, scale[..., None], zero[..., None], spec.qmax)[1].reshape(w.shape)


def scaled_error(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W - Q(W diag(s)) diag(s)^-1`` for ``w [B, N, K]``, ``s [B, K]``: the error the readers see.

    ``col_weight [B, K]``: the unscaled inputs' importance (the Hessian diagonal); the scaled
    problem's is ``col_weight / s**2``."""
    sc = s.float()[:, None, :]
    cw = None if col_weight is None else col_weight.float() / s.float() ** 2
    return w.float() - fake_quant(w.float() * sc, spec, cw) / sc


def hessian_loss(ws: list[torch.Tensor], hs: list[torch.Tensor], s: torch.Tensor,
                 spec: QuantSpec | list[QuantSpec]) -> torch.Tensor:
    """Summed output error ``sum_i tr(D_i H_i D_i^T)`` of the readers (``H = 2/n X^T X``), per batch member,
    each quantized as the method will (clip search weighted by ``diag H``; ``spec``: one, or one per reader)."""
    total = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
    for w, h, sp in zip(ws, hs, per_reader(spec, len(ws))):
        h = h.float()
        d = scaled_error(w, s, sp, h.diagonal(dim1=-2, dim2=-1).expand(w.shape[0], -1))
        total += ((d @ h) * d).sum(dim=(-1, -2)).double()
    return total


@dataclass
class ScaleChoice:
    scales: torch.Tensor  # [B, K] float32 (ones where the identity won)
    alpha: list[float | None]  # per member; None: the identity
    loss_before: list[float]  # loss with s = 1
    loss_after: list[float]  # loss with the chosen scales
    duo: list[bool] | None = None  # per member: the chosen scales have the weight term (None: identity)


def search_scales(loss: Callable[[torch.Tensor], torch.Tensor], x_mean: torch.Tensor, w_mean: torch.Tensor | None,
                  grid: list[float], pow2: bool) -> ScaleChoice:
    """Per member, the candidate with the lowest ``loss(s) -> [B]``: the identity, then the grid (with
    ``w_mean``: the duo scales, then the activation-only ones).

    Ties keep the earlier candidate (the identity first). A non-finite loss raises ValueError.
    """
    check_finite(x_mean, "activation statistics")
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    base = loss(ones).double()
    check_finite(base, "AWQ search loss")
    best, best_s = base.clone(), ones.clone()
    alpha: list[float | None] = [None] * x_mean.shape[0]
    duo: list[bool | None] = [None] * x_mean.shape[0]
    families = [w_mean, None] if w_mean is not None else [None]
    for wm in families:
        for a in grid:
            s = candidate_scales(x_mean, wm, a, pow2)
            cur = loss(s).double()
            check_finite(cur, "AWQ search loss")
            better = cur < best
            if bool(better.any()):
                best = torch.where(better, cur, best)
                best_s[better] = s[better]
                for j in torch.nonzero(better).flatten().tolist():
                    alpha[j], duo[j] = a, wm is not None
    return ScaleChoice(best_s, alpha, base.tolist(), best.tolist(), duo)


def scale_summary(s: torch.Tensor) -> dict:
    """Statistics of one member's scales for moecompress.json."""
    l2 = torch.log2(s.float())
    return {"min": float(s.min()), "max": float(s.max()), "log2_mean": float(l2.mean()), "log2_std": float(l2.std())
            if s.numel() > 1 else 0.0}
