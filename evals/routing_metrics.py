"""Routing agreement between a model and its reference: pure functions on router outputs, no I/O.

What a router "said" for ``n`` tokens is a :class:`RouterOut`: its normalized selection scores
``probs [n, R]`` over all ``R`` router rows, the ``ids [n, k]`` it selected (the family's own top-k,
group-limited for DeepSeek-V3/GLM-4-MoE) and ``num_experts`` E, the number of real experts.

Selection scores (the distributions the router KL compares):

* softmax routers (Qwen2/3-MoE, Qwen3.5-MoE, Mixtral, OLMoE): ``softmax(logits)`` over all R rows,
  exactly the probabilities the family takes its top-k from;
* sigmoid routers (DeepSeek-V3, GLM-4-MoE): the bias-corrected scores the top-k is taken from,
  ``sigmoid(logits) + e_score_correction_bias``, clamped at 1e-12 (a large negative bias can push a
  score below zero) and normalized to sum 1 over the R rows. They are not a probability the model
  uses; normalizing them makes KL a scale-free measure of how the ranking scores moved.

Zero experts (a ZEDA extension): router rows ``E .. R-1`` stand for "skip"; a selected id ``>= E``
is a skip slot. Skips take part in the top-k set comparisons and the router KL like any row, but
not in the expert-load histograms, which count the slots routed to real experts only.

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


def selection_probs(logits: torch.Tensor, scoring: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[n, R]`` normalized selection scores of router ``logits [n, R]`` (see the module docstring)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if scoring == "softmax":
        return F.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        s = logits.sigmoid()
        if bias is not None:
            s = s + bias.float().to(s.device)
        s = s.clamp_min(_FLOOR)
        return s / s.sum(-1, keepdim=True)
    raise ValueError(f"unknown router scoring {scoring!r}")


def topk_overlap(ids: torch.Tensor, ref_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact [n] bool, jaccard [n] fp64)`` of the top-k sets in two ``[n, k]`` id tensors (ids distinct per row)."""
    ids, ref_ids = ids.reshape(ids.shape[0], -1), ref_ids.reshape(ref_ids.shape[0], -1).to(ids.device)
    if ids.shape[0] != ref_ids.shape[0]:
        raise ValueError(f"token counts differ: {ids.shape[0]} vs {ref_ids.shape[0]}")
    inter = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).sum(-1)
    union = ids.shape[1] + ref_ids.shape[1] - inter
    exact = (inter == ids.shape[1]) & (inter == ref_ids.shape[1])
    return exact, inter.double() / union.double()


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

    def update(self, out: RouterOut, ref: RouterOut) -> None:
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

    def agreement(self) -> dict:
        n = max(self.tokens, 1)
        return {"topk_exact": self.exact / n, "jaccard": self.jaccard / n, "router_kl": self.kl / n}


@dataclass
class RoutingAccumulator:
    """Per-layer routing sums over every batch; ``result()`` gives the report's routing sections."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def update(self, layer: int, out: RouterOut, ref: RouterOut) -> None:
        self.layers.setdefault(layer, LayerRouting()).update(out, ref)

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
        return {"routing": dict(overall, per_layer=per_layer), "expert_load": load, "skip_rate": skip}
