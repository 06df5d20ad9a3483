"""compressed-tensors ``pack-quantized`` encoding of one linear, and its ``quantization_config``.

Checked against compressed-tensors 0.20 (``compressors/pack_quantized/{base,helpers}.py``):
``PackedQuantizationCompressor.compress`` stores ``weight_packed = pack_to_int32(q_signed, b)``
(int32 ``[N, ceil(K*b/32)]``, dense bit stream along K after adding ``2**(b-1)``),
``weight_shape = torch.tensor(weight.shape)`` (int64), ``weight_scale`` as is, and for asymmetric
group/channel ``weight_zero_point = pack_to_int32(zp_signed, b, packed_dim=0)`` (int32
``[ceil(N*b/32), G]``); symmetric drops the zero point. Dequantization is
``(q_signed - zp_signed) * scale`` computed in the scale's dtype. Our unsigned codes are exactly the
offset values CT packs (``q = q_signed + 2**(b-1)``, ``z = zp_signed + 2**(b-1)``, symmetric
``z = 2**(b-1)``), so we pack them directly. There is no ``g_idx`` in this format.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ..pack import pack_along, packed_length, unpack_along
from ..spec import QuantizedWeight, QuantSpec

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _check_supported(spec: QuantSpec) -> None:
    if spec.act_order == "group":
        raise UserError(
            "act_order='group' (permuted groups with a g_idx) cannot be stored in the compressed-tensors "
            "format: compressed-tensors only knows actorder null or 'weight'; use act_order 'weight' or "
            "export the GPTQ format"
        )


def encode_linear(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The suffix -> tensor map of one quantized linear (``<name>.<suffix>`` on disk).

    ``dtype`` is the model's float dtype, used for ``weight_scale``.
    """
    spec = qw.spec
    _check_supported(spec)
    if qw.g_idx is not None:
        raise UserError(
            "this weight carries a g_idx (act-order with permuted groups); compressed-tensors has no g_idx: "
            "quantize with act_order 'weight' or null, or export the GPTQ format"
        )
    if qw.qweight.dim() != 2:
        raise ValueError(f"encode_linear takes one linear [N, K], got shape {tuple(qw.qweight.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"scale dtype must be a float dtype, got {dtype}")
    n, k = qw.qweight.shape
    spec.check_shape(k)
    g = 1 if spec.group_size is None else k // spec.group_size
    if tuple(qw.scales.shape) != (n, g) or tuple(qw.zeros.shape) != (n, g):
        raise ValueError(f"scales/zeros must be [{n}, {g}], got {tuple(qw.scales.shape)}/{tuple(qw.zeros.shape)}")
    scale = qw.scales.to(dtype)
    if not bool(torch.isfinite(scale).all()):
        raise UserError(f"a weight scale overflows {dtype}; export in a wider dtype")
    out = {
        "weight_packed": pack_along(qw.qweight, spec.bits, dim=1),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if spec.symmetric:
        if not bool((qw.zeros == spec.sym_zero).all()):
            raise ValueError(f"symmetric weight with zero points other than {spec.sym_zero}")
    else:
        out["weight_zero_point"] = pack_along(qw.zeros, spec.bits, dim=0)
    return out


def decode_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read back one linear from its suffix -> tensor map (our own reader; no g_idx)."""
    _check_supported(spec)
    n, k = (int(x) for x in tensors["weight_shape"].tolist())
    packed = tensors["weight_packed"]
    if tuple(packed.shape) != (n, packed_length(k, spec.bits)):
        raise UserError(f"weight_packed has shape {tuple(packed.shape)}, expected [{n}, {packed_length(k, spec.bits)}]")
    scales = tensors["weight_scale"].float()
    g = 1 if spec.group_size is None else k // spec.group_size
    if tuple(scales.shape) != (n, g):
        raise UserError(f"weight_scale has shape {tuple(scales.shape)}, expected [{n}, {g}]")
    q = unpack_along(packed, spec.bits, dim=1, length=k)
    if spec.symmetric:
        zeros = torch.full((n, g), spec.sym_zero, dtype=torch.uint8, device=q.device)
    else:
        if "weight_zero_point" not in tensors:
            raise UserError("asymmetric compressed-tensors weight without weight_zero_point")
        zeros = unpack_along(tensors["weight_zero_point"], spec.bits, dim=0, length=n)
    return QuantizedWeight(q, scales.contiguous(), zeros, spec)


def weights_args(spec: QuantSpec) -> dict:
    """The ``weights`` QuantizationArgs of a config group, as compressed-tensors 0.20 serializes it.

    CT 0.20's ``QuantizationArgs`` serializer omits ``observer``/``observer_kwargs``/``zp_dtype``
    unless set explicitly, and ``actorder``/``block_structure``/``scale_dtype`` when None; we write
    ``actorder`` explicitly (null or "weight"), which it accepts.
    """
    _check_supported(spec)
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": spec.group_size,
        "strategy": "channel" if spec.group_size is None else "group",
        "dynamic": False,
        "actorder": spec.act_order,  # None or "weight"
    }


def quantization_config(spec: QuantSpec, ignore: list[str], targets: list[str] | None = None,
                        others: list[tuple[QuantSpec, list[str]]] = ()) -> dict:
    """config.json's ``quantization_config`` for a ``pack-quantized`` checkpoint.

    ``ignore``: full names of every module a ``targets`` rule would match but that stays in float
    (routers, ``shared_expert_gate``, ``lm_head``, ...). ``others``: (scheme, ``re:`` targets) of modules
    quantized with another scheme than ``spec``, one config group each (``override_{j}``), written before
    ``group_0``: compressed-tensors' loader marks a target as used at the first one a module matches, in the
    groups' order, and warns about the others; which scheme applies does not depend on the order (a name
    target wins over a class target, in compressed-tensors and in vLLM). The weights' float dtype is not
    part of the config: loaders take the scale dtype from the checkpoint/model.
    """
    def group(s: QuantSpec, t: list[str]) -> dict:
        return {"targets": t, "weights": weights_args(s), "input_activations": None, "output_activations": None,
                "format": "pack-quantized"}

    groups = {f"override_{j}": group(s, list(t)) for j, (s, t) in enumerate(others)}
    groups["group_0"] = group(spec, list(targets) if targets is not None else ["Linear"])
    return {
        "config_groups": groups,
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "ignore": list(dict.fromkeys(ignore)),
    }
