"""Plumbing shared by the kernel launchers: where kernels may run, buffer allocation, the device name."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

# Set by kernels.testing.poisoned_buffers(): every scratch/output buffer a launcher allocates is
# filled with NaN (floats) or a large sentinel (ints) so that an element a kernel forgot to write
# shows up in the comparison instead of silently reading as whatever torch.empty left there.
_POISON = False


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Read from the environment on every call; triton itself decides when a kernel module is imported,
    kernels.testing.ensure_interpreter() keeps the two in agreement for the tests.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors (CUDA tensors, or anything under the interpreter)."""
    return interpreting() or all(t.is_cuda for t in tensors)


def require_launch(op: str, *tensors: torch.Tensor) -> None:
    if not can_launch(*tensors):
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before moecompress.kernels "
            f"is imported); got {[str(t.device) for t in tensors]}. Use the *_torch twin on CPU."
        )


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer under kernels.testing.poisoned_buffers()."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).max)
    return out


@contextmanager
def poison(enabled: bool = True):
    global _POISON
    prev, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = prev


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str | None = None) -> str:
    """The key configs are filed under: torch's CUDA device name ("NVIDIA H200"), or "cpu"."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return "cpu"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs every tl.dot site takes.

    FP32_IEEE: fp32 activations are for reference/testing runs, so do not let tl.dot silently drop to
    tf32 (10-bit mantissa) on the GPU. UPCAST_DOT: the triton 3.9 CPU interpreter feeds bf16 tiles to
    np.matmul as their raw uint16 bits (garbage results), so under the interpreter bf16 dots are done
    in fp32; compiled kernels always use the native bf16 tensor-core dot.
    """
    return dict(FP32_IEEE=dtype == torch.float32, UPCAST_DOT=interpreting() and dtype == torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
