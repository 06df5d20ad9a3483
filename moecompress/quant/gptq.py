"""GPTQ (Frantar et al., 2022), batched over the experts of one projection.

All experts go through one batched Cholesky and one column loop; every step is a batched tensor op,
so B experts cost about as much Python as one. The algorithm follows IST-DASLab's ``gptq.py``:
dead columns, relative damping, the upper Cholesky factor of ``H^-1``, lazy block updates,
act-order with static groups ("weight") or permuted groups ("group", with g_idx). What it adds:
damping escalation per expert with an RTN fallback, the Hessian-weighted clip search for every
group, and a fallback for experts that saw no calibration token.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .rtn import check_finite, round_in_place, rtn_quantize, search_qparams
from .spec import QuantizedWeight, QuantSpec


def accumulate_hessian(
    H: torch.Tensor | None, x: torch.Tensor, n_seen: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x [T, K]`` into the running ``H = 2/n * sum_t w_t x_t x_t^T``; updates H in place.

    ``weight [T]`` (non-negative, e.g. router probabilities) scales each token's contribution;
    ``n`` counts tokens, so all-ones weights give the unweighted Hessian. ``H=None`` starts a
    float32 one on x's device.
    """
    x = x.reshape(-1, x.shape[-1])
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    t = x.shape[0]
    if t == 0:
        return H, n_seen
    x = x.to(H.dtype)
    check_finite(x, "calibration activations")
    if weight is not None:
        w = weight.reshape(-1).to(H.dtype)
        check_finite(w, "token weights")
        if bool((w < 0).any()):
            raise ValueError("token weights must be non-negative")
        x = x * w.sqrt()[:, None]
    n = n_seen + t
    H.mul_(n_seen / n)
    H.addmm_(x.T, x, alpha=2.0 / n)
    return H, n


def _damped_cholesky(H: torch.Tensor, damp: float, max_tries: int, todo: torch.Tensor):
    """Upper triangular R with ``H + d I = R R^T`` for the members ``todo`` of ``H [B, K, K]``.

    GPTQ needs U, the upper Cholesky factor of ``(H + d I)^-1``: that is ``R^-1``, whose rows the
    column loop solves for one block at a time (a third of the work of inverting R up front).
    R is the reversal of the lower Cholesky factor of the reversed H.

    At try t the relative damping is ``damp * 10**t`` (after a first try with ``damp=0``: 1e-3,
    1e-2, ...), times ``mean|diag H|``: a member whose factorization fails retries with ten times
    the damping. H is scratch: its diagonal is damped in place. Returns R (identity where every
    try failed), the relative damping used per member (NaN: failed) and the tries made.
    """
    b, k, _ = H.shape
    scale = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    used = torch.full((b,), float("nan"), dtype=torch.float64)
    tries = torch.zeros(b, dtype=torch.long)
    R = None
    Hs = H if todo.numel() == b else H[todo]
    prev = 0.0
    for t in range(max_tries):
        if todo.numel() == 0:
            break
        d = damp * 10.0**t if damp > 0 else (0.0 if t == 0 else 1e-3 * 10.0 ** (t - 1))
        Hs.diagonal(dim1=-2, dim2=-1).add_(((d - prev) * scale[todo])[:, None])
        prev = d
        L, info = torch.linalg.cholesky_ex(Hs.flip(-2, -1))
        ok = info == 0
        used[todo[ok].cpu()] = d
        tries[todo.cpu()] = t + 1
        if R is None and bool(ok.all()) and todo.numel() == b:
            return L.flip(-2, -1), used, tries  # the common case: no copies
        if R is None:
            R = torch.eye(k, dtype=H.dtype, device=H.device).repeat(b, 1, 1)
        R[todo[ok]] = L[ok].flip(-2, -1)
        del L
        todo, Hs = todo[~ok], Hs[~ok]
    if R is None:
        R = torch.eye(k, dtype=H.dtype, device=H.device).repeat(b, 1, 1)
    return R, used, tries


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    max_damp_tries: int = 6,
    qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[QuantizedWeight, dict]:
    """GPTQ of ``w [N, K]`` / ``[B, N, K]`` against its Hessian ``H [K, K]`` / ``[B, K, K]``.

    Returns the QuantizedWeight (original column order; g_idx only for act_order="group") and
    per-member stats, each a list of length B (1 for a single weight):

    * ``damp``: relative damping that worked (fraction of mean|diag H|), None for a fallback;
    * ``fallback``: True when the member was quantized with RTN instead; ``reason`` says why
      ("starved": H == 0, no calibration token; "not positive definite": every damping failed;
      "non-finite GPTQ result": R^-1 overflowed), None for the others;
    * ``tries``: Cholesky attempts made;
    * ``loss``: ``1/2 tr(dW H' dW^T)`` with ``dW = Q - W``; for GPTQ members this is the paper's
      ``sum (w - q)^2 / (2 d^2)`` (exact in exact arithmetic) with H' the damped Hessian, for RTN
      fallbacks it is computed with the given H.

    H is never modified; it may be float64, in which case the factorization runs in float64.
    ``qparams=(scales [B, N, G], zeros [B, N, G])`` fixes every group's scale and zero point up
    front (act_order None or "weight": groups contiguous in the original order), e.g. refitted ones.
    """
    if w.dim() not in (2, 3):
        raise ValueError(f"weight must be [N, K] or [B, N, K], got shape {tuple(w.shape)}")
    single = w.dim() == 2
    W0 = w.unsqueeze(0) if single else w
    Hb = H.unsqueeze(0) if H.dim() == 2 else H
    b, n, k = W0.shape
    if tuple(Hb.shape) != (b, k, k):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight of shape {tuple(w.shape)}")
    spec.check_shape(k)
    if damp < 0 or block_size < 1 or max_damp_tries < 1:
        raise ValueError("need damp >= 0, block_size >= 1 and max_damp_tries >= 1")
    check_finite(W0, "weight")
    check_finite(Hb, "Hessian")
    dev = W0.device
    gs = spec.group_for(k)

    W = W0.float().clone()
    Hb = Hb.to(torch.float64 if Hb.dtype == torch.float64 else torch.float32, copy=True)
    diag = Hb.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    starved = dead.all(-1)
    # A column no calibration token touched carries no information: pin it to zero (as the paper).
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    col_weight = diag.float().clamp_min(0)  # importance of each input for the clip search

    static = None
    if qparams is not None:
        if spec.act_order == "group":
            raise ValueError("fixed qparams need groups in the original column order (act_order None or 'weight')")
        static = tuple(t.reshape(b, n, k // gs).to(dev) for t in qparams)
        static = (static[0].float(), static[1].float())
    elif spec.act_order == "weight":
        # Groups stay contiguous in the original order, so their qparams must exist before the
        # permuted column loop can reach any of them.
        wg = W.reshape(b, n, k // gs, gs)
        static = search_qparams(wg, spec, col_weight.reshape(b, 1, k // gs, gs))
    perm = None
    if spec.act_order is not None:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
        W = W.gather(-1, perm[:, None, :].expand(b, n, k))
        Hb = Hb.gather(1, perm[:, :, None].expand(b, k, k)).gather(2, perm[:, None, :].expand(b, k, k))
        col_weight = col_weight.gather(-1, perm)

    todo = torch.nonzero(~starved).flatten()
    R, used, tries = _damped_cholesky(Hb, damp, max_damp_tries, todo)
    del Hb

    codes, scales, zeros, losses = _column_loop(W, R, col_weight, spec, block_size, static, perm)
    del R
    # An overflow in R^-1 (a nearly singular H in float32) surfaces as a non-finite loss.
    losses, starved = losses.cpu(), starved.cpu()
    failed = (torch.isnan(used) | ~torch.isfinite(losses)) & ~starved

    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        codes = codes.gather(1, inv[:, :, None].expand(b, k, n))
    qweight = codes.transpose(1, 2).contiguous()
    g_idx = None
    if spec.act_order == "group":
        g_idx = torch.empty(b, k, dtype=torch.long, device=dev)
        g_idx.scatter_(1, perm, (torch.arange(k, device=dev) // gs).expand(b, k))
        g_idx = g_idx.to(torch.int32)

    stats = {"damp": [], "fallback": [], "reason": [], "tries": tries.tolist(), "loss": losses.tolist()}
    for i, (hungry, bad) in enumerate(zip(starved.tolist(), failed.tolist())):
        if hungry or bad:
            # Without a usable Hessian, error feedback would be noise: plain RTN keeps the weights.
            hi = H.reshape(b, k, k)[i]
            r = rtn_quantize(W0[i], spec, None if hungry else hi.diagonal().float().clamp_min(0))
            qweight[i], scales[i], zeros[i] = r.qweight, r.scales, r.zeros
            if g_idx is not None:
                g_idx[i] = (torch.arange(k, device=dev) // gs).to(torch.int32)
            dw = r.dequantize(torch.float64) - W0[i].double()
            stats["loss"][i] = 0.5 * float(((dw @ hi.double()) * dw).sum())
        stats["damp"].append(None if hungry or bad else float(used[i]))
        stats["fallback"].append(hungry or bad)
        reason = "not positive definite" if bool(torch.isnan(used[i])) else "non-finite GPTQ result"
        stats["reason"].append("starved" if hungry else reason if bad else None)

    qw = QuantizedWeight(qweight, scales, zeros, spec, g_idx)
    if single:
        qw = qw[0]
    return qw, stats


def _column_loop(W, R, col_weight, spec, block_size, static, perm):
    """The GPTQ sweep over the (possibly permuted) columns of ``W [B, N, K]``, ``H' = R R^T``.

    Works on ``W^T [B, K, N]`` so that one column of every expert is a contiguous ``[B, N]`` slab.
    Returns codes ``[B, K, N]`` (processing order), scales/zeros ``[B, N, G]`` and losses ``[B]``.
    """
    b, n, k = W.shape
    gs = spec.group_for(k)
    Wt = W.transpose(1, 2).contiguous()
    del W
    codes = torch.empty(b, k, n, dtype=torch.uint8, device=Wt.device)
    losses = torch.zeros(b, dtype=torch.float64, device=Wt.device)
    group_spec = replace(spec, group_size=None)
    bi = torch.arange(b, device=Wt.device)
    dqbuf = torch.empty(b, n, device=Wt.device)
    if static is not None:
        st, zt = (t.transpose(1, 2) for t in static)  # [B, G, N]
        order = perm if perm is not None else torch.arange(k, device=Wt.device).expand(b, k)
        col_group = order // gs  # original group of each processed column
    else:
        found_s, found_z = [], []

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)  # the block's codes, as floats
        # Rows i1:i2 of U = R^-1 (upper: zero left of i1) solve  Y R[i1:, i1:] = I[i1:i2, i1:].
        eye = torch.eye(i2 - i1, k - i1, dtype=R.dtype, device=R.device).expand(b, -1, -1)
        Ub = torch.linalg.solve_triangular(R[:, i1:, i1:], eye, upper=True, left=False).float()
        U1, Urest = Ub[:, :, : i2 - i1], Ub[:, :, i2 - i1 :]
        d = U1.diagonal(dim1=1, dim2=2)  # [B, columns]
        if static is not None:  # the block's columns' qparams, gathered once: [B, columns, N]
            sb, zb = st[bi[:, None], col_group[:, i1:i2]], zt[bi[:, None], col_group[:, i1:i2]]
        cols = zip(W1.unbind(1), Err1.unbind(1), Q1.unbind(1), d.unsqueeze(-1).unbind(1), U1.unbind(1))
        for i, (col, err, q, di, u) in enumerate(cols):
            j = i1 + i
            if static is not None:
                s, z = sb[:, i], zb[:, i]
            elif j % gs == 0:
                # The group's qparams come from its columns as GPTQ has updated them so far;
                # those past this block still miss this block's (lazy) updates, so apply them.
                e = min(j + gs, k)
                cur = W1[:, i : e - i1]
                if e > i2:
                    rest = Wt[:, i2:e] - Urest[:, :, : e - i2].transpose(1, 2) @ Err1
                    cur = torch.cat([cur, rest], 1)
                s, z = search_qparams(cur.transpose(1, 2)[:, :, None, :], group_spec, col_weight[:, None, None, j:e])
                s, z = s[..., 0], z[..., 0]
                found_s.append(s)
                found_z.append(z)
            # every step in place or into the block's buffers: this runs K times a sweep on B x N floats, so
            # on a CPU its cost is mostly the number of torch calls
            round_in_place(torch.div(col, s, out=q)).add_(z).clamp_(0, spec.qmax)  # the codes, as fake_quantize's
            dq = torch.sub(q, z, out=dqbuf).mul_(s)
            torch.sub(col, dq, out=err).div_(di)  # (w - dequantized) / d
            W1[:, i + 1 :].addcmul_(u[:, i + 1 :, None], err[:, None, :], value=-1.0)
        codes[:, i1:i2] = Q1.to(torch.uint8)
        losses += 0.5 * Err1.double().square().sum((1, 2))
        if i2 < k:
            Wt[:, i2:].baddbmm_(Urest.transpose(1, 2), Err1, alpha=-1.0)

    if static is not None:
        scales, zeros = static
    else:
        scales, zeros = torch.stack(found_s, -1), torch.stack(found_z, -1)
    return codes, scales.float().contiguous(), zeros.to(torch.uint8).contiguous(), losses
