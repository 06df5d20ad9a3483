"""RMSNorm, optionally fused with the residual add that precedes it.

``rmsnorm(x, weight, eps)`` -> ``weight * x / sqrt(mean(x^2) + eps)``; with ``residual=r`` it first forms
``h = x + r`` (rounded to the residual's dtype, which is what the next layer adds to -- the same value
HF gets from its bf16 ``residual + hidden``), returns ``(rmsnorm(h), h)`` and reads/writes each row
once. Statistics and the scale are computed in fp32 and the output is rounded once at the end (HF
rounds ``x / rms`` to the input dtype before the weight multiply: at most one ulp apart in bf16).
One program per row, the whole row in registers (hidden sizes up to 16K; larger rows fall back to
the torch twin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .tuning import get_config

MAX_KERNEL_HIDDEN = 16384


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x [..., H]``; with ``residual`` returns ``(out, x + residual)``."""
    h = _check(x, weight, residual)
    if h > MAX_KERNEL_HIDDEN:
        return rmsnorm_torch(x, weight, eps, residual=residual)
    _common.require_launch("rmsnorm", x)
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if out is None:
        out = _common.empty(x.shape, x.dtype, x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} {tuple(x.shape)}")
    out2 = out.view(-1, h)
    if residual is not None:
        r2 = residual.reshape(-1, h)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = _common.empty(residual.shape, residual.dtype, x.device)
        ro2 = res_out.view(-1, h)
    else:
        r2, ro2, res_out = x2, out2, None
    if rows:
        block_h = _common.next_pow2(h)
        cfg = get_config("rmsnorm", _common.device_name(x.device), f"h{block_h}")
        _rmsnorm_kernel[(rows,)](
            x2, x2.stride(0), r2, r2.stride(0), weight.contiguous(), out2, out2.stride(0), ro2, ro2.stride(0),
            h, float(eps), HAS_RESIDUAL=residual is not None, BLOCK_H=block_h,
            num_warps=int(cfg.get("num_warps", 4)),
        )
    return out if residual is None else (out, res_out)


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference twin (fp32 math, one final rounding; the residual sum rounded to its dtype first)."""
    _check(x, weight, residual)
    if residual is not None:
        res = (x.float() + residual.float()).to(residual.dtype)
        hf = res.float()
    else:
        hf = x.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), res)


def _check(x, weight, residual) -> int:
    h = x.shape[-1]
    if tuple(weight.shape) != (h,):
        raise ValueError(f"weight must be [{h}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    return h


@triton.jit
def _rmsnorm_kernel(
    x_ptr, stride_x, r_ptr, stride_r, w_ptr, out_ptr, stride_o, rout_ptr, stride_ro,
    H, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(rout_ptr.dtype.element_ty)
        tl.store(rout_ptr + row * stride_ro + offs, h, mask=mask)
        x = h.to(tl.float32)  # normalize exactly the residual the next layer will see
    var = tl.sum(x * x, axis=0) / H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
