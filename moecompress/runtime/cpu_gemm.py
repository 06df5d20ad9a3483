"""Many rows through a packed CPU linear: dequantize the weight to bf16 once, then one bf16 GEMM.

torch's CPU weight-only kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) work row by row:
their time grows linearly with the rows (2 cores, a 4096 x 2048 int4 weight: ~0.12 ms a row, 73 ms for 512).
That is right for decode (one row a step) and wrong for a prompt, an expert that many tokens reach, or
batched work. Where the CPU multiplies bf16 natively (AVX512-BF16 / AMX: about ten times its fp32 rate), from
``DEQUANT_ROWS`` rows on it is cheaper to expand the weight into bf16 (a few ms, into a scratch buffer
reused from call to call, so memory stays about the packed checkpoint plus the largest weight) and run one
GEMM: the same 512 rows take ~13 ms.

The expanded weight is exactly the kernel's own ``(q - 8) * scale + zero`` rounded to bf16 (what the kernel
gives when multiplied by the identity); the products are accumulated in fp32 as in the kernel, so the two
ways differ by that rounding of the weight: ~2**-9 relative, the size of the bf16 output's own rounding.

The int4 kernel keeps its weight in a CPU-specific layout. The one read here (blocks of 64 output rows;
per input column, byte ``j`` holds row ``j`` in its low nibble and row ``j + 32`` in its high one) is checked
once per process against the converter itself (:func:`int4pack_layout_known`); on a CPU whose layout differs,
or an N that is not a multiple of 64, every call stays on the kernel.
"""

from __future__ import annotations

import functools
import threading

import torch

# from this many rows on, a call dequantizes (2 cores: the two ways cross at 64-80 rows for 0.8-8M weights, as
# both scale with N x K); a weight below DEQUANT_MIN_WEIGHTS never does (the fixed cost of the ~10 ops, ~0.15
# ms, is more than the kernel spends on a small weight at any row count)
DEQUANT_ROWS = 96
DEQUANT_MIN_WEIGHTS = 1 << 20
_BLOCK = 64  # output rows per block of the int4 layout read here


@functools.lru_cache(maxsize=None)
def bf16_gemm_is_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (otherwise a bf16 GEMM is emulated and slower than the kernels)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return torch.backends.mkldnn.is_available() and any(getattr(cpu, p, lambda: False)() for p in probes)
    except Exception:  # noqa: BLE001 -- a private probe: absent or failing means no
        return False


@functools.lru_cache(maxsize=None)
def int4pack_layout_known() -> bool:
    """Whether ``_convert_weight_to_int4pack_for_cpu`` lays its codes out as :func:`int4pack_codes_t` reads
    them (checked on a random 192 x 512 weight)."""
    try:
        n, k = 3 * _BLOCK, 512  # several row blocks, a long K (a layout tiling K would show)
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return tuple(packed.shape) == (n, k // 2) and torch.equal(
            int4pack_codes_t(packed, n, k, torch.empty(k, n, dtype=torch.uint8)).t().int(), q)
    except Exception:  # noqa: BLE001 -- no kernel, or another layout
        return False


def dequant_rows_ok(kind: str, n: int, k: int) -> bool:
    """Whether a ``kind`` weight ``[n, k]`` takes the dequantizing way for many rows on this machine."""
    if n * k < DEQUANT_MIN_WEIGHTS or kind not in ("int4pack", "int8pack", "int8group") or not bf16_gemm_is_fast():
        return False
    return kind != "int4pack" or (n % _BLOCK == 0 and int4pack_layout_known())


def int4pack_codes_t(packed: torch.Tensor, n: int, k: int, out: torch.Tensor) -> torch.Tensor:
    """The codes ``q [n, k]`` (0..15) of an int4pack weight, transposed: ``out [k, n]`` uint8."""
    v = packed.view(n // _BLOCK, k, _BLOCK // 2).transpose(0, 1)  # [k, n/64, 32]
    o = out.view(k, n // _BLOCK, 2, _BLOCK // 2)
    torch.bitwise_and(v, 15, out=o[:, :, 0])
    torch.bitwise_right_shift(v, 4, out=o[:, :, 1])
    return out


class _Scratch(threading.local):
    """Buffers reused from call to call (a fresh multi-MB tensor is page-faulted in every time, which costs
    about as much as the arithmetic): per thread, at most one per dtype, grown to the largest weight seen."""

    def __init__(self):
        self.bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.bufs.get(dtype)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor even if first asked for under inference mode
                buf = self.bufs[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*shape)


_SCRATCH = _Scratch()


def int4pack_weight_t(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int, group: int) -> torch.Tensor:
    """``W^T [k, n]`` bf16 of an int4pack weight (``sz [k/group, n, 2]``: scale, zero): ``(q - 8) * scale +
    zero``, computed in fp32 and rounded once (``addcmul`` on bf16). A view of the scratch buffer: valid until
    the next call."""
    codes = int4pack_codes_t(packed, n, k, _SCRATCH.get(torch.uint8, k, n))
    w = _SCRATCH.get(torch.bfloat16, k, n)
    w.copy_(codes).sub_(8)  # exact: small integers
    w3 = w.view(k // group, group, n)
    # contiguous scales and zeros (small): broadcasting the strided [..., 2] views is several times slower;
    # all bf16 (mixed dtypes take a slow path): the product and sum are formed in fp32 and rounded once
    torch.addcmul(sz[..., 1].unsqueeze(1).contiguous(), w3, sz[..., 0].unsqueeze(1).contiguous(), out=w3)
    return w


def int8pack_weight(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W [n, k]`` bf16 of an int8pack weight (``q * scale`` rounded once). A view of the scratch buffer."""
    w = _SCRATCH.get(torch.bfloat16, *packed.shape)
    w.copy_(packed)  # exact: |q| <= 128
    return w.mul_(scales.unsqueeze(1))


def int8group_weight(packed: torch.Tensor, scales: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
    """``W [n, k]`` bf16 of an int8group weight (``packed [G, n, group]`` = ``q - 128``, ``scales [G, n]``, zero
    points ``zq [G, n]`` = ``z - 128`` or None): ``q - z`` formed exactly in bf16 (integers within 255), times the
    scale, rounded once. A view of the scratch buffer."""
    g, n, group = packed.shape
    w = _SCRATCH.get(torch.bfloat16, n, g * group)
    w3 = w.view(n, g, group)
    w3.copy_(packed.permute(1, 0, 2))  # exact: |q - 128| <= 128
    if zq is not None:
        w3.sub_(zq.t().unsqueeze(-1).to(torch.bfloat16))  # exact: integers in [-255, 255]
    w3.mul_(scales.t().unsqueeze(-1).to(torch.bfloat16))
    return w


def dequant_mm(kind: str, x2: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor,
               zq: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 [M, k] (bf16) @ W^T`` the dequantizing way (bf16 out, like the kernels)."""
    if kind == "int4pack":
        n, k = packed.shape[0], x2.shape[1]
        return rows_mm(x2, int4pack_weight_t(packed, sz, n, k, group))
    if kind == "int8group":
        return rows_mm(x2, int8group_weight(packed, sz, zq).t())
    return rows_mm(x2, int8pack_weight(packed, sz).t())


# the GEMM library builds (and caches, ~1 MB each) a kernel per shape: a prompt's row counts, one per linear and
# expert, would pile up hundreds of MB. Rows go in chunks of GEMM_CHUNK, the last one padded to a multiple of
# GEMM_PAD: a few shapes per weight shape, whatever the prompts
GEMM_CHUNK = 256
GEMM_PAD = 64


def rows_mm(x2: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x2 [M, k] @ wt [k, n]`` in row chunks of a few fixed sizes (see ``GEMM_CHUNK``)."""
    m = x2.shape[0]
    if m == GEMM_CHUNK:
        return torch.mm(x2, wt)
    out = x2.new_empty(m, wt.shape[1])
    for i in range(0, m, GEMM_CHUNK):
        rows = x2[i:i + GEMM_CHUNK]
        r = rows.shape[0]
        if r == GEMM_CHUNK or r % GEMM_PAD == 0:
            torch.mm(rows, wt, out=out[i:i + r])
        else:  # the last, short chunk: zero rows up to the next multiple of GEMM_PAD
            rows = torch.cat([rows, rows.new_zeros(GEMM_PAD - r % GEMM_PAD, rows.shape[1])])
            out[i:i + r] = torch.mm(rows, wt)[:r]
    return out
