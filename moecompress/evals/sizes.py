"""What a checkpoint costs on disk, and how many bits its quantized weights take.

Read from the safetensors headers (plus, for compressed-tensors, the tiny ``weight_shape`` tensors):
no weight is decoded.

``bits_per_weight`` is taken over the quantized linears only: every stored part of a quantized
weight -- packed codes, scales, zero points and ``g_idx`` (not biases, not ``weight_shape``
metadata) -- in bits, divided by the number of dense weights they stand for. W4 group 32 symmetric
with fp16/bf16 scales in compressed-tensors is 4 + 16/32 = 4.5; GPTQ adds its (always stored)
zero points, 4/32 per weight, and its ``g_idx``, 32 bits per input column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moecompress.checkpoint.dequant import quantized_modules, spec_from_config
from moecompress.checkpoint.fp8_source import Fp8SourceReader
from moecompress.checkpoint.reader import CheckpointReader
from moecompress.errors import UserError

_PARTS = {
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
}


def checkpoint_bytes(reader: CheckpointReader) -> int:
    """Bytes of the weight shards (the safetensors files)."""
    return reader.total_bytes()


def _dense_count(reader: CheckpointReader, fmt: str, bits: int, module: str) -> int:
    try:
        return _dense_count_of(reader, fmt, bits, module)
    except KeyError as e:  # a shard deleted or never downloaded
        raise UserError(f"{reader.path}: tensor {e.args[0]} is missing from the shards") from None


def _dense_count_of(reader: CheckpointReader, fmt: str, bits: int, module: str) -> int:
    if fmt == "compressed-tensors":
        shape = reader.get(f"{module}.weight_shape").tolist()
        return int(shape[0]) * int(shape[1])
    rows, n = reader.tensors[f"{module}.qweight"].shape
    if fmt == "awq":  # qweight [K, N*bits/32]: packed along N
        return rows * (n * 32 // bits)
    return rows * 32 // bits * n


_FLOATS = ("F64", "F32", "F16", "BF16")
_SIDECARS = ("weight_shape",)  # compressed-tensors metadata of a quantized linear, never resident


def resident_bytes(reader: CheckpointReader, dtype: torch.dtype, packed: bool, floor: bool = False,
                   keep=None) -> int:
    """About what the weights of ``reader``'s checkpoint take loaded whole in ``dtype`` (from the headers):
    float tensors at ``dtype``'s size; quantized linears as stored (``packed``: the CPU keeps them so) or
    dequantized to ``dtype``. ``floor``: a lower bound instead, each float tensor at the smaller of its stored
    size and ``dtype``'s (a loader may keep some, e.g. the embedding, as stored). ``keep``: a predicate on
    tensor names, the ones a load reads (``ModelHandle.whole_load_filter``: no MTP layer, vision tower or
    stock zero expert); every tensor without it."""
    fmt, spec, mods = quantized_modules(reader)
    if keep is not None:
        mods = [m for m in mods if keep(m + ".weight")]
    parts = _PARTS.get(fmt, ()) + _SIDECARS
    owned = {f"{m}.{p}" for m in mods for p in parts}
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, info in reader.tensors.items():
        if name in owned or (keep is not None and not keep(name)):
            continue
        if info.dtype not in _FLOATS:
            total += info.nbytes
        else:
            total += min(info.nbytes, math.prod(info.shape) * size) if floor else math.prod(info.shape) * size
    for m in mods:
        if packed:
            total += sum(reader.tensors[f"{m}.{p}"].nbytes for p in _PARTS[fmt] if f"{m}.{p}" in reader)
        else:
            total += _dense_count(reader, fmt, spec.of(m).bits, m) * size
    return total


def stored_reader(handle):
    """The reader the functions here take for ``handle`` (a ``ModelHandle``): the packed shards under a
    dequantizing view; an FP8 source's view as is (it counts as its float model, and knows its FP8 parts)."""
    from ..checkpoint.dequant_reader import DequantizingReader

    return handle.reader.inner if isinstance(handle.reader, DequantizingReader) else handle.reader


def model_bytes(handle, dtype: torch.dtype, packed: bool, floor: bool = False) -> int:
    """:func:`resident_bytes` of the checkpoint under ``handle`` (a ``ModelHandle``), counting only what a whole
    load reads (``handle.whole_load_filter``)."""
    return resident_bytes(stored_reader(handle), dtype, packed, floor, keep=handle.whole_load_filter())


def bits_per_weight(reader: CheckpointReader) -> float | None:
    """Stored bits per dense weight over the quantized linears; None for a float checkpoint."""
    if isinstance(reader, Fp8SourceReader):  # FP8 weights and their scales, over the weights
        raw = reader.inner.tensors
        stored = sum(raw[w].nbytes + raw[s].nbytes for w, (s, _) in reader.scales.items())
        return 8 * stored / max(sum(math.prod(raw[w].shape) for w in reader.scales), 1)
    fmt, spec, mods = quantized_modules(reader)
    if fmt is None or not mods:
        return None
    stored = dense = 0
    for m in mods:
        stored += 8 * sum(reader.tensors[f"{m}.{p}"].nbytes for p in _PARTS[fmt] if f"{m}.{p}" in reader)
        dense += _dense_count(reader, fmt, spec.of(m).bits, m)
    return stored / dense


def quantization_settings(reader: CheckpointReader) -> dict | None:
    """method, bits, group_size, symmetric, act_order, format -- from moecompress.json, else config.json."""
    if isinstance(reader, Fp8SourceReader):
        return {"method": "fp8", "bits": 8, "group_size": None, "symmetric": True, "act_order": None,
                "format": reader.scheme.method, "source": reader.describe()}
    qcfg = reader.config.get("quantization_config")
    if not qcfg:
        return None
    fmt, spec = spec_from_config(qcfg)
    out = {"method": None, "bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
           "act_order": spec.act_order, "format": fmt}
    try:
        recipe = json.loads((Path(reader.path) / "moecompress.json").read_text()).get("recipe") or {}
    except (OSError, ValueError, AttributeError):
        recipe = {}
    for key in ("method", "bits", "group_size", "symmetric", "act_order", "format"):
        if key in recipe:
            out[key] = recipe[key]
    if recipe.get("overrides"):  # per-module schemes (quantize --override)
        out["overrides"] = recipe["overrides"]
    return out
