"""Throughput of the runtime on one checkpoint: prefill and decode tokens/s, medians of repeated runs."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..errors import UserError
from .generate import Runtime


def benchmark(model_dir: str | Path, device: str = "cpu", prompt_len: int = 128, new_tokens: int = 64,
              batch: int = 1, *, dtype: str = "auto", repeats: int = 3, seed: int = 0,
              runtime: Runtime | None = None) -> dict:
    """Generate ``new_tokens`` after random ``[batch, prompt_len]`` prompts, ``repeats`` times after one
    warm-up run (which also captures the CUDA graph); report the medians. JSON-ready dict."""
    if prompt_len < 1 or batch < 1 or repeats < 1:
        raise UserError("prompt_len, batch and repeats must be >= 1")
    if new_tokens < 2:
        raise UserError(f"new_tokens must be >= 2 to measure decoding, got {new_tokens}")
    rt = runtime or Runtime.load(model_dir, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, rt.model.vocab_size, (batch, prompt_len), generator=gen)
    rt.generate(prompt, new_tokens, stop_ids=[])  # warm-up at the measured shapes
    runs = [rt.generate(prompt, new_tokens, stop_ids=[]) for _ in range(repeats)]
    dev = rt.device
    return {
        "model": str(model_dir),
        "family": rt.family,
        "quant_format": rt.report.quant_format,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(rt.dtype).removeprefix("torch."),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "kernels": rt.use_kernels,
        "cuda_graph": rt.cuda_graph,
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
    }
