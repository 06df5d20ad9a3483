"""AWQ GEMM encoding of one linear (what AutoAWQ and GPTQModel write; vLLM, GPTQModel and transformers
read it), and its ``quantization_config``.

Per linear (``K`` inputs, ``N`` outputs, 4 bits, ``G`` groups):

* ``qweight`` int32 ``[K, N/8]``: the codes of input row ``k`` packed along the *output* dim, eight
  per word in AWQ's interleaved order -- bits ``4i..4i+3`` of word ``c`` hold output column
  ``8c + AWQ_PACK_ORDER[i]`` with ``AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (AutoAWQ's
  ``WQLinear_GEMM.from_linear``; GPTQModel's ``AwqGEMMLinear.pack`` and ``AwqTorchLinear.pack``);
* ``qzeros`` int32 ``[G, N/8]``: the zero points, packed the same way and stored **as is** (no
  minus one, unlike GPTQ v1): every loader computes ``(q - z) * s`` with the unpacked fields
  (AutoAWQ/GPTQModel ``dequantize_gemm``, vLLM's ``awq_dequantize`` and its Marlin repack);
* ``scales`` ``[G, N]``, fp16 (AutoAWQ) or bf16 (GPTQModel keeps a bf16 model's scales in bf16).

Symmetric weights are written as an ordinary AWQ checkpoint whose zero points are all ``2**(bits-1)``
(8), with ``zero_point: true`` (and ``sym: true``, which GPTQModel and transformers' ``AwqConfig`` read):
every loader then computes ``(q - 8) * s``, the symmetric dequantization. ``zero_point: false`` is a
spelling AutoAWQ never writes (its GEMM packer cannot run without zero points) and loaders treat it
apart: vLLM 0.32 hands its MoE kernels no zero points for it, and its CPU build crashes in the experts
(``bad optional access``, benchmarks/RESULTS.md). Checkpoints that say ``zero_point: false`` (GPTQModel's
symmetric AWQ) are read as symmetric, and only if every stored zero point is 8.

4-bit only (every AWQ GEMM packer and vLLM's AWQ MoE path are). Per-channel scales (a group of all
of K, ``group_size: -1``) are read but not written: vLLM's AWQ MoE method sizes its expert scales
as ``hidden_size // group_size``, which a ``-1`` breaks. There is no ``g_idx`` in this format.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ..pack import awq_deinterleave, awq_interleave, pack_along, unpack_along
from ..spec import QuantizedWeight, QuantSpec

SUFFIXES = ("qweight", "qzeros", "scales")
BITS = 4
PER_WORD = 32 // BITS  # output columns per int32 word

_SCALE_DTYPES = (torch.float16, torch.bfloat16)


def check_spec(spec: QuantSpec, *, writing: bool = True) -> None:
    """UserError for a scheme the AWQ GEMM format cannot hold."""
    if spec.bits != BITS:
        raise UserError(f"the AWQ GEMM format stores 4-bit weights only, not {spec.bits}-bit; "
                        "use --bits 4 or the compressed-tensors/GPTQ format")
    if spec.act_order == "group":
        raise UserError("act_order 'group' (permuted groups with a g_idx) cannot be stored in the AWQ format; "
                        "use act_order 'weight' or the GPTQ format")
    if writing and spec.group_size is None:
        raise UserError("the AWQ format is not written per-channel (vLLM's AWQ MoE kernels need a group size); "
                        "use a group size such as 128, or the compressed-tensors/GPTQ format")


def check_dims(n: int, k: int, name: str = "weight") -> None:
    """UserError when the output dim cannot be packed eight to a word."""
    if n % PER_WORD:
        raise UserError(f"the AWQ format packs output channels by {PER_WORD}; {name} has N={n} (K={k}); "
                        "export this weight in the compressed-tensors format or leave it unquantized")


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in: the model's fp16/bf16, fp16 for anything else (AWQ runs half)."""
    return dtype if dtype in _SCALE_DTYPES else torch.float16


def _pack(values: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` codes -> int32 ``[R, N/8]`` in AWQ's interleaved order."""
    return pack_along(awq_interleave(values, dim=1), BITS, dim=1)


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[R, N/8]`` -> uint8 codes ``[R, N]`` in natural column order."""
    return awq_deinterleave(unpack_along(words, BITS, dim=1, length=n), dim=1)


def encode_linear(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The suffix -> tensor map of one quantized linear (``<name>.<suffix>`` on disk).

    ``dtype`` is the model's float dtype; it picks the scale dtype (:func:`scale_dtype`).
    """
    spec = qw.spec
    check_spec(spec)
    if qw.g_idx is not None:
        raise UserError("this weight carries a g_idx (act-order with permuted groups); the AWQ format has none: "
                        "quantize with act_order 'weight' or null, or export the GPTQ format")
    if qw.qweight.dim() != 2:
        raise ValueError(f"encode_linear takes one linear [N, K], got shape {tuple(qw.qweight.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"scale dtype must be a float dtype, got {dtype}")
    n, k = qw.qweight.shape
    spec.check_shape(k)
    check_dims(n, k)
    g = k // spec.group_size
    if tuple(qw.scales.shape) != (n, g) or tuple(qw.zeros.shape) != (n, g):
        raise ValueError(f"scales/zeros must be [{n}, {g}], got {tuple(qw.scales.shape)}/{tuple(qw.zeros.shape)}")
    if spec.symmetric and not bool((qw.zeros == spec.sym_zero).all()):
        raise ValueError(f"symmetric weight with zero points other than {spec.sym_zero}")
    sdt = scale_dtype(dtype)
    scales = qw.scales.t().to(sdt)
    if not bool(torch.isfinite(scales).all()):
        raise UserError(f"a weight scale overflows {str(sdt).removeprefix('torch.')} (the AWQ format's scale dtype)")
    return {
        "qweight": _pack(qw.qweight.t()),
        "qzeros": _pack(qw.zeros.t()),  # raw zero points (symmetric: 8)
        "scales": scales.contiguous(),
    }


def decode_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read back one linear (ours or any AWQ GEMM checkpoint laid out the same; bias, if any, stays in ``tensors``)."""
    check_spec(spec, writing=False)
    for s in SUFFIXES:
        if s not in tensors:
            raise UserError(f"AWQ weight without its '{s}' tensor")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise UserError(f"AWQ tensors must be 2D, got qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                        f"scales {tuple(scales.shape)}")
    k, words = qweight.shape
    g, n = scales.shape
    if words * PER_WORD != n or tuple(qzeros.shape) != (g, words):
        raise UserError(f"inconsistent AWQ shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                        f"scales {tuple(scales.shape)} (expected [K, N/8], [G, N/8], [G, N])")
    expected_g = 1 if spec.group_size is None else k // spec.group_size
    if (spec.group_size is not None and k % spec.group_size) or g != expected_g:
        raise UserError(f"scales has {g} groups, expected {expected_g} for K={k} and group size {spec.group_size}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UserError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    q = _unpack(qweight, n).t().contiguous()
    zeros = _unpack(qzeros, n).t().contiguous()
    if spec.symmetric and not bool((zeros == spec.sym_zero).all()):
        raise UserError(f"the checkpoint says zero_point false (symmetric) but stores zero points other than "
                        f"{spec.sym_zero}; loaders would use the stored ones")
    return QuantizedWeight(q, scales.t().float().contiguous(), zeros, spec)


def quantization_config(spec: QuantSpec, modules_to_not_convert: list[str] | tuple[str, ...], *,
                        lm_head: bool = False, dynamic_rules: list[str] | tuple[str, ...] = ()) -> dict:
    """config.json's ``quantization_config`` for an AWQ GEMM checkpoint.

    ``modules_to_not_convert``: full names of every module kept in float (routers above all);
    transformers skips a module whose name starts (at a module boundary) or ends with an entry, vLLM
    one whose name contains an entry. ``dynamic_rules`` become GPTQModel ``dynamic`` negative matches
    (``"-:<regex>": {}``): GPTQModel builds its quantized modules from its own module tree and the
    ``dynamic`` field, not from ``modules_to_not_convert``.
    """
    check_spec(spec)
    return {
        "quant_method": "awq",
        "version": "gemm",  # AutoAWQ's / vLLM's and transformers' legacy field
        "format": "gemm",  # GPTQModel's and transformers' current field
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,  # the stored zero points are used by every loader (8 for a symmetric weight)
        "sym": spec.symmetric,  # GPTQModel and transformers' AwqConfig (a GPTQConfig) read it too
        "desc_act": False,
        "lm_head": lm_head,  # vLLM's and GPTQModel's switch for a quantized lm_head
        "modules_to_not_convert": list(dict.fromkeys(modules_to_not_convert)),
        "dynamic": {f"-:{rx}": {} for rx in dict.fromkeys(dynamic_rules)},
    }
