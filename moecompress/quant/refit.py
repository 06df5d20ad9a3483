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

Cost: ``N K^2`` multiply-adds per weight, the order of GPTQ's own sweep; memory is bounded by
processing rows in slabs.
"""

from __future__ import annotations

import torch

from .spec import QuantizedWeight

_SLAB_ELEMENTS = 1 << 24  # rows * K * G per slab (64 MiB of float32)


def _membership(qw: QuantizedWeight, k: int, g: int, device) -> torch.Tensor:
    """One-hot group membership ``[K, G]`` (or ``[B, K, G]`` with a per-member g_idx)."""
    gi = qw.group_index().to(device)
    return torch.nn.functional.one_hot(gi, g).float()


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
    b, n, k = w.shape
    g = qw.scales.shape[-1]
    dev = w.device
    Hd = H.float().clone()
    diag = Hd.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * diag.mean(-1, keepdim=True).clamp_min(1e-12))
    M = _membership(qw, k, g, dev)
    if M.dim() == 2:
        M = M.expand(b, k, g)
    zcols = torch.einsum("bng,bkg->bnk", qw.zeros.float(), M)  # zero point of each column
    C = qw.qweight.float() - zcols  # [B, N, K]: codes minus zero point
    HW = torch.bmm(w.float(), Hd)  # rows of w H (H symmetric)
    old = qw.scales.float()
    new = old.clone()
    rows = max(1, _SLAB_ELEMENTS // max(1, b * k * g))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        Cs = C[:, r0:r1]  # [B, R, K]
        # Z[b, r, k, h] = sum_j H[k, j] C[r, j] M[j, h]: H applied to each group's part of the row
        Z = torch.einsum("bkj,brj,bjh->brkh", Hd, Cs, M)
        A = torch.einsum("brk,bkg,brkh->brgh", Cs, M, Z)
        rhs = torch.einsum("brk,bkg->brg", Cs * HW[:, r0:r1], M)
        # a group whose codes all sit at the zero point has no say: pin its scale with an identity row
        empty = A.diagonal(dim1=-2, dim2=-1) <= 1e-12
        A = A + torch.diag_embed(empty.float())
        rhs = torch.where(empty, old[:, r0:r1], rhs)
        sol, info = torch.linalg.solve_ex(A.double(), rhs.double().unsqueeze(-1))
        sol = sol.squeeze(-1).float()
        good = (info == 0)[..., None] & torch.isfinite(sol).all(-1, keepdim=True) & (sol > 0).all(-1, keepdim=True)
        new[:, r0:r1] = torch.where(good, sol, old[:, r0:r1])
    cand = QuantizedWeight(qw.qweight, new, qw.zeros, qw.spec, qw.g_idx)
    before = _row_loss(w, qw.dequantize(torch.float32), Hd)  # [B, N]
    after = _row_loss(w, cand.dequantize(torch.float32), Hd)
    keep_new = after <= before
    scales = torch.where(keep_new[..., None], new, old)
    out = QuantizedWeight(qw.qweight, scales, qw.zeros, qw.spec, qw.g_idx)
    return out, {"loss_before": before.sum(-1).tolist(), "loss_after": torch.minimum(before, after).sum(-1).tolist()}


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
    Hd = H.float().clone()
    Hd.diagonal(dim1=-2, dim2=-1).add_(damp * Hd.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-12))
    best = qw
    best_loss = _row_loss(w, qw.dequantize(torch.float32), Hd)
    start = best_loss.sum(-1)
    for _ in range(rounds):
        cands = [refit_scales(w, best, H, damp=damp)[0]]
        if qw.spec.act_order != "group":
            swept, _ = gptq_quantize(w, H, qw.spec, damp=damp, block_size=block_size,
                                     qparams=(cands[0].scales, cands[0].zeros))
            cands.append(swept)
        for c in cands:
            loss = _row_loss(w, c.dequantize(torch.float32), Hd)
            better = loss < best_loss
            pick = better[..., None]
            best = QuantizedWeight(torch.where(pick, c.qweight, best.qweight), torch.where(pick, c.scales, best.scales),
                                   torch.where(pick, c.zeros, best.zeros), qw.spec, qw.g_idx)
            best_loss = torch.where(better, loss, best_loss)
    return best, {"loss_before": start.tolist(), "loss_after": best_loss.sum(-1).tolist()}
