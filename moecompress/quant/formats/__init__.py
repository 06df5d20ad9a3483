"""On-disk encodings of quantized weights: compressed-tensors pack-quantized, GPTQ v1, AWQ GEMM (and FP8 sources)."""

from __future__ import annotations

import torch


def scale_dtype(fmt: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``fmt`` stores quantization scales in, for a model in ``dtype``: what the solvers round them to,
    so calibration and every error report see the weights as written (GPTQ v1: fp16 always)."""
    if fmt == "gptq":
        return torch.float16
    if fmt == "awq":
        from .awq import scale_dtype as awq_scale_dtype

        return awq_scale_dtype(dtype)
    return dtype
