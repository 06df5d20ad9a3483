"""`moecompress inspect`: what a checkpoint is, and what quantizing it would do.

A float checkpoint gets int4/int8 size estimates and the list of what `quantize` would quantize.
An already-quantized one (config.json has a ``quantization_config``) is described as such: its
scheme, parameters counted from the packed shapes (a packed int32 word holds several weights), and
what is quantized and kept *in the checkpoint*; no estimates.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .arch.handle import ModelHandle, decoder_layers
from .arch.registry import router_rule
from .checkpoint.fp8_source import Fp8SourceReader
from .errors import UserError
from .quant.targets import layer_targets, target_weight

_CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _quantization(h: ModelHandle) -> dict | None:
    """The checkpoint's quantization scheme from config.json (None: a float checkpoint)."""
    qcfg = h.reader.config.get("quantization_config")
    if not qcfg:
        return None
    from .checkpoint.dequant import schemes_from_config

    if not isinstance(qcfg, dict):
        return {"format": "unknown", "known": False}
    try:
        fmt, schemes = schemes_from_config(qcfg)
        spec = schemes.base
    except (UserError, KeyError, TypeError, AttributeError):  # a scheme we do not read: say what we know
        return {"format": str(qcfg.get("quant_method", "unknown")), "known": False,
                "bits": qcfg.get("bits"), "group_size": qcfg.get("group_size")}
    if fmt == "compressed-tensors":
        fmt = f"compressed-tensors {qcfg.get('format', '')}".strip()
    symmetric = spec.symmetric
    if fmt == "awq" and not symmetric:  # AWQ stores a symmetric weight as zero points 8: our record says which
        from .evals.sizes import quantization_settings

        symmetric = bool((quantization_settings(h.reader) or {}).get("symmetric", False))
    return {"format": fmt, "known": True, "bits": spec.bits, "group_size": spec.group_size,
            "symmetric": symmetric, "act_order": spec.act_order, "_schemes": schemes}


def _layers_text(layers: set[int]) -> str:
    ls = sorted(layers)
    return ("layer " if len(ls) == 1 else "layers ") + ", ".join(map(str, ls[:4])) + (", ..." if len(ls) > 4 else "")


def _quantized_modules(h: ModelHandle, q: dict) -> dict[str, int]:
    """{module name: logical weight numel} of every packed linear of a checkpoint we can read."""
    t = h.reader.tensors
    out = {}
    if q["format"].startswith("compressed-tensors"):
        for n, info in t.items():
            if n.endswith(".weight_packed"):
                m = n[: -len(".weight_packed")]
                spec = q["_schemes"].of(m)
                bits, gs = spec.bits, spec.group_size
                rows, words = info.shape[0], info.shape[-1]
                scale = t.get(f"{m}.weight_scale")
                k = scale.shape[-1] * gs if gs and scale is not None else words * 32 // bits
                out[m] = rows * k
    else:
        for n, info in t.items():
            if n.endswith(".qweight"):
                m = n[: -len(".qweight")]
                bits = q["_schemes"].of(m).bits
                if q["format"] == "awq":  # qweight [K, N*bits/32]: packed along N
                    out[m] = info.shape[0] * (info.shape[-1] * 32 // bits)
                    continue
                g_idx = t.get(f"{m}.g_idx")  # one entry per input column: K exactly
                k = g_idx.shape[0] if g_idx is not None else info.shape[0] * 32 // bits
                out[m] = k * info.shape[-1]
    return out


def _other_schemes(h: ModelHandle, schemes, mods: dict[str, int]) -> list[dict]:
    """The modules whose scheme is not the base one (per-module rules: ``quantize --override``), by scheme."""
    by: dict = {}
    for m in mods:
        s = schemes.of(m)
        if s != schemes.base:
            kinds, layers = by.setdefault(s, (set(), set()))
            kinds.add(_local_kind(h, m))
            hit = re.search(r"\.layers\.(\d+)\.", m)
            if hit:
                layers.add(int(hit.group(1)))
    return [{"bits": s.bits, "group_size": s.group_size, "modules": sorted(ks, key=_natural), "layers": sorted(ls)}
            for s, (ks, ls) in by.items()]


def _non_text_parts(h: ModelHandle) -> list[str]:
    """Parts of the checkpoint outside the text model we process (vision tower, MTP layers...)."""
    text = {f"{h.disk_prefix}.embed_tokens.weight", f"{h.disk_prefix}.norm.weight", "lm_head.weight"}
    layer = re.compile(rf"^{re.escape(h.disk_prefix)}\.layers\.(\d+)\.")
    parts = {}
    undeclared = set(h.undeclared_layers())
    for n in h.non_layer_tensor_names():
        if n in text or n.startswith("lm_head."):  # lm_head's own tensors, packed when it was quantized
            continue
        m = layer.match(n)
        if m:  # a layer past num_hidden_layers: DeepSeek-V3 / GLM stores its MTP layer there
            parts[f"{h.disk_prefix}.layers.{m.group(1)}"] = (
                f"past num_hidden_layers {h.num_layers}, not a declared MTP layer: is num_hidden_layers right?"
                if int(m.group(1)) in undeclared else "MTP layer")
            continue
        bits = n.split(".")
        group = ".".join(bits[:2]) if bits[0] == "model" and len(bits) > 2 else bits[0]
        low = group.lower()
        parts.setdefault(group, "vision tower" if ("visual" in low or "vision" in low) else
                         "MTP layers" if "mtp" in low else "")
    return [f"{g} ({kind})" if kind else g for g, kind in sorted(parts.items(), key=lambda kv: _natural(kv[0]))]


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def _local_kind(h: ModelHandle, module: str) -> str:
    """Layer-local kind of a full module name, indices folded: ``mlp.experts.*.up_proj``."""
    pre = f"{h.disk_prefix}.layers."
    if module.startswith(pre):
        module = module[len(pre):].partition(".")[2]
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", module)


def _zero_experts(h: ModelHandle, total: int, expert_params: int, skip_rate: float | None,
                  measured: bool = False) -> dict | None:
    """Zero experts: how many, the layout, and active experts/parameters per token at skip rates."""
    z = h.zero
    if z is None:
        if skip_rate is not None:
            raise UserError(f"{h.reader.path} has no zero experts: --skip-rate and --eval apply to zero-expert models")
        return None
    # a stock checkpoint stores the zero experts' (all-zero) weights: on disk, never active
    base = total - expert_params - (expert_params * z.num_zero // max(h.num_experts, 1) if z.layout == "stock" else 0)
    rates = [skip_rate] if skip_rate is not None else [0.0, 0.25, 0.5, 0.75]
    active = {f"{s:g}": {"experts": h.top_k * (1 - s),
                         "params": int(base + expert_params * h.top_k * (1 - s) / max(h.num_experts, 1))}
              for s in rates}
    return {"num_zero": z.num_zero, "layout": z.layout, "topk_mode": z.topk_mode, "weights": z.weights,
            "logits": z.logits,
            "rule": None if z.rule is None else {"rule": z.rule[0], "value": z.rule[1]},
            "skip_rate": skip_rate, "skip_rate_measured": measured and skip_rate is not None, "active": active}


def describe(model_dir: str | Path, group_size: int = 128, skip_rate: float | None = None,
             measured: bool = False) -> dict:
    h = ModelHandle.open(model_dir)
    quant = _quantization(h)
    model = h.skeleton()
    layers = decoder_layers(model)
    moe_layers = [i for i, l in enumerate(layers) if hasattr(getattr(l, "mlp", None), "experts")]
    dense_layers = [i for i in range(h.num_layers) if i not in moe_layers]
    expert_params = 0
    quant_numel = Counter()
    quant_groups = 0
    quantized_kinds, kept_kinds = set(), set()
    in_dims: dict[int, str] = {}  # input dimension -> a linear that has it
    for i, layer in enumerate(layers):
        for t in layer_targets(layer, h.spec, only_experts=False):
            shape = tuple(target_weight(layer, t).shape)
            in_dims.setdefault(shape[-1], t.name)
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
    non_text = _non_text_parts(h)
    bytes_now = h.reader.total_bytes()
    fp8_source = h.reader.describe() if isinstance(h.reader, Fp8SourceReader) else None
    size = None
    if quant is None:
        total = sum(_numel(t.shape) for t in h.reader.tensors.values())
        qn = sum(quant_numel.values())
        elt = {"F32": 4, "BF16": 2, "F16": 2}
        # an FP8 source's float view: its tensors' float size, not the FP8 bytes on disk
        float_bytes = sum(t.nbytes for t in h.reader.tensors.values()) if fp8_source else bytes_now
        other_bytes = float_bytes - qn * elt.get(next(iter(h.reader.tensors.values())).dtype, 2)
        scale_bytes = quant_groups * 2
        size = {f"int{b}": int(max(other_bytes, 0) + qn * b / 8 + scale_bytes) for b in (4, 8)}
        # int4 with int8 attention (quantize --override self_attn=8): attention's codes twice the int4 bytes
        size["int4_attn8"] = int(size["int4"] + quant_numel["attn"] * 4 / 8)
        quantized = sorted(quantized_kinds)
        kept = sorted(kept_kinds) + ["embed_tokens", "lm_head"]
    elif quant["known"]:
        mods = _quantized_modules(h, quant)
        quant["other_schemes"] = _other_schemes(h, quant.pop("_schemes"), mods)
        parts = _CT_PARTS if quant["format"].startswith("compressed-tensors") else _GPTQ_PARTS
        packed = {f"{m}.{p}" for m in mods for p in parts}
        total = sum(mods.values()) + sum(_numel(t.shape) for n, t in h.reader.tensors.items() if n not in packed)
        quantized = sorted({_local_kind(h, m) for m in mods}, key=_natural)
        in_layer = re.compile(rf"^{re.escape(h.disk_prefix)}\.layers\.(\d+)\.")
        floats = {n[: -len(".weight")] for n, info in h.reader.tensors.items()
                  if n.endswith(".weight") and len(info.shape) == 2 and (m := in_layer.match(n))
                  and int(m.group(1)) < h.num_layers}
        kept_layers: dict[str, set[int]] = {}
        for m in floats - set(mods):
            kept_layers.setdefault(_local_kind(h, m), set()).add(int(in_layer.match(m).group(1)))
        # a kind also quantized elsewhere (--ignore of some layers) names the layers it is kept in
        kept = [k + (f" ({_layers_text(kept_layers[k])})" if k in quantized else "")
                for k in sorted(kept_layers, key=_natural)] + ["embed_tokens"]
        kept += [] if "lm_head" in mods else ["lm_head"]
    else:  # a scheme we cannot read: count from the config (the text model) plus the other float parts
        text_params = sum(t.numel() for t in model.state_dict().values())
        text_names = {f"{h.disk_prefix}.embed_tokens.weight", f"{h.disk_prefix}.norm.weight", "lm_head.weight"}
        others = [n for n in h.non_layer_tensor_names() if n not in text_names]
        total = text_params + sum(_numel(h.reader.tensors[n].shape) for n in others)
        quantized, kept = [], []
    awq = _awq_plan(h, layers, moe_layers) if quant is None else None
    zero = _zero_experts(h, total, expert_params, skip_rate, measured)
    if zero is not None and zero["layout"] == "stock":
        total -= expert_params * h.num_zero // max(h.num_experts, 1)
    active = total - expert_params + expert_params * h.top_k // max(h.num_experts, 1)
    text = h.text_config
    return {
        "path": str(Path(model_dir).resolve()), "family": h.family, "model_type": h.reader.config.get("model_type"),
        "layers": h.num_layers, "moe_layers": len(moe_layers), "dense_layers": dense_layers,
        "experts": h.num_experts, "top_k": h.top_k,
        "shared_expert": h.spec.shared_expert is not None,
        "hidden_size": text.hidden_size, "float_dtype": str(h.float_dtype).replace("torch.", ""),
        "params_total": total, "params_active": active, "params_experts": expert_params,
        "size_bytes": bytes_now, "size_estimate_bytes": size, "group_size_for_estimate": group_size,
        "group_size_misfit": _group_misfit(in_dims, group_size),
        "quantization": quant, "fp8_source": fp8_source,
        "quantized": quantized, "kept": kept, "non_text": non_text,
        "router_scoring": h.spec.scoring, "router": _router_text(h), "zero_experts": zero, "awq_groups": awq,
    }


def _router_text(h: ModelHandle) -> str:
    """The family's routing rule in words, e.g. 'sigmoid + bias, best 4 of 8 groups (two best), renormalized, x2.5'."""
    r = router_rule(h.spec, h.text_config)
    parts = [r.scoring + (" + bias" if h.spec.bias_name is not None else "")]
    if r.n_group is not None:
        by = "best expert" if r.group_score == "max" else "two best"
        parts.append(f"best {r.topk_group} of {r.n_group} groups ({by})")
    parts.append("renormalized" if r.renormalize else "not renormalized")
    if r.scaling != 1.0:
        parts.append(f"x{r.scaling:g}")
    return ", ".join(parts)


def _awq_plan(h: ModelHandle, layers, moe_layers: list[int]) -> list[dict]:
    """The AWQ balance groups of one MoE layer (and of a dense one, if any), as `quantize --method awq` finds them."""
    from .quant.balance import resolve

    picks = moe_layers[:1] + [i for i in range(len(layers)) if i not in moe_layers][:1]
    out, seen = [], set()
    for i in picks:
        names = {t.name for t in layer_targets(layers[i], h.spec, only_experts=False)}
        for g in resolve(layers[i], h.spec, names, names):
            key = (g.group.source, tuple(r.name for r in g.quantized))
            if key in seen:
                continue
            seen.add(key)
            floats = [r.name for r in g.floats]
            mode = "power-of-two (exact for " + ", ".join(floats) + ")" if floats else "free"
            if floats and g.source_kind == "norm" and h.spec.norm_weight_offset:
                mode = "skipped unless --awq-scales free (a (1 + weight) norm cannot fold exactly)"
            out.append({"source": g.group.source, "readers": [r.name for r in g.quantized], "float_readers": floats,
                        "loss": g.group.loss, "per_expert": g.group.per_expert, "scales": mode})
    return out


def measured_skip_rate(eval_json: str | Path, model_dir: str | Path | None = None) -> float:
    """The model's overall skip rate from an ``eval`` JSON (of ``model_dir``: a JSON naming another folder is
    refused; it records the path as given, so the folders' names are compared)."""
    import json

    if not Path(eval_json).is_file():
        raise UserError(f"--eval {eval_json} {'is a folder, not' if Path(eval_json).is_dir() else 'does not exist:'} "
                        "an `eval --json` file")
    try:
        r = json.loads(Path(eval_json).read_text())
        rate = float(r["skip_rate"]["model_overall"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{eval_json} is not an evaluation of a zero-expert model (no skip_rate.model_overall)") from None
    recorded = Path(str(r.get("model") or ""))
    if model_dir is not None and str(recorded) not in ("", "."):
        # the path as eval was given it ("..", a link): any of its spellings' names may be the folder's
        names = {recorded.name, recorded.resolve().name}
        here = {Path(model_dir).name, Path(model_dir).resolve().name}
        if not names & here:
            raise UserError(f"--eval {eval_json} evaluated '{recorded}', not {Path(model_dir).resolve().name}")
    return rate


def _group_misfit(in_dims: dict[int, str], group_size: int) -> dict | None:
    """Where ``group_size`` does not divide some linear's input dimension (``quantize`` refuses it): one such
    linear, and the largest power-of-two group size that divides them all (None if none from 16 up)."""
    bad = {d: name for d, name in in_dims.items() if d % group_size}
    if not bad:
        return None
    dim = min(bad)
    fits = next((g for g in (1024, 512, 256, 128, 64, 32, 16) if g < group_size and all(d % g == 0 for d in in_dims)),
                None)
    return {"dim": dim, "linear": bad[dim], "fits": fits}


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _params(n: int) -> str:
    return f"{_count(n)} params"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _scheme(q: dict) -> str:
    if not q["known"]:
        extra = ", ".join(f"{k} {q[k]}" for k in ("bits", "group_size") if q.get(k) is not None)
        return f"{q['format']}{' (' + extra + ')' if extra else ''}, a scheme moecompress does not read"
    group = "per-channel" if q["group_size"] is None else f"group {q['group_size']}"
    order = f", act-order {q['act_order']}" if q["act_order"] else ""
    return f"{q['format']}, int{q['bits']}, {group}, {'symmetric' if q['symmetric'] else 'asymmetric'}{order}"


def render(d: dict) -> str:
    q = d.get("quantization")
    lines = [
        f"{d['path']}",
        f"  family        {d['family']} (model_type {d['model_type']}), {d['float_dtype']}",
        f"  layers        {d['layers']} ({d['moe_layers']} MoE, dense: {d['dense_layers'] or 'none'})",
        f"  experts       {d['experts']} routed, top-{d['top_k']}, shared expert: {'yes' if d['shared_expert'] else 'no'}, "
        f"router: {d['router']}",
        f"  parameters    {_count(d['params_total'])} total, {_count(d['params_active'])} active per token "
        f"({d['params_experts'] / max(d['params_total'], 1):.0%} in routed experts)",
    ]
    z = d.get("zero_experts")
    if z:
        rule = f", skipping rule {z['rule']['rule']} {z['rule']['value']:g}" if z["rule"] else ""
        mode = f", added with top-k mode {z['topk_mode']}" if z["topk_mode"] else ""
        weights = ", kept experts keep the original weights" if z.get("weights") == "original" else ""
        weights += ", zero logits relative to the best real one" if z.get("logits") == "relative" else ""
        lines.append(f"  zero experts  {z['num_zero']} per router, {z['layout']} layout{mode}{rule}{weights}")
        what = "at the measured skip rate" if z.get("skip_rate_measured") else "at skip rate"
        lines.append(f"  active/token  {what}: " + "; ".join(
            f"{100 * float(s):.0f}%: {a['experts']:.3g} experts, {_params(a['params'])}"
            for s, a in z["active"].items()))
    kept = [", ".join(d["kept"])] if d["kept"] else []
    if d.get("fp8_source"):
        lines.append(f"  source        {d['fp8_source']} (every tool reads it as that float model)")
    if q is None:
        lines += [
            f"  size on disk  {_gb(d['size_bytes'])} now; int8 ~{_gb(d['size_estimate_bytes']['int8'])}, "
            f"int4 ~{_gb(d['size_estimate_bytes']['int4'])}, int4 + int8 attention "
            f"~{_gb(d['size_estimate_bytes']['int4_attn8'])} (group {d['group_size_for_estimate']})",
            "  quantized     " + ", ".join(d["quantized"]),
        ]
        misfit = d.get("group_size_misfit")
        if misfit:
            advice = f"pass --group-size {misfit['fits']}" if misfit["fits"] else "pass --group-size -1 (per channel)"
            lines.append(f"  note          quantize's default group size {d['group_size_for_estimate']} does not divide "
                         f"{misfit['linear']}'s input dimension {misfit['dim']}: {advice}")
        kept[0] += " (routers bit-exact in the source dtype)"
    else:
        lines += [f"  quantization  already quantized: {_scheme(q)}", f"  size on disk  {_gb(d['size_bytes'])}"]
        if q["known"]:
            lines.append("  quantized     " + (", ".join(d["quantized"]) or "nothing"))
            for o in q.get("other_schemes") or []:
                group = "per-channel" if o["group_size"] is None else f"group {o['group_size']}"
                where = "" if len(o["layers"]) in (0, d["layers"]) else \
                    f" (layer{'s' if len(o['layers']) > 1 else ''} {', '.join(map(str, o['layers']))} only)"
                lines.append(f"  other scheme  int{o['bits']}, {group}: {', '.join(o['modules'])}{where}")
            kept[0] += " (float)"
    for g in d.get("awq_groups") or []:
        what = {"block": "MoE block output, routing fixed", "attention": "attention block output"}.get(
            g["loss"], "readers' output error")
        lines.append(f"  awq group     {g['source']} -> {', '.join(g['readers'])}"
                     f"{' (per expert)' if g['per_expert'] else ''}: {what}; scales {g['scales']}")
    if d.get("non_text"):  # `quantize` copies them byte for byte
        kept.append("carried through unchanged: " + ", ".join(d["non_text"]))
    if kept:
        lines.append("  kept          " + "; ".join(kept))
    return "\n".join(lines)
