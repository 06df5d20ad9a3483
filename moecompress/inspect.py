"""`moecompress inspect`: what a checkpoint is, and what quantizing it would do."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .arch.handle import ModelHandle, decoder_layers
from .quant.targets import layer_targets, target_weight


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(model_dir: str | Path, group_size: int = 128) -> dict:
    h = ModelHandle.open(model_dir)
    model = h.skeleton()
    layers = decoder_layers(model)
    moe_layers = [i for i, l in enumerate(layers) if hasattr(getattr(l, "mlp", None), "experts")]
    dense_layers = [i for i in range(h.num_layers) if i not in moe_layers]
    total = sum(_numel(t.shape) for t in h.reader.tensors.values())
    expert_params = 0
    quant_numel = Counter()
    quant_groups = 0
    quantized_kinds, kept_kinds = set(), set()
    for i, layer in enumerate(layers):
        for t in layer_targets(layer, h.spec, only_experts=False):
            shape = tuple(target_weight(layer, t).shape)
            n = _numel(shape)
            quant_numel[t.stage] += n
            quant_groups += n // (group_size if shape[-1] % group_size == 0 else shape[-1])
            quantized_kinds.add(t.name)
            if t.expert_proj:
                expert_params += n
        for r in h.spec.routers + h.spec.keep_float:
            try:
                layer.get_submodule(r)
                kept_kinds.add(r)
            except AttributeError:
                pass
    active = total - expert_params + expert_params * h.top_k // max(h.num_experts, 1)
    qn = sum(quant_numel.values())
    bytes_now = h.reader.total_bytes()
    elt = {"F32": 4, "BF16": 2, "F16": 2}
    other_bytes = bytes_now - qn * elt.get(next(iter(h.reader.tensors.values())).dtype, 2)
    scale_bytes = quant_groups * 2
    size = {f"int{b}": int(max(other_bytes, 0) + qn * b / 8 + scale_bytes) for b in (4, 8)}
    text = h.text_config
    return {
        "path": str(Path(model_dir).resolve()), "family": h.family, "model_type": h.reader.config.get("model_type"),
        "layers": h.num_layers, "moe_layers": len(moe_layers), "dense_layers": dense_layers,
        "experts": h.num_experts, "top_k": h.top_k,
        "shared_expert": h.spec.shared_expert is not None,
        "hidden_size": text.hidden_size, "float_dtype": str(h.float_dtype).replace("torch.", ""),
        "params_total": total, "params_active": active, "params_experts": expert_params,
        "size_bytes": bytes_now, "size_estimate_bytes": size, "group_size_for_estimate": group_size,
        "quantized": sorted(quantized_kinds), "kept": sorted(kept_kinds) + ["embed_tokens", "lm_head"],
        "router_scoring": h.spec.scoring,
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def render(d: dict) -> str:
    lines = [
        f"{d['path']}",
        f"  family        {d['family']} (model_type {d['model_type']}), {d['float_dtype']}",
        f"  layers        {d['layers']} ({d['moe_layers']} MoE, dense: {d['dense_layers'] or 'none'})",
        f"  experts       {d['experts']} routed, top-{d['top_k']}, shared expert: {'yes' if d['shared_expert'] else 'no'}, "
        f"router: {d['router_scoring']}",
        f"  parameters    {d['params_total'] / 1e9:.3f} B total, {d['params_active'] / 1e9:.3f} B active per token "
        f"({d['params_experts'] / max(d['params_total'], 1):.0%} in routed experts)",
        f"  size on disk  {_gb(d['size_bytes'])} now; int8 ~{_gb(d['size_estimate_bytes']['int8'])}, "
        f"int4 ~{_gb(d['size_estimate_bytes']['int4'])} (group {d['group_size_for_estimate']})",
        "  quantized     " + ", ".join(d["quantized"]),
        "  kept          " + ", ".join(d["kept"]) + " (routers bit-exact in the source dtype)",
    ]
    return "\n".join(lines)
