"""FP8 *source* checkpoints: read-only, dequantized to the model's float dtype on read.

DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and the official ``-FP8`` Qwen3 releases ship only FP8 weights; GLM's
and RedHat's FP8 releases use compressed-tensors. Two layouts, both e4m3 (or e5m2) weights next to a float
scale that multiplies them back (``w = q * s``, nothing else):

* ``quant_method: "fp8"`` (DeepSeek's and transformers' fine-grained FP8; ``weight_block_size`` [bm, bn],
  usually [128, 128]): ``X`` in F8 with ``X_scale_inv`` (``X.weight`` -> ``X.weight_scale_inv``, fused experts
  ``experts.gate_up_proj`` -> ``experts.gate_up_proj_scale_inv``) of shape ``[..., ceil(N/bm), ceil(K/bn)]``
  (``weight_scale_inv`` is, despite its name, the dequantization scale); a few checkpoints spell it ``X.scale``.
  Without ``weight_block_size`` the scale is per tensor. Scales stored as ``uint8`` are E8M0 exponents
  (``2**(b - 127)``), as transformers reads them.
* ``quant_method: "compressed-tensors"`` with ``format: "float-quantized"`` (or ``naive-quantized``) and float
  8-bit weights: ``X.weight`` with ``X.weight_scale`` per tensor ``[1]``, per channel ``[N, 1]``, per group
  ``[N, K/g]`` or per block ``[ceil(N/bm), ceil(K/bn)]`` (compressed-tensors' ``dequantize``: ``q * s``).

Activation and KV-cache scales (``input_scale``, ``activation_scale``, ``k_scale``, ``v_scale``) belong to the
FP8 serving path and are not part of the float model. The product is computed in float32 and rounded once
to the model's dtype, as transformers' ``Fp8Dequantize`` does, so an FP8 source reads exactly as its bf16
conversion (DeepSeek's ``fp8_cast_bf16.py``) would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import UserError

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# scale tensors and activation-side scales: hidden from the float view
ACTIVATION_SUFFIXES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale", ".output_scale")


@dataclass(frozen=True)
class Fp8Scheme:
    """How one FP8 source checkpoint stores its scales."""

    method: str  # "fp8" (fine-grained, DeepSeek) or "compressed-tensors"
    blocks: tuple[tuple[int, int], ...]  # the configured blocks (rows, columns); a scale grid is matched against
    # each, edge blocks partial (ceil); none, or none matching: the block is the weight's shape over the grid's
    scale_names: tuple[str, ...]  # sibling suffixes tried in order, appended to the weight's name
    label: str  # for ``inspect``

    def describe(self) -> str:
        return self.label


def _ct_blocks(weights: list[dict]) -> tuple[tuple[tuple[int, int], ...], str]:
    """compressed-tensors weight args -> (configured blocks, strategies)."""
    blocks, strategies = [], []
    for w in weights:
        strategy = w.get("strategy") or "tensor"
        strategies.append(strategy)
        if strategy == "block":
            b = w.get("block_structure")
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
                raise UserError(f"config.json: FP8 block_structure must be two positive integers, not {b!r}")
            blocks.append((int(b[0]), int(b[1])))
        elif strategy == "group":
            g = w.get("group_size")
            if not (isinstance(g, int) and g > 0):
                raise UserError(f"config.json: FP8 group strategy needs a positive group_size, not {g!r}")
            blocks.append((1, g))
        elif strategy not in ("tensor", "channel"):
            raise UserError(f"config.json: FP8 compressed-tensors strategy {strategy!r} cannot be read "
                            "(tensor, channel, group or block)")
    return tuple(dict.fromkeys(blocks)), ", ".join(dict.fromkeys(strategies))


def scheme_from_config(qcfg) -> Fp8Scheme | None:
    """The FP8 scheme of a config.json ``quantization_config``; None when it is not an FP8 one."""
    if not isinstance(qcfg, dict):
        return None
    method = qcfg.get("quant_method")
    if method == "fp8":
        fmt = str(qcfg.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "e5m2", "float8_e4m3fn", "float8_e5m2"):
            raise UserError(f"config.json: FP8 checkpoints of fmt {fmt!r} cannot be read (e4m3 or e5m2)")
        fmt = "e5m2" if "e5m2" in fmt else "e4m3"
        block = qcfg.get("weight_block_size")
        if block is None:
            return Fp8Scheme("fp8", (), ("_scale_inv", "_scale"), f"FP8 {fmt}, per tensor")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            raise UserError(f"config.json: weight_block_size must be two positive integers, not {block!r}")
        return Fp8Scheme("fp8", ((int(block[0]), int(block[1])),), ("_scale_inv", "_scale"),
                         f"FP8 {fmt}, {block[0]}x{block[1]} blocks")
    if method == "compressed-tensors" and qcfg.get("format") in ("float-quantized", "naive-quantized"):
        groups = list((qcfg.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups if isinstance(g, dict)]
        if not weights or any(w.get("type") != "float" or w.get("num_bits") != 8 for w in weights):
            return None  # an int naive-quantized checkpoint: not FP8 (the caller's own error applies)
        if any(w.get("symmetric") is False for w in weights):
            raise UserError("config.json: asymmetric FP8 compressed-tensors checkpoints cannot be read")
        blocks, strategies = _ct_blocks(weights)
        return Fp8Scheme("compressed-tensors", blocks, ("_scale",),
                         f"FP8 (compressed-tensors float-quantized, per {strategies})")
    return None


def scale_name(names, weight: str, scheme: Fp8Scheme) -> str | None:
    """The name of ``weight``'s scale among ``names`` (a set-like), or None."""
    for suffix in scheme.scale_names:
        if weight + suffix in names:
            return weight + suffix
    if weight.endswith(".weight") and weight[: -len("weight")] + "scale" in names:  # DeepSeek-V4-style ``X.scale``
        return weight[: -len("weight")] + "scale"
    return None


def block_of(shape: tuple[int, ...], scale_shape: tuple[int, ...], configured: tuple[tuple[int, int], ...],
             name: str) -> tuple[int, int]:
    """The (rows, columns) block one scale covers, checked against the weight's shape: a configured block whose
    grid (partial edge blocks included) is the scale's shape, else the weight's shape over the scale's when it
    divides (per channel, or another block that tiles exactly, as transformers derives it)."""
    n, k = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1] if shape else 1)
    s = tuple(scale_shape)
    if math.prod(s) == 1:  # one scale for the whole tensor
        return n, k
    if len(s) == 1:
        s = (s[0], 1)
    if len(s) != max(len(shape), 2) or tuple(s[:-2]) != tuple(shape[:-2]):
        raise UserError(f"FP8 checkpoint: scale of {name} has shape {tuple(scale_shape)}, which does not tile its "
                        f"weight of shape {tuple(shape)}")
    rows, cols = s[-2], s[-1]
    for bm, bn in configured:
        if (math.ceil(n / bm), math.ceil(k / bn)) == (rows, cols):
            return bm, bn
    if n % rows or k % cols:
        blocks = " or ".join(f"{bm}x{bn}" for bm, bn in configured)
        raise UserError(f"FP8 checkpoint: scale of {name} has shape {tuple(scale_shape)}, which does not tile its "
                        f"weight of shape {tuple(shape)}" + (f" in {blocks} blocks" if blocks else ""))
    return n // rows, k // cols


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as float32 (uint8 / float8_e8m0 scales are E8M0 exponents: ``2**(b - 127)``)."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


_LUTS: dict[torch.dtype, torch.Tensor] = {}
_TAKE_CHUNK = 1 << 22


def to_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.to(float32)`` of an FP8 tensor, exactly, by a 256-entry table (on a CPU 2.6x faster than torch's
    own conversion, which is not vectorized)."""
    if q.device.type != "cpu":
        return q.to(torch.float32)
    lut = _LUTS.get(q.dtype)
    if lut is None:
        lut = _LUTS[q.dtype] = torch.arange(256, dtype=torch.uint8).view(q.dtype).to(torch.float32)
    codes = q.contiguous().view(torch.uint8).reshape(-1)
    out = torch.empty(codes.numel(), dtype=torch.float32)
    for i in range(0, codes.numel(), _TAKE_CHUNK):  # the int64 index of a chunk, not of the whole tensor
        torch.take(lut, codes[i:i + _TAKE_CHUNK].long(), out=out[i:i + _TAKE_CHUNK])
    return out.reshape(q.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``q * s`` of an FP8 tensor ``q [..., N, K]`` and its per-block scale, in float32, rounded once to ``dtype``.

    ``block`` (bm, bn): scale ``[..., ceil(N/bm), ceil(K/bn)]``; partial blocks at the edges take their
    block's scale. Stacked experts go one at a time (the float32 product is one expert's, not the whole
    tensor's). A 1-D weight (rare: a bias stored in FP8) takes one scale."""
    s = scale_values(scale)
    if q.dim() < 2 or s.numel() == 1:
        return (to_float32(q) * s.reshape(())).to(dtype)
    if q.dim() > 2:  # fused experts [E, N, K]: one expert at a time, so the float32 product is one expert's
        s = s.reshape(*q.shape[:-2], *s.shape[-2:])
        out = torch.empty(q.shape, dtype=dtype)
        for e in range(q.shape[0]):
            out[e] = dequantize(q[e], s[e], block, dtype)
        return out
    n, k = q.shape
    bm, bn = block
    s = s.reshape(math.ceil(n / bm), math.ceil(k / bn))
    if n % bm == 0 and k % bn == 0:  # the common case: one broadcast multiply, no expanded scale
        qb = to_float32(q).reshape(n // bm, bm, k // bn, bn)
        return (qb * s[:, None, :, None]).to(dtype).reshape(n, k)
    full = s.repeat_interleave(bm, 0)[:n].repeat_interleave(bn, 1)[:, :k]
    return (to_float32(q) * full).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] | None,
             fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) of ``w [..., N, K]`` with one scale per ``block`` (None: per tensor), amax
    scaling as DeepSeek's and transformers' converters do. For building FP8 test checkpoints."""
    fmax = torch.finfo(fp8).max
    wf = w.to(torch.float32)
    if block is None:
        s = (wf.abs().amax() / fmax).clamp_min(1e-12)
        return (wf / s).clamp(-fmax, fmax).to(fp8), s.reshape(1)
    n, k = wf.shape[-2:]
    bm, bn = block
    rows, cols = math.ceil(n / bm), math.ceil(k / bn)
    pad = torch.nn.functional.pad(wf, (0, cols * bn - k, 0, rows * bm - n))
    blocks = pad.reshape(*wf.shape[:-2], rows, bm, cols, bn)
    s = (blocks.abs().amax(dim=(-3, -1)) / fmax).clamp_min(1e-12)  # [..., rows, cols]
    q = (blocks / s[..., :, None, :, None]).clamp(-fmax, fmax).to(fp8)
    q = q.reshape(*wf.shape[:-2], rows * bm, cols * bn)[..., :n, :k].contiguous()
    return q, s
