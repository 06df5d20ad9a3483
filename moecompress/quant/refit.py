"""Refit the group scales of a quantized weight to its codes, against the layer's Hessian.

GPTQ picks each group's scale *before* it rounds the group's columns (from the weights as updated
so far, or up front with act-order "weight") and never revisits it. Once the integer codes ``q``
are fixed, the output error is a quadratic in the scales: for every output row ``r``

    loss_r(s) = (w_r - sum_g s_rg c_rg)^T H (w_r - sum_g s_rg c_rg),   c_rg = (q_r - z_rg) on group g,

so the best scales solve a ``G x G`` linear system per row, ``A_r s_r = b_r`` with
``A_r[g, h] = c_rg^T H c_rh`` and ``b_r[g] = c_rg^T H w_r``. Rows are independent, so the refit is
exact (not a heuristic) and never worse than the scales it starts from on the calibration
statistics; a row whose system is singular or whose solution is not positive keeps its old scales.
Zero points stay as they are (they are integers in the format).

Cost: ``N K^2`` multiply-adds per weight (one batched matmul per group), the order of GPTQ's own
sweep; memory is bounded by processing rows in slabs. With act_order "group" the columns are
first gathered so that each group is a contiguous block.
"""

from __future__ import annotations

import torch

from .spec import QuantizedWeight

_SLAB_ELEMENTS = 1 << 24  # rows * K * G per slab (64 MiB of float32)


def _grouped_order(qw: QuantizedWeight, b: int, k: int, gs: int) -> torch.Tensor | None:
    """Column order ``[B, K]`` that makes every group a contiguous block of ``gs`` (None: already so)."""
    if qw.g_idx is None:
        return None
    gi = qw.group_index()
    gi = gi.expand(b, k) if gi.dim() == 1 else gi
    order = torch.argsort(gi, dim=-1, stable=True)
    counts = torch.stack([torch.bincount(row, minlength=k // gs) for row in gi])
    if bool((counts != gs).any()):
        raise ValueError("every group must hold exactly group_size columns")
    return order


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float32 (a copy), as GPTQ damps it."""
    Hd = H.float().clone()
    diag = Hd.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * diag.mean(-1, keepdim=True).clamp_min(1e-12))
    return Hd


def _row_loss(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = (w - wq).double()
    return ((d @ H.double()) * d).sum(-1)


@torch.no_grad()
def refit_scales(w: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor, damp: float = 0.01) -> tuple[QuantizedWeight, dict]:
    """Least-squares scales for fixed codes: ``w [B, N, K]``, ``qw`` batched alike, ``H [B, K, K]``.

    ``H`` is damped by ``damp * mean(diag H)`` (as GPTQ is). Returns a new QuantizedWeight (codes,
    zeros and g_idx shared with ``qw``) and ``{"loss_before": [B], "loss_after": [B]}`` with the
    damped-Hessian loss summed over rows.
    """
    out, before, after = _refit_rows(w, qw, _damped(H, damp))
    return out, {"loss_before": before.sum(-1).tolist(), "loss_after": after.sum(-1).tolist()}


def _refit_rows(w: torch.Tensor, qw: QuantizedWeight, Hd: torch.Tensor):
    """(refitted weight, per-row loss before [B, N], per-row loss after [B, N]) -- float64 losses.

    ``Hd`` is the already damped Hessian (see ``_damped``)."""
    b, n, k = w.shape
    g = qw.scales.shape[-1]
    gs = k // g
    gi = qw.group_index()
    zc = qw.zeros.float().gather(-1, gi.expand(b, n, k) if gi.dim() == 1 else gi[:, None, :].expand(b, n, k))
    C = qw.qweight.float() - zc  # [B, N, K]: codes minus the zero point of their group
    W = w.float()
    order = _grouped_order(qw, b, k, gs)
    if order is not None:  # act_order "group": gather each group's columns into one block
        bi = torch.arange(b, device=w.device)[:, None]
        C = C.gather(-1, order[:, None, :].expand(b, n, k))
        W = W.gather(-1, order[:, None, :].expand(b, n, k))
        Hd = Hd[bi[:, :, None], order[:, :, None], order[:, None, :]]
    HW = torch.bmm(W, Hd)  # rows of w H (H symmetric)
    const = (W.double() * HW.double()).sum(-1)  # w^T H w per row
    Hg = Hd.reshape(b, k, g, gs).permute(0, 2, 1, 3).reshape(b * g, k, gs)  # [(B, group h), K, columns of h]
    old = qw.scales.float()
    new = old.clone()
    before = torch.empty(b, n, dtype=torch.float64, device=w.device)
    after = torch.empty_like(before)
    rows = max(1, _SLAB_ELEMENTS // max(1, b * k * g))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        Cg = C[:, r0:r1].reshape(b, r1 - r0, g, gs)
        Ct = Cg.permute(0, 2, 3, 1)  # [B, group, column, row]
        # Z[b, h, k, r] = sum over the columns j of group h of H[k, j] C[r, j]: one matmul per group
        Z = torch.bmm(Hg, Ct.reshape(b * g, gs, r1 - r0)).reshape(b, g, g, gs, r1 - r0)
        A = (Z * Ct.unsqueeze(1)).sum(3).permute(0, 3, 2, 1).double()  # A[r, g, h] = c_g^T H c_h
        rhs = (Cg * HW[:, r0:r1].reshape(b, r1 - r0, g, gs)).sum(-1).double()  # c_g^T H w

        def loss(s):  # (w - C s)^T H (w - C s), per row
            return const[:, r0:r1] - 2 * (s * rhs).sum(-1) + (s.unsqueeze(-2) @ A @ s.unsqueeze(-1))[..., 0, 0]

        # a group whose codes all sit at the zero point has no say: pin its scale with an identity row
        empty = A.diagonal(dim1=-2, dim2=-1) <= 1e-12
        sol, info = torch.linalg.solve_ex(A + torch.diag_embed(empty.double()),
                                          torch.where(empty, old[:, r0:r1].double(), rhs).unsqueeze(-1))
        sol = sol.squeeze(-1)
        good = (info == 0)[..., None] & torch.isfinite(sol).all(-1, keepdim=True) & (sol > 0).all(-1, keepdim=True)
        sol = torch.where(good, sol, old[:, r0:r1].double())
        lo, ln = loss(old[:, r0:r1].double()), loss(sol)
        keep = (ln <= lo)[..., None]
        new[:, r0:r1] = torch.where(keep, sol.float(), old[:, r0:r1])
        before[:, r0:r1], after[:, r0:r1] = lo, torch.minimum(lo, ln)
    return QuantizedWeight(qw.qweight, new, qw.zeros, qw.spec, qw.g_idx), before, after


def _keep_better(best: QuantizedWeight, best_loss: torch.Tensor, cand: QuantizedWeight, loss: torch.Tensor):
    """(per row the better of ``best`` and ``cand`` by their losses ``[B, N]``, its losses, whether any row moved)."""
    better = loss < best_loss
    if not bool(better.any()):
        return best, best_loss, False
    pick = better[..., None]
    merged = QuantizedWeight(torch.where(pick, cand.qweight, best.qweight), torch.where(pick, cand.scales, best.scales),
                             torch.where(pick, cand.zeros, best.zeros), best.spec, best.g_idx)
    return merged, torch.where(better, loss, best_loss), True


@torch.no_grad()
def refit_reround(w: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor, damp: float = 0.01,
                  max_rounds: int = 8) -> tuple[QuantizedWeight, dict]:
    """Alternate least-squares scale refits with rounding to nearest at the refit scales (AWQ's codes).

    A refit keeps the codes; re-rounding the weight at the new scales (zero points unchanged) gives
    new round-to-nearest codes, whose scales are refit again, and so on until no row improves or
    ``max_rounds`` refits ran. Each row keeps its best candidate by the damped-Hessian loss, so the
    result is never worse than ``qw`` nor than one refit. Needs natural group order (no ``g_idx``).
    """
    if qw.g_idx is not None:
        raise ValueError("refit_reround needs groups in natural order (no g_idx)")
    from .rtn import quantize_with_qparams  # rtn imports nothing from here; keep the import graph one-way

    Hd = _damped(H, damp)
    best, best_loss, start, cur = qw, None, None, qw
    for _ in range(max_rounds):
        fitted, before, after = _refit_rows(w, cur, Hd)  # after: the refit's loss per row
        if start is None:
            start, best_loss = before, before
        rounded = QuantizedWeight(quantize_with_qparams(w, fitted.scales, fitted.zeros, qw.spec), fitted.scales,
                                  fitted.zeros, qw.spec)
        best, best_loss, a = _keep_better(best, best_loss, fitted, after)
        best, best_loss, b = _keep_better(best, best_loss, rounded, _row_loss(w, rounded.dequantize(torch.float32), Hd))
        if not (a or b):
            break
        cur = rounded
    return best, {"loss_before": start.sum(-1).tolist(), "loss_after": best_loss.sum(-1).tolist()}


@torch.no_grad()
def refine(w: torch.Tensor, H: torch.Tensor, qw: QuantizedWeight, *, rounds: int, damp: float = 0.01,
           block_size: int = 128) -> tuple[QuantizedWeight, dict]:
    """Alternate scale refits and GPTQ sweeps with those scales fixed, keeping each row's best.

    Every output row is its own problem (GPTQ's error feedback stays within a row, and so does the
    refit), so the result takes, per row, whichever candidate has the lowest damped-Hessian loss:
    it is never worse than ``qw``. With act_order "group" the groups follow GPTQ's permutation and
    are not re-swept: only the scale refits run.
    """
    from .gptq import gptq_quantize  # gptq imports rtn, which this module must not import at load time

    b, n, k = w.shape
    Hd = _damped(H, damp)
    best, best_loss, start = qw, None, None
    for _ in range(rounds):
        fitted, before, after = _refit_rows(w, best, Hd)
        if start is None:
            start, best_loss = before.sum(-1), before
        cands = [(fitted, after)]
        if qw.spec.act_order != "group":
            swept, _ = gptq_quantize(w, H, qw.spec, damp=damp, block_size=block_size,
                                     qparams=(fitted.scales, fitted.zeros))
            cands.append((swept, _row_loss(w, swept.dequantize(torch.float32), Hd)))
        for c, loss in cands:
            best, best_loss, _ = _keep_better(best, best_loss, c, loss)
    if start is None:
        return qw, {}
    return best, {"loss_before": start.tolist(), "loss_after": best_loss.sum(-1).tolist()}
