"""Triton building blocks shared by the GEMM kernels: program swizzle, the dot wrapper, and the
load-dequantize-dot of one quantization chunk (layout: moecompress/kernels/packing.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Walk GROUP_M row-blocks down one column of N-tiles before moving on, so the weight tiles a
    # group touches stay in L2 while its rows are processed (the classic grouped ordering).
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # See moecompress/kernels/_common.dot_flags for why the two flags exist.
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_act_chunk(a_rows, row_mask, kc, stride_ak, BITS: tl.constexpr, CHUNK: tl.constexpr):
    # Activations of one chunk, as the two halves an int4 chunk multiplies (low nibbles against the
    # first half, high nibbles against the second); int8 uses one [BLOCK_M, CHUNK] tile.
    # Chunks never run past K: the launchers pick BLOCK_K dividing K, so no K mask is needed.
    if BITS == 4:
        offs = kc + tl.arange(0, CHUNK // 2)
        a_lo = tl.load(a_rows + offs[None, :] * stride_ak, mask=row_mask[:, None], other=0.0)
        a_hi = tl.load(a_rows + (offs + CHUNK // 2)[None, :] * stride_ak, mask=row_mask[:, None], other=0.0)
    else:
        offs = kc + tl.arange(0, CHUNK)
        a_lo = tl.load(a_rows + offs[None, :] * stride_ak, mask=row_mask[:, None], other=0.0)
        a_hi = a_lo
    return a_lo, a_hi


@triton.jit
def _quant_chunk_dot(
    a_lo, a_hi, w_rows, n_mask, kc, stride_wk,
    s_rows, stride_sg, z_rows, stride_zg, g,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """fp32 ``a_chunk @ dequant(W_chunk)^T`` for one chunk inside quantization group ``g``.

    w_rows/s_rows/z_rows are [BLOCK_N] pointers at the start of each output row (expert applied).
    The codes minus the zero point are small integers, exact in bf16/fp16, so they go through the
    tensor cores as-is and the group scale multiplies the fp32 partial sum: one multiply per output
    element per chunk instead of one per weight element.
    """
    s = tl.load(s_rows + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZP:
        z = tl.load(z_rows + g * stride_zg, mask=n_mask, other=0).to(tl.int32)[None, :]
    else:
        z = 1 << (BITS - 1)
    # UPCAST_DOT: the interpreter also casts int -> bf16 as a raw uint16 astype; go through fp32.
    if UPCAST_DOT:
        wdt = tl.float32
    else:
        wdt = a_lo.dtype
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 4:
        offs = kc // 2 + tl.arange(0, CHUNK // 2)
        b = tl.load(w_rows[None, :] + offs[:, None] * stride_wk, mask=n_mask[None, :], other=0).to(tl.int32)
        lo = ((b & 0xF) - z).to(wdt)
        hi = ((b >> 4) - z).to(wdt)
        part = _dot(a_lo, lo, part, FP32_IEEE, UPCAST_DOT)
        part = _dot(a_hi, hi, part, FP32_IEEE, UPCAST_DOT)
    else:
        offs = kc + tl.arange(0, CHUNK)
        b = tl.load(w_rows[None, :] + offs[:, None] * stride_wk, mask=n_mask[None, :], other=0).to(tl.int32)
        part = _dot(a_lo, (b - z).to(wdt), part, FP32_IEEE, UPCAST_DOT)
    return part * s[None, :]
