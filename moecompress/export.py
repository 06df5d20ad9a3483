"""Turn quantized layers into on-disk tensors and configs of the chosen format.

Names follow what transformers' ``save_pretrained`` writes for the family (per-expert
``experts.{e}.gate_proj`` / Mixtral's ``block_sparse_moe.experts.{e}.w1``), so every loader that
reads the family reads our output. Everything not quantized is copied from the source shards
byte for byte (routers above all).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .arch.handle import ModelHandle
from .quant.formats import awq as awq_format
from .quant.formats import compressed_tensors as ct_format
from .quant.formats import gptq as gptq_format
from .quant.overrides import FUSED
from .quant.spec import QuantizedWeight, QuantSpec
from .quant.targets import Target

FORMATS = ("compressed-tensors", "gptq", "awq")


def encode(fmt: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if fmt == "compressed-tensors":
        return ct_format.encode_linear(qw, dtype)
    if fmt == "awq":
        return awq_format.encode_linear(qw, dtype)
    return gptq_format.encode_linear(qw)


def layer_tensors(handle: ModelHandle, i: int, results: dict[Target, QuantizedWeight], fmt: str,
                  dtype: torch.dtype, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All on-disk tensors of decoder layer i: quantized targets encoded, the rest copied as stored.

    ``overrides``: float tensors a method changed (AWQ's folded norms and compensated routers), by
    in-memory layer-local name; they replace the stored ones under the same on-disk name."""
    pre = handle.layer_prefix(i)
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for local, tensor in (overrides or {}).items():
        src = handle.source_name(i, local)
        if src is None:
            raise ValueError(f"layer {i}: no stored tensor for the modified {local}")
        consumed.add(src)
        out[handle.output_name(src)] = tensor.to(handle.reader.get(src).dtype)
    for t, qw in results.items():
        if t.expert_proj is None:
            base = pre + handle.disk_local(t.name)
            consumed.add(handle.source_name(i, t.name + ".weight"))
            out.update({f"{base}.{k}": v for k, v in encode(fmt, qw, dtype).items()})
            continue
        consumed.add(handle.fused_source(i, t.name))
        for e in range(qw.qweight.shape[0]):
            g, u, d = handle.expert_disk_names(i, e)
            sg, su, sd = handle.expert_source_names(i, e)
            consumed.update({sg + ".weight", su + ".weight"} if t.expert_proj == "gate_up" else {sd + ".weight"})
            q = qw[e]
            if t.expert_proj == "gate_up":
                half = q.qweight.shape[0] // 2
                for name, rows in ((g, slice(0, half)), (u, slice(half, None))):
                    part = QuantizedWeight(q.qweight[rows], q.scales[rows], q.zeros[rows], q.spec, q.g_idx)
                    out.update({f"{name}.{k}": v for k, v in encode(fmt, part, dtype).items()})
            else:
                out.update({f"{d}.{k}": v for k, v in encode(fmt, q, dtype).items()})
        if handle.zero is not None and handle.zero.layout == "stock":
            out.update(_stock_zero_experts(handle, i, t, qw[0], fmt, dtype, consumed))
    for name in handle.layer_tensor_names(i):
        if name not in consumed:  # copied as stored, under the family's original name
            out[handle.output_name(name)] = handle.reader.get(name)
    return out


def zero_quantized_like(q: QuantizedWeight) -> QuantizedWeight:
    """A quantized weight shaped like ``q`` that dequantizes to exactly zero (codes = zero points, scales 1)."""
    z = torch.full_like(q.zeros, q.spec.sym_zero)
    return QuantizedWeight(torch.full_like(q.qweight, q.spec.sym_zero), torch.ones_like(q.scales), z, q.spec, q.g_idx)


def _stock_zero_experts(handle: ModelHandle, i: int, t: Target, like: QuantizedWeight, fmt: str, dtype,
                        consumed: set[str]) -> dict[str, torch.Tensor]:
    """The stock layout's zero experts of target ``t``, quantized like the real ones (vLLM wants one
    scheme for all experts of a layer); their float source tensors are consumed."""
    out: dict[str, torch.Tensor] = {}
    e = handle.num_experts
    for ex in range(e, e + handle.num_zero):
        g, u, d = handle.expert_disk_names(i, ex)
        sg, su, sd = handle.expert_source_names(i, ex)
        if t.expert_proj == "gate_up":
            consumed.update({sg + ".weight", su + ".weight"})
            half = like.qweight.shape[0] // 2
            for name, rows in ((g, slice(0, half)), (u, slice(half, None))):
                part = QuantizedWeight(like.qweight[rows], like.scales[rows], like.zeros[rows], like.spec, like.g_idx)
                out.update({f"{name}.{k}": v for k, v in encode(fmt, zero_quantized_like(part), dtype).items()})
        else:
            consumed.add(sd + ".weight")
            out.update({f"{d}.{k}": v for k, v in encode(fmt, zero_quantized_like(like), dtype).items()})
    return out


def kept_module_names(handle: ModelHandle, model: nn.Module, quantized: set[str]) -> list[str]:
    """Full names of every Linear-like module left in float, spelled as the loaders see them.

    ``quantized``: ``"{layer}.{local name}"`` of every quantized layer module, plus ``"lm_head"`` when the head is.

    Routers are listed although transformers' router is not an ``nn.Linear``: vLLM builds them as
    linear layers and would otherwise look for packed weights. Non-text parts (a vision tower,
    MTP layers) are listed from the shards: every 2D ``.weight`` outside the processed layers
    except the embedding.
    """
    names: list[str] = []
    mem_prefix_len = len("model.layers.")
    for full, mod in model.named_modules():
        if not full.startswith("model.layers."):
            continue
        rest = full[mem_prefix_len:]
        i, _, local = rest.partition(".")
        if not local:
            continue
        is_router = local in handle.spec.routers
        is_linear = isinstance(mod, nn.Linear) and f"{i}.{local}" not in quantized
        if is_router or is_linear:
            # every spelling a loader may use: checkpoint prefix and text-only prefix (Qwen3.5 loads as
            # ``model.language_model.layers`` in the VL class, ``model.layers`` in the causal-LM class),
            # transformers' ``mlp`` and the checkpoint's own block name (Mixtral's ``block_sparse_moe``)
            for prefix in dict.fromkeys((handle.disk_prefix, "model")):
                for loc in dict.fromkeys((local, handle.disk_local(local))):
                    names.append(f"{prefix}.layers.{i}.{loc}")
    embed = f"{handle.disk_prefix}.embed_tokens.weight"
    for n in handle.non_layer_tensor_names():
        info = handle.reader.tensors[n]
        if n.endswith(".weight") and len(info.shape) == 2 and n != embed and n[: -len(".weight")] not in quantized:
            names.append(n[: -len(".weight")])
    if "lm_head" not in names and "lm_head" not in quantized:
        names.append("lm_head")
    return sorted(set(names), key=_natural)


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def gptq_dynamic_rules(handle: ModelHandle, kept: list[str], quantized: set[str] = frozenset()) -> list[str]:
    """GPTQModel/vLLM negative-match regexes for the kept modules: one per layer-local name, or, for a name that
    is quantized in other layers (``--ignore`` of some layers), one per kept module. Where every member of a
    group vLLM fuses is kept (Qwen3.5's ``in_proj_b``/``in_proj_a``, an ignored q/k/v), the fused name
    (``in_proj_ba``, ``qkv_proj``) gets the same rule: vLLM matches the rules against its fused layers."""
    layer = re.compile(rf"^{re.escape(handle.disk_prefix)}\.layers\.(\d+)\.(.+)$")
    quantized_locals = {q.partition(".")[2] for q in quantized}
    kept_set = set(kept)
    rules = []
    for n in kept:
        m = layer.match(n)
        # a layer past the processed ones (an MTP layer stored as model.layers.N, DeepSeek-V3/GLM-4.5) holds per-expert
        # linears whose local names no processed layer has: a rule for every layer would keep their experts in float
        m = m if m and int(m.group(1)) < handle.num_layers else None
        parent, _, leaf = n.rpartition(".")
        names = [n] + [f"{parent}.{fused}" for members, fused in FUSED
                       if members[0] == leaf and all(f"{parent}.{x}" in kept_set for x in members)]
        for name in names:
            if m and m.group(2) not in quantized_locals:  # the member's local name decides for the fused one
                rules.append(rf".*\.layers\.\d+\.{re.escape(name[len(n) - len(m.group(2)):])}$")
            else:
                rules.append(rf"^{re.escape(name)}$")
    return sorted(set(rules))


def _by_local(schemes: dict[str, QuantSpec]) -> dict[str, dict[int, QuantSpec]]:
    """``{"layers.{i}.{local}": spec}`` -> ``{local: {i: spec}}``."""
    out: dict[str, dict[int, QuantSpec]] = {}
    for name, s in schemes.items():
        if not name.startswith("layers."):
            continue  # lm_head: its own rule
        _, i, local = name.split(".", 2)
        out.setdefault(local, {})[int(i)] = s
    return out


def _layers_of(local: str, quantized: set[str]) -> set[int]:
    return {int(q.partition(".")[0]) for q in quantized if q.partition(".")[2] == local}


def _fused_names(local: str, spellings: list[str], quantized: set[str]) -> list[str]:
    """vLLM's fused layer name in each spelling of ``local`` (``self_attn.q_proj`` -> ``self_attn.qkv_proj``), where
    ``local`` belongs to a fused group whose members are all quantized (DeepSeek-V2-Lite's lone q_proj fuses with
    nothing)."""
    parent, _, leaf = local.rpartition(".")
    present = {q.partition(".")[2] for q in quantized}
    fused = [f for members, f in FUSED
             if leaf in members and all((f"{parent}.{m}" if parent else m) in present for m in members)]
    out = []
    for spelling in spellings:
        p = spelling.rpartition(".")[0]
        out += [f"{p}.{f}" if p else f for f in fused]
    return out


def scheme_groups(handle: ModelHandle, schemes: dict[str, QuantSpec], quantized: set[str]) -> list[tuple[QuantSpec, list[str]]]:
    """compressed-tensors config groups of the overriding schemes: (scheme, ``re:`` targets) each, a target per
    set of layers, matching the module names of every spelling (checkpoint and transformers' names, as
    :func:`kept_module_names`) and vLLM's fused layers' names (``qkv_proj``...: vLLM versions before July 2026
    match a fused layer's name, then its class name against "Linear", and only then its parts). A name target
    wins over a class target in compressed-tensors and in vLLM, whatever the groups' order. The targets never
    contain the text "experts" (DeepSeek's ``shared_experts`` is written ``shared_expert[s]``): transformers
    takes the routed experts' scheme from the first group with such a regex, else from the first group with a
    class target."""
    out = []
    by_local = _by_local(schemes)
    for spec in dict.fromkeys(schemes.values()):
        locals_by_layers: dict[str, list[str]] = {}
        for local, per_layer in by_local.items():
            mine = sorted(i for i, s in per_layer.items() if s == spec)
            if not mine:
                continue
            idx = r"\d+" if set(mine) == _layers_of(local, quantized) else "(?:" + "|".join(map(str, mine)) + ")"
            names = list(dict.fromkeys((local, handle.disk_local(local))))
            names += _fused_names(local, names, quantized)
            locals_by_layers.setdefault(idx, []).extend(re.escape(n) for n in names)
        targets = ["re:.*\\.layers\\." + idx + r"\.(?:" + "|".join(sorted(set(ls))) + ")$"
                   for idx, ls in locals_by_layers.items()]
        targets += [rf"re:^(?:.*\.)?{re.escape(n)}$" for n, s in schemes.items()
                    if s == spec and not n.startswith("layers.")]
        out.append((spec, [t.replace("experts", "expert[s]") for t in targets]))
    return out


def gptq_positive_rules(handle: ModelHandle, schemes: dict[str, QuantSpec], quantized: set[str]) -> dict[str, QuantSpec]:
    """GPTQModel/vLLM positive ``dynamic`` rules ``{regex: scheme}``: one per layer-local name when every layer
    that quantizes it uses the same scheme, else one per module; vLLM's fused name (``qkv_proj``...) too, since
    vLLM matches the rules against its fused layers' names."""
    rules: dict[str, QuantSpec] = {f"^{re.escape(n)}$": s for n, s in schemes.items() if not n.startswith("layers.")}
    for local, per_layer in sorted(_by_local(schemes).items()):
        uniform = len(set(per_layer.values())) == 1 and _layers_of(local, quantized) <= set(per_layer)
        spellings = list(dict.fromkeys((local, handle.disk_local(local))))
        for loc in spellings + _fused_names(local, spellings, quantized):
            if uniform:
                rules[rf".*\.layers\.\d+\.{re.escape(loc)}$"] = next(iter(per_layer.values()))
            else:
                for i, s in sorted(per_layer.items()):
                    rules[rf".*\.layers\.{i}\.{re.escape(loc)}$"] = s
    return rules


def quantization_config(fmt: str, spec: QuantSpec, kept: list[str], handle: ModelHandle, extra: dict,
                        quantized: set[str] = frozenset(), schemes: dict[str, QuantSpec] | None = None) -> dict:
    """``quantized``: ``"{layer}.{local name}"`` of every quantized layer module (as for kept_module_names);
    ``schemes``: the overridden targets' schemes (``quant.overrides.assign``; not in the AWQ format)."""
    schemes = schemes or {}
    if fmt == "compressed-tensors":
        # vLLM matches a class target against its own classes, and its lm_head (ParallelLMHead) is no "Linear":
        # a quantized head under the base scheme is named as well (an overridden one is, by scheme_groups), with
        # any prefix (vLLM's vision-language models name it language_model.lm_head)
        head = [r"re:^(?:.*\.)?lm_head$"] if extra.get("lm_head") and "lm_head" not in schemes else []
        return ct_format.quantization_config(spec, ignore=kept, targets=["Linear", *head],
                                             others=scheme_groups(handle, schemes, quantized))
    if fmt == "awq":  # GPTQModel reads ``dynamic``, not modules_to_not_convert: give it both
        if schemes:
            raise ValueError("the AWQ format has one scheme")  # refused by the recipe already
        return awq_format.quantization_config(spec, kept, lm_head=bool(extra.get("lm_head")),
                                              dynamic_rules=gptq_dynamic_rules(handle, kept, quantized))
    return gptq_format.quantize_config(spec, gptq_dynamic_rules(handle, kept, quantized), **extra,
                                       positive=gptq_positive_rules(handle, schemes, quantized))
