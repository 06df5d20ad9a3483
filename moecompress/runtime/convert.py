"""Build the runtime's model from a checkpoint: transformers' modules with our MoE blocks and packed linears.

The checkpoint is read through the family adapter one decoder layer at a time (``open_model``):
each layer is materialized on the CPU with dequantized float weights, converted, then moved to the
device, so the peak host memory is one float layer. Conversion:

* every sparse-MoE block becomes a :class:`~moecompress.runtime.moe.MoEBlock` (router weight and
  correction bias re-read from the checkpoint in fp32; dense leading layers stay dense MLPs);
* on the kernel path, every linear the checkpoint stores quantized (int4/int8, no act-order
  permutation, a group the kernels can chunk) is repacked for the kernels -- attention, shared
  experts and the routed experts alike; anything else keeps its dequantized float weight. On the CPU
  path (``packed_cpu``, the default) every quantized linear stays packed too (:mod:`.cpu_packed`: torch's
  CPU int4/int8 kernels where the layout fits, codes dequantized per call otherwise), so resident memory
  is about the checkpoint's size; ``packed_cpu=False`` dequantizes once here (the fp32 reference);
* RMSNorms become one fused op (:mod:`.norms`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.handle import ModelHandle, decoder_layers
from ..arch.registry import supported_families
from ..checkpoint.dequant import read_quantized
from ..checkpoint.dequant_reader import DequantizingReader
from ..checkpoint.load import materialize_outer, open_model
from ..errors import UserError
from ..memory import release_freed_memory
from ..kernels.packing import QuantWeights, repack_for_kernel
from .cpu_packed import CpuExperts, CpuQuantLinear, LazyExpertWeights
from .moe import Experts, MoEBlock, Routing
from .offload import SplitExperts, subset
from .attention import wrap_decode_attention
from .norms import fuse_rmsnorms
from .qlinear import PackedWeight, QuantLinear

log = logging.getLogger("moecompress.runtime")

RUNTIME_FAMILIES = tuple(supported_families())
_SCALE_SUFFIX = {"compressed-tensors": "weight_scale", "gptq": "scales", "awq": "scales"}
_SCALE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ConversionReport:
    """What the loader built: the compute dtype, which quantized tensors run packed or dequantized, fused norms."""

    dtype: torch.dtype = torch.float32
    quant_format: str | None = None
    packed_linears: int = 0
    packed_expert_layers: int = 0
    fused_norms: int = 0
    fast_attention: int = 0  # decoder layers whose one-token attention runs the fast path (runtime.attention)
    dequantized: list[str] = field(default_factory=list)  # quantized on disk, run as float (with why)
    cpu_kinds: dict = field(default_factory=dict)  # CPU packed linears by kind (int4pack / int8pack / codes)
    cpu_fallbacks: dict = field(default_factory=dict)  # why -> modules that could not use a CPU kernel
    offloaded_experts: int = 0  # routed experts kept in host memory, run on the CPU


CPU_WEIGHTS = ("packed", "exact", "dequantized")
# experts converted between two heap trims: without them, glibc keeps the freed decode temporaries of a whole
# layer resident (+1.3 GB for a 128-expert Qwen3-30B-A3B layer, on top of its 300 MB packed; with them the load
# peaks 1.2 GB lower, for ~5% more load time)
TRIM_EVERY = 16


def load_runtime_model(path, device: torch.device, dtype: torch.dtype | None, use_kernels: bool,
                       cpu_weights: str = "packed", offload: dict[int, list[int]] | None = None,
                       ) -> tuple[ModelHandle, nn.Module, ConversionReport]:
    """(handle, eval-mode causal LM ready for the runtime, report); dtype None: the checkpoint's.

    ``cpu_weights`` (CPU path): "packed" (torch's int4/int8 CPU kernels where they fit), "exact" (packed
    codes, fp32 math: the dequantized numbers), "dequantized" (fp32 weights, the reference).
    ``offload``: per MoE layer, the routed experts that live on ``device``; the others stay in host memory
    and run on the CPU (:mod:`.offload`; with a CPU ``device`` this simulates the split)."""
    if cpu_weights not in CPU_WEIGHTS:
        raise UserError(f"cpu_weights must be one of {', '.join(CPU_WEIGHTS)}, not {cpu_weights!r}")
    handle, model = open_model(path, experts_implementation="eager")
    if offload is None:  # with offload the placement decides what goes where (``moecompress plan``)
        _check_fits(path, handle, device, dtype,
                    packed=use_kernels or (device.type == "cpu" and cpu_weights != "dequantized"))
    if handle.family not in RUNTIME_FAMILIES:
        raise UserError(f"the runtime does not support the '{handle.family}' family yet; "
                        f"it runs {', '.join(RUNTIME_FAMILIES)}")
    act = getattr(handle.text_config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"the runtime's expert MLPs use SiLU gating; this checkpoint uses '{act}'")
    model.config._attn_implementation = "sdpa"
    dtype = dtype or handle.float_dtype
    report = ConversionReport(dtype=dtype)
    reader = handle.reader
    packer = _Packer(reader, dtype) if use_kernels and isinstance(reader, DequantizingReader) else None
    cpu = reader if (not use_kernels and cpu_weights != "dequantized" and device.type == "cpu"
                     and isinstance(reader, DequantizingReader)) else None
    exact = cpu_weights == "exact"
    if isinstance(reader, DequantizingReader):
        report.quant_format = reader.fmt
    routing = Routing.from_config(handle.spec, handle.text_config, handle.top_k, handle.zero)

    materialize_outer(handle, model, device, dtype)
    if cpu is not None and not exact:
        _stored_dtype_outer(handle, model)
    for i, layer in enumerate(decoder_layers(model)):
        # the CPU path reads quantized experts packed itself: their float copy would only be thrown away
        handle.load_layer(model, i, torch.device("cpu"), dtype,
                          skip_experts=cpu is not None and quantized_expert_names(handle, cpu, i) is not None)
        if packer is not None:
            _pack_linears(handle, packer, i, layer, report)
        elif cpu is not None:
            _pack_linears_cpu(handle, cpu, i, layer, report, exact)
        if _is_moe(layer.mlp):
            layer.mlp = _moe_block(handle, i, layer.mlp, routing, packer, use_kernels, report, cpu, exact,
                                   None if offload is None else offload.get(i))
        layer.to(device)
        if cpu is not None:  # the layer's float copy is gone: give its pages back, so RSS stays near the packed size
            release_freed_memory()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{path}: '{n}' was not loaded (still on the meta device)")
    report.fused_norms = fuse_rmsnorms(model)
    if device.type == "cpu" and not use_kernels:
        rowmajor_linears(model)
        report.fast_attention = wrap_decode_attention(model, list(decoder_layers(model)))
        release_freed_memory()  # the re-laid copies' old pages (RSS stays near the weights' size)
    for why, mods in report.cpu_fallbacks.items():  # one line per reason, naming the first modules
        log.warning("runtime: %d quantized linears run dequantized per call (%s): %s%s", len(mods), why,
                    ", ".join(mods[:3]), " ..." if len(mods) > 3 else "")
    if report.dequantized:
        log.info("runtime: %d quantized tensors run dequantized (first: %s)", len(report.dequantized),
                 report.dequantized[0])
    return handle, model.eval(), report


def _check_fits(path, handle: ModelHandle, device: torch.device, dtype: torch.dtype | None, packed: bool) -> None:
    """One line before loading where even a lower bound of the weights' size (quantized ones as stored when
    ``packed``, floats at the smaller of their stored size and ``dtype``'s) exceeds the device's free memory:
    an out-of-memory kill says nothing."""
    from .. import memory
    from ..evals.sizes import model_bytes

    need = model_bytes(handle, dtype or torch.bfloat16, packed, floor=True)
    free = memory.available_bytes(device)
    if need > free:
        hint = ("on a GPU, --offload-experts keeps some experts in host memory (see moecompress plan)"
                if device.type == "cuda" else "a quantized checkpoint stays packed on a CPU (--cpu-weights packed)")
        raise UserError(f"{path}: its weights need at least {need / 2**30:.1f} GiB and {device} has "
                        f"{free / 2**30:.1f} GiB free; {hint}")


def rowmajor_linears(model: nn.Module) -> int:
    """Store every fp32 ``nn.Linear`` weight transposed in memory (row-major ``[in, out]``, seen as the usual
    ``[out, in]``): ``F.linear`` then multiplies by a row-major matrix, which the CPU BLAS runs faster for a
    decode token (16.5 vs 9.1 us for the wide demo model's lm_head, 37.6 vs 39.3 ms for a 151936 x 2048
    one) and no slower for a prefill. bf16 weights stay as they are (there the transposed layout is 2.2x
    slower at a real lm_head's size), and so does a weight shared with another module (a tied lm_head).
    Returns how many were re-laid."""
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    done = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is nn.Linear and w.dtype == torch.float32 and w.dim() == 2 and id(w) not in shared and w.is_contiguous():
            m.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
            done += 1
    return done


def _is_moe(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def _moe_block(handle: ModelHandle, i: int, mlp: nn.Module, routing: Routing, packer: "_Packer | None",
               use_kernels: bool, report: ConversionReport, cpu: DequantizingReader | None = None,
               exact: bool = False, near: list[int] | None = None) -> MoEBlock:
    pre = handle.layer_prefix(i)
    reader = handle.reader
    router = reader.get(handle.source_name(i, "mlp.gate.weight")).float()
    bias = None
    if handle.spec.bias_name is not None:  # ERNIE stores it [1, E]
        bias = reader.get(handle.source_name(i, handle.spec.bias_name)).float().reshape(-1)
    logit_bias = None
    if handle.zero is not None:
        zname = handle.source_name(i, "mlp.gate.zero_expert_bias")
        if zname is not None:
            logit_bias = torch.cat([torch.zeros(handle.num_experts), reader.get(zname).float()])
    w13: torch.Tensor | PackedWeight = mlp.experts.gate_up_proj.data
    w2: torch.Tensor | PackedWeight = mlp.experts.down_proj.data
    if packer is not None:
        names = [handle.expert_source_names(i, e) for e in range(w13.shape[0])]
        p13 = packer.pack([[g, u] for g, u, _ in names], f"{pre}experts gate/up", report)
        p2 = packer.pack([[d] for _, _, d in names], f"{pre}experts down", report) if p13 is not None else None
        if p13 is not None and p2 is not None:
            w13, w2 = PackedWeight(p13), PackedWeight(p2)
            report.packed_expert_layers += 1
    experts = _cpu_experts(handle, cpu, i, report, exact) if cpu is not None else None
    if experts is None:
        experts = Experts(w13, w2, use_kernels)
    if near is not None:
        experts = _split(handle, i, mlp, experts, sorted(set(near)), cpu, exact, report)
    shared = None
    if handle.spec.shared_expert is not None:
        shared = mlp.get_submodule(handle.spec.shared_expert.removeprefix("mlp."))
    gates = [r.removeprefix("mlp.") for r in handle.spec.routers if r != "mlp.gate" and r.startswith("mlp.")]
    shared_gate = mlp.get_submodule(gates[0]) if gates else None
    return MoEBlock(router, bias, experts, routing, shared, shared_gate, logit_bias)


class _StoredEmbedding(nn.Module):
    """An embedding kept in its stored dtype (bf16): the rows it returns are cast to the run's dtype, exactly."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        self.weight, self.out_dtype = nn.Parameter(weight, requires_grad=False), out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)


class _StoredHead(nn.Module):
    """lm_head kept in its stored dtype (bf16): hidden states go in rounded to it, like the packed linears'."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        self.weight, self.out_dtype = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
            weight, requires_grad=False), out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # row-major [V, H]: for bf16 the CPU's F.linear is 2.2x faster so than against a row-major transpose
        # at a real head's size (32000 x 2048: 4.8 vs 10.7 ms), though slower on a toy's (52 vs 33 us)
        return F.linear(x.to(self.weight.dtype), self.weight).to(self.out_dtype)


def _stored_dtype_outer(handle: ModelHandle, model: nn.Module) -> None:
    """Packed CPU runs: the embedding and lm_head stay in the checkpoint's half-precision dtype (half the
    memory of the fp32 copies; the embedding's rows are exact, the head sees bf16 inputs)."""
    stored = handle.float_dtype
    run = model.model.embed_tokens.weight.dtype
    if stored.itemsize >= run.itemsize:
        return
    emb = _StoredEmbedding(model.model.embed_tokens.weight.data.to(stored), run)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens = emb
    model.lm_head = _StoredHead(emb.weight if tied else model.lm_head.weight.data.to(stored), run)


def _split(handle: ModelHandle, i: int, mlp: nn.Module, experts: nn.Module, near: list[int],
           cpu: DequantizingReader | None, exact: bool, report: ConversionReport) -> SplitExperts:
    """``near`` experts stay where the layer goes; the rest run on the CPU (packed when quantized)."""
    n = handle.num_experts
    if any(e < 0 or e >= n for e in near):
        raise UserError(f"layer {i}: the offload placement names experts outside 0..{n - 1}")
    far_ids = [e for e in range(n) if e not in set(near)]
    packed = None
    if cpu is not None or not isinstance(experts, Experts) or not experts.use_kernels:
        packed = experts  # already CPU-side (the split is simulated on a CPU run)
    elif isinstance(handle.reader, DequantizingReader):
        packed = _cpu_experts(handle, handle.reader, i, report, exact)
    if packed is not None:
        far = subset(packed, far_ids)
    else:  # float experts for the CPU side: only the far ones are copied (into the torch path's layout)
        idx = torch.tensor(far_ids, dtype=torch.long)
        far = Experts(mlp.experts.gate_up_proj.data[idx], mlp.experts.down_proj.data[idx], False)
    report.offloaded_experts += len(far_ids)
    return SplitExperts(subset(experts, near), far, near, n)


def _cpu_linear(reader: DequantizingReader, module: str, bias: torch.Tensor | None,
                report: ConversionReport, exact: bool = False) -> CpuQuantLinear:
    qw = read_quantized(reader.inner, reader.fmt, reader.spec, module)
    spec = qw.spec
    lin = CpuQuantLinear(qw.qweight, qw.scales, qw.zeros, spec.bits, spec.group_size or qw.qweight.shape[-1],
                         qw.g_idx, bias, symmetric=spec.symmetric, exact=exact)
    _count(report, lin, module)
    return lin


def _count(report: ConversionReport, lin: CpuQuantLinear, module: str) -> None:
    report.cpu_kinds[lin.kind] = report.cpu_kinds.get(lin.kind, 0) + 1
    if lin.why is not None:
        report.cpu_fallbacks.setdefault(lin.why, []).append(module)


def _pack_linears_cpu(handle: ModelHandle, reader: DequantizingReader, i: int, layer: nn.Module,
                      report: ConversionReport, exact: bool = False) -> None:
    for name, mod in list(layer.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        disk = (handle.source_name(i, name + ".weight") or "").removesuffix(".weight")
        if disk in reader.modules:
            layer.set_submodule(name, _cpu_linear(reader, disk, None if mod.bias is None else mod.bias.data, report,
                                                  exact))
            report.packed_linears += 1


def quantized_expert_names(handle: ModelHandle, reader: DequantizingReader, i: int,
                           n: int | None = None) -> list[tuple[str, str, str]] | None:
    """(gate, up, down) source module names of layer i's first ``n`` (default: all) routed experts if every one
    is quantized in ``reader``, else None (a dense layer, float experts)."""
    names = [handle.expert_source_names(i, e) for e in range(handle.num_experts if n is None else n)]
    if not names or not all(m in reader.modules for row in names for m in row):
        return None
    # one scheme for all of them (a third-party checkpoint's per-module rules could split them): else dense
    return names if len({reader.spec.of(m) for row in names for m in row}) == 1 else None


def _cpu_experts(handle: ModelHandle, reader: DequantizingReader, i: int, report: ConversionReport,
                 exact: bool = False) -> CpuExperts | None:
    """The layer's routed experts as packed CPU linears (gate and up fused along N), or None if not quantized."""
    names = quantized_expert_names(handle, reader, i)
    if names is None:
        return None
    gate_up, down = [], []
    for j, (g, u, d) in enumerate(names):
        if j and j % TRIM_EVERY == 0:
            release_freed_memory()  # each expert's decode temporaries: heap holes a long layer would pile up
        a, b = (read_quantized(reader.inner, reader.fmt, reader.spec, m) for m in (g, u))
        if a.g_idx is None and b.g_idx is None and a.spec == b.spec:
            spec = a.spec
            lin = CpuQuantLinear(torch.cat([a.qweight, b.qweight]), torch.cat([a.scales, b.scales]),
                                 torch.cat([a.zeros, b.zeros]), spec.bits, spec.group_size or a.qweight.shape[-1],
                                 None, None, symmetric=spec.symmetric, exact=exact)
            _count(report, lin, f"{g} + {u}")
        else:  # each its own act-order permutation: two linears, outputs concatenated
            lin = _Concat([_cpu_linear(reader, g, None, report, exact), _cpu_linear(reader, u, None, report, exact)])
        gate_up.append(lin)
        down.append(_cpu_linear(reader, d, None, report, exact))
    report.packed_expert_layers += 1
    return CpuExperts(gate_up, down)


def exact_expert_names(handle: ModelHandle, i: int, layer: nn.Module) -> list[tuple[str, str, str]] | None:
    """The source names of a transformers decoder layer's fused experts if :func:`pack_layer_exact` keeps them
    packed (all quantized), else None."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return None
    return quantized_expert_names(handle, handle.reader, i, experts.gate_up_proj.shape[0])


def pack_layer_exact(handle: ModelHandle, i: int, layer: nn.Module, dtype: torch.dtype) -> None:
    """Keep a transformers decoder layer's quantized weights packed (dequantized when used, same numbers):
    linears become ``CpuQuantLinear(exact)``, the fused experts' parameters ``LazyExpertWeights``."""
    reader = handle.reader
    _pack_linears_cpu(handle, reader, i, layer, ConversionReport(), exact=True)
    names = exact_expert_names(handle, i, layer)
    if names is None:
        return
    experts = layer.mlp.experts
    spec = reader.spec.of(names[0][0])  # one for all of them (quantized_expert_names)

    def stacked(col: int) -> tuple:
        qs = [read_quantized(reader.inner, reader.fmt, spec, row[col]) for row in names]
        g = None if qs[0].g_idx is None else torch.stack([q.group_index() for q in qs])
        return (torch.stack([q.qweight for q in qs]), torch.stack([q.scales for q in qs]),
                torch.stack([q.zeros for q in qs]), g)

    group = spec.group_size or experts.gate_up_proj.shape[-1]
    gate_up = LazyExpertWeights([stacked(0), stacked(1)], spec.bits, group, dtype)
    down = LazyExpertWeights([stacked(2)], spec.bits, spec.group_size or experts.down_proj.shape[-1], dtype)
    del experts.gate_up_proj, experts.down_proj
    experts.gate_up_proj, experts.down_proj = gate_up, down


class _Concat(nn.Module):
    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _pack_linears(handle: ModelHandle, packer: "_Packer", i: int, layer: nn.Module,
                  report: ConversionReport) -> None:
    for name, mod in list(layer.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        disk = (handle.source_name(i, name + ".weight") or "").removesuffix(".weight")
        if disk not in packer.modules:
            continue
        qw = packer.pack([[disk]], disk, report, batched=False)
        if qw is not None:
            bias = None if mod.bias is None else mod.bias.data
            layer.set_submodule(name, QuantLinear(qw, bias))
            report.packed_linears += 1


class _Packer:
    """Reads quantized linears in canonical form and repacks them for the kernels."""

    def __init__(self, reader: DequantizingReader, dtype: torch.dtype) -> None:
        self.reader = reader
        self.modules = reader.modules
        self.dtype = dtype

    def pack(self, rows: list[list[str]], what: str, report: ConversionReport,
             batched: bool = True) -> QuantWeights | None:
        """Pack ``rows`` (per batch member, modules concatenated along N) as ``[B, N, K]``, or ``[N, K]``
        for one unbatched row; None (and a note in ``report``) when the kernels cannot run them."""
        flat = [m for row in rows for m in row]
        if any(m not in self.modules for m in flat):
            if any(m in self.modules for m in flat):
                report.dequantized.append(f"{what} (partly quantized)")
            return None
        specs = {self.reader.spec.of(m) for m in flat}
        if len(specs) > 1:
            report.dequantized.append(f"{what} (parts with different schemes)")
            return None
        spec = specs.pop()
        if spec.bits not in (4, 8):
            report.dequantized.append(f"{what} ({spec.bits}-bit: the kernels run 4 and 8 bits)")
            return None
        parts = [[read_quantized(self.reader.inner, self.reader.fmt, spec, m) for m in row] for row in rows]
        if any(p.g_idx is not None for row in parts for p in row):
            report.dequantized.append(f"{what} (act-order group index)")
            return None
        q, s, z = (torch.stack([torch.cat([getattr(p, a) for p in row]) for row in parts])
                   for a in ("qweight", "scales", "zeros"))
        if not batched:
            q, s, z = q[0], s[0], z[0]
        try:
            # symmetric=None: detected from the zero points (AWQ stores a symmetric weight's as 8s)
            return repack_for_kernel(q, s, z, spec.bits, spec.group_size, symmetric=None,
                                     scale_dtype=self._scale_dtype(flat[0]))
        except ValueError as e:
            report.dequantized.append(f"{what} ({e})")
            return None

    def _scale_dtype(self, module: str) -> torch.dtype:
        """The dtype the checkpoint stores scales in (exact), or fp32 for fp32 runs."""
        if self.dtype == torch.float32:
            return torch.float32
        info = self.reader.inner.tensors.get(f"{module}.{_SCALE_SUFFIX[self.reader.fmt]}")
        return _SCALE_DTYPES.get(info.dtype if info else "BF16", torch.bfloat16)
