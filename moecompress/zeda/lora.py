"""LoRA on the routed experts for ZEDA (``--trainable lora``), through peft's parameter adapters.

peft (``LoraConfig(target_parameters=...)``, peft >= 0.17) adapts a fused 3D expert tensor
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``) with one rank-``r``
pair per expert, applied as ``W + B A`` during each forward; B starts at zero, so the student starts
as the original. The base weights stay frozen and shared: the teacher's forward runs with the
adapters disabled (:func:`adapters_disabled`), so one copy of the weights serves both. At export
the adapters are merged (:func:`merged_experts`): the written expert tensors are ``W + B A`` in the
checkpoint's dtype, so any loader reads the result as a plain model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError

TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _peft():
    try:
        import peft
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        raise UserError("--trainable lora needs peft (>= 0.17): pip install 'moecompress[lora]'") from None
    return peft, ParamWrapper


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """Inject rank-``rank`` adapters on every layer's routed experts (in place); returns their parameters.

    ``alpha`` defaults to ``rank`` (a scaling of 1)."""
    dims = [min(p.shape[-2:]) for n, p in model.named_parameters()
            if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if dims and rank > min(dims):  # wider than the smaller side: a full-rank update, at LoRA's memory price
        raise UserError(f"--lora-rank {rank} exceeds the experts' smaller dimension ({min(dims)}); use at most "
                        f"{min(dims)}")
    peft, _ = _peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=[],
                          target_parameters=list(TARGETS), lora_dropout=0.0, bias="none")
    trainable = [p for p in model.parameters() if p.requires_grad]
    peft.inject_adapter_in_model(cfg, model)  # (it freezes everything but the adapters: the routers train too)
    for p in trainable:
        p.requires_grad_(True)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    if not params:
        raise UserError("--trainable lora: this model has no fused routed experts to adapt")
    for p in params:
        p.requires_grad_(True)
    return params


def _wrappers(model: nn.Module):
    _, ParamWrapper = _peft()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ParamWrapper)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within: every LoRA adapter of ``model`` is off (the original experts); no-op without adapters."""
    layers = [m for _, m in _wrappers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def merged_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{in-memory parameter name: W + B A}`` (float32) for every adapted expert tensor, e.g.
    ``model.layers.3.mlp.experts.gate_up_proj``."""
    out: dict[str, torch.Tensor] = {}
    for name, w in _wrappers(model):
        base = w.get_param()
        delta = sum(w.get_delta_weight(a).float() for a in w.lora_A)
        # the wrapper's module path holds peft's "base_layer." hops (nested wrappers: one per adapted tensor)
        mod = ".".join(p for p in name.split(".") if p != "base_layer")
        out[f"{mod}.{w.parameter_name}"] = base.detach().float() + delta
    return out
