"""Dense group-quantized linear: ``y [T, N] = x [T, K] @ dequant(W [N, K])^T`` (int4/int8, dequant in registers).

The weight is a 2-D :class:`~kernels.packing.QuantWeights` (``repack_for_kernel`` of the canonical
``qweight [N, K]``): the same chunked layout and load-dequantize-dot as the MoE kernel, so the two stay
numerically identical. For decode (T of a few tokens) a GEMV over N alone leaves most SMs idle, so
configs may set ``SPLIT_K``: programs split K and write fp32 partials ``[SPLIT_K, T, N]`` that one torch
sum reduces -- deterministic, unlike atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import _load_act_chunk, _quant_chunk_dot, _swizzle
from .packing import QuantWeights
from .tuning import get_config, token_bucket


def quant_linear(
    x: torch.Tensor, qw: QuantWeights, *, config: dict | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [T, K]`` (fp32/fp16/bf16) times a quantized ``[N, K]`` weight; returns ``[T, N]`` in x's dtype."""
    t, k, n = _check(x, qw)
    _common.require_launch("quant_linear", x, qw.qweight)
    if out is None:
        out = _common.empty((t, n), x.dtype, x.device)
    elif tuple(out.shape) != (t, n) or out.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} [{t}, {n}], got {out.dtype} {tuple(out.shape)}")
    if t == 0:
        return out
    cfg = get_config("quant_linear", _common.device_name(x.device), f"int{qw.bits}:{token_bucket(t)}")
    if config:
        cfg.update(config)
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", int(cfg["BLOCK_K"]))):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot)")
    chunk = qw.pack_k
    bk = max(int(cfg["BLOCK_K"]), chunk)
    while k % bk:  # whole chunks only: the K loop needs no mask
        bk //= 2
    # Each split gets a whole number of BLOCK_K steps; never more splits than steps.
    split = max(1, min(int(cfg.get("SPLIT_K", 1)), k // bk))
    k_per_split = _common.cdiv(k // bk, split) * bk
    split = _common.cdiv(k, k_per_split)
    dst = out if split == 1 else _common.empty((split, t, n), torch.float32, x.device)
    num_pid_m, num_pid_n = _common.cdiv(t, bm), _common.cdiv(n, bn)
    zp = qw.zeros if qw.zeros is not None else qw.scales
    _quant_linear_kernel[(num_pid_m * num_pid_n, split)](
        x, x.stride(0), x.stride(1),
        qw.qweight, qw.qweight.stride(0), qw.qweight.stride(1),
        qw.scales, qw.scales.stride(0), qw.scales.stride(1),
        zp, zp.stride(0), zp.stride(1),
        dst, dst.stride(-2), dst.stride(-1), dst.stride(0) if split > 1 else 0,
        t, n, k_per_split, k, qw.group_size, num_pid_m,
        BITS=qw.bits, HAS_ZP=qw.zeros is not None, CHUNK=chunk,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=int(cfg.get("GROUP_M", 1)),
        **_common.dot_flags(x.dtype),
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)),
    )
    if split > 1:
        out.copy_(dst.sum(dim=0))
    return out


def quant_linear_torch(x: torch.Tensor, qw: QuantWeights) -> torch.Tensor:
    """Reference twin: fp32 matmul against the dequantized weight, cast to x's dtype."""
    _check(x, qw)
    return (x.float() @ qw.dequantize(torch.float32).T).to(x.dtype)


def _check(x: torch.Tensor, qw: QuantWeights) -> tuple[int, int, int]:
    if not isinstance(qw, QuantWeights) or qw.qweight.dim() != 2:
        raise ValueError("quant_linear needs a 2-D QuantWeights (repack_for_kernel of a [N, K] weight)")
    if x.dim() != 2 or x.shape[1] != qw.k:
        raise ValueError(f"x must be [T, {qw.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp32/fp16/bf16, got {x.dtype}")
    return x.shape[0], qw.k, qw.n


@triton.jit
def _quant_linear_kernel(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_wn, stride_wk,
    s_ptr, stride_sn, stride_sg,
    z_ptr, stride_zn, stride_zg,
    y_ptr, stride_ym, stride_yn, stride_ysplit,
    M, N, K_PER_SPLIT, K, group_size, num_pid_m,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    a_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    s_rows = s_ptr + offs_n * stride_sn
    z_rows = z_ptr + offs_n * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = k0 + c * CHUNK
            a_lo, a_hi = _load_act_chunk(a_rows, row_mask, kc, stride_xk, BITS, CHUNK)
            acc += _quant_chunk_dot(
                a_lo, a_hi, w_rows, n_mask, kc, stride_wk, s_rows, stride_sg, z_rows, stride_zg,
                kc // group_size, BITS, HAS_ZP, CHUNK, BLOCK_M, BLOCK_N, FP32_IEEE, UPCAST_DOT,
            )
    y = y_ptr + split.to(tl.int64) * stride_ysplit
    y += offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
