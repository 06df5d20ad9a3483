"""Helpers for the kernel tests (tests/test_kernels_*.py): interpreter setup, poisoned buffers, and an
error-locating closeness check. Lives beside the kernels so every test module can import it."""

from __future__ import annotations

import os
import sys

import torch

from . import _common

# Modules holding @triton.jit functions.
_KERNEL_MODULES = (
    "moecompress.kernels._tiles",
    "moecompress.kernels.routing",
    "moecompress.kernels.fused_moe",
    "moecompress.kernels.quant_matmul",
    "moecompress.kernels.rmsnorm",
)


def ensure_interpreter() -> str:
    """Pick the device the kernel tests run on ("cuda" compiled, else "cpu" interpreted) and check
    that triton agrees.

    triton chooses interpreted-vs-compiled when each @triton.jit decorator runs -- including its own
    standard library (tl.max, tl.cdiv, ...) at ``import triton`` -- so TRITON_INTERPRET=1 must be in the
    environment before *anything* imports triton (transformers model code does). Test modules set it
    at their top; when a module collected earlier already imported triton without it, this raises
    with the fix rather than letting every kernel test fail obscurely.
    """
    if torch.cuda.is_available() and not _common.interpreting():
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.standard.max, JITFunction) or any(
        isinstance(v, JITFunction) for m in _KERNEL_MODULES if m in sys.modules for v in vars(sys.modules[m]).values()
    ):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so the kernels cannot run on CPU in "
            "this process. Run `TRITON_INTERPRET=1 pytest ...`, or set os.environ['TRITON_INTERPRET'] = '1' "
            "in tests/conftest.py when CUDA is unavailable."
        )
    return "cuda" if torch.cuda.is_available() else "cpu"


poisoned_buffers = _common.poison


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "output") -> None:
    """``max|actual - expected| <= tol * max|expected|``, any NaN/inf in actual failing outright.

    The message says where: max error (relative and absolute), its index, both values, the shape and
    how many elements are over.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements non-finite (unwritten/poisoned?), first at "
            f"index {idx}: actual {a[idx].item()} expected {e[idx].item()}; shape {tuple(a.shape)}"
        )
    if a.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs()
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    rel = err.max().item() / scale
    if rel > tol:
        over = int((err > tol * scale).sum())
        raise AssertionError(
            f"{name}: max error {rel:.3e} of max|expected| (abs {err.max().item():.3e}, scale {scale:.3e}) "
            f"> tol {tol:.1e} at index {idx}: actual {a[idx].item():.6g} expected {e[idx].item():.6g}; "
            f"shape {tuple(a.shape)}, {over} of {a.numel()} elements over"
        )
