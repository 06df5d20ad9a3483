"""Router top-k: scores, (group-limited) top-k selection, renormalization, scaling.

``route(logits [T, E_total], top_k, ...) -> (weights fp32 [T, k], ids int32 [T, k])`` covers

* softmax routing (Mixtral, Qwen-MoE, OLMoE, ...): weights = softmax(logits) of the chosen experts,
  optionally renormalized over the top-k;
* sigmoid routing with ``e_score_correction_bias`` and group-limited top-k (DeepSeek-V3, GLM-4-MoE):
  the *selection* uses sigmoid(logits) + bias (first the ``topk_group`` best groups, each group scored
  by the sum of its two best biased scores, then the top-k experts inside them), the *weights* are the
  unbiased sigmoid scores of the chosen experts, optionally renormalized (``+1e-20`` like HF);
* softmax routing limited to groups scored by their best expert (``group_score="max"``: DeepSeek-V2's
  ``group_limited_greedy``);
* a correction bias with softmax scoring (LongCat-Flash) the same way.

Everything is multiplied by ``routed_scaling_factor`` at the end. ids are ordered by decreasing
selection score; among exactly equal scores the lower expert id wins (torch.topk leaves ties
unspecified). Ids in [E, E_total) are the caller's "zero experts" (``num_zero`` = E_total - E of them):
they are scored like any row, except that group-limited routing groups the E real experts only and
leaves the zero experts always eligible; moe_align/fused_moe drop their slots.

All of this runs in one Triton kernel (one program per BLOCK_T tokens, the whole expert row in
registers, k rounds of argmax). The launcher falls back to the torch twin ``route_torch`` only where
the kernel does not apply: more than 4096 experts or more than 64 groups. On CPU tensors it needs the
Triton interpreter (TRITON_INTERPRET=1); use ``route_torch`` otherwise.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from . import _common
from .tuning import get_config

MAX_KERNEL_EXPERTS = 4096
MAX_KERNEL_GROUPS = 64


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool,
    scoring: Literal["softmax", "sigmoid"] = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    num_zero: int = 0,
    group_score: Literal["top2", "max"] = "top2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing; returns ``(weights float32 [T, top_k], ids int32 [T, top_k])``. See module docstring."""
    t, e = _check(logits, top_k, scoring, correction_bias, n_group, topk_group, num_zero, group_score)
    grouped = n_group is not None and n_group > 1
    if e > MAX_KERNEL_EXPERTS or (grouped and n_group > MAX_KERNEL_GROUPS):
        return route_torch(
            logits, top_k, renormalize=renormalize, scoring=scoring, correction_bias=correction_bias,
            n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
            num_zero=num_zero, group_score=group_score,
        )
    _common.require_launch("route", logits)
    logits = logits.float()
    weights = _common.empty((t, top_k), torch.float32, logits.device)
    ids = _common.empty((t, top_k), torch.int32, logits.device)
    if t == 0:
        return weights, ids
    block_e = _common.next_pow2(e)
    cfg = get_config("routing", _common.device_name(logits.device), f"e{block_e}")
    # >= 2 rows/slots: keeps every tile genuinely 2-D (size-1 aranges are a needless edge case to compile)
    block_t = max(2, min(int(cfg.get("BLOCK_T", 16)), _common.next_pow2(t)))
    bias = correction_bias.float().contiguous() if correction_bias is not None else logits
    ng = n_group if grouped else 1
    _route_kernel[(_common.cdiv(t, block_t),)](
        logits, logits.stride(0), logits.stride(1), bias, weights, ids,
        t, e, e - num_zero, (e - num_zero) // ng, float(routed_scaling_factor),
        TOP_K=top_k, K_PAD=max(2, _common.next_pow2(top_k)), BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, RENORM=bool(renormalize),
        N_GROUP=ng, G_PAD=_common.next_pow2(ng), TOPK_GROUP=topk_group if grouped else 1,
        GROUP_MAX=group_score == "max", num_warps=int(cfg.get("num_warps", 4)),
    )
    return weights, ids


def route_torch(
    logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool,
    scoring: Literal["softmax", "sigmoid"] = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    num_zero: int = 0,
    group_score: Literal["top2", "max"] = "top2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of :func:`route`, written like the HF routers (Glm4MoeTopkRouter et al.)."""
    t, e = _check(logits, top_k, scoring, correction_bias, n_group, topk_group, num_zero, group_score)
    logits = logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group is not None and n_group > 1:
        real = e - num_zero
        grouped = choice[:, :real].reshape(t, n_group, real // n_group)
        group_scores = grouped.max(dim=-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, real // n_group).reshape(t, real)
        score_mask = torch.cat([score_mask, score_mask.new_ones(t, num_zero)], dim=1)  # zero experts: no group
        choice = choice.masked_fill(~score_mask, float("-inf"))
    top, ids = choice.topk(top_k, dim=-1, sorted=True)
    # the chosen scores are the weights unless a bias or the group mask shaped the choice
    weights = top if choice is scores else scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def _check(logits, top_k, scoring, correction_bias, n_group, topk_group, num_zero=0,
           group_score="top2") -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits.shape)}")
    t, e = logits.shape
    if not 0 <= num_zero < e:
        raise ValueError(f"num_zero={num_zero} must lie in [0, {e})")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must lie in [1, {e}]")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', not {scoring!r}")
    if group_score not in ("top2", "max"):
        raise ValueError(f"group_score must be 'top2' or 'max', not {group_score!r}")
    if correction_bias is not None and tuple(correction_bias.shape) != (e,):
        raise ValueError(f"correction_bias must be [{e}], got {tuple(correction_bias.shape)}")
    if n_group is not None and n_group > 1:
        real = e - num_zero
        least = 2 if group_score == "top2" else 1  # a group's score is its two best experts' or its best one's
        if real % n_group or real // n_group < least:
            raise ValueError(f"n_group={n_group} must divide {real} experts into groups of at least {least}")
        if topk_group is None or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must lie in [1, n_group={n_group}]")
        if top_k > topk_group * (real // n_group) + num_zero:
            raise ValueError(f"top_k={top_k} exceeds the experts of {topk_group} groups")
    return t, e


@triton.jit
def _argmax_first(v, idx, SENTINEL: tl.constexpr):
    # Row-wise argmax returning the lowest index among exact ties (deterministic, unlike torch.topk).
    m = tl.max(v, axis=1)
    return tl.min(tl.where(v == m[:, None], idx[None, :], SENTINEL), axis=1), m


@triton.jit
def _route_kernel(
    logits_ptr, stride_lt, stride_le, bias_ptr, w_ptr, ids_ptr,
    T, E, E_REAL, GROUP_E, scaling,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    N_GROUP: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_MAX: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
        mask=rmask[:, None] & cmask[None, :], other=0.0,
    )
    # Padded columns must never win and must add nothing to the softmax denominator.
    x = tl.where(cmask[None, :], x, float("-inf"))
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    choice = tl.where(cmask[None, :], choice, float("-inf"))

    if N_GROUP > 1:
        # Group score = sum of the group's two best biased scores (GROUP_MAX: its best one); keep the
        # TOPK_GROUP best groups.
        grp = cols // GROUP_E
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            v = tl.where((grp == g)[None, :], choice, float("-inf"))
            i1, m1 = _argmax_first(v, cols, BLOCK_E)
            if GROUP_MAX:
                gs = m1
            else:
                gs = m1 + tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), v), axis=1)
            gscore = tl.where(gcols[None, :] == g, gs[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            gi, _gm = _argmax_first(gscore, gcols, G_PAD)
            keep = keep | (grp[None, :] == gi[:, None]).to(tl.int32)
            gscore = tl.where(gcols[None, :] == gi[:, None], float("-inf"), gscore)
        # zero experts (columns >= E_REAL) belong to no group (their grp is >= N_GROUP): always eligible
        keep = tl.where((cols >= E_REAL)[None, :], 1, keep)
        choice = tl.where(keep != 0, choice, float("-inf"))

    # k rounds of argmax; the chosen weights/ids are collected in a [BLOCK_T, K_PAD] register tile so
    # the renormalization can happen before the single store.
    kcols = tl.arange(0, K_PAD)
    w_tile = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    id_tile = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    wsum = tl.zeros((BLOCK_T,), tl.float32)
    for j in tl.static_range(TOP_K):
        idx, _m = _argmax_first(choice, cols, BLOCK_E)
        sel = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(sel, scores, 0.0), axis=1)
        w_tile = tl.where(kcols[None, :] == j, w[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == j, idx[:, None], id_tile)
        wsum += w
        choice = tl.where(sel, float("-inf"), choice)
    if RENORM:
        w_tile = w_tile / (wsum[:, None] + 1e-20)
    w_tile = w_tile * scaling
    out = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    omask = rmask[:, None] & (kcols[None, :] < TOP_K)
    tl.store(w_ptr + out, w_tile, mask=omask)
    tl.store(ids_ptr + out, id_tile, mask=omask)
