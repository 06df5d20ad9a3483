"""The weight layout the quantized kernels read, and the one-time repack from the canonical layout.

Canonical (moecompress.quant.spec): uint8 codes ``q [..., N, K]`` in ``[0, 2**bits - 1]``, float32
``scales [..., N, G]``, uint8 ``zeros [..., N, G]``, ``W = scale * (q - z)`` with ``g(k) = k // group_size``.

Kernel layout (:class:`QuantWeights`), decided once at load time:

* K is cut into chunks of ``pack_k`` columns: the largest power of two <= 128 dividing both the
  group size and K (128 for group 128, 32 for group 32; per-channel weights use ``group_size = K``).
  A chunk never straddles a quantization group, so the kernel applies one scale vector per chunk
  *after* the chunk's dot product (integer-valued weights go into the tensor cores, scales are
  applied in fp32 to the [BLOCK_M, BLOCK_N] partial sum).
* int8: ``qweight [..., N, K]`` uint8, the codes unchanged.
* int4: ``qweight [..., N, K // 2]`` uint8, two codes per byte *split by half chunk*: byte ``j`` of
  chunk ``c`` holds column ``c*pack_k + j`` in its low nibble and ``c*pack_k + pack_k/2 + j`` in its high
  nibble. The kernel loads a contiguous ``[pack_k/2, BLOCK_N]`` byte tile (vectorized, no duplicated
  addresses) and multiplies the low nibbles against the first half of the activation chunk and the
  high nibbles against the second half, both contiguous too. (The usual "k//2 with a shift" scheme
  makes every lane load the same byte twice and defeats vectorized loads; with this layout the
  sm_90 build streams the weight tiles with 16-byte cp.async, see moecompress/kernels/compile_check.py.)
* ``scales [..., N, G]`` in ``scale_dtype`` (default bf16: half the bytes of fp32 on a memory-bound
  decode; pass float32 to keep the canonical scales exactly).
* ``zeros [..., N, G]`` uint8, or None for a symmetric scheme (z = 2**(bits-1) is a kernel constant, so
  symmetric weights carry no zero-point traffic at all).

act-order with a permuted ``g_idx`` is not representable: apply the permutation to the activations
(or re-order K) before repacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
MAX_PACK_K = 128
MIN_PACK_K = 32  # int4 dots half a chunk: tl.dot needs K >= 16


@dataclass(frozen=True)
class QuantWeights:
    """Group-quantized weights ``[..., N, K]`` in the kernel layout described in the module docstring."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    k: int  # logical input dimension (qweight's last dim is k // 2 for int4)

    @property
    def n(self) -> int:
        return self.qweight.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., N, K]``."""
        return (*self.qweight.shape[:-1], self.k)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def pack_k(self) -> int:
        return pack_chunk(self.k, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """The uint8 codes ``[..., N, K]`` in natural column order."""
        if self.bits == 8:
            return self.qweight
        return unpack_int4(self.qweight, self.pack_k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W = scale * (q - z)`` ``[..., N, K]``, computed in float32 from exactly what the kernel reads."""
        q = self.codes().float()
        s = self.scales.float().repeat_interleave(self.group_size, dim=-1)
        if self.zeros is None:
            z = float(1 << (self.bits - 1))
        else:
            z = self.zeros.float().repeat_interleave(self.group_size, dim=-1)
        return (s * (q - z)).to(dtype)


def pack_chunk(k: int, group_size: int) -> int:
    """Columns per packing/dequant chunk: a power of two dividing both the group and K."""
    c = 1 << (min(group_size, MAX_PACK_K).bit_length() - 1)  # largest power of two <= both
    while c > 1 and (k % c or group_size % c):
        c //= 2
    if c < MIN_PACK_K:
        raise ValueError(
            f"K={k} with group size {group_size}: the kernels need a power-of-two chunk >= {MIN_PACK_K} "
            f"dividing both (group sizes 32/64/128, K a multiple of 32)"
        )
    return c


def pack_int4(q: torch.Tensor, pack_k: int) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (values < 16) -> ``[..., K // 2]`` half-chunk-split bytes."""
    *lead, k = q.shape
    c = q.reshape(*lead, k // pack_k, 2, pack_k // 2).to(torch.uint8)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*lead, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor, pack_k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    *lead, kh = packed.shape
    b = packed.reshape(*lead, (2 * kh) // pack_k, 1, pack_k // 2)
    return torch.cat([b & 0xF, b >> 4], dim=-2).reshape(*lead, 2 * kh)


def repack_for_kernel(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    *,
    symmetric: bool | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantWeights:
    """Canonical ``(qweight uint8 [..., N, K], scales [..., N, G], zeros [..., N, G])`` -> :class:`QuantWeights`.

    Done once at load time. ``symmetric=None`` detects it: zeros None or all equal to ``2**(bits-1)``
    (then no zero tensor is kept). ``group_size=None`` means per-channel (one group of K).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"kernels support bits in {SUPPORTED_BITS}, not {bits}")
    *lead, n, k = qweight.shape
    gs = k if group_size is None else int(group_size)
    if k % gs:
        raise ValueError(f"group size {gs} does not divide K={k}")
    g = k // gs
    if tuple(scales.shape) != (*lead, n, g):
        raise ValueError(f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)} / group {gs}")
    sym_z = 1 << (bits - 1)
    if symmetric is None:
        symmetric = zeros is None or bool((zeros == sym_z).all())
    if symmetric and zeros is not None and not bool((zeros == sym_z).all()):
        raise ValueError(f"symmetric=True but zeros are not all {sym_z}")
    if not symmetric:
        if zeros is None or tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError("an asymmetric scheme needs zeros shaped like scales")
        zeros = zeros.to(torch.uint8).contiguous()
    else:
        zeros = None
    q = qweight.to(torch.uint8)
    pk = pack_chunk(k, gs)
    packed = pack_int4(q, pk) if bits == 4 else q.contiguous()
    return QuantWeights(packed, scales.to(scale_dtype).contiguous(), zeros, bits, gs, k)


def from_quantized(qw, *, scale_dtype: torch.dtype = torch.bfloat16) -> QuantWeights:
    """Repack a ``moecompress.quant.spec.QuantizedWeight`` (duck-typed to keep kernels import-light)."""
    if getattr(qw, "g_idx", None) is not None:
        raise ValueError("act-order with g_idx is not supported by the kernels; permute K first")
    spec = qw.spec
    return repack_for_kernel(
        qw.qweight, qw.scales, qw.zeros, spec.bits, spec.group_size, symmetric=spec.symmetric, scale_dtype=scale_dtype
    )
