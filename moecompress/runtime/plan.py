"""`moecompress plan`: where each part of a MoE model lives when the GPU is small, and what decode costs.

Everything that every token reads -- embeddings, attention, norms, routers, shared experts, dense MLPs,
lm_head, the KV cache -- goes on the GPU first; the routed experts then fill what VRAM is left, the most
used first (``load``: each expert's share of the routed slots per layer, from ``eval``'s expert load, or
uniform). The others stay in host memory and run on the CPU (``runtime.cpu_packed``) in the same step.

Shapes come from the config alone (a meta model, no weights read): a 35B checkpoint can be planned
before it is downloaded. Sizes: quantized linears at ``bits`` with one bf16 scale (and a zero point when
asymmetric) per ``group``; everything else at ``float_bytes``.

Decode estimate, per token: a layer costs its GPU-resident reads (attention and the rest, plus the
expected reads of its GPU experts) over ``gpu_gbps``, and its CPU experts' expected reads over ``cpu_gbps``,
the two expert sides overlapping (``max``), plus a hidden-state round trip over PCIe when the layer has
CPU experts. Expected reads of expert e = P(e among a token's k) x its bytes, with P = k x its load share
(capped at 1). Memory-bound decode at batch 1 is the regime this models; compute is not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.reader import read_config
from ..errors import UserError
from ..quant.formats import fp8


@dataclass
class Part:
    name: str
    nbytes: int
    layer: int | None = None
    expert: int | None = None


@dataclass
class ModelParts:
    family: str
    dense: list[Part]  # read by every token
    experts: dict[int, list[int]]  # layer -> bytes of each routed expert
    top_k: int
    kv_bytes_per_token: int
    hidden: int
    max_positions: int | None = None  # the config's max_position_embeddings


@dataclass
class Placement:
    gpu_bytes: int
    cpu_bytes: int
    dense_bytes: int
    kv_bytes: int
    on_gpu: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts placed on the GPU
    per_layer: list[dict] = field(default_factory=list)
    decode_tokens_per_s: float = 0.0
    all_on_gpu_tokens_per_s: float = 0.0
    load_source: str = "uniform"


def _quant_bytes(numel: int, k: int, bits: int, group: int | None, asym: bool, scale_bytes: int = 2) -> int:
    groups = numel // (group or k)
    return numel * bits // 8 + groups * (scale_bytes + (1 if asym else 0))


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _packed_modules(path: Path) -> set[tuple[int, str]] | None:
    """``{(layer, layer-local module)}`` of the linears a quantized checkpoint's shards hold packed; None
    without shards (a config alone: planned by the config's settings)."""
    import re

    if not any(path.glob("*.safetensors")):
        return None
    from ..checkpoint.reader import CheckpointReader

    out = set()
    for n in CheckpointReader.open(path).names():
        m = re.search(r"\.layers\.(\d+)\.(.+)\.(weight_packed|qweight)$", n)
        if m:
            out.add((int(m.group(1)), m.group(2)))
    return out


def model_parts(config_dir: str | Path, bits: int = 4, group: int | None = 128, symmetric: bool = True,
                float_bytes: int | None = None, stored: bool = False) -> ModelParts:
    """Every tensor of the text model by its bytes, from ``config.json`` alone (``float_bytes``: the
    config's dtype, bf16 when it names none; quantization scales are stored in it too). A quantized checkpoint
    is planned at its own settings, its linears left in float (``--ignore``, ``--only-experts``) at float size;
    ``stored``: a float checkpoint as it runs (its weights in float, not at ``bits``)."""
    from transformers import AutoModelForCausalLM

    from ..arch.handle import check_routing_fields, read_hf_config
    from ..arch.registry import BY_MODEL_TYPE
    from ..zero.layout import read_zero_experts

    path = Path(config_dir)
    if path.is_file() and path.name == "config.json":  # the config itself
        path = path.parent
    raw = read_config(path)
    cfg_file = path / "config.json"
    spec = BY_MODEL_TYPE.get(raw.get("model_type"))
    if spec is None:
        raise UserError(f"{cfg_file}: model_type {raw.get('model_type')!r} is not a supported MoE family")
    qcfg = raw.get("quantization_config")
    if qcfg and fp8.scheme_from_config(qcfg) is None:  # quantized by us or a GPTQ/AWQ tool: its own settings
        from ..checkpoint.dequant import schemes_from_config

        _, schemes = schemes_from_config(qcfg)
        qs = schemes.base
        bits, group, symmetric = qs.bits, qs.group_size, qs.symmetric
    else:
        schemes = None
    packed = _packed_modules(path) if schemes is not None else None
    as_float = stored and schemes is None  # a float (or FP8-release) checkpoint, run as it is stored
    config = read_hf_config(path)
    text = getattr(config, spec.text_config_attr) if spec.text_config_attr else config
    zero = read_zero_experts(raw)
    check_routing_fields(text, spec, int(getattr(text, spec.num_experts_attr, 0) or 0) + (
        zero.num_zero if zero is not None and zero.layout == "native" else 0), path)
    if float_bytes is None:
        dt = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
        float_bytes = _DTYPE_BYTES.get(str(dt).removeprefix("torch."), 2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text, trust_remote_code=False)
    keep = set(spec.routers) | set(spec.keep_float)
    dense, experts = [], {}
    for name, p in model.named_parameters():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        local = name.split(f".layers.{layer}.", 1)[1] if layer is not None else name
        if local.startswith("mlp.experts."):
            e = p.shape[0]
            per = [p[0].numel() * float_bytes if as_float else
                   _quant_bytes(p[0].numel(), p.shape[-1], bits, group, not symmetric, float_bytes)] * e
            cur = experts.setdefault(layer, [0] * e)
            experts[layer] = [a + b for a, b in zip(cur, per)]
            continue
        module = local.rsplit(".", 1)[0]
        quantized = (p.dim() == 2 and layer is not None and module not in keep and local.endswith(".weight")
                     and "norm" not in module and "embed" not in module and not as_float
                     and (packed is None or (layer, module) in packed))
        own = schemes.of(name.rsplit(".", 1)[0]) if schemes is not None and quantized else None  # --override
        b, g, sym = (own.bits, own.group_size, own.symmetric) if own is not None else (bits, group, symmetric)
        nbytes = _quant_bytes(p.numel(), p.shape[-1], b, g, not sym, float_bytes) if quantized else \
            p.numel() * float_bytes
        dense.append(Part(name, nbytes, layer))
    heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if getattr(text, "kv_lora_rank", None):  # MLA caches the latent and the rope key
        per_layer = (text.kv_lora_rank + getattr(text, "qk_rope_head_dim", 0)) * float_bytes
    else:
        per_layer = 2 * heads * head_dim * float_bytes
    if getattr(text, "index_topk", None):  # DeepSeek-V3.2's sparse attention: its indexer's keys too
        per_layer += text.index_head_dim * float_bytes
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    attn_layers = sum(t != "linear_attention" for t in types)  # linear attention keeps a fixed state instead
    top_k = int(getattr(text, "num_experts_per_tok", 1))
    return ModelParts(raw.get("model_type"), dense, experts, top_k, per_layer * attn_layers, text.hidden_size,
                      getattr(text, "max_position_embeddings", None))


def plan(parts: ModelParts, vram_bytes: int, *, context: int = 4096, ram_bytes: int | None = None,
         load: dict[int, list[float]] | None = None, gpu_gbps: float = 300.0, cpu_gbps: float = 40.0,
         pcie_gbps: float = 16.0, reserve_bytes: int = 512 << 20, context_option: str | None = "--context") -> Placement:
    """Place the experts given ``vram_bytes``; UserError when even the non-expert part does not fit (naming
    ``context_option``, where the caller has one)."""
    dense = sum(p.nbytes for p in parts.dense)
    kv = parts.kv_bytes_per_token * context
    need = dense + kv + reserve_bytes
    if vram_bytes < need:
        shorter = context_option and kv >= need - vram_bytes  # a shorter context alone could make it fit
        raise UserError(f"--vram {_gib(vram_bytes)} is below what the non-expert part needs: {_gib(need)} "
                        f"(weights {_gib(dense)}, KV cache for {context} tokens {_gib(kv)}, scratch "
                        f"{_gib(reserve_bytes)}); give at least that"
                        + (f", or a shorter {context_option}" if shorter else ""))
    shares = _shares(parts, load)
    free = vram_bytes - need
    order = sorted(((p, layer, e) for layer, ps in shares.items() for e, p in enumerate(ps)),
                   key=lambda t: (-t[0], t[1], t[2]))
    placed: dict[int, list[int]] = {layer: [] for layer in parts.experts}
    gpu_exp = 0
    for p, layer, e in order:
        size = parts.experts[layer][e]
        if size <= free:
            placed[layer].append(e)
            free -= size
            gpu_exp += size
    cpu_exp = sum(sum(s) for s in parts.experts.values()) - gpu_exp
    if ram_bytes is not None and cpu_exp > ram_bytes:
        raise UserError(f"--ram {_gib(ram_bytes)} is below the {_gib(cpu_exp)} of experts left in host memory")
    out = Placement(dense + kv + gpu_exp, cpu_exp, dense, kv, {k: sorted(v) for k, v in placed.items()},
                    load_source="measured" if load else "uniform")
    out.decode_tokens_per_s, out.per_layer = _estimate(parts, shares, placed, gpu_gbps, cpu_gbps, pcie_gbps)
    everything = {layer: list(range(len(s))) for layer, s in parts.experts.items()}
    out.all_on_gpu_tokens_per_s, _ = _estimate(parts, shares, everything, gpu_gbps, cpu_gbps, pcie_gbps)
    return out


def estimate(parts: ModelParts, placed: dict[int, list[int]], *, load: dict[int, list[float]] | None = None,
             gpu_gbps: float = 300.0, cpu_gbps: float = 40.0, pcie_gbps: float = 16.0) -> tuple[float, list[dict]]:
    """The decode estimate (tokens/s at batch 1, per-layer rows) of a given placement ``{layer: experts on the
    GPU}`` (a layer not listed has all its experts on the CPU), e.g. to set beside a measured one."""
    return _estimate(parts, _shares(parts, load), placed, gpu_gbps, cpu_gbps, pcie_gbps)


def _shares(parts: ModelParts, load: dict[int, list[float]] | None) -> dict[int, list[float]]:
    """Per layer, each expert's P(among a token's k) = k x its load share (uniform without ``load``), capped at 1."""
    shares = {}
    for layer, sizes in parts.experts.items():
        row = (load or {}).get(layer)
        if row is None or len(row) != len(sizes) or sum(row) <= 0:
            row = [1.0] * len(sizes)
        tot = float(sum(row))
        shares[layer] = [min(1.0, parts.top_k * r / tot) for r in row]
    return shares


def _estimate(parts: ModelParts, shares, placed, gpu_gbps, cpu_gbps, pcie_gbps) -> tuple[float, list[dict]]:
    per_layer_dense: dict[int | None, int] = {}
    for p in parts.dense:
        per_layer_dense[p.layer] = per_layer_dense.get(p.layer, 0) + p.nbytes
    # outside the layers a token reads one embedding row (nothing, counted) and the whole lm_head and norm
    total = sum(p.nbytes for p in parts.dense if p.layer is None and "embed_tokens" not in p.name) / (gpu_gbps * 1e9)
    rows = []
    for layer in sorted(per_layer_dense.keys() - {None}):
        sizes, ps = parts.experts.get(layer, []), shares.get(layer, [])
        on = set(placed.get(layer, []))
        g = sum(ps[e] * sizes[e] for e in on)
        c = sum(ps[e] * sizes[e] for e in range(len(sizes)) if e not in on)
        hop = 2 * parts.hidden * 2 / (pcie_gbps * 1e9) + 20e-6 if c else 0.0
        t = per_layer_dense[layer] / (gpu_gbps * 1e9) + max(g / (gpu_gbps * 1e9), c / (cpu_gbps * 1e9)) + hop
        rows.append({"layer": layer, "experts_on_gpu": len(on), "experts": len(sizes),
                     "gpu_hit_share": g / max(g + c, 1e-30), "expert_read_bytes": g + c, "seconds": t})
        total += t
    return 1.0 / total, rows


def _gib(n: float) -> str:
    """A size with enough digits that two different ones print differently: GiB from 1 GiB, else MiB / KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def load_from_eval(path: str | Path, parts: ModelParts) -> dict[int, list[float]]:
    """Per-layer expert load shares from an ``eval`` JSON (the evaluated model's routing), which must be of a
    model with ``parts``' MoE layers and experts."""
    try:
        data = json.loads(Path(path).read_text())
        el = data["expert_load"]
        load = {int(layer): [float(x) for x in row] for layer, row in zip(el["layers"], el["model"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--load {path}: not an eval JSON with expert_load ({type(e).__name__}: {e})") from None
    for layer, sizes in parts.experts.items():
        row = load.get(layer)
        if row is None or len(row) != len(sizes):
            got = "no such layer" if row is None else f"{len(row)} experts"
            raise UserError(f"--load {path}: not this model's expert load (MoE layer {layer} has {len(sizes)} "
                            f"experts here; the eval JSON: {got})")
    return load


def render(pl: Placement, parts: ModelParts, vram: int) -> str:
    n_exp = sum(len(s) for s in parts.experts.values())
    n_gpu = sum(len(v) for v in pl.on_gpu.values())
    lines = [f"{parts.family}: {len(parts.experts)} MoE layers x {len(next(iter(parts.experts.values())))} experts "
             f"(top-{parts.top_k}); VRAM {_gib(vram)}",
             f"  GPU: non-expert weights {_gib(pl.dense_bytes)} + KV cache {_gib(pl.kv_bytes)} + {n_gpu} of "
             f"{n_exp} experts = {_gib(pl.gpu_bytes)}",
             f"  host: {n_exp - n_gpu} experts = {_gib(pl.cpu_bytes)} (they run on the CPU)",
             f"  expert load: {pl.load_source}; share of expert reads served by the GPU: "
             f"{gpu_read_share(pl):.0%}",
             f"  ESTIMATE decode at batch 1: {pl.decode_tokens_per_s:.1f} tokens/s "
             f"(everything on the GPU would be {pl.all_on_gpu_tokens_per_s:.1f})",
             "  layer  experts on GPU  GPU share of expert reads"]
    lines += [f"  {r['layer']:5d}  {r['experts_on_gpu']:5d} / {r['experts']:<5d}  {r['gpu_hit_share']:6.0%}"
              for r in pl.per_layer if r["experts"]]
    return "\n".join(lines)


def gpu_read_share(pl: Placement) -> float:
    """The share of a token's expected expert bytes read on the GPU, over the MoE layers (dense layers, which
    read no experts, do not count)."""
    total = sum(r["expert_read_bytes"] for r in pl.per_layer)
    return sum(r["gpu_hit_share"] * r["expert_read_bytes"] for r in pl.per_layer) / total if total else 0.0
