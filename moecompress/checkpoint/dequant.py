"""Our own reader of the checkpoints `quantize` writes: dense float weights back from packed ones.

Used to check exports against third-party loaders, by the evaluator, and by the runtime's
reference path. Knows compressed-tensors ``pack-quantized``, GPTQ v1 and AWQ GEMM through the format
modules (ours and third-party checkpoints laid out the same: AutoAWQ/GPTQModel per-expert
``experts.{e}.gate_proj.qweight``...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..quant.formats import awq as awq_format
from ..quant.formats import compressed_tensors as ct_format
from ..quant.formats import gptq as gptq_format
from ..quant.spec import QuantizedWeight, QuantSpec
from .reader import CheckpointReader
from .writer import ShardedWriter, copy_side_files

_CT_MARK, _GPTQ_MARK = ".weight_packed", ".qweight"


def spec_from_config(qcfg: dict) -> tuple[str, QuantSpec]:
    """(format, QuantSpec) from a config.json ``quantization_config`` we know how to read."""
    if not isinstance(qcfg, dict):
        raise UserError(f"config.json: quantization_config must be an object, not {type(qcfg).__name__}")
    try:
        return _spec_from_config(qcfg)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of another type
        raise UserError(f"config.json: quantization_config ({qcfg.get('quant_method')!r}) is malformed "
                        f"({type(e).__name__}: {e})") from None


def _spec_from_config(qcfg: dict) -> tuple[str, QuantSpec]:
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        groups = list(qcfg.get("config_groups", {}).values())
        if len(groups) != 1 or qcfg.get("format") != "pack-quantized":
            raise UserError("only single-scheme pack-quantized compressed-tensors checkpoints can be read")
        w = groups[0]["weights"]
        gs = w.get("group_size") if w.get("strategy") == "group" else None
        # llm-compressor writes "static" for what compressed-tensors 0.19+ calls "weight"
        order = {"static": "weight", "dynamic": "group"}.get(w.get("actorder"), w.get("actorder"))
        return "compressed-tensors", QuantSpec(w["num_bits"], gs, w["symmetric"], order, (1.0,))
    if method == "gptq":
        gs = qcfg.get("group_size", 128)
        return "gptq", QuantSpec(qcfg["bits"], None if gs in (-1, None) else gs, qcfg.get("sym", True),
                                 "group" if qcfg.get("desc_act") else None, (1.0,))
    if method == "awq":
        version = str(qcfg.get("version", qcfg.get("format", "gemm"))).lower()
        if version != "gemm":
            raise UserError(f"AWQ checkpoints of version {version!r} cannot be read by moecompress (only 'gemm')")
        bits = qcfg.get("bits", qcfg.get("w_bit", 4))
        if bits != awq_format.BITS:
            raise UserError(f"{bits}-bit AWQ checkpoints cannot be read by moecompress (AWQ GEMM is 4-bit)")
        gs = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        zero_point = qcfg.get("zero_point", not qcfg["sym"] if "sym" in qcfg else True)  # AutoAWQ's default
        return "awq", QuantSpec(bits, None if gs in (-1, None) else gs, not zero_point, None, (1.0,))
    raise UserError(f"quantization method {method!r} cannot be read by moecompress")


def quantized_modules(reader: CheckpointReader) -> tuple[str | None, QuantSpec | None, list[str]]:
    qcfg = reader.config.get("quantization_config")
    if not qcfg:
        return None, None, []
    fmt, spec = spec_from_config(qcfg)
    mark = _CT_MARK if fmt == "compressed-tensors" else _GPTQ_MARK
    mods = [n[: -len(mark)] for n in reader.names() if n.endswith(mark)]
    return fmt, spec, mods


def read_quantized(reader: CheckpointReader, fmt: str, spec: QuantSpec, module: str) -> QuantizedWeight:
    fmt_module = {"compressed-tensors": ct_format, "awq": awq_format}.get(fmt, gptq_format)
    suffixes = ("qweight", "qzeros", "scales", "g_idx") if fmt_module is gptq_format else fmt_module.SUFFIXES
    tensors = {s: reader.get(f"{module}.{s}") for s in suffixes if f"{module}.{s}" in reader}
    return fmt_module.decode_linear(tensors, spec)


def dequantized_state(path: str | Path, dtype: torch.dtype = torch.float32):
    """Yield ``(name, tensor)`` of a dense checkpoint equivalent to ``path`` (quantized linears dequantized)."""
    reader = CheckpointReader.open(path)
    fmt, spec, mods = quantized_modules(reader)
    owned = set()
    for m in mods:
        qw = read_quantized(reader, fmt, spec, m)
        owned.update(f"{m}.{s}" for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                           "qweight", "qzeros", "scales", "g_idx"))
        yield f"{m}.weight", qw.dequantize(dtype)
    for n in reader.names():
        if n not in owned:
            t = reader.get(n)
            yield n, t.to(dtype) if t.is_floating_point() else t


def write_dequantized(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a plain float checkpoint with the dequantized weights of ``src`` (for any HF loader)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst)
    try:
        for name, t in dequantized_state(src, dtype):
            writer.add(name, t)
    except BaseException:
        writer.abort()  # no half-written spill file left in dst
        raise
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, dst)
    return dst
