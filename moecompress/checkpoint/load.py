"""Load any checkpoint we read -- plain HF, or quantized by ``quantize`` -- as a float transformers model.

The handle opened with ``dequantize=True`` reads through a ``DequantizingReader`` (see
``checkpoint.dequant_reader``), so a quantized checkpoint loads exactly like a float one.
``load_model`` materializes the whole causal LM; ``open_model`` gives the handle and a
meta skeleton for callers that stream layer by layer (low-memory eval, the runtime).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..arch.handle import ModelHandle, _check_materialized, decoder_layers
from ..calib.runner import prepare_embeddings
from ..memory import release_freed_memory
from .dequant_reader import DequantizingReader


def open_model(path: str | Path, experts_implementation: str = "eager") -> tuple[ModelHandle, nn.Module]:
    """(handle over a dequantizing reader, meta skeleton of the causal LM)."""
    handle = ModelHandle.open(path, dequantize=True)
    return handle, handle.skeleton(experts_implementation=experts_implementation)


def materialize_outer(handle: ModelHandle, model: nn.Module, device, dtype) -> None:
    """Load everything outside the decoder layers: embedding, rotary tables, final norm, lm_head."""
    prepare_embeddings(handle, model, device, dtype)  # embedding and rotary tables
    handle.load_module(model, "model.norm", device, dtype)
    if getattr(model.config, "tie_word_embeddings", False) and handle.non_layer_disk_name("lm_head.weight") in (
            None, f"{handle.disk_prefix}.embed_tokens.weight"):
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        handle.load_module(model, "lm_head", device, dtype)


@torch.no_grad()
def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               experts_implementation: str = "eager", packed: bool = False) -> tuple[ModelHandle, nn.Module]:
    """(handle, eval-mode causal LM with every weight of ``path`` in ``dtype``; quantized ones dequantized).

    ``packed`` (CPU, eager experts): quantized linears and experts stay packed and are dequantized when
    used (``runtime.cpu_packed``, "exact"): the same numbers, at about the checkpoint's memory instead of
    the float model's (each layer is float only while it is converted)."""
    device = torch.device(device)
    handle, model = open_model(path, experts_implementation)
    materialize_outer(handle, model, device, dtype)
    pack = packed and device.type == "cpu" and experts_implementation == "eager" and \
        isinstance(handle.reader, DequantizingReader)
    for i, layer in enumerate(decoder_layers(model)):
        if pack:
            from ..runtime.convert import exact_expert_names, pack_layer_exact

            # quantized experts are read packed by pack_layer_exact: never as a float copy
            handle.load_layer(model, i, device, dtype, skip_experts=exact_expert_names(handle, i, layer) is not None)
            pack_layer_exact(handle, i, layer, dtype)
            release_freed_memory()  # the layer's float copy is gone: give its pages back
        else:
            handle.load_layer(model, i, device, dtype)
    _check_materialized(model, str(path))
    return handle, model.eval()
