"""Load any checkpoint we read -- plain HF, or quantized by ``quantize`` -- as a float transformers model.

``DequantizingReader`` stands in for a :class:`CheckpointReader`: every quantized linear ``m``
appears as a float ``m.weight`` (dequantized on read) and its packed parts are hidden, so the
family adapter (``ModelHandle``) loads a quantized checkpoint exactly like a float one, one tensor
at a time. ``load_model`` materializes the whole causal LM; ``open_model`` gives the handle and a
meta skeleton for callers that stream layer by layer (low-memory eval, the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch.handle import ModelHandle, _check_materialized, decoder_layers
from ..calib.runner import prepare_embeddings
from ..memory import release_freed_memory
from .dequant import quantized_modules, read_quantized
from .reader import CheckpointReader

_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
                    "qweight", "qzeros", "scales", "g_idx")


@dataclass
class DequantizingReader:
    """A CheckpointReader view where quantized linears read as dense float ``.weight`` tensors."""

    inner: CheckpointReader
    fmt: str | None
    spec: object
    modules: set[str]
    _names: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def wrap(cls, reader: CheckpointReader) -> "DequantizingReader | CheckpointReader":
        fmt, spec, mods = quantized_modules(reader)
        if fmt is None:
            return reader
        hidden = {f"{m}.{s}" for m in mods for s in _PACKED_SUFFIXES}
        names = [n for n in reader.names() if n not in hidden] + [f"{m}.weight" for m in mods]
        return cls(reader, fmt, spec, set(mods), names)

    # the parts of CheckpointReader the adapter uses
    @property
    def path(self) -> Path:
        return self.inner.path

    @property
    def config(self) -> dict:
        return self.inner.config

    @property
    def tensors(self):
        return self.inner.tensors

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.inner or (name.endswith(".weight") and name[:-7] in self.modules)

    def get(self, name: str) -> torch.Tensor:
        if name.endswith(".weight") and name[:-7] in self.modules:
            return read_quantized(self.inner, self.fmt, self.spec, name[:-7]).dequantize(torch.float32)  # callers cast
        return self.inner.get(name)

    def total_bytes(self) -> int:
        return self.inner.total_bytes()

    def close(self) -> None:
        self.inner.close()


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
