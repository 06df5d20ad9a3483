"""Routing agreement between a model and its reference: pure functions on router outputs, no I/O.

What a router "said" for ``n`` tokens is a :class:`RouterOut`: its normalized selection scores
``probs [n, R]`` over all ``R`` router rows, the ``ids [n, k]`` it selected (the family's own top-k,
group-limited for DeepSeek-V3/GLM-4-MoE) and ``num_experts`` E, the number of real experts.

Selection scores (the distributions the router KL compares):

* softmax routers (Qwen2/3-MoE, Qwen3.5-MoE, Mixtral, OLMoE, DeepSeek-V2): ``softmax(logits)`` over all
  R rows, exactly the probabilities the family takes its top-k from;
* routers with a selection bias (sigmoid: DeepSeek-V3, GLM-4-MoE; softmax: ERNIE-4.5): the bias-corrected
  scores the top-k is taken from, ``sigmoid(logits) + e_score_correction_bias`` (or ``softmax(logits) +
  bias``), clamped at 1e-12 (a large negative bias can push a score below zero) and normalized to sum 1
  over the R rows. They are not a probability the model uses; normalizing them makes KL a scale-free
  measure of how the ranking scores moved.

Zero experts (a ZEDA extension): router rows ``E .. R-1`` stand for "skip"; a selected id ``>= E``
is a skip slot. Skips take part in the top-k set comparisons and the router KL like any row, but
not in the expert-load histograms, which count the slots routed to real experts only.

When exactly one of the two routers has zero experts (a zero-expert model against its original),
the set comparisons use the *real-expert* sets (skips left out of both; two empty sets agree).
Per layer and side, ``active`` counts the real experts each token runs (a histogram over 0..k);
``expert_flops_saved`` = 1 - mean active experts of the model / of the reference (routed experts
only: every expert of a layer costs the same).

Per token: ``exact`` = the two top-k sets are equal; ``jaccard`` = |A ∩ B| / |A ∪ B|;
``router_kl`` = KL(reference || model) of the selection scores, in nats (when the two routers have
different R, the shorter distribution is padded with zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

_FLOOR = 1e-12  # floor of normalized sigmoid scores, and of the model's probabilities inside the KL

__all__ = ["RouterOut", "selection_probs", "topk_overlap", "router_kl", "expert_histogram", "load_summary",
           "LayerRouting", "RoutingAccumulator"]


class RouterOut(NamedTuple):
    probs: torch.Tensor  # [n, R] fp32, rows sum to 1
    ids: torch.Tensor  # [n, k] long
    num_experts: int  # E: ids >= E are skips (zero experts)
    weights: torch.Tensor | None = None  # [n, k] the routing weights of the chosen slots, when kept


def selection_probs(logits: torch.Tensor, scoring: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[n, R]`` normalized selection scores of router ``logits [n, R]`` (see the module docstring)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown router scoring {scoring!r}")
    s = F.softmax(logits, dim=-1) if scoring == "softmax" else logits.sigmoid()
    if scoring == "softmax" and bias is None:
        return s
    if bias is not None:
        s = s + bias.float().reshape(-1).to(s.device)
    s = s.clamp_min(_FLOOR)
    return s / s.sum(-1, keepdim=True)


def topk_overlap(ids: torch.Tensor, ref_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact [n] bool, jaccard [n] fp64)`` of the top-k sets in two ``[n, k]`` id tensors (ids distinct per row)."""
    ids, ref_ids = ids.reshape(ids.shape[0], -1), ref_ids.reshape(ref_ids.shape[0], -1).to(ids.device)
    if ids.shape[0] != ref_ids.shape[0]:
        raise ValueError(f"token counts differ: {ids.shape[0]} vs {ref_ids.shape[0]}")
    inter = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).sum(-1)
    union = ids.shape[1] + ref_ids.shape[1] - inter
    exact = (inter == ids.shape[1]) & (inter == ref_ids.shape[1])
    return exact, inter.double() / union.double()


def real_set_overlap(ids: torch.Tensor, ref_ids: torch.Tensor, num_experts: int,
                     ref_num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact [n] bool, jaccard [n] fp64)`` of the real-expert sets (ids >= E left out; empty == empty)."""
    ids, ref_ids = ids.reshape(ids.shape[0], -1), ref_ids.reshape(ref_ids.shape[0], -1).to(ids.device)
    a_real, b_real = ids < num_experts, ref_ids < ref_num_experts
    match = (ids[:, :, None] == ref_ids[:, None, :]) & a_real[:, :, None] & b_real[:, None, :]
    inter = match.any(-1).sum(-1)
    na, nb = a_real.sum(-1), b_real.sum(-1)
    union = na + nb - inter
    exact = (inter == na) & (inter == nb)
    jac = torch.where(union > 0, inter.double() / union.clamp_min(1).double(), torch.ones_like(inter, dtype=torch.double))
    return exact, jac


def active_histogram(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[k + 1]``: how many tokens run 0, 1, .., k real experts."""
    ids = ids.reshape(ids.shape[0], -1)
    return torch.bincount((ids < num_experts).sum(-1), minlength=ids.shape[1] + 1).cpu()


def router_kl(probs: torch.Tensor, ref_probs: torch.Tensor) -> torch.Tensor:
    """fp64 ``[n]``: KL(ref || model) in nats of two ``[n, R]`` distributions (zero-padded to equal R)."""
    p, q = ref_probs.double(), probs.double().to(ref_probs.device)
    r = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, r - p.shape[-1])), F.pad(q, (0, r - q.shape[-1]))
    # >= 0 in exact arithmetic; clamp the rounding noise of two nearly equal rows
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(_FLOOR))).sum(-1).clamp_min(0.0)


def expert_histogram(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, int, int]:
    """``(counts [E] int64, skip slots, all slots)`` of selected ``ids``; ids >= E are skips."""
    flat = ids.reshape(-1)
    real = flat < num_experts
    counts = torch.bincount(flat[real], minlength=num_experts)[:num_experts].cpu()
    return counts, int((~real).sum()), flat.numel()


def load_summary(counts: torch.Tensor) -> tuple[list[float], float, float]:
    """``(fractions, entropy in nats, max / mean)`` of one expert-load histogram (all 0 when empty)."""
    total = float(counts.sum())
    if total <= 0:
        return [0.0] * counts.numel(), 0.0, 0.0
    frac = counts.double() / total
    entropy = float(-torch.xlogy(frac, frac).sum())
    return [float(x) for x in frac], entropy + 0.0, float(frac.max()) * counts.numel()


@dataclass
class LayerRouting:
    """Running sums of one MoE layer's agreement and both models' expert loads."""

    tokens: int = 0
    exact: int = 0
    jaccard: float = 0.0
    kl: float = 0.0
    counts: dict = field(default_factory=dict)  # side -> [E] int64
    skips: dict = field(default_factory=dict)  # side -> skip slots
    slots: dict = field(default_factory=dict)  # side -> all slots
    has_zero: dict = field(default_factory=dict)  # side -> router has rows beyond E
    active: dict = field(default_factory=dict)  # side -> [k + 1] tokens by real experts run

    def update(self, out: RouterOut, ref: RouterOut) -> None:
        if (out.probs.shape[-1] > out.num_experts) != (ref.probs.shape[-1] > ref.num_experts):
            exact, jac = real_set_overlap(out.ids, ref.ids, out.num_experts, ref.num_experts)
        else:
            exact, jac = topk_overlap(out.ids, ref.ids)
        self.tokens += exact.numel()
        self.exact += int(exact.sum())
        self.jaccard += float(jac.sum())
        self.kl += float(router_kl(out.probs, ref.probs).sum())
        for side, r in (("model", out), ("reference", ref)):
            counts, skips, slots = expert_histogram(r.ids, r.num_experts)
            self.counts[side] = self.counts[side] + counts if side in self.counts else counts
            self.skips[side] = self.skips.get(side, 0) + skips
            self.slots[side] = self.slots.get(side, 0) + slots
            self.has_zero[side] = self.has_zero.get(side, False) or r.probs.shape[-1] > r.num_experts
            hist = active_histogram(r.ids, r.num_experts)
            prev = self.active.get(side)
            if prev is not None and prev.numel() != hist.numel():  # k differs between calls: pad
                n = max(prev.numel(), hist.numel())
                prev, hist = F.pad(prev, (0, n - prev.numel())), F.pad(hist, (0, n - hist.numel()))
            self.active[side] = hist if prev is None else prev + hist

    def merge(self, other: "LayerRouting") -> None:
        """Add another accumulator's sums of the same layer (another rank's windows)."""
        self.tokens += other.tokens
        self.exact += other.exact
        self.jaccard += other.jaccard
        self.kl += other.kl
        for side in other.counts:
            self.counts[side] = self.counts[side] + other.counts[side] if side in self.counts else other.counts[side]
            self.skips[side] = self.skips.get(side, 0) + other.skips[side]
            self.slots[side] = self.slots.get(side, 0) + other.slots[side]
            self.has_zero[side] = self.has_zero.get(side, False) or other.has_zero[side]
            prev, hist = self.active.get(side), other.active[side]
            if prev is not None and prev.numel() != hist.numel():
                n = max(prev.numel(), hist.numel())
                prev, hist = F.pad(prev, (0, n - prev.numel())), F.pad(hist, (0, n - hist.numel()))
            self.active[side] = hist if prev is None else prev + hist

    def agreement(self) -> dict:
        n = max(self.tokens, 1)
        return {"topk_exact": self.exact / n, "jaccard": self.jaccard / n, "router_kl": self.kl / n}

    def mean_active(self, side: str) -> float:
        h = self.active[side].double()
        return float((h * torch.arange(h.numel(), dtype=torch.double)).sum() / h.sum().clamp_min(1))


@dataclass
class RoutingAccumulator:
    """Per-layer routing sums over every batch; ``result()`` gives the report's routing sections."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def update(self, layer: int, out: RouterOut, ref: RouterOut) -> None:
        self.layers.setdefault(layer, LayerRouting()).update(out, ref)

    def merge(self, other: "RoutingAccumulator") -> "RoutingAccumulator":
        for i, lr in other.layers.items():
            self.layers.setdefault(i, LayerRouting()).merge(lr)
        return self

    def result(self) -> dict:
        """``{"routing": ..., "expert_load": ..., "skip_rate": ...}`` (see evals.evaluate for the schema)."""
        idx = sorted(self.layers)
        per_layer = [dict(layer=i, **self.layers[i].agreement()) for i in idx]
        tokens = sum(self.layers[i].tokens for i in idx)
        overall = {}
        for key in ("topk_exact", "jaccard", "router_kl"):
            s = sum(row[key] * self.layers[row["layer"]].tokens for row in per_layer)
            overall[key] = s / tokens if tokens else float("nan")
        load: dict = {"layers": idx, "model": [], "reference": [],
                      "entropy": {"model": [], "reference": []}, "max_over_mean": {"model": [], "reference": []}}
        for i in idx:
            for side in ("model", "reference"):
                frac, ent, mom = load_summary(self.layers[i].counts[side])
                load[side].append(frac)
                load["entropy"][side].append(ent)
                load["max_over_mean"][side].append(mom)
        skip = None
        if any(any(self.layers[i].has_zero.values()) for i in idx):
            skip = {side: [self.layers[i].skips[side] / max(self.layers[i].slots[side], 1)
                           if self.layers[i].has_zero[side] else None for i in idx]
                    for side in ("model", "reference")}
            for side in ("model", "reference"):
                slots = sum(self.layers[i].slots[side] for i in idx)
                skip[f"{side}_overall"] = (sum(self.layers[i].skips[side] for i in idx) / max(slots, 1)
                                           if any(self.layers[i].has_zero[side] for i in idx) else None)
        return {"routing": dict(overall, per_layer=per_layer), "expert_load": load, "skip_rate": skip,
                "active_experts": self._active(idx)}

    def _active(self, idx: list[int]) -> dict | None:
        """Mean real experts per token and their histogram, per layer and side; FLOPs saved vs the reference."""
        if not idx:
            return None
        out: dict = {"layers": idx}
        for side in ("model", "reference"):
            out[side] = [self.layers[i].mean_active(side) for i in idx]
            out[f"{side}_histogram"] = [self.layers[i].active[side].tolist() for i in idx]
        tokens = [self.layers[i].tokens for i in idx]
        total = max(sum(tokens), 1)
        for side in ("model", "reference"):
            out[f"{side}_overall"] = sum(a * t for a, t in zip(out[side], tokens)) / total
        out["expert_flops_saved"] = [1.0 - m / r if r else 0.0 for m, r in zip(out["model"], out["reference"])]
        ref = out["reference_overall"]
        out["expert_flops_saved_overall"] = 1.0 - out["model_overall"] / ref if ref else 0.0
        return out
