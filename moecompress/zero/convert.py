"""``zero-experts convert``: the same zero-expert model in the other layout (see :mod:`.layout`).

native -> stock appends Z experts of all-zero weights to every MoE layer (per expert, or to the
fused 3D tensors when the checkpoint stores them so) and counts them in the family's expert
field; stock -> native drops them. Refused when the stock layout cannot express the model: a
``zero_expert_bias`` that is not all zero, a skipping rule, ``original`` slot weights, relative zero
logits, group-limited routing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..arch.handle import FUSED_DOWN, FUSED_GATE_UP, ModelHandle
from ..arch.registry import router_rule
from ..errors import UserError
from .inject import open_float_original
from .layout import LAYOUTS, ZeroExperts, set_expert_count, write_zero_experts
from .rewrite import rewrite_checkpoint


def _stock_blockers(handle: ModelHandle) -> str | None:
    if handle.zero.rule is not None:
        return f"it skips by the rule {handle.zero.rule[0]} {handle.zero.rule[1]:g}, which stock loaders cannot run"
    if handle.zero.logits != "linear":
        return "its zero logits are relative to each token's best real logit, which stock loaders cannot compute"
    if handle.zero.weights != "renormalized":
        return (f"its slots are weighted {handle.zero.weights!r} (zero_experts_weights), which stock loaders "
                "cannot compute")
    if router_rule(handle.spec, handle.text_config).n_group is not None:
        return (f"its routing is group-limited (n_group={handle.text_config.n_group}) and stock loaders would "
                "put the zero experts into the groups")
    return None


def _logit_bias_blocker(handle: ModelHandle) -> str | None:
    """A layer whose zero experts have a logit bias (small tensors: read them all before writing anything)."""
    for i in range(handle.num_layers):
        name = handle.source_name(i, "mlp.gate.zero_expert_bias")
        if name is not None:
            bias = handle.reader.get(name)
            if torch.count_nonzero(bias):
                return (f"layer {i}'s zero experts have a logit bias (mlp.gate.zero_expert_bias, e.g. "
                        f"{float(bias.reshape(-1)[0]):g}), and {handle.family} routers have none")
    return None


def convert_layout(model_dir: str | Path, out_dir: str | Path, layout: str, overwrite: bool = False,
                   command: list[str] | None = None) -> dict:
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    handle = open_float_original(model_dir, "convert")
    if handle.zero is None:
        raise UserError(f"{model_dir} has no zero experts; add them with 'moecompress zero-experts add'")
    if handle.zero.layout == layout:
        raise UserError(f"{model_dir} is already in the {layout} layout")
    e, z = handle.num_experts, handle.num_zero
    if layout == "stock":
        why = _stock_blockers(handle) or _logit_bias_blocker(handle)
        if why:
            raise UserError(f"{model_dir} cannot be written in the stock layout: {why}")
    fn = _to_stock(handle) if layout == "stock" else _to_native(handle)
    zero = ZeroExperts(z, layout, handle.zero.rule, handle.zero.topk_mode, handle.zero.weights, handle.zero.logits)
    config = write_zero_experts(handle.reader.config, zero)
    set_expert_count(config, handle.spec.num_experts_attr, e + z if layout == "stock" else e)
    record = {"moecompress_version": __version__, "command": command, "source": str(Path(model_dir).resolve()),
              "zero_experts": {"action": "convert", "from": handle.zero.layout, "to": layout, "num_zero": z}}
    return rewrite_checkpoint(handle, out_dir, config, fn, record, overwrite, desc=f"converting to {layout}")


def _is_router_layer(handle: ModelHandle, i: int, tensors: dict) -> bool:
    name = handle.source_name(i, "mlp.gate.weight")
    return name is not None and tensors[name].dim() == 2 and tensors[name].shape[0] == handle.num_experts + handle.num_zero


def _to_stock(handle: ModelHandle):
    e, z = handle.num_experts, handle.num_zero

    def fn(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {handle.output_name(n): t for n, t in tensors.items()}
        if not _is_router_layer(handle, i, tensors):
            return out
        bias = handle.source_name(i, "mlp.gate.zero_expert_bias")
        if bias is not None:
            if torch.count_nonzero(tensors[bias]):
                raise UserError(f"{handle.reader.path} cannot be written in the stock layout: layer {i}'s zero experts "
                                f"have a logit bias (mlp.gate.zero_expert_bias, e.g. {float(tensors[bias][0]):g}), "
                                f"and {handle.family} routers have none")
            del out[handle.output_name(bias)]
        for key in (FUSED_GATE_UP, FUSED_DOWN):
            fused = handle.fused_source(i, "mlp." + key)
            if fused is not None:
                t = tensors[fused]
                out[handle.output_name(fused)] = torch.cat([t, t.new_zeros((z,) + tuple(t.shape[1:]))])
        if handle.fused_source(i, "mlp." + FUSED_GATE_UP) is None:
            shapes = [tensors[n + ".weight"] for n in handle.expert_source_names(i, 0)]
            for ex in range(e, e + z):
                for name, like in zip(handle.expert_disk_names(i, ex), shapes):
                    out[name + ".weight"] = torch.zeros_like(like)
        return out

    return fn


def _to_native(handle: ModelHandle):
    e, z = handle.num_experts, handle.num_zero

    def fn(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {handle.output_name(n): t for n, t in tensors.items()}
        if not _is_router_layer(handle, i, tensors):
            return out
        dropped = []
        for key in (FUSED_GATE_UP, FUSED_DOWN):
            fused = handle.fused_source(i, "mlp." + key)
            if fused is not None:
                out[handle.output_name(fused)] = tensors[fused][:e]
                dropped.append((fused, tensors[fused][e:]))
        for ex in range(e, e + z):
            for name in handle.expert_source_names(i, ex):
                if out.pop(handle.output_name(name + ".weight"), None) is not None:
                    dropped.append((name, tensors[name + ".weight"]))
        for name, t in dropped:
            if torch.count_nonzero(t):
                raise UserError(f"{handle.reader.path}: the zero experts' weights in {name} are not all zero; "
                                "this is not a stock zero-expert checkpoint")
        return out

    return fn
