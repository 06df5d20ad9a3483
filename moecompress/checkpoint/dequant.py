"""Our own reader of the checkpoints `quantize` writes: dense float weights back from packed ones.

Used to check exports against third-party loaders, by the evaluator, and by the runtime's
reference path. Knows compressed-tensors ``pack-quantized``, GPTQ v1 and AWQ GEMM through the format
modules (ours and third-party checkpoints laid out the same: AutoAWQ/GPTQModel per-expert
``experts.{e}.gate_proj.qweight``...).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Schemes:
    """The scheme of each quantized module of a checkpoint: ``base`` unless a rule of the config names it.

    ``exact``: full module name -> scheme; ``patterns``: (regex tested with ``re.match``, scheme) in the order the
    loaders try them, the first match deciding (compressed-tensors: exact names, then regexes, then the class
    target's group; GPTQModel ``dynamic``: its rules in order)."""

    base: QuantSpec
    exact: dict = field(default_factory=dict)
    patterns: tuple = ()

    def of(self, module: str) -> QuantSpec:
        hit = self.exact.get(module)
        if hit is not None:
            return hit
        for rx, spec in self.patterns:
            if rx.match(module):
                return spec
        return self.base

    @property
    def mixed(self) -> bool:
        return bool(self.exact or self.patterns)


def spec_from_config(qcfg: dict) -> tuple[str, QuantSpec]:
    """(format, base QuantSpec) from a config.json ``quantization_config`` we know how to read."""
    fmt, schemes = schemes_from_config(qcfg)
    return fmt, schemes.base


def schemes_from_config(qcfg: dict) -> tuple[str, Schemes]:
    """(format, Schemes) from a config.json ``quantization_config`` we know how to read."""
    if not isinstance(qcfg, dict):
        raise UserError(f"config.json: quantization_config must be an object, not {type(qcfg).__name__}")
    try:
        return _schemes_from_config(qcfg)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of another type
        raise UserError(f"config.json: quantization_config ({qcfg.get('quant_method')!r}) is malformed "
                        f"({type(e).__name__}: {e})") from None
    except re.error as e:
        raise UserError(f"config.json: quantization_config ({qcfg.get('quant_method')!r}) has a rule that is not "
                        f"a regular expression ({e})") from None


def _ct_spec(w: dict) -> QuantSpec:
    if w.get("type", "int") != "int" or w.get("dynamic"):
        raise UserError(f"compressed-tensors weights of type {w.get('type')!r} (dynamic {w.get('dynamic')}) cannot "
                        "be read by moecompress (only static int weights, pack-quantized)")
    gs = w.get("group_size") if w.get("strategy") == "group" else None
    # llm-compressor writes "static" for what compressed-tensors 0.19+ calls "weight"
    order = {"static": "weight", "dynamic": "group"}.get(w.get("actorder"), w.get("actorder"))
    return QuantSpec(w["num_bits"], gs, w["symmetric"], order, (1.0,))


def _ct_schemes(qcfg: dict) -> Schemes:
    """One scheme per config group; a module takes the group of its exact name, else of the first regex that
    matches it (compressed-tensors sorts them by their text), else the group with a class target ("Linear")."""
    groups = list(qcfg.get("config_groups", {}).values())
    if not groups or qcfg.get("format") != "pack-quantized" or any(
            g.get("format", "pack-quantized") != "pack-quantized" for g in groups):
        raise UserError("only pack-quantized compressed-tensors checkpoints can be read")
    exact, regexes, classes = {}, [], []
    for g in groups:
        spec = _ct_spec(g["weights"])
        for t in g["targets"]:
            if t.startswith("re:"):
                regexes.append((t, spec))
            elif "." in t:
                exact[t] = spec
            else:
                classes.append(spec)
    if len(set(classes)) > 1:
        raise UserError("compressed-tensors config groups with different schemes for the same class target cannot "
                        "be read by moecompress")
    base = classes[0] if classes else _ct_spec(groups[0]["weights"])
    patterns = tuple((re.compile(t[3:]), spec) for t, spec in sorted(regexes, key=lambda x: x[0]))
    return Schemes(base, exact, patterns)


def _gptq_schemes(qcfg: dict) -> Schemes:
    """The base scheme, and GPTQModel's positive ``dynamic`` rules (``"+:regex"`` or a bare regex, with ``bits``/
    ``group_size``/``sym``/``desc_act``); negative ``"-:"`` rules name modules kept in float, which have no
    packed tensors to read."""
    gs = qcfg.get("group_size", 128)
    base = QuantSpec(qcfg["bits"], None if gs in (-1, None) else gs, qcfg.get("sym", True),
                     "group" if qcfg.get("desc_act") else None, (1.0,))
    patterns = []
    for key, values in (qcfg.get("dynamic") or {}).items():
        rx = re.compile(key.removeprefix("-:").removeprefix("+:"))
        if key.startswith("-:"):
            patterns.append((rx, base))  # a float module: never asked for (kept for the first-match order)
            continue
        values = values or {}
        g = values.get("group_size", -1 if base.group_size is None else base.group_size)
        order = base.act_order if "desc_act" not in values else ("group" if values["desc_act"] else None)
        patterns.append((rx, dataclasses.replace(base, bits=values.get("bits", base.bits),
                                                 group_size=None if g in (-1, None) else g,
                                                 symmetric=values.get("sym", base.symmetric), act_order=order)))
    return Schemes(base, {}, tuple(patterns))


def _schemes_from_config(qcfg: dict) -> tuple[str, Schemes]:
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors", _ct_schemes(qcfg)
    if method == "gptq":
        # v1 stores zero points minus one; gptq_v2 (GPTQModel's runtime layout) and marlin/bitblas repacks do not
        fmt = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()
        if fmt != "gptq":
            raise UserError(f"GPTQ checkpoints in format {fmt!r} cannot be read by moecompress (only GPTQ v1, "
                            "checkpoint_format 'gptq')")
        return "gptq", _gptq_schemes(qcfg)
    if method == "awq":
        version = str(qcfg.get("version", qcfg.get("format", "gemm"))).lower()
        if version != "gemm":
            raise UserError(f"AWQ checkpoints of version {version!r} cannot be read by moecompress (only 'gemm')")
        bits = qcfg.get("bits", qcfg.get("w_bit", 4))
        if bits != awq_format.BITS:
            raise UserError(f"{bits}-bit AWQ checkpoints cannot be read by moecompress (AWQ GEMM is 4-bit)")
        gs = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        # zero_point decides, as in AutoAWQ and vLLM: with it, loaders use the stored zero points (ours: 8 for a
        # symmetric weight, so the weights read back exactly; `inspect` labels our own output by moecompress.json)
        zero_point = qcfg.get("zero_point", not qcfg["sym"] if "sym" in qcfg else True)  # AutoAWQ's default
        if any(not k.startswith("-:") and v for k, v in (qcfg.get("dynamic") or {}).items()):
            raise UserError("AWQ checkpoints with per-module schemes (positive 'dynamic' rules) cannot be read by "
                            "moecompress")
        return "awq", Schemes(QuantSpec(bits, None if gs in (-1, None) else gs, not zero_point, None, (1.0,)))
    raise UserError(f"quantization method {method!r} cannot be read by moecompress")


def quantized_modules(reader: CheckpointReader) -> tuple[str | None, Schemes | None, list[str]]:
    qcfg = reader.config.get("quantization_config")
    if not qcfg:
        return None, None, []
    fmt, schemes = schemes_from_config(qcfg)
    mark = _CT_MARK if fmt == "compressed-tensors" else _GPTQ_MARK
    mods = [n[: -len(mark)] for n in reader.names() if n.endswith(mark)]
    return fmt, schemes, mods


def read_quantized(reader: CheckpointReader, fmt: str, schemes: Schemes | QuantSpec, module: str) -> QuantizedWeight:
    fmt_module = {"compressed-tensors": ct_format, "awq": awq_format}.get(fmt, gptq_format)
    suffixes = ("qweight", "qzeros", "scales", "g_idx") if fmt_module is gptq_format else fmt_module.SUFFIXES
    tensors = {s: reader.get(f"{module}.{s}") for s in suffixes if f"{module}.{s}" in reader}
    spec = schemes.of(module) if isinstance(schemes, Schemes) else schemes
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
