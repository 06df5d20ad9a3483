"""Round-to-nearest quantization with a per-group clipping search.

Also the scale/zero-point search that GPTQ reuses for every group it reaches.

Scale convention (that of GPTQ and compressed-tensors):

* symmetric: ``scale = r * max|w| / (qmax / 2)`` (int4: ``amax / 7.5``) and ``z = 2**(bits-1)``, so the
  signed values ``q - z`` span ``[-2**(bits-1), 2**(bits-1) - 1]``; the most positive weight of an
  unclipped group lands on +7.5 and rounds to +7 (an error of half a step) while the negative side
  uses -8. The clip search is what trades that off.
* asymmetric: the range ``[min(w, 0), max(w, 0)] * r`` maps onto ``[0, qmax]``; zero is kept in the
  range so that it is exactly representable, and ``z = round(-lo / scale)``.

A group whose range is empty (all zeros) gets ``scale = 1``; a scale is never 0.
"""

from __future__ import annotations

import torch

from .spec import QuantizedWeight, QuantSpec


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` (and the batch members at fault) when ``t`` has NaN/Inf."""
    if t.is_floating_point() and bool(torch.isfinite(t.sum())):
        return  # a NaN/Inf anywhere makes the sum non-finite; one reduction is the cheap common case
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = ""
        if t.dim() == 3:
            members = torch.nonzero(bad.flatten(1).any(-1)).flatten().tolist()
            where = f" (batch members {members[:10]}{'...' if len(members) > 10 else ''})"
        raise ValueError(f"{what} contains {int(bad.sum())} NaN/Inf values{where}")


def _range_qparams(lo: torch.Tensor, hi: torch.Tensor, ratio: float, spec: QuantSpec):
    """Scale and zero of groups whose range is ``[lo, hi]`` (lo <= 0 <= hi) shrunk by ``ratio``."""
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) * (ratio / (spec.qmax / 2))
        zero = torch.full_like(scale, spec.sym_zero)
    else:
        scale = (hi - lo) * (ratio / spec.qmax)
        zero = None
    # An empty range would make every code divide by zero; any positive scale quantizes it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min_(torch.finfo(torch.float32).tiny)
    if zero is None:
        zero = round_in_place(-lo * ratio / scale).clamp_(spec.zero_min, spec.qmax)
    return scale, zero


def round_in_place(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even) of a fresh float tensor, in place, for |x| < 2**(mantissa-1).

    Adding 1.5 * 2**mantissa leaves no fraction bits, so the FPU rounds; larger values are clamped
    to the code range by every caller anyway. torch.round goes multi-threaded on tensors of a few
    thousand elements and stalls for milliseconds per call on a busy CPU; two adds do not.
    """
    magic = 1.5 / torch.finfo(x.dtype).eps  # eps = 2**-mantissa
    return x.add_(magic).sub_(magic)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return round_in_place(w / scale).add_(zero).clamp_(0, qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int):
    """(codes as float, dequantized values) of ``w`` for broadcastable ``scale``/``zero``."""
    q = _codes(w, scale, zero, qmax)
    return q, (q - zero).mul_(scale)


def search_qparams(wg: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None,
                   hblock: torch.Tensor | None = None):
    """Best (scale, zero) per group of ``wg [..., N, G, gs]`` over ``spec.clip_ratios``.

    ``weight`` broadcasts against ``wg`` and weighs each element's squared error. ``hblock
    [..., G, gs, gs]`` (instead of ``weight``): each group's block of the input Hessian, so a row's
    error in group ``g`` is ``e H_gg e^T`` -- the group's exact share of the output error, input
    correlations included (AWQ's clip search measures the same on sampled inputs); with it,
    asymmetric groups also try AWQ's clamp family (both ends clamped at ``r x max|w|``, which clips
    only the longer tail first) and each end shrunk on its own. Ties keep the earlier candidate, so with 1.0 listed first the
    search is never worse than plain min/max. No input checks: the public callers make them.
    """
    # Every ratio re-reads the group: slabs of rows small enough to stay in cache are several
    # times faster than whole-tensor passes.
    wg = wg.contiguous()
    rows = wg.shape[-3]
    step = max(1, _SEARCH_CHUNK // max(1, wg[..., :1, :, :].numel()))
    if step >= rows:
        return _search_slab(wg, spec, weight, hblock)
    parts = [_search_slab(wg[..., r : r + step, :, :], spec, weight, hblock) for r in range(0, rows, step)]
    return torch.cat([p[0] for p in parts], -2), torch.cat([p[1] for p in parts], -2)


_SEARCH_CHUNK = 1 << 19  # elements per slab (2 MiB of float32)
# per-end shrink factors of the block-scored search: 1.0 down to 0.6 in steps of 0.025 (steps of 0.05-0.1 gave
# 2-3% more KL on the demo model; RESULTS.md, session 9)
_ENDS = tuple(1.0 - 0.025 * i for i in range(17))


def _search_slab(wg: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None, hblock: torch.Tensor | None = None):
    lo = wg.amin(-1).clamp_(max=0)
    hi = wg.amax(-1).clamp_(min=0)
    cands = [(lo, hi, r) for r in spec.clip_ratios]
    if hblock is not None and not spec.symmetric:
        m = torch.maximum(-lo, hi)
        cands += [(torch.maximum(lo, -m * r), torch.minimum(hi, m * r), 1.0) for r in spec.clip_ratios if r < 1.0]
        # each end shrunk on its own (a group's two tails differ): 272 more candidates, worth 4-6% of KL
        # on the wide demo model at W3 g64 / W4 g128 (RESULTS.md, sessions 8 and 9)
        cands += [(lo * a, hi * b, 1.0) for a in _ENDS for b in _ENDS if a != b]
    best = None
    for c_lo, c_hi, r in cands:
        scale, zero = _range_qparams(c_lo, c_hi, r, spec)
        if len(cands) == 1:
            return scale, zero
        s = scale[..., None]
        if spec.symmetric:  # z is a constant: clamp the signed value instead of adding z and back
            err = round_in_place(wg / s).clamp_(-spec.sym_zero, spec.qmax - spec.sym_zero)
        else:
            err = round_in_place(wg / s).add_(zero[..., None]).clamp_(0, spec.qmax).sub_(zero[..., None])
        err = err.mul_(s).sub_(wg)
        if hblock is not None:  # [..., N, G, gs] x [..., G, gs, gs]: per row and group e H_gg e^T
            err = (torch.matmul(err.transpose(-3, -2), hblock).transpose(-3, -2) * err).sum(-1)
        else:
            err = err.square_()
            err = err.sum(-1) if weight is None else err.mul_(weight).sum(-1)
        if best is None:
            best = [err, scale, zero]
        else:
            better = err < best[0]
            best = [torch.where(better, new, old) for new, old in zip((err, scale, zero), best)]
    return best[1], best[2]


def group_blocks(h: torch.Tensor, gs: int) -> torch.Tensor:
    """The diagonal ``gs x gs`` blocks of ``h [..., K, K]``: ``[..., K/gs, gs, gs]``."""
    k = h.shape[-1]
    g = k // gs
    return h.reshape(*h.shape[:-2], g, gs, g, gs).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def compute_qparams(w: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None):
    """Per-group ``(scales float32 [..., N, G], zeros uint8 [..., N, G])`` of ``w [..., N, K]``.

    ``weight [..., K]`` (non-negative, e.g. the Hessian diagonal) weighs each input column's squared
    error in the clip search; None weighs all columns equally. ``hessian [..., K, K]`` (instead):
    the clip search scores each group by its block of the Hessian (see :func:`search_qparams`).
    """
    k = w.shape[-1]
    spec.check_shape(k)
    check_finite(w, "weight")
    gs = spec.group_for(k)
    wg = w.float().reshape(*w.shape[:-1], k // gs, gs)
    wt = None
    if weight is not None:
        if weight.shape[-1] != k or weight.shape[:-1] not in ((), w.shape[:-2]):
            raise ValueError(f"column weight of shape {tuple(weight.shape)} does not fit weight {tuple(w.shape)}")
        check_finite(weight, "column weight")
        if bool((weight < 0).any()):
            raise ValueError("column weight must be non-negative")
        # [..., K] -> [..., 1, G, gs]: the same column weight for every output row.
        wt = weight.float().reshape(*weight.shape[:-1], 1, k // gs, gs)
    hb = None
    if hessian is not None:
        if hessian.shape[-2:] != (k, k) or hessian.shape[:-2] not in ((), w.shape[:-2]):
            raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit weight {tuple(w.shape)}")
        check_finite(hessian, "Hessian")
        hb = group_blocks(hessian.float(), gs)
    scales, zeros = search_qparams(wg, spec, wt, hb)
    return scales, zeros.to(torch.uint8)


def quantize_with_qparams(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 codes of ``w [..., N, K]`` for given per-group scales/zeros (``g_idx``: group of each column)."""
    k = w.shape[-1]
    spec.check_shape(k)
    s, z = scales.float(), zeros.float()
    if g_idx is None:
        gs = spec.group_for(k)
        wg = w.float().reshape(*w.shape[:-1], k // gs, gs)
        return _codes(wg, s[..., None], z[..., None], spec.qmax).reshape(w.shape).to(torch.uint8)
    gi = g_idx.long()
    if gi.dim() == 1:
        s, z = s[..., gi], z[..., gi]
    else:
        idx = gi.unsqueeze(-2).expand(*s.shape[:-1], k)
        s, z = torch.gather(s, -1, idx), torch.gather(z, -1, idx)
    return _codes(w.float(), s, z, spec.qmax).to(torch.uint8)


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, hessian_diag: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest of ``w [N, K]`` or ``[B, N, K]`` with the clip search.

    ``hessian_diag [K]`` / ``[B, K]`` weighs the search by input importance; ``hessian [K, K]`` /
    ``[B, K, K]`` scores it by each group's Hessian block instead. ``spec.act_order`` has no meaning
    without error feedback and is ignored (no g_idx).
    """
    scales, zeros = compute_qparams(w, spec, hessian_diag, hessian)
    q = quantize_with_qparams(w, scales, zeros, spec)
    return QuantizedWeight(q, scales.float(), zeros, spec)
