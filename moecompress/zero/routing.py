"""Routing with zero experts, written like the families' own routers: pure functions, no I/O.

:func:`route_zero` takes the real experts' logits ``[T, E]`` and the zero experts' ``[T, Z]``
separately and reproduces, op for op, what the family's transformers router does on the real
part, so that a model whose zero experts are never chosen computes *bit for bit* what the original
does (the point of an injected model). The joint distribution over all ``E+Z`` rows is formed
without touching the real part when the zero rows carry no mass:

* softmax: ``p_real = softmax(real)`` (the original's numbers), the zero rows' mass relative to
  the real normalizer ``a = zero - logsumexp(real)``, ``L = log(1 + sum exp a)``; the joint
  probabilities are ``p_real * exp(-L)`` and ``exp(a - L)``. With negligible zero mass ``L`` rounds
  to 0 and ``exp(-L)`` to exactly 1.
* sigmoid: scores are elementwise.
* a selection bias (sigmoid routers; ERNIE's softmax one) is added to the scores for the top-k only;
  the weights are the unbiased scores.
* group-limited top-k (``n_group``; sigmoid in DeepSeek-V3/GLM, softmax in DeepSeek-V2): groups are
  formed over the real experts only and the zero experts are always eligible.

Where no zero expert makes the top-k, the result *is* the real-only top-k (same values, same
slot order); elsewhere it is the top-k over all rows. A zero slot keeps its weight in the
renormalization (``weights="renormalized"``), or the real slots keep the weights of the real-only
routing and zero slots weigh 0 (``"original"``, :func:`original_weights`; see :mod:`.layout`).

:func:`apply_rule` turns the training-free skipping baselines into zero slots after the top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_zero(real: torch.Tensor, zero: torch.Tensor, *, top_k: int, scoring: str, renormalize: bool,
               correction_bias: torch.Tensor | None = None, n_group: int | None = None,
               topk_group: int | None = None, scaling: float = 1.0, group_score: str = "top2",
               cast_dtype: torch.dtype | None = None, weights: str = "renormalized") -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], ids [T, k] int64)``; ids in ``[E, E+Z)`` are zero experts."""
    kw = dict(top_k=top_k, scoring=scoring, renormalize=renormalize, correction_bias=correction_bias,
              n_group=n_group, topk_group=topk_group, scaling=scaling, group_score=group_score,
              cast_dtype=cast_dtype)
    w, ids = _route_zero(real, zero, **kw)
    if weights == "original" and zero.shape[-1]:
        if correction_bias is not None:
            kw["correction_bias"] = correction_bias[: real.shape[-1]]
        w_real, ids_real = _route_zero(real, zero[:, :0], **kw)
        w = original_weights(w_real, ids_real, ids)
    elif weights not in ("renormalized", "original"):
        raise ValueError(f"unknown zero-expert weighting {weights!r}")
    return w, ids


def original_weights(w_real: torch.Tensor, ids_real: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The weights of slots ``ids [T, k]`` when each real slot keeps the weight the real-only routing
    ``(w_real, ids_real)`` gives its expert, and a zero slot (an id no real routing holds) weighs 0.

    The real experts of a merged top-k are always among the real-only top-k (a zero slot displaces the
    lowest-ranked real one), so every real slot finds its weight."""
    match = ids[:, :, None] == ids_real[:, None, :]
    return (match.to(w_real.dtype) * w_real[:, None, :]).sum(-1)


def _group_limited(choice: torch.Tensor, n_group: int | None, topk_group: int | None, group_score: str):
    """``choice [T, E]`` with the experts outside each token's ``topk_group`` best groups at -inf."""
    if n_group is None or n_group <= 1:
        return choice
    e = choice.shape[-1]
    grouped = choice.view(-1, n_group, e // n_group)
    group_scores = grouped.max(dim=-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))


def _route_zero(real, zero, *, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling,
                group_score, cast_dtype):
    e = real.shape[-1]
    if scoring == "softmax":
        p_real = F.softmax(real.float(), dim=-1)
        a = zero.float() - torch.logsumexp(real.float(), dim=-1, keepdim=True)
        big = torch.logsumexp(F.pad(a, (1, 0)), dim=-1, keepdim=True)  # log(1 + sum exp a)
        p_zero = torch.exp(a - big)
        p_real = p_real * torch.exp(-big)
        c_real, c_zero = p_real, p_zero
        if correction_bias is not None:  # ERNIE: the top-k ranks probabilities plus a bias; weights stay unbiased
            c_real, c_zero = p_real + correction_bias[:e], p_zero + correction_bias[e:]
        c_real = _group_limited(c_real, n_group, topk_group, group_score)
        vals, ids = _merged_topk(c_real, c_zero, p_real, p_zero, top_k, sorted_=True)
        if renormalize:
            vals /= vals.sum(dim=-1, keepdim=True)
        if scaling != 1.0:
            vals = vals * scaling
        return (vals.to(cast_dtype) if cast_dtype is not None else vals), ids
    if scoring != "sigmoid":
        raise ValueError(f"unknown router scoring {scoring!r}")
    s_real, s_zero = real.float().sigmoid(), zero.float().sigmoid()
    c_real, c_zero = s_real, s_zero
    if correction_bias is not None:
        c_real = s_real + correction_bias[:e]
        c_zero = s_zero + correction_bias[e:]
    c_real = _group_limited(c_real, n_group, topk_group, group_score)
    _, ids = _merged_topk(c_real, c_zero, s_real, s_zero, top_k, sorted_=False)
    weights = torch.cat([s_real, s_zero], dim=-1).gather(1, ids)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * scaling, ids


def _merged_topk(choice_real, choice_zero, val_real, val_zero, k: int, sorted_: bool):
    """Top-k by ``choice`` over real + zero rows, returning ``val`` at the chosen ids; tokens where no
    zero row beats the k-th real choice get exactly the real-only top-k."""
    c_top, ids_real = torch.topk(choice_real, k, dim=-1, sorted=sorted_)
    vals_real = val_real.gather(1, ids_real) if val_real is not choice_real else c_top
    if choice_zero.shape[-1] == 0:
        return vals_real, ids_real
    full_choice = torch.cat([choice_real, choice_zero], dim=-1)
    ids_full = torch.topk(full_choice, k, dim=-1, sorted=sorted_)[1]
    vals_full = torch.cat([val_real, val_zero], dim=-1).gather(1, ids_full)
    kth = c_top.min(dim=-1, keepdim=True).values
    use_full = (choice_zero.max(dim=-1, keepdim=True).values > kth)
    return torch.where(use_full, vals_full, vals_real), torch.where(use_full, ids_full, ids_real)


def apply_rule(weights: torch.Tensor, ids: torch.Tensor, rule: tuple[str, float] | None,
               num_experts: int, sorted_desc: bool = False) -> torch.Tensor:
    """The ids after a skipping rule: real slots the rule drops become zero expert ``num_experts``.

    * ``threshold`` beta: drop a slot whose weight is below beta x the token's largest real weight
      (NAEE's dynamic skipping);
    * ``top-p`` p: keep the heaviest real slots until their share of the token's real weight reaches p;
    * ``top-k`` k': keep the k' heaviest real slots.
    Weights are not changed: a skipped slot keeps its weight and contributes 0.
    ``sorted_desc``: the slots are known to be in decreasing weight order (softmax routers), which
    saves the sort -- a handful of small ops per decode step instead of a dozen.
    """
    if rule is None:
        return ids
    kind, value = rule
    real = ids < num_experts
    w = torch.where(real, weights.float(), torch.zeros((), dtype=torch.float32, device=weights.device))
    if sorted_desc and kind != "threshold":
        if kind == "top-k":
            drop = real & (torch.cumsum(real.to(torch.int32), dim=-1) > int(value))
        else:
            before = torch.cumsum(w, dim=-1) - w
            drop = real & ~(before < value * w.sum(dim=-1, keepdim=True))
        return torch.where(drop, torch.full_like(ids, num_experts), ids)
    if kind == "threshold":
        drop = real & (w < value * w.max(dim=-1, keepdim=True).values)
    else:
        order = torch.argsort(torch.where(real, w, -1.0), dim=-1, descending=True, stable=True)
        w_sorted = w.gather(1, order)
        rank = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        if kind == "top-p":
            before = torch.cumsum(w_sorted, dim=-1) - w_sorted
            keep_sorted = before < value * w_sorted.sum(dim=-1, keepdim=True)
        elif kind == "top-k":
            keep_sorted = rank < int(value)
        else:
            raise ValueError(f"unknown rule {kind!r}")
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        drop = real & ~keep
    return torch.where(drop, torch.full_like(ids, num_experts), ids)


def apply_rule_one(weights: list[float], ids: list[int], rule: tuple[str, float], num_experts: int) -> list[int]:
    """:func:`apply_rule` for one token whose slots come in decreasing weight order, on Python lists (the
    runtime's one-token decode path: a few list operations instead of a dozen small tensor ops). The sums
    are taken in double precision: a slot within rounding of the rule's boundary may fall the other way."""
    kind, value = rule
    real = [e < num_experts for e in ids]
    if kind == "threshold":
        top = max((w for w, r in zip(weights, real) if r), default=0.0)
        return [num_experts if r and w < value * top else e for w, e, r in zip(weights, ids, real)]
    if kind == "top-k":
        out, kept = [], 0
        for e, r in zip(ids, real):
            kept += r
            out.append(num_experts if r and kept > int(value) else e)
        return out
    if kind == "top-p":
        total = sum(w for w, r in zip(weights, real) if r)
        out, before = [], 0.0
        for w, e, r in zip(weights, ids, real):
            out.append(num_experts if r and not before < value * total else e)
            before += w if r else 0.0
        return out
    raise ValueError(f"unknown rule {kind!r}")
