"""The runtime's MoE block: router logits in fp32 -> top-k routing -> expert MLPs (+ shared expert).

One module serves every family; what differs is data (:class:`Routing`, read from the config, and
whether a shared expert / shared-expert gate exists). Experts are ``w13 = gate_up [E, 2I, H]`` and
``w2 = down [E, H, I]``, dense or packed (:class:`~moecompress.runtime.qlinear.PackedWeight`).

Two execution paths, chosen once at load time:

* kernels (CUDA, or the Triton interpreter): ``kernels.routing.route`` + ``kernels.fused_moe.fused_moe``,
  free of host syncs so a decode step can be captured in a CUDA graph;
* torch (CPU): ``route_torch`` + a loop over the experts that received tokens -- at decode only
  the k chosen experts are touched, which is what makes it fast on a CPU.

Router rows beyond the experts in the weights are zero experts (ZEDA, :mod:`moecompress.zero`):
their logits may carry a ``zero_expert_bias``, group-limited routing leaves them out of the groups,
a skipping rule (``zero_experts_rule``) may send more slots there, and their slots are dropped --
before the grouped GEMMs on the kernel path, and without touching any expert on the torch path.
With ``zero_experts_weights: original`` the real slots take the weights of a second routing over
the real rows alone (:func:`moecompress.zero.routing.original_weights`); with ``zero_experts_logits:
relative`` the zero logits add the token's best real logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.registry import router_rule
from ..kernels.routing import route_torch
from ..zero.routing import apply_rule, apply_rule_one, original_weights
from .qlinear import PackedWeight


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into (weights, expert ids)."""

    top_k: int
    scoring: str  # "softmax" | "sigmoid"
    renormalize: bool
    n_group: int | None = None
    topk_group: int | None = None
    scaling: float = 1.0
    group_score: str = "top2"  # a group's score: its two best scores summed, or its best ("max")
    num_zero: int = 0  # zero experts: router rows beyond the real experts
    rule: tuple[str, float] | None = None  # a training-free skipping rule (zero.routing.apply_rule)
    zero_weights: str = "renormalized"  # "original": real slots keep the real-only routing's weights
    zero_relative: bool = False  # zero logits + the token's best real logit (zero_experts_logits: relative)

    @classmethod
    def from_config(cls, spec, text_config, top_k: int, zero=None) -> "Routing":
        rule = router_rule(spec, text_config)
        return cls(
            top_k=top_k,
            scoring=rule.scoring,
            renormalize=rule.renormalize,
            n_group=rule.n_group,
            topk_group=rule.topk_group,
            scaling=rule.scaling,
            group_score=rule.group_score,
            num_zero=zero.num_zero if zero is not None else 0,
            rule=zero.rule if zero is not None else None,
            zero_weights=zero.weights if zero is not None else "renormalized",
            zero_relative=zero is not None and zero.logits == "relative",
        )


class Experts(nn.Module):
    """Routed expert MLPs with SiLU gating; weights dense or packed."""

    def __init__(self, w13: torch.Tensor | PackedWeight, w2: torch.Tensor | PackedWeight, use_kernels: bool) -> None:
        super().__init__()
        if isinstance(w13, PackedWeight) != isinstance(w2, PackedWeight):
            raise ValueError("w13 and w2 must both be dense or both packed")
        if isinstance(w13, PackedWeight):
            if not use_kernels:
                raise ValueError("packed experts run on the kernel path only")
            self.w13, self.w2 = w13, w2
        elif use_kernels:
            self.register_buffer("w13", w13)
            self.register_buffer("w2", w2)
        else:
            # the torch path keeps each expert's matrices transposed in memory ([H, 2I] and [I, H] row-major,
            # seen here through transposed views of the usual shapes): a decode token is then a row vector
            # times a row-major matrix, which the CPU BLAS runs in about 60% of the time of ``F.linear``'s
            # layout -- per-call cost is what small experts spend their time on at decode
            self.register_buffer("w13", w13.transpose(1, 2).contiguous().transpose(1, 2))
            self.register_buffer("w2", w2.transpose(1, 2).contiguous().transpose(1, 2))
        self.num_experts = w13.shape[0]
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            from ..kernels.fused_moe import fused_moe

            w13 = self.w13.get() if isinstance(self.w13, PackedWeight) else self.w13
            w2 = self.w2.get() if isinstance(self.w2, PackedWeight) else self.w2
            return fused_moe(x, w13, w2, weights, ids, num_experts=self.num_experts)
        return _experts_torch(x, self.w13, self.w2, weights, ids)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_views", None)  # per-expert views of the tensors before .to()
        return super()._apply(fn, recurse)

    def views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert row-major ``([H, 2I] ...], [I, H] ...])`` views for :func:`_experts_one`, made once."""
        views = self.__dict__.get("_views")
        if views is None:
            views = self.__dict__["_views"] = (list(self.w13.transpose(1, 2).unbind(0)),
                                               list(self.w2.transpose(1, 2).unbind(0)))
        return views

    def forward_one(self, x: torch.Tensor, ids: list[int], weights: list[float]) -> torch.Tensor:
        """One token on the torch path, its routing as lists (``MoEBlock``'s decode fast path)."""
        return _experts_one(x, *self.views(), ids, weights)


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = torch.mm(x, w13.t()).chunk(2, dim=-1)
    return torch.mm(F.silu(gate).mul_(up), w2.t())


def _experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """Sum over each token's experts of ``weight * expert(x)``; ids >= E (zero experts) contribute nothing."""
    t, k = ids.shape
    e = w13.shape[0]
    if t == 1:
        return _experts_one(x, w13.transpose(1, 2), w2.transpose(1, 2), ids.tolist()[0], weights.tolist()[0])
    out = torch.zeros_like(x)
    flat_w = weights.reshape(-1)
    for ex, slots, tok in expert_groups(ids, e):
        y = _expert(x[tok], w13[ex], w2[ex]) * flat_w[slots, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def _experts_one(x: torch.Tensor, w13t, w2t, ids: list[int], weights: list[float]):
    """Decode, one token ``x [1, H]``: its chosen experts in turn (no sorting), each weight folded into the
    down GEMM; ids >= E (zero experts) touch nothing. ``w13t[e]`` is ``[H, 2I]``, ``w2t[e]`` is ``[I, H]``
    (tensors, or lists of per-expert views: a list saves the per-call indexing, a visible cost at decode on
    a CPU). The first real expert writes the output (``addmm`` with ``beta=0`` ignores its input), so a
    token pays no op for a zero output buffer unless every slot is a zero expert."""
    e = len(w13t)
    out = None
    for ex, wj in zip(ids, weights):
        if ex < e:
            gate, up = torch.mm(x, w13t[ex]).chunk(2, dim=-1)
            h = F.silu(gate).mul_(up)
            if out is None:
                out = torch.addmm(x, h, w2t[ex], beta=0, alpha=wj)
            else:
                out.addmm_(h, w2t[ex], alpha=wj)
    return torch.zeros_like(x) if out is None else out


def expert_groups(ids: torch.Tensor, num_experts: int):
    """``(expert, slots, tokens)`` for every real expert that ``ids [T, k]`` routes to, in expert order
    (slots flattened ``t * k + j``, in token order within an expert); ids >= E (zero experts) are skipped."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    start = 0
    for ex, count in enumerate(torch.bincount(flat).tolist()):
        if count and ex < num_experts:
            slots = order[start:start + count]
            yield ex, slots, slots // k
        start += count


class MoEBlock(nn.Module):
    """Drop-in for a transformers sparse-MoE block: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, router_weight: torch.Tensor, correction_bias: torch.Tensor | None, experts: Experts,
                 routing: Routing, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, logit_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        # stored transposed ([H, E+Z] row-major, seen as [E+Z, H]): a decode token's logits are then a row
        # vector times a row-major matrix, the CPU BLAS's faster case (see :class:`Experts`)
        self.register_buffer("router_weight", router_weight.float().t().contiguous().t())
        self.register_buffer("correction_bias", None if correction_bias is None else correction_bias.float())
        # [E+Z] fp32 added to the router logits (0 on the real rows, zero_expert_bias on the zero rows)
        self.register_buffer("logit_bias", None if logit_bias is None else logit_bias.float())
        self.experts = experts
        self.routing = routing
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        # one token on the torch path, softmax routing renormalized over its k slots (no bias, groups or rule):
        # the top-k of the logits and a softmax over those k give the same weights in 3 ops instead of ~8
        self._one_token_route = (routing.scoring == "softmax" and routing.renormalize
                                 and correction_bias is None and not (routing.n_group or 0) > 1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32 [T, k], ids int32 [T, k]) for ``x [T, H]``; logits computed in fp32."""
        r = self.routing
        logits = self._logits(x)
        if self.experts.use_kernels:
            from ..kernels.routing import route as route_fn
        else:
            route_fn = route_torch
        kw = dict(renormalize=r.renormalize, scoring=r.scoring, n_group=r.n_group, topk_group=r.topk_group,
                  routed_scaling_factor=r.scaling, group_score=r.group_score)
        weights, ids = route_fn(logits, r.top_k, correction_bias=self.correction_bias, num_zero=r.num_zero, **kw)
        if r.num_zero and r.zero_weights == "original":
            e = logits.shape[1] - r.num_zero
            bias = None if self.correction_bias is None else self.correction_bias[:e]
            w_real, ids_real = route_fn(logits[:, :e], r.top_k, correction_bias=bias, **kw)
            weights = original_weights(w_real, ids_real, ids)
        if r.rule is not None:
            # softmax routing returns its slots by decreasing weight (route and route_torch sort them), unless a
            # selection bias ranked them (ERNIE)
            ids = apply_rule(weights, ids, r.rule, self.experts.num_experts,
                             sorted_desc=r.scoring == "softmax" and self.correction_bias is None)
        return weights, ids

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[T, E+Z]``: one addmm with the zero experts' bias; relative zero logits add
        the token's best real logit."""
        logits = F.linear(x.float(), self.router_weight, self.logit_bias)
        if self.routing.zero_relative:
            e = logits.shape[1] - self.routing.num_zero
            logits[:, e:] += logits[:, :e].max(dim=-1, keepdim=True).values
        return logits

    def _route_one(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """:meth:`route` for one token ``x [1, H]`` as Python lists (the decode path's router)."""
        return self._decoder()[0](x)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_decode", None)  # closures over the tensors before .to() / .float()
        return super()._apply(fn, recurse)

    def _decoder(self) -> tuple:
        """``(route, decode)`` for one token on the torch path, closures over this block's tensors made once
        (``.to()`` drops them, :meth:`_apply`); ``()`` where the path does not apply. A decode token of a small
        MoE is a few dozen small ops, and an ``nn.Module`` attribute lookup costs about what one of them does.

        ``route(x) -> (ids, weights)``: the top-k of the logits and a softmax over those k (= the renormalized
        top-k of the softmax, to rounding). Where zero logits are relative or the real slots keep the
        real-only routing's weights, the real top-k is merged in Python with the Z zero logits (the overall
        top-k is among them). A skipping rule then runs on the lists. ``decode(x)``: routed experts (zero
        slots touch nothing) plus the shared expert."""
        cached = self.__dict__.get("_decode")
        if cached is not None:
            return cached
        e = self.experts
        if e.use_kernels or not hasattr(e, "forward_one"):
            self.__dict__["_decode"] = ()
            return ()
        r = self.routing
        k, n, z, scaling, rule = r.top_k, e.num_experts, r.num_zero, r.scaling, r.rule
        rt = self.router_weight.t()
        rt = rt if rt.is_contiguous() else rt.contiguous()
        bias, relative, original = self.logit_bias, r.zero_relative, bool(z) and r.zero_weights == "original"
        zero_ids = list(range(n, n + z))

        def route(x: torch.Tensor) -> tuple[list[int], list[float]]:
            xf = x if x.dtype == torch.float32 else x.float()
            logits = torch.mm(xf, rt) if bias is None else torch.addmm(bias, xf, rt)
            if not (relative or original):
                top, ids = logits.topk(k)
                w = top.softmax(-1)
                ids, w = ids.tolist()[0], (w if scaling == 1.0 else w * scaling).tolist()[0]
            else:
                # the top k + Z rows hold the real top-k (at most Z zero rows rank above them); every zero row's
                # logit comes from the full list (relative ones move by the token's best real logit)
                full = logits.tolist()[0]
                real = [j for j in logits.topk(k + z)[1].tolist()[0] if j < n][:k]
                shift = full[real[0]] if relative else 0.0  # the token's best real logit
                cut = full[real[-1]]  # only zero rows above the k-th real logit take a slot
                zero = [(full[j] + shift, j) for j in zero_ids if full[j] + shift > cut]
                slots = [(full[j], j) for j in real]
                if zero:
                    slots = sorted(slots + zero, reverse=True)[:k]
                ids = [j for _, j in slots]
                # original: real slots take the real-only routing's weights (a softmax over its top k), zero
                # slots 0; renormalized: a softmax over the chosen slots' logits
                top = [full[j] for j in real] if original else [v for v, _ in slots]
                ex = [math.exp(v - top[0]) for v in top]
                total = sum(ex) / scaling
                if original:
                    weight_of = dict(zip(real, ex))
                    w = [weight_of[j] / total if j < n else 0.0 for j in ids]
                else:
                    w = [a / total for a in ex]
            if rule is not None:
                ids = apply_rule_one(w, ids, rule, n)
            return ids, w

        if isinstance(e, Experts):  # the views bound once: no per-call lookup on the decode path
            w13t, w2t = e.views()

            def experts(x, ids, w):
                return _experts_one(x, w13t, w2t, ids, w)
        else:
            experts = e.forward_one
        add_shared = self._add_shared if self.shared_expert is not None else None

        def decode(x: torch.Tensor) -> torch.Tensor:
            out = experts(x, *route(x))
            return out if add_shared is None else add_shared(x, out)

        self.__dict__["_decode"] = (route, decode)
        return route, decode

    def one_token(self):
        """``decode(x [1, H]) -> [1, H]``, this block's one-token path (a closure; no module call), or None where
        that path does not apply (kernels, or routing it does not implement)."""
        if not self._one_token_route:
            return None
        fns = self._decoder()
        return fns[1] if fns else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        if x.shape[0] == 1:
            one = self.one_token()
            if one is not None:
                return one(x).view_as(hidden)
        weights, ids = self.route(x)
        e = self.experts
        # the torch path is called directly: at decode on a CPU the module-call overhead is not negligible
        if e.use_kernels or not isinstance(e, Experts):  # kernels, or packed CPU experts (runtime.cpu_packed)
            out = e(x, weights, ids)
        else:
            out = _experts_torch(x, e.w13, e.w2, weights, ids)
        return self._add_shared(x, out).view_as(hidden)

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
