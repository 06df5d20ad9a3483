"""Fused MoE expert MLP: ``out[t] = sum_j w[t,j] * down_e(SiLU(gate_e(x[t])) * up_e(x[t]))``, e = ids[t,j].

Weights follow transformers 5: ``w13 = gate_up_proj [E, 2I, H]`` (gate rows first, then up) and
``w2 = down_proj [E, H, I]``; each is a dense bf16/fp16/fp32 tensor or a :class:`MoEQuantWeights`
(int4/int8, group 32/64/128 or per-channel, symmetric or asymmetric; layout in moecompress/kernels/packing.py)
dequantized in registers inside the GEMM.

Four steps:

1. ``moe_align_block_size`` sorts the slots by expert into BLOCK_M-row blocks, dropping ids outside
   ``[0, num_experts)`` (zero experts): they get no block, so no compute and no weight traffic.
2. gate/up grouped GEMM: each program computes the gate *and* the up tile of the same BLOCK_N
   columns (two accumulators over one pass of the activations) and stores only
   ``SiLU(gate) * up`` ``[S, I]`` -- the ``[S, 2I]`` pre-activation never reaches memory.
3. down grouped GEMM, scaled by the routing weight in the epilogue, one row per slot ``[S, H]``;
   then a small kernel sums each token's top-k rows in fp32, skipping dropped slots.

``zero_expert_mode="identity"`` makes ids >= num_experts add ``weight * x`` in that reduction instead
(LongCat-Flash semantics); the default "zero" drops them.

Why a separate top-k reduction instead of atomically adding into ``out``: fp32 atomics make the
result depend on scheduling (run-to-run bit differences, bad for an evaluation tool), bf16 atomics
are slow/unsupported, and atomics need a zeroed fp32 output plus a cast pass anyway. The per-slot
buffer costs S*H activations of traffic, small next to the expert weights at decode and next to the
GEMMs at prefill.
"""

from __future__ import annotations

import os

from typing import Literal

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import _dot, _load_act_chunk, _quant_chunk_dot, _swizzle
from .moe_align import AlignedSlots, moe_align_block_size
from .packing import QuantWeights, repack_for_kernel  # noqa: F401  (repack_for_kernel re-exported)
from .tuning import get_config, token_bucket

# Expert weights in the kernel layout: a QuantWeights with a leading expert dimension [E, N, K].
MoEQuantWeights = QuantWeights

Weight = torch.Tensor | QuantWeights


def fused_moe(
    x: torch.Tensor,
    w13: Weight | None,
    w2: Weight | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int | None = None,
    quant: tuple[QuantWeights, QuantWeights] | None = None,
    zero_expert_mode: Literal["zero", "identity"] = "zero",
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE expert MLP of ``x [T, H]``; returns ``out [T, H]`` in x's dtype.

    w13 ``[E, 2I, H]`` and w2 ``[E, H, I]``: dense tensors or MoEQuantWeights (each independently).
    ``quant=(w13_q, w2_q)`` is the same as passing them as w13/w2 (which may then be None).
    topk_weights ``[T, k]`` (any float dtype, used in fp32), topk_ids ``[T, k]`` (any int dtype):
    ids outside ``[0, num_experts)`` contribute nothing. ``num_experts`` defaults to w13's first dim.
    ``zero_expert_mode="identity"``: ids >= num_experts instead add ``weight * x[t]`` (LongCat-Flash's
    "zero-computation" experts are identities in HF); still no GEMM work, the add is in the reduction.
    ``config`` overrides the tuned tile config (moecompress/kernels/configs/fused_moe.json); besides the tiles it
    may set ``SPLIT_K`` (default 1): each GEMM's K loop split in that many ranges summed in fp32, for more
    programs in flight at small T (not yet measured on a GPU, so no table entry uses it). ``out`` may be given.
    """
    if quant is not None:
        w13, w2 = quant
    t, h, e, i, top_k = _check(x, w13, w2, topk_weights, topk_ids, zero_expert_mode)
    num_experts = e if num_experts is None else int(num_experts)
    if num_experts > e:
        raise ValueError(f"num_experts={num_experts} exceeds the {e} experts in the weights")
    _common.require_launch("fused_moe", x, topk_ids)
    if out is None:
        out = _common.empty((t, h), x.dtype, x.device)
    elif tuple(out.shape) != (t, h) or out.dtype != x.dtype or (h and out.stride(1) != 1):
        raise ValueError(
            f"out must be {x.dtype} [{t}, {h}] with unit column stride, got {out.dtype} {tuple(out.shape)}"
        )
    s = t * top_k
    if s == 0:
        return out

    cfg = _resolve_config(config, x, w13, w2, t)
    align = moe_align_block_size
    flag = os.environ.get("MOECOMPRESS_TRITON_ALIGN")  # "0": the torch version, "1": Triton on any device
    if flag == "1" or (flag != "0" and x.device.type == "cuda"):
        # one launch instead of ~20: 1.3-3.1x faster fused MoE at T <= 16 on an H200, same bits (2026-12-04)
        from .moe_align_triton import moe_align_block_size_triton as align
    aligned = align(topk_ids, cfg["BLOCK_M"], num_experts)
    rw = topk_weights.reshape(-1).float().contiguous()
    inter = _common.empty((s, i), x.dtype, x.device)
    _grouped_gemm(x, w13, inter, aligned, rw, a_row_div=top_k, gate_up=True, cfg=cfg)
    y = _common.empty((s, h), x.dtype, x.device)
    _grouped_gemm(inter, w2, y, aligned, rw, a_row_div=1, gate_up=False, cfg=cfg)

    ids = topk_ids.reshape(t, top_k)
    block_h = min(_common.next_pow2(h), 1024)
    _moe_sum_kernel[(t, _common.cdiv(h, block_h))](
        y, y.stride(0), ids, ids.stride(0), ids.stride(1), out, out.stride(0), x, x.stride(0), x.stride(1), rw,
        h, num_experts, TOP_K=top_k, BLOCK_H=block_h, IDENTITY_ZERO=zero_expert_mode == "identity", num_warps=4,
    )
    return out


def fused_moe_torch(
    x: torch.Tensor,
    w13: Weight | None,
    w2: Weight | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int | None = None,
    quant: tuple[QuantWeights, QuantWeights] | None = None,
    zero_expert_mode: Literal["zero", "identity"] = "zero",
) -> torch.Tensor:
    """Reference twin: loop over experts on fp32 (dequantized) weights, result cast to x's dtype."""
    if quant is not None:
        w13, w2 = quant
    t, h, e, i, top_k = _check(x, w13, w2, topk_weights, topk_ids, zero_expert_mode)
    num_experts = e if num_experts is None else int(num_experts)
    w13f = w13.dequantize() if isinstance(w13, QuantWeights) else w13.float()
    w2f = w2.dequantize() if isinstance(w2, QuantWeights) else w2.float()
    xf = x.float()
    acc = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    ids = topk_ids.reshape(t, top_k).long()
    for ex in range(num_experts):
        tok, j = torch.nonzero(ids == ex, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = xf[tok] @ w13f[ex].T
        act = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        acc.index_add_(0, tok, (act @ w2f[ex].T) * topk_weights[tok, j].float()[:, None])
    if zero_expert_mode == "identity":
        ident = (ids >= num_experts).float() * topk_weights.float()
        acc += ident.sum(dim=1, keepdim=True) * xf
    return acc.to(x.dtype)


def _check(x, w13, w2, topk_weights, topk_ids, zero_expert_mode):
    if zero_expert_mode not in ("zero", "identity"):
        raise ValueError(f"zero_expert_mode must be 'zero' or 'identity', not {zero_expert_mode!r}")
    if w13 is None or w2 is None:
        raise ValueError("fused_moe needs w13 and w2 (or quant=(w13, w2))")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    t, h = x.shape
    e, two_i, h13 = w13.shape
    if h13 != h or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, {h}], got {tuple(w13.shape)}")
    i = two_i // 2
    if tuple(w2.shape) != (e, h, i):
        raise ValueError(f"w2 must be [{e}, {h}, {i}] to match w13 {tuple(w13.shape)}, got {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_ids/topk_weights must both be [{t}, k], got {tuple(topk_ids.shape)} / {tuple(topk_weights.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp32/fp16/bf16, got {x.dtype}")
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, QuantWeights) and w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dense {name} must be fp32/fp16/bf16, got {w.dtype}")
    return t, h, e, i, topk_ids.shape[1]


def _kind(w: Weight) -> str:
    return f"int{w.bits}" if isinstance(w, QuantWeights) else "dense"


def _resolve_config(config: dict | None, x, w13, w2, t: int) -> dict:
    kind = _kind(w13) if _kind(w13) == _kind(w2) else "dense"
    cfg = get_config("fused_moe", _common.device_name(x.device), f"{kind}:{token_bucket(t)}")
    if config:
        cfg.update(config)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = int(cfg[key])
        if v < 16 or v & (v - 1):
            raise ValueError(f"{key}={v} must be a power of two >= 16 (tl.dot)")
    if x.device.type == "cuda" and not isinstance(w13, QuantWeights) and w13.element_size() > 2:
        cfg = _fit_shared_memory(cfg, x.element_size(), w13.element_size())
    return cfg


# The tile tables are made for 2-byte weights; fp32 weights double the staged bytes and overflowed an
# H200's 227 KiB of shared memory (first GPU run, 2026-12-04: 408 KiB asked at BLOCK_N 128, BLOCK_K 128,
# 4 stages). The estimate below (A tile + the gate and up W tiles, per stage) is ~1.33x what Triton
# allocated there, so 240 KB of estimate stays under the limit.
_SMEM_BUDGET = 240_000


def _fit_shared_memory(cfg: dict, a_bytes: int, w_bytes: int) -> dict:
    cfg = dict(cfg)

    def need() -> int:
        bm, bn, bk = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"]), int(cfg["BLOCK_K"])
        return int(cfg.get("num_stages", 3)) * (bm * bk * a_bytes + 2 * bk * bn * w_bytes)

    while need() > _SMEM_BUDGET:
        if int(cfg.get("num_stages", 3)) > 2:
            cfg["num_stages"] = int(cfg.get("num_stages", 3)) - 1
        elif int(cfg["BLOCK_K"]) > 32:
            cfg["BLOCK_K"] = int(cfg["BLOCK_K"]) // 2
        elif int(cfg["BLOCK_N"]) > 32:
            cfg["BLOCK_N"] = int(cfg["BLOCK_N"]) // 2
        else:
            break
    return cfg


def _block_k(cfg_bk: int, w: Weight) -> int:
    """BLOCK_K for one weight: dense as configured; quantized a multiple of the pack chunk dividing K
    (chunks are whole, so the quantized K loop needs no mask)."""
    if not isinstance(w, QuantWeights):
        return cfg_bk
    chunk = w.pack_k
    bk = max(cfg_bk, chunk)
    while w.k % bk:
        bk //= 2
    return bk


def _grouped_gemm(a, w: Weight, c, aligned: AlignedSlots, rw, *, a_row_div: int, gate_up: bool, cfg: dict):
    n = w.shape[1] // 2 if gate_up else w.shape[1]
    k = w.shape[2]
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    bk = _block_k(int(cfg["BLOCK_K"]), w)
    num_pid_m = aligned.num_blocks
    # split-K (config SPLIT_K > 1): each program sums one range of whole BLOCK_K steps into an fp32 partial
    # buffer; a second kernel adds the ranges in order (deterministic) and applies the epilogue. More
    # programs per expert at small T, where a few experts' serial K loops leave the GPU idle.
    k_steps = _common.cdiv(k, bk)
    k_per = _common.cdiv(k_steps, max(1, min(int(cfg.get("SPLIT_K", 1)), k_steps))) * bk
    split = _common.cdiv(k, k_per)
    grid = (num_pid_m * _common.cdiv(n, bn), split)
    if grid[0] == 0:
        return
    part = _common.empty((split, c.shape[0], 2 * n if gate_up else n), torch.float32, c.device) if split > 1 else c
    if isinstance(w, QuantWeights):
        qw, sc = w.qweight, w.scales
        zp = w.zeros if w.zeros is not None else sc
        zs = (zp.stride(0), zp.stride(1), zp.stride(2)) if w.zeros is not None else (0, 0, 0)
        bits, has_zp, chunk, group = w.bits, w.zeros is not None, w.pack_k, w.group_size
        sstr = sc.stride()
    else:
        qw, sc, zp = w, w, w
        sstr, zs = (0, 0, 0), (0, 0, 0)
        bits, has_zp, chunk, group = 0, False, bk, 1
    _moe_gemm_kernel[grid](
        a, a.stride(0), a.stride(1),
        qw, qw.stride(0), qw.stride(1), qw.stride(2),
        sc, *sstr,
        zp, *zs,
        part, part.stride(-2), part.stride(-1), part.stride(0) if split > 1 else 0,
        rw, aligned.sorted_ids, aligned.expert_ids, aligned.num_tokens_post_padded,
        aligned.num_slots, n, k, k_per, group, num_pid_m,
        A_ROW_DIV=a_row_div, GATE_UP=gate_up, MUL_ROUTING_WEIGHT=not gate_up, PARTIAL=split > 1,
        BITS=bits, HAS_ZP=has_zp, CHUNK=chunk,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=int(cfg.get("GROUP_M", 1)),
        **_common.dot_flags(a.dtype),
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)),
    )
    if split > 1:
        block = min(_common.next_pow2(n), 1024)
        _split_sum_kernel[(c.shape[0], _common.cdiv(n, block))](
            part, part.stride(0), part.stride(1), c, c.stride(0), c.stride(1), rw, n, split,
            GATE_UP=gate_up, MUL_ROUTING_WEIGHT=not gate_up, BLOCK=block, num_warps=4,
        )


@triton.jit
def _moe_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    w_ptr, stride_we, stride_wn, stride_wk,
    s_ptr, stride_se, stride_sn, stride_sg,
    z_ptr, stride_ze, stride_zn, stride_zg,
    c_ptr, stride_cm, stride_cn, stride_cs,
    rw_ptr, sorted_ids_ptr, expert_ids_ptr, n_post_ptr,
    num_slots, N, K, k_per_split, group_size, num_pid_m,
    A_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, PARTIAL: tl.constexpr,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One program: BLOCK_M sorted slots (all routed to one expert) x BLOCK_N output columns, over the K
    # range of program_id(1) (all of K unless split). Rows of A are tokens (gate/up: slot // top_k) or
    # slots (down); rows of C are slots. PARTIAL: C is the fp32 partial buffer [split, slots, N (x2 for
    # gate/up: gate, then up)] and the epilogue is left to _split_sum_kernel.
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    # The grid is sized for the worst case; blocks past the real padded length (including every
    # block when all slots went to zero experts) exit before touching any weight.
    if pid_m * BLOCK_M >= tl.load(n_post_ptr):
        return
    slot = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = slot < num_slots
    a_rows = a_ptr + (slot // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_g = w_ptr + expert * stride_we + offs_n.to(tl.int64) * stride_wn
    w_u = w_g + N * stride_wn  # up rows follow the I gate rows
    s_g = s_ptr + expert * stride_se + offs_n * stride_sn
    s_u = s_g + N * stride_sn
    z_g = z_ptr + expert * stride_ze + offs_n * stride_zn
    z_u = z_g + N * stride_zn

    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 0:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(w_g[None, :] + offs_k[:, None] * stride_wk, mask=wmask, other=0.0)
            acc_g = _dot(a, wg.to(a.dtype), acc_g, FP32_IEEE, UPCAST_DOT)
            if GATE_UP:
                wu = tl.load(w_u[None, :] + offs_k[:, None] * stride_wk, mask=wmask, other=0.0)
                acc_u = _dot(a, wu.to(a.dtype), acc_u, FP32_IEEE, UPCAST_DOT)
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for c in tl.static_range(BLOCK_K // CHUNK):
                kc = k0 + c * CHUNK
                g = kc // group_size
                a_lo, a_hi = _load_act_chunk(a_rows, row_mask, kc, stride_ak, BITS, CHUNK)
                acc_g += _quant_chunk_dot(
                    a_lo, a_hi, w_g, n_mask, kc, stride_wk, s_g, stride_sg, z_g, stride_zg, g,
                    BITS, HAS_ZP, CHUNK, BLOCK_M, BLOCK_N, FP32_IEEE, UPCAST_DOT,
                )
                if GATE_UP:
                    acc_u += _quant_chunk_dot(
                        a_lo, a_hi, w_u, n_mask, kc, stride_wk, s_u, stride_sg, z_u, stride_zg, g,
                        BITS, HAS_ZP, CHUNK, BLOCK_M, BLOCK_N, FP32_IEEE, UPCAST_DOT,
                    )

    c_ptrs = c_ptr + slot.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = row_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        c_ptrs += tl.program_id(1).to(tl.int64) * stride_cs
        tl.store(c_ptrs, acc_g, mask=c_mask)
        if GATE_UP:
            tl.store(c_ptrs + N * stride_cn, acc_u, mask=c_mask)
    else:
        out = _activate(acc_g, acc_u, GATE_UP)
        if MUL_ROUTING_WEIGHT:
            out = out * tl.load(rw_ptr + slot, mask=row_mask, other=0.0)[:, None]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _activate(g, u, GATE_UP: tl.constexpr):
    """The first GEMM's epilogue: SiLU(gate) * up (the second GEMM's output passes through)."""
    if GATE_UP:
        return g / (1.0 + tl.exp(-g)) * u
    return g


@triton.jit
def _split_sum_kernel(
    p_ptr, stride_ps, stride_pm, c_ptr, stride_cm, stride_cn, rw_ptr, N, split,
    GATE_UP: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    # c[slot] = epilogue(sum over the K ranges, in order). Rows of slots no expert computed (zero
    # experts) hold garbage here as in c itself; nothing reads them.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(0, split):
        base = p_ptr + sp * stride_ps + row * stride_pm
        g += tl.load(base + offs, mask=mask, other=0.0)
        if GATE_UP:
            u += tl.load(base + N + offs, mask=mask, other=0.0)
    out = _activate(g, u, GATE_UP)
    if MUL_ROUTING_WEIGHT:
        out = out * tl.load(rw_ptr + row)
    tl.store(c_ptr + row * stride_cm + offs * stride_cn, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_sum_kernel(
    y_ptr, stride_ym, ids_ptr, stride_it, stride_ij, out_ptr, stride_ot, x_ptr, stride_xm, stride_xk, rw_ptr,
    H, num_experts, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, IDENTITY_ZERO: tl.constexpr,
):
    # out[t] = sum of the token's top-k slot rows, fp32. A dropped slot's row was never written:
    # its load is masked off (not multiplied by zero), so garbage there cannot leak in as NaN.
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * stride_it + j * stride_ij)
        # the scalar condition is broadcast through the offsets (a bare scalar & tensor mask trips
        # the interpreter)
        live = h_mask & (offs * 0 + e >= 0) & (offs * 0 + e < num_experts)
        row = (t * TOP_K + j).to(tl.int64)
        acc += tl.load(y_ptr + row * stride_ym + offs, mask=live, other=0.0).to(tl.float32)
        if IDENTITY_ZERO:
            ident = h_mask & (offs * 0 + e >= num_experts)
            xv = tl.load(x_ptr + t.to(tl.int64) * stride_xm + offs * stride_xk, mask=ident, other=0.0)
            acc += xv.to(tl.float32) * tl.load(rw_ptr + row)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=h_mask)
