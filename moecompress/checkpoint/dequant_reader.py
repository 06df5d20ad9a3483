"""A :class:`CheckpointReader` view of a quantized checkpoint as float: every quantized linear ``m``
appears as a float ``m.weight`` (dequantized on read) and its packed parts are hidden, so the family
adapter (``ModelHandle``) loads a quantized checkpoint exactly like a float one, one tensor at a time.

It knows the formats (``checkpoint.dequant``) and the reader, nothing of the adapter: the handle wraps
its reader in it when opened with ``dequantize=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

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
