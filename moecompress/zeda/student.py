"""One copy of the weights, two models: the ZEDA student and, with its zero rows masked, the teacher.

:func:`build_student` loads the original checkpoint once and gives every MoE router its zero
experts in memory (:func:`moecompress.zero.inject.zero_router_init`: outputs unchanged). With
:func:`teacher_mode` on, every router masks its zero rows and routes the original k slots, so the
forward is exactly the original model's; off, it is the student. Only router parameters (and,
optionally, the norms, or LoRA adapters on the experts: :mod:`.lora`, off in the teacher's forward)
are trainable; everything else is frozen. ``trainable="zero-rows"``: only the
zero rows and their bias learn (a gradient mask on the real rows; AdamW without weight decay then
leaves the real rows bit for bit as they were).

:func:`warm_start` then moves the zero rows from "never chosen" (where no gradient reaches them)
to the edge of the real experts: from one batch of teacher activations, per layer, the zero logits'
bias is set so that their mean sits ``margin`` below the mean k-th real logit (sigmoid routers:
the same on the selection scores, through the zero rows' correction bias).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.handle import ModelHandle
from ..checkpoint.load import load_model
from ..finite import check_finite
from ..zero.inject import zero_router_init
from ..zero.layout import ZeroExperts
from ..zero.modules import BLOCK_BIAS, RouterSpec, ZeroExpertRouter, moe_blocks, router_bias, set_router

TRAINABLE = ("routers", "routers+norms", "lora")


@dataclass
class Student:
    handle: ModelHandle
    model: nn.Module
    routers: dict[int, ZeroExpertRouter]  # layer -> router
    params: list[nn.Parameter]
    zero: ZeroExperts
    # trained parameters outside the routers (norms) -> their original values: the teacher reads these
    originals: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    lora: list[nn.Parameter] = field(default_factory=list)  # the experts' adapters (--trainable lora)

    @property
    def num_experts(self) -> int:
        return self.handle.num_experts


def build_student(model_dir, num_zero: int, topk_mode: str, seed: int, trainable: str, device, dtype,
                  weights: str = "renormalized", logits: str = "linear", lora_rank: int = 8) -> Student:
    handle, model = load_model(model_dir, dtype, device)
    for name, p in model.named_parameters():  # a NaN weight would surface later as a diverging loss
        check_finite(p, name, p.dtype, p.dtype)
    k = handle.top_k
    zero = ZeroExperts(num_zero, "native", None, topk_mode, weights, logits)
    rs = replace(RouterSpec.of(handle.spec, handle.text_config, handle.num_experts, zero),
                 top_k=k + 1 if topk_mode == "plus-one" else k, teacher_top_k=k)
    for p in model.parameters():
        p.requires_grad_(False)
    routers = {}
    layers = model.model.layers
    for i, mlp in moe_blocks(model):
        old = mlp.gate
        corr = getattr(mlp, BLOCK_BIAS) if rs.bias_passed else router_bias(old, rs.bias_path)
        norm = getattr(layers[i], handle.spec.router_input_norm).weight
        init = zero_router_init(old.weight.data.cpu(), norm.data.cpu(), None if corr is None else corr.data.cpu(),
                                num_zero, seed, i, rs.scoring)
        with torch.device(old.weight.device):
            new = ZeroExpertRouter(rs)
        new.weight.data = init.weight.to(old.weight.device, old.weight.dtype)
        set_router(mlp, new)
        if init.correction_bias is not None:
            new.selection_bias().copy_(init.correction_bias.reshape(-1))
        if init.zero_bias is not None:
            new.zero_expert_bias.data.copy_(init.zero_bias)
        new.reference_rows = old.weight.data.detach().clone()
        routers[i] = new
    params = []
    for r in routers.values():
        r.weight.requires_grad_(True)
        params.append(r.weight)
        if r.rs.scoring == "softmax":  # sigmoid routers keep no zero logit bias (the stock layout has none)
            r.zero_expert_bias.requires_grad_(True)
            params.append(r.zero_expert_bias)
        else:
            r.zero_expert_bias.requires_grad_(False)
    if trainable == "zero-rows":  # the real rows keep the original's bits: only the zero rows (and bias) learn
        for r in routers.values():
            keep = torch.zeros(r.weight.shape[0], 1, dtype=r.weight.dtype, device=r.weight.device)
            keep[r.num_experts:] = 1.0
            r.weight.register_hook(lambda g, m=keep: g * m)
    originals = {}
    if trainable == "routers+norms":
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and "norm" in name.rsplit(".", 2)[-2] and p.dim() == 1:
                p.requires_grad_(True)
                params.append(p)
                originals[p] = p.data.detach().clone()
    lora = []
    if trainable == "lora":  # after the experts' class swap: peft wraps the zero-skipping experts
        from .lora import add_lora

        lora = add_lora(model, lora_rank)
    return Student(handle, model, routers, params, zero, originals, lora)


@contextlib.contextmanager
def _router_flag(student: Student, name: str):
    """Within: ``name`` is True on every router (False again after, and ``aux`` dropped)."""
    for r in student.routers.values():
        setattr(r, name, True)
    try:
        yield
    finally:
        for r in student.routers.values():
            setattr(r, name, False)
            if name == "track":
                r.aux = None


@contextlib.contextmanager
def teacher_mode(student: Student):
    """Within: the original model (zero rows masked, the original k, the original real rows, the original
    norms when they train, the experts' adapters off). Only for forwards without gradients: trained norms are swapped for their
    original values in place of the parameters' data, and put back after."""
    swapped = [(p, p.data) for p in student.originals]
    for p, _ in swapped:
        p.data = student.originals[p]
    adapters = contextlib.nullcontext()
    if student.lora:
        from .lora import adapters_disabled

        adapters = adapters_disabled(student.model)
    try:
        with _router_flag(student, "mask_zero"), adapters:
            yield
    finally:
        for p, d in swapped:
            p.data = d


def tracking(student: Student):
    """Within: every router keeps what the losses need from its last call (``router.aux``)."""
    return _router_flag(student, "track")


@torch.no_grad()
@torch.no_grad()
def warm_start(student: Student, input_ids: torch.Tensor, margin: float = 1.0) -> dict[int, float]:
    """Put each layer's zero rows ``margin`` below its mean k-th real choice (see module docstring);
    returns the new bias per layer."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, r in student.routers.items()]
    try:
        with teacher_mode(student):
            student.model(input_ids=input_ids.to(next(student.model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, r in student.routers.items():
        x = seen[i].reshape(-1, r.rs.hidden).float()
        e, k = r.num_experts, r.rs.teacher_top_k or r.top_k
        real = F.linear(x, r.weight[:e].float())
        zero = F.linear(x, r.weight[e:].float())
        if r.rs.relative:
            zero = zero + real.max(dim=-1, keepdim=True).values
        bias = r.selection_bias()
        if r.rs.scoring == "softmax":
            kth = real.topk(k, dim=-1).values[:, -1]
            b = float(kth.mean() - zero.mean() - margin)
            r.zero_expert_bias.data.fill_(b)
            if bias is not None:  # ERNIE: then the zero rows' selection bias, at the k-th real choice's level
                p = torch.cat([real, zero + b], dim=-1).softmax(-1)
                kth_c = (p[:, :e] + bias[:e]).topk(k, dim=-1).values[:, -1]
                bias[e:] = float(kth_c.mean() - p[:, e:].mean() - 0.1 * margin * p[:, :e].max(-1).values.mean())
        else:
            kth = (real.sigmoid() + bias[:e]).topk(k, dim=-1).values[:, -1]
            b = float(kth.mean() - zero.sigmoid().mean() - 0.1 * margin)
            bias[e:] = b
        out[i] = b
    return out
