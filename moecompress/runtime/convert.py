"""Build the runtime's model from a checkpoint: transformers' modules with our MoE blocks and packed linears.

The checkpoint is read through the family adapter one decoder layer at a time (``open_model``):
each layer is materialized on the CPU with dequantized float weights, converted, then moved to the
device, so the peak host memory is one float layer. Conversion:

* every sparse-MoE block becomes a :class:`~moecompress.runtime.moe.MoEBlock` (router weight and
  correction bias re-read from the checkpoint in fp32; dense leading layers stay dense MLPs);
* on the kernel path, every linear the checkpoint stores quantized (int4/int8, no act-order
  permutation, a group the kernels can chunk) is repacked for the kernels -- attention, shared
  experts and the routed experts alike; anything else keeps its dequantized float weight. The CPU
  path keeps float weights only (dequantized once here);
* RMSNorms become one fused op (:mod:`.norms`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.handle import ModelHandle, decoder_layers
from ..checkpoint.dequant import read_quantized
from ..checkpoint.load import DequantizingReader, materialize_outer, open_model
from ..errors import UserError
from ..kernels.packing import QuantWeights, repack_for_kernel
from .moe import Experts, MoEBlock, Routing
from .norms import fuse_rmsnorms
from .qlinear import PackedWeight, QuantLinear

log = logging.getLogger("moecompress.runtime")

RUNTIME_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_5_moe",
                    "glm4_moe_lite")
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
    dequantized: list[str] = field(default_factory=list)  # quantized on disk, run as float (with why)


def load_runtime_model(path, device: torch.device, dtype: torch.dtype | None,
                       use_kernels: bool) -> tuple[ModelHandle, nn.Module, ConversionReport]:
    """(handle, eval-mode causal LM ready for the runtime, report); dtype None: the checkpoint's."""
    handle, model = open_model(path, experts_implementation="eager")
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
    if isinstance(reader, DequantizingReader):
        report.quant_format = reader.fmt
    routing = Routing.from_config(handle.text_config, handle.top_k, handle.spec.scoring, handle.zero)

    materialize_outer(handle, model, device, dtype)
    for i, layer in enumerate(decoder_layers(model)):
        handle.load_layer(model, i, torch.device("cpu"), dtype)
        if packer is not None:
            _pack_linears(handle, packer, i, layer, report)
        if _is_moe(layer.mlp):
            layer.mlp = _moe_block(handle, i, layer.mlp, routing, packer, use_kernels, report)
        layer.to(device)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{path}: '{n}' was not loaded (still on the meta device)")
    report.fused_norms = fuse_rmsnorms(model)
    if report.dequantized:
        log.info("runtime: %d quantized tensors run dequantized (first: %s)", len(report.dequantized),
                 report.dequantized[0])
    return handle, model.eval(), report


def _is_moe(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def _moe_block(handle: ModelHandle, i: int, mlp: nn.Module, routing: Routing, packer: "_Packer | None",
               use_kernels: bool, report: ConversionReport) -> MoEBlock:
    pre = handle.layer_prefix(i)
    reader = handle.reader
    router = reader.get(handle.source_name(i, "mlp.gate.weight")).float()
    bias = None
    if getattr(mlp.gate, "e_score_correction_bias", None) is not None:
        bias = reader.get(handle.source_name(i, "mlp.gate.e_score_correction_bias")).float()
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
    shared = None
    if handle.spec.shared_expert is not None:
        shared = mlp.get_submodule(handle.spec.shared_expert.removeprefix("mlp."))
    gates = [r.removeprefix("mlp.") for r in handle.spec.routers if r != "mlp.gate" and r.startswith("mlp.")]
    shared_gate = mlp.get_submodule(gates[0]) if gates else None
    return MoEBlock(router, bias, Experts(w13, w2, use_kernels), routing, shared, shared_gate, logit_bias)


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
        spec = self.reader.spec
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
            return repack_for_kernel(q, s, z, spec.bits, spec.group_size, symmetric=spec.symmetric,
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
