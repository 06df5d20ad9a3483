"""transformers-side modules of a zero-expert model (what quantize, eval and ZEDA run).

:func:`install_zero_experts` turns a transformers MoE model built with ``E`` experts into the
zero-expert model: every MoE block's ``gate`` becomes a :class:`ZeroExpertRouter` with ``E+Z`` rows
(returning ``(logits [T, E+Z], weights, ids)`` like the family's router, ids ``>= E`` being zero
experts) and the experts module learns to skip zero slots (:class:`ZeroSkippingExperts`). The
state-dict names stay the family's: ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias`` (ERNIE:
``mlp.gate.moe_statics.e_score_correction_bias``), plus
``mlp.gate.zero_expert_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import ZeroExperts
from ..arch.registry import router_rule
from .routing import apply_rule, route_zero


@dataclass(frozen=True)
class RouterSpec:
    """What a family's router does, as data (read from the ArchSpec and the text config)."""

    hidden: int
    num_experts: int
    num_zero: int
    top_k: int
    scoring: str
    renormalize: bool
    logits_fp32: bool
    weights_dtype: str | None  # "logits", "input" or None (ArchSpec.router_weights_dtype)
    n_group: int | None = None
    topk_group: int | None = None
    scaling: float = 1.0
    group_score: str = "top2"
    # the selection bias under the router, as transformers names it: "e_score_correction_bias" (sigmoid routers)
    # or "moe_statics.e_score_correction_bias" (ERNIE's softmax router, stored [1, E]); None: no bias
    bias_path: str | None = None
    # the MoE block holds the bias (``mlp.e_score_correction_bias``) and passes it to the router (MiniMax-M2)
    bias_passed: bool = False
    rule: tuple[str, float] | None = None
    teacher_top_k: int | None = None  # the original k (plus-one models route k+1 slots)
    weights: str = "renormalized"  # how chosen slots are weighted (zero.layout: zero_experts_weights)
    relative: bool = False  # zero logits relative to the token's best real logit (zero_experts_logits)

    @classmethod
    def of(cls, spec, text_config, num_experts: int, zero: ZeroExperts) -> "RouterSpec":
        r = router_rule(spec, text_config)
        return cls(
            hidden=int(text_config.hidden_size), num_experts=num_experts, num_zero=zero.num_zero,
            top_k=int(getattr(text_config, spec.top_k_attr)), scoring=r.scoring, renormalize=r.renormalize,
            logits_fp32=spec.router_logits_fp32, weights_dtype=spec.router_weights_dtype,
            n_group=r.n_group, topk_group=r.topk_group, scaling=r.scaling, group_score=r.group_score,
            bias_path=spec.bias_path, bias_passed=spec.bias_passed,
            rule=zero.rule,
            teacher_top_k=int(getattr(text_config, spec.top_k_attr)) - (1 if zero.topk_mode == "plus-one" else 0),
            weights=zero.weights, relative=zero.logits == "relative",
        )


BLOCK_BIAS = "e_score_correction_bias"  # the attribute of a MoE block that passes its router the bias


def router_bias(router: nn.Module, path: str | None, args: tuple = ()) -> torch.Tensor | None:
    """A router module's selection bias at ``path`` (``RouterSpec.bias_path``, e.g. ERNIE's
    ``moe_statics.e_score_correction_bias``), flattened to ``[R]``; None where it has none. ``args``: the
    router call's positional arguments, where a block passes the bias it holds (``gate(hidden, bias)``)."""
    if isinstance(router, ZeroExpertRouter):
        bias = router.selection_bias()
        return None if bias is None else bias.detach()
    if len(args) > 1 and torch.is_tensor(args[1]):
        return args[1].detach().reshape(-1)
    if not path:
        return None
    owner, _, leaf = path.rpartition(".")
    try:
        mod = router.get_submodule(owner) if owner else router
    except AttributeError:
        return None
    t = getattr(mod, leaf, None)
    return None if t is None else t.detach().reshape(-1)


class ZeroExpertRouter(nn.Module):
    """A family's top-k router over ``E`` real and ``Z`` zero experts (see :mod:`.routing`)."""

    def __init__(self, rs: RouterSpec):
        super().__init__()
        self.rs = rs
        self.num_experts, self.num_zero, self.top_k = rs.num_experts, rs.num_zero, rs.top_k
        rows = rs.num_experts + rs.num_zero
        self.weight = nn.Parameter(torch.zeros(rows, rs.hidden))
        self.zero_expert_bias = nn.Parameter(torch.zeros(rs.num_zero, dtype=torch.float32))
        if rs.bias_path == "e_score_correction_bias":
            self.e_score_correction_bias = nn.Buffer(torch.zeros(rows, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        if rs.bias_path == "moe_statics.e_score_correction_bias":  # ERNIE's module and [1, rows] parameter
            self.moe_statics = nn.Module()
            self.moe_statics.e_score_correction_bias = nn.Parameter(torch.zeros(1, rows, dtype=torch.float32),
                                                                    requires_grad=False)
        elif rs.bias_path not in (None, "e_score_correction_bias"):
            raise ValueError(f"unknown router bias {rs.bias_path!r}")
        # bias_passed: the block's [E+Z] buffer, read through the block (not a submodule: that would be a cycle)
        self._bias_block: nn.Module | None = None
        # ZEDA's teacher is the student with the zero rows masked out: same weights, no zero expert
        # chosen, the original k slots
        self.mask_zero = False
        # ZEDA training: keep what the losses need from the last call (see zeda.losses)
        self.track = False
        self.reference_rows: torch.Tensor | None = None  # the original real rows, frozen
        self.aux: dict | None = None

    def _weights_dtype(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.dtype | None:
        """The dtype the family's router returns its top-k weights in (None: as computed)."""
        return {"input": hidden.dtype, "logits": real.dtype}.get(self.rs.weights_dtype)

    def selection_bias(self) -> torch.Tensor | None:
        """The ``[E+Z]`` bias the top-k adds to the scores (a view of the stored tensor), None without one."""
        if self.e_score_correction_bias is not None:
            return self.e_score_correction_bias
        if self.rs.bias_passed:
            return None if self._bias_block is None else getattr(self._bias_block, BLOCK_BIAS)
        statics = getattr(self, "moe_statics", None)
        return None if statics is None else statics.e_score_correction_bias.view(-1)

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real ``[T, E]``, zero ``[T, Z]``) logits, computed as the family computes its router logits.

        Under autocast (ZEDA's bf16 training) the router still computes in fp32: routing decisions are what
        ZEDA trains, and a bf16 GEMM would flip near-ties between the teacher's and the student's forwards."""
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self._logits(hidden.reshape(-1, self.rs.hidden).float(), self.weight.float())
        x = hidden.reshape(-1, self.rs.hidden)
        w = self.weight
        if self.rs.logits_fp32:
            x, w = x.type(torch.float32), w.type(torch.float32)
        return self._logits(x, w)

    def _logits(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.num_experts
        # the real rows alone, as in the original: same GEMM shape, same bits; the teacher reads the
        # original rows even while training moves the student's
        rows = w[:e]
        if self.mask_zero and self.reference_rows is not None:
            rows = self.reference_rows.to(w.dtype)
        real = F.linear(x, rows)
        zero = F.linear(x, w[e:]) + self.zero_expert_bias.to(real.dtype)
        if self.rs.relative:  # the best real logit is the reference, not a path for gradients to the real rows
            zero = zero + real.detach().max(dim=-1, keepdim=True).values
        if self.mask_zero:
            zero = torch.full_like(zero, float("-inf"))
        return real, zero

    def forward(self, hidden: torch.Tensor, e_score_correction_bias: torch.Tensor | None = None):
        # a block that passes its bias (MiniMax-M2) passes the buffer selection_bias() reads
        real, zero = self.logits(hidden)
        rs = self.rs
        bias = self.selection_bias()
        top_k = rs.top_k
        if self.mask_zero:  # the original router: no zero rows at all, the original k
            top_k, zero_in = rs.teacher_top_k or rs.top_k, zero[:, :0]
            bias = None if bias is None else bias[: self.num_experts]
        else:
            zero_in = zero
        # training with original weights: only the merged ids are needed here, _relaxed weighs the slots
        relax = self.track and rs.weights == "original" and not self.mask_zero and rs.rule is None
        weights, ids = route_zero(
            real, zero_in, top_k=top_k, scoring=rs.scoring, renormalize=rs.renormalize,
            correction_bias=bias, n_group=rs.n_group, topk_group=rs.topk_group,
            scaling=rs.scaling, group_score=rs.group_score, cast_dtype=self._weights_dtype(hidden, real),
            weights="renormalized" if self.mask_zero or relax else rs.weights,
        )
        if not self.mask_zero:
            ids = apply_rule(weights, ids, rs.rule, self.num_experts)
        logits = torch.cat([real, zero], dim=-1)
        if self.track:
            self.aux = self._aux(hidden, real, logits, ids)
            if relax:
                return (logits,) + self._relaxed(hidden, real, logits, bias, ids)
        return logits, weights, ids

    def _selection(self, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(selection scores ``[T, E+Z]`` as the top-k compares them, a temperature for soft counts)."""
        if self.rs.scoring == "softmax" and bias is None:
            return logits.float(), 0.5
        scores = logits.float().softmax(-1) if self.rs.scoring == "softmax" else logits.float().sigmoid()
        return scores + (0 if bias is None else bias), 0.02

    def _relaxed(self, hidden, real, logits, bias, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Training with ``original`` weights: (weights, ids) over the real-only top-k, every one of its
        experts computed; a slot's weight is its original weight times *keep*: in the forward the hard
        survival (1 when the slot is in the merged top-k ``ids``, else 0: the same output as the hard
        routing), in the backward the gradient of a soft survival (straight-through). Without it the
        zero rows would get no gradient from the distillation at all (a zero slot weighs 0, so only
        the discrete choice depends on them); with it the KL tells them which slots are cheap to drop.

        Soft survival of real slot ``j`` (rank ``r_j`` among the real slots, selection score ``c_j``):
        ``sigmoid((k + 1/2 - r_j - n_j) / 0.25)`` with ``n_j = sum_z sigmoid((c_z - c_j) / tau)`` the soft
        count of zero rows outranking it (the hard rule: ``r_j + #{c_z > c_j} <= k``)."""
        rs, e = self.rs, self.num_experts
        w_real, ids_real = route_zero(real, real[:, :0], top_k=rs.top_k, scoring=rs.scoring,
                                      renormalize=rs.renormalize, correction_bias=None if bias is None else bias[:e],
                                      n_group=rs.n_group, topk_group=rs.topk_group, scaling=rs.scaling,
                                      group_score=rs.group_score,
                                      cast_dtype=self._weights_dtype(hidden, real))
        keep_hard = (ids_real[:, :, None] == ids[:, None, :]).any(-1).to(w_real.dtype)
        score, tau = self._selection(logits, bias)
        c_zero = score[:, e:]
        c = score[:, :e].gather(1, ids_real)  # [T, k]
        rank = 1 + (c.detach()[:, None, :] > c.detach()[:, :, None]).sum(-1)  # 1 = the best real slot
        n = torch.sigmoid((c_zero[:, None, :] - c[:, :, None]) / tau).sum(-1)
        keep_soft = torch.sigmoid((rs.top_k + 0.5 - rank - n) / 0.25).to(w_real.dtype)
        keep = keep_hard + (keep_soft - keep_soft.detach())
        return w_real * keep, ids_real

    def _soft_skip(self, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[T]: a differentiable count of each token's slots on zero experts, over k. A zero row takes
        a slot when its selection score passes the midpoint between the k-th and (k+1)-th best scores
        (held fixed); each row counts sigmoid((score - midpoint) / tau). It moves the tokens near the
        edge, without inflating the zero rows' weights the way a target on their mass would."""
        score, tau = self._selection(logits, bias)
        k = self.top_k
        top = score.detach().topk(min(k + 1, score.shape[-1]), dim=-1).values
        mid = (top[:, k - 1] + top[:, -1]) / 2 if top.shape[-1] > k else top[:, -1] - tau
        return torch.sigmoid((score[:, self.num_experts:] - mid[:, None]) / tau).sum(-1) / k

    def _aux(self, hidden, real, logits, ids) -> dict:
        """Selection distribution over all rows, the chosen ids, and KL(original || now) of the real
        experts' distribution (renormalized among themselves) when the real rows are trained."""
        from ..evals.routing_metrics import selection_probs

        bias = self.selection_bias()
        out = {"probs": selection_probs(logits, self.rs.scoring, bias), "ids": ids,
               "soft_skip": self._soft_skip(logits, bias)}
        if self.reference_rows is not None:
            x = hidden.reshape(-1, self.rs.hidden)
            x = x.float() if self.rs.logits_fp32 else x
            real_bias = None if bias is None else bias[: self.num_experts]
            with torch.no_grad():
                ref = selection_probs(F.linear(x, self.reference_rows.to(x.dtype)), self.rs.scoring, real_bias)
            now = selection_probs(real, self.rs.scoring, real_bias)
            out["real_kl"] = (torch.xlogy(ref, ref) - ref * torch.log(now.clamp_min(1e-12))).sum(-1).mean()
        return out


class ZeroSkippingExperts:
    """Mixed into a transformers experts class: slots with ids ``>= E`` contribute nothing.

    Recent transformers' ``eager`` experts skip an id equal to ``E`` (5.25; they fail on larger ones);
    older ones (5.17, the GPU image's) fail on it, and the other implementations have no notion of it.
    Zero slots become id ``E`` for an ``eager`` that skips it (probed once per class: they then cost
    nothing), and expert 0 with weight 0 otherwise (its output times an exact 0). The forward hooks of
    callers (calibration capture) see the original ids.
    """

    def forward(self, hidden_states, top_k_index, top_k_weights):  # noqa: D102
        e = self.gate_up_proj.shape[0]
        live = top_k_index < e
        impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
        if impl == "eager" and _eager_skips_id_e(self, hidden_states, e):
            top_k_index = torch.where(live, top_k_index, e)
        else:
            top_k_index = torch.where(live, top_k_index, 0)
            top_k_weights = torch.where(live, top_k_weights, torch.zeros_like(top_k_weights))
        return super().forward(hidden_states, top_k_index, top_k_weights)


_SKIPPING: dict[type, type] = {}
_EAGER_SKIPS_E: dict[type, bool] = {}


def _eager_skips_id_e(module: "ZeroSkippingExperts", hidden_states: torch.Tensor, e: int) -> bool:
    """Whether the transformers experts class under ``module``'s mixin skips a slot with id ``E``: one token
    routed only there, run once per class (a one-hot over ``E`` classes raises on it). The probe's tensors
    are on the CPU whatever the module's device: an eager that skips id E never touches the weights, one that
    does not raises in ``one_hot`` -- on a GPU that would be a device-side assert, fatal to the process."""
    cls = type(module)
    if cls not in _EAGER_SKIPS_E:
        parent = super(ZeroSkippingExperts, module)
        x = torch.zeros(1, hidden_states.shape[-1], dtype=hidden_states.dtype)
        try:
            with torch.no_grad():
                out = parent.forward(x, torch.full((1, 1), e, dtype=torch.long), torch.ones((1, 1), dtype=x.dtype))
            _EAGER_SKIPS_E[cls] = bool((out == 0).all())
        except (RuntimeError, IndexError):
            _EAGER_SKIPS_E[cls] = False
    return _EAGER_SKIPS_E[cls]


def _skipping_class(cls: type) -> type:
    if issubclass(cls, ZeroSkippingExperts):
        return cls
    if cls not in _SKIPPING:
        _SKIPPING[cls] = type(f"ZeroSkipping{cls.__name__}", (ZeroSkippingExperts, cls), {})
    return _SKIPPING[cls]


def moe_blocks(model: nn.Module):
    """``(layer index, MoE block)`` of every decoder layer with a router and routed experts."""
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts") and \
                hasattr(mlp.experts, "gate_up_proj"):
            yield i, mlp


def install_zero_experts(model: nn.Module, rs: RouterSpec) -> None:
    """Replace every MoE router by a :class:`ZeroExpertRouter` and make the experts skip zero slots."""
    for _, mlp in moe_blocks(model):
        old = mlp.gate
        dev = old.weight.device
        with torch.device(dev):
            new = ZeroExpertRouter(rs)
        new.weight.data = new.weight.data.to(old.weight.dtype)
        set_router(mlp, new)


def set_router(mlp: nn.Module, new: ZeroExpertRouter) -> None:
    """Put ``new`` in ``mlp`` as its router and make its experts skip zero slots; a block that holds the
    selection bias (``rs.bias_passed``) gets an ``[E+Z]`` one (zeros, to be loaded or set)."""
    if new.rs.bias_passed:
        old = getattr(mlp, BLOCK_BIAS)
        setattr(mlp, BLOCK_BIAS, nn.Buffer(torch.zeros(new.weight.shape[0], dtype=torch.float32, device=old.device)))
        object.__setattr__(new, "_bias_block", mlp)  # a plain attribute: as a submodule it would be a cycle
    mlp.gate = new
    mlp.experts.__class__ = _skipping_class(type(mlp.experts))


def zero_routers(model: nn.Module) -> list[ZeroExpertRouter]:
    return [m for m in model.modules() if isinstance(m, ZeroExpertRouter)]
