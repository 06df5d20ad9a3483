"""Bit packing of unsigned integer codes into int32 words, shared by every export format.

``pack_along`` writes the elements along one dim as a dense little-endian bit stream: element ``i``
occupies bits ``[i*b, (i+1)*b)`` of the stream, word ``w`` holds stream bits ``[32w, 32w+32)`` with
the lowest stream bit in bit 0. For 2/4/8 bits this is the classic "``32/b`` values per word,
lowest bits first"; for 3 bits values straddle words. The same layout is what
compressed-tensors' ``pack_to_int32`` writes (after its ``+2**(b-1)`` offset, i.e. on our unsigned
codes) and what AutoGPTQ v1 wrote for ``qweight``/``qzeros`` (including its 3-bit scheme of 32
values in 3 words). Words are returned as int32 (bit 31 set -> negative), as both formats store
them.

AWQ GEMM packs along N in the interleaved order ``AWQ_PACK_ORDER``; ``awq_interleave`` permutes the
codes so that a plain ``pack_along`` produces that layout (``awq_deinterleave`` undoes it).
"""

from __future__ import annotations

import sys

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # bit slot i of an AWQ int32 holds column 8c + order[i]


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` values of ``bits`` bits: ``ceil(length*bits/32)``."""
    return -(-length * bits // 32)


def _slot_layout(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 elements of a block of ``bits`` words: (word, bit offset, low-part width)."""
    return [((i * bits) // 32, (i * bits) % 32, min(bits, 32 - (i * bits) % 32)) for i in range(32)]


def _bytewise(bits: int) -> bool:
    """2/4/8-bit codes never straddle a byte: on a little-endian host the stream is the words' own bytes,
    ``8 // bits`` codes a byte, lowest bits first (the general slot loop gives the same, ~10x slower)."""
    return bits in (2, 4, 8) and sys.byteorder == "little"


def _pack_bytes(v: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Codes ``[..., length]`` -> int32 words ``[..., ceil(length * bits / 32)]`` (see :func:`_bytewise`)."""
    per = 8 // bits
    nwords = packed_length(length, bits)
    v = v.to(torch.uint8)
    if nwords * 32 // bits != length:
        v = torch.nn.functional.pad(v, (0, nwords * 32 // bits - length))
    if per > 1:
        v = v.reshape(*v.shape[:-1], -1, per)
        b = v[..., 0].clone()
        for j in range(1, per):
            b |= v[..., j] << (j * bits)
        v = b
    return v.contiguous().view(-1).view(torch.int32).reshape(*v.shape[:-1], nwords)


def _unpack_bytes(p: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 words ``[..., W]`` -> ``length`` uint8 codes (see :func:`_bytewise`)."""
    b = p.contiguous().view(torch.uint8)
    if bits < 8:
        mask = (1 << bits) - 1
        b = torch.stack([(b >> s) & mask if s else b & mask for s in range(0, 8, bits)], -1).flatten(-2)
    return b[..., :length]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, not {bits}")


def pack_along(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, each in ``[0, 2**bits)``) along ``dim`` into int32.

    The result has the same shape except ``dim``, which becomes ``ceil(length*bits/32)``.
    Vectorized over all words; the Python loop runs over the 32 slot positions of a block.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"pack_along expects integer codes, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    dim = dim % values.dim()
    v = values.movedim(dim, -1)
    length = v.shape[-1]
    lead = v.shape[:-1]
    if _bytewise(bits):
        return _pack_bytes(v, bits, length).movedim(-1, dim).contiguous()
    nblocks = -(-length // 32)
    if nblocks * 32 != length:
        v = torch.nn.functional.pad(v, (0, nblocks * 32 - length))
    v = v.reshape(*lead, nblocks, 32)
    out = torch.zeros(*lead, nblocks, bits, dtype=torch.int64, device=v.device)
    for i, (word, offset, lo_bits) in enumerate(_slot_layout(bits)):
        x = v[..., i].to(torch.int64)
        out[..., word] |= (x & ((1 << lo_bits) - 1)) << offset
        if lo_bits < bits:  # the value straddles into the next word
            out[..., word + 1] |= x >> lo_bits
    out = out.reshape(*lead, nblocks * bits)[..., : packed_length(length, bits)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # two's complement
    return out.movedim(-1, dim).contiguous()


def unpack_along(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_along`: ``length`` uint8 codes along ``dim``."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    dim = dim % packed.dim()
    nwords = packed.shape[dim]
    if nwords != packed_length(length, bits):
        raise ValueError(f"{nwords} words cannot hold exactly {length} values of {bits} bits")
    if _bytewise(bits):
        return _unpack_bytes(packed.movedim(dim, -1), bits, length).movedim(-1, dim).contiguous()
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    lead = p.shape[:-1]
    nblocks = -(-nwords // bits)
    if nblocks * bits != nwords:
        p = torch.nn.functional.pad(p, (0, nblocks * bits - nwords))
    p = p.reshape(*lead, nblocks, bits)
    v = torch.empty(*lead, nblocks, 32, dtype=torch.uint8, device=p.device)
    for i, (word, offset, lo_bits) in enumerate(_slot_layout(bits)):
        x = (p[..., word] >> offset) & ((1 << lo_bits) - 1)
        if lo_bits < bits:
            x |= (p[..., word + 1] & ((1 << (bits - lo_bits)) - 1)) << lo_bits
        v[..., i] = x
    v = v.reshape(*lead, nblocks * 32)[..., :length]
    return v.movedim(-1, dim).contiguous()


def _awq_perm(length: int, device: torch.device) -> torch.Tensor:
    if length % 8:
        raise ValueError(f"AWQ interleaving needs a multiple of 8 values, got {length}")
    order = torch.tensor(AWQ_PACK_ORDER, device=device)
    return (torch.arange(0, length, 8, device=device)[:, None] + order[None, :]).reshape(-1)


def awq_interleave(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reorder along ``dim`` so that ``pack_along(result, 4, dim)`` is AutoAWQ's GEMM packing
    (slot ``i`` of each 8-value word holds column ``8c + AWQ_PACK_ORDER[i]``)."""
    return values.index_select(dim, _awq_perm(values.shape[dim], values.device))


def awq_deinterleave(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`awq_interleave` (apply to ``unpack_along`` of AWQ words)."""
    inv = torch.argsort(_awq_perm(values.shape[dim], values.device))
    return values.index_select(dim, inv)
