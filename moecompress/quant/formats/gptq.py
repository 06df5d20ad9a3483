"""GPTQ v1 encoding of one linear (what AutoGPTQ wrote; GPTQModel, vLLM and transformers read it),
and its ``quantize_config``.

Per linear: ``qweight`` int32 ``[K*b/32, N]`` (codes packed along K, lowest bits first, a dense bit
stream: AutoGPTQ's 3-bit layout of 32 values in 3 words, value 10 split 2+1 bits and value 21
split 1+2 bits across words, is exactly that stream), ``qzeros`` int32 ``[G, N*b/32]`` (zero points
packed along N, **stored minus one**), ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]`` and an
optional ``bias`` (fp16, as AutoGPTQ stored it). Loaders compute
``W[n, k] = scales[g_idx[k], n] * (q[k, n] - ((qzeros_field[g_idx[k], n] & mask) + 1))``.

Zero point 0 has no v1 encoding: AutoGPTQ stored ``-1`` unmasked (corrupting the other fields of the
word) and GPTQModel converts v1 to its internal v2 by adding ``0x11111111``-style constants to
whole words, which carries out of a field holding ``2**b - 1``. So stored fields must lie in
``[0, 2**b - 2]``. A group with ``z == 0`` whose codes all stay below ``qmax`` is re-expressed
exactly as ``(q + 1, z = 1)``; otherwise encoding raises a UserError.
"""

from __future__ import annotations

import re

import torch

from ...errors import UserError
from ..pack import pack_along, unpack_along
from ..spec import QuantizedWeight, QuantSpec

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _natural_g_idx(k: int, group: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(k, device=device) // group).to(torch.int32)


def check_dims(n: int, k: int, bits: int) -> None:
    if (k * bits) % 32 or (n * bits) % 32:
        raise UserError(
            f"GPTQ v1 needs K*bits and N*bits to be multiples of 32 (K={k}, N={n}, bits={bits}); "
            "export this weight in the compressed-tensors format or leave it unquantized"
        )


def _lift_zero_points(q: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor, qmax: int):
    """Rewrite groups with z == 0 as (q + 1, z = 1) when exact; UserError otherwise."""
    bad = z == 0
    if not bool(bad.any()):
        return q, z
    rows = bad.any(dim=1).nonzero().squeeze(1)  # only the rows concerned
    idx = g_idx.long().expand(len(rows), -1)
    gmax = torch.zeros(len(rows), z.shape[1], dtype=torch.int64, device=q.device)
    gmax.scatter_reduce_(1, idx, q[rows].long(), reduce="amax")
    cnt = int((bad[rows] & (gmax >= qmax)).sum())
    if cnt:
        raise UserError(
            f"{cnt} group(s) have zero point 0 and use code {qmax}: GPTQ v1 cannot store that (zero points "
            "are written minus one); use symmetric quantization or the compressed-tensors format"
        )
    shift = bad[rows].to(torch.uint8)
    q, z = q.clone(), z + bad.to(torch.uint8)
    q[rows] += torch.gather(shift, 1, idx)
    return q, z


def encode_linear(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The suffix -> tensor map of one quantized linear (``<name>.<suffix>`` on disk)."""
    spec = qw.spec
    if qw.qweight.dim() != 2:
        raise ValueError(f"encode_linear takes one linear [N, K], got shape {tuple(qw.qweight.shape)}")
    n, k = qw.qweight.shape
    spec.check_shape(k)
    check_dims(n, k, spec.bits)
    g = 1 if spec.group_size is None else k // spec.group_size
    if tuple(qw.scales.shape) != (n, g) or tuple(qw.zeros.shape) != (n, g):
        raise ValueError(f"scales/zeros must be [{n}, {g}], got {tuple(qw.scales.shape)}/{tuple(qw.zeros.shape)}")
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32)
        if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
            raise ValueError(f"g_idx must be [{k}] with values in [0, {g})")
    else:
        g_idx = _natural_g_idx(k, spec.group_for(k), qw.qweight.device)
    q, z = qw.qweight, qw.zeros
    if spec.symmetric and not bool((z == spec.sym_zero).all()):
        raise ValueError(f"symmetric weight with zero points other than {spec.sym_zero}")
    q, z = _lift_zero_points(q, z, g_idx, spec.qmax)
    scales = qw.scales.t().to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise UserError("a weight scale overflows float16 (GPTQ stores fp16 scales)")
    out = {
        "qweight": pack_along(q.t(), spec.bits, dim=0),
        "qzeros": pack_along((z - 1).t(), spec.bits, dim=1),
        "scales": scales.contiguous(),
        "g_idx": g_idx.contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def decode_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read back one linear (bias, if any, is left in ``tensors``).

    The g_idx is kept only when it is not ``k // group_size`` (or when ``spec.act_order == "group"``).
    """
    b = spec.bits
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g, n = scales.shape
    k = qweight.shape[0] * 32 // b
    check_dims(n, k, b)
    if qweight.shape != (k * b // 32, n) or qzeros.shape != (g, n * b // 32):
        raise UserError(f"inconsistent GPTQ shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                        f"scales {tuple(scales.shape)} for {b} bits")
    expected_g = 1 if spec.group_size is None else k // spec.group_size
    if g != expected_g:
        raise UserError(f"scales has {g} groups, expected {expected_g} for group size {spec.group_size}")
    q = unpack_along(qweight, b, dim=0, length=k).t().contiguous()
    stored = unpack_along(qzeros, b, dim=1, length=n).t().contiguous()
    if bool((stored == spec.qmax).any()):
        raise UserError(f"a GPTQ v1 zero point decodes to {1 << b} (stored {spec.qmax}): not representable; "
                        "the checkpoint was probably written with the v1 zero-point underflow")
    zeros = stored + 1
    g_idx = tensors.get("g_idx")
    natural = _natural_g_idx(k, spec.group_for(k), q.device)
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if torch.equal(g_idx, natural) and spec.act_order != "group":
            g_idx = None
    elif spec.act_order == "group":
        g_idx = natural
    return QuantizedWeight(q, scales.t().float().contiguous(), zeros, spec, g_idx)


def exact_name_regex(name: str) -> str:
    """A regex matching exactly the module ``name`` (loaders use ``re.match`` on the full name)."""
    return re.escape(name) + "$"


def quantize_config(
    spec: QuantSpec,
    ignore_regexes: list[str] | tuple[str, ...] = (),
    *,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    lm_head: bool = False,
    positive: dict[str, QuantSpec] | None = None,
) -> dict:
    """quantize_config.json (also config.json's ``quantization_config``) for a GPTQ v1 checkpoint.

    ``ignore_regexes`` become GPTQModel ``dynamic`` negative rules ``"-:<regex>": {}``; GPTQModel's
    ``dynamic_get`` and vLLM's ``get_dynamic_override`` test them with ``re.match`` (anchored at the
    start only) on the full module name, e.g. ``r".*mlp\\.gate$"``. ``positive``: ``{regex: spec}`` of modules
    quantized with another scheme, written as positive rules ``"+:<regex>": {"bits": .., "group_size": ..}``
    (both read the first rule that matches; the two kinds match disjoint modules).
    """
    for rx in ignore_regexes:
        try:
            re.compile(rx)
        except re.error as e:
            raise UserError(f"invalid ignore regex {rx!r}: {e}") from e
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": -1 if spec.group_size is None else spec.group_size,
        "desc_act": spec.act_order == "group",
        "sym": spec.symmetric,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "static_groups": False,
        "lm_head": lm_head,  # vLLM's and GPTQModel's switch for a quantized lm_head
        "dynamic": {**{f"-:{rx}": {} for rx in dict.fromkeys(ignore_regexes)},
                    **{f"+:{rx}": dynamic_override(s, spec) for rx, s in (positive or {}).items()}},
    }


def dynamic_override(spec: QuantSpec, base: QuantSpec) -> dict:
    """A positive ``dynamic`` rule's values: the fields where ``spec`` differs from ``base``."""
    out = {}
    if spec.bits != base.bits:
        out["bits"] = spec.bits
    if spec.group_size != base.group_size:
        out["group_size"] = -1 if spec.group_size is None else spec.group_size
    return out
