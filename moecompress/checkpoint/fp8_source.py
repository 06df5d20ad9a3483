"""An FP8 checkpoint read as the float model it encodes (``quant.formats.fp8``).

``Fp8SourceReader`` stands in for a :class:`CheckpointReader`: each FP8 tensor reads as ``q * scale``
in the model's float dtype, its scale and the activation-side scales are hidden, and ``config`` has no
``quantization_config``. ``ModelHandle.open`` wraps every checkpoint this way, so ``quantize``, ``eval``,
``zero-experts``, ``zeda`` and the runtime take DeepSeek-V3-style FP8 releases as they take float ones,
one tensor at a time (no bf16 copy of the checkpoint on disk). Everything is checked from the headers
at open: a missing scale or one that does not tile its weight is a one-line error before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError
from ..quant.formats import fp8
from .reader import CheckpointReader, TensorInfo

_DTYPE_NAMES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
                "float32": (torch.float32, "F32")}


def _model_dtype(config: dict) -> tuple[torch.dtype, str]:
    """The float dtype config.json declares (``dtype`` / ``torch_dtype``, also in a ``text_config``), bf16 if none."""
    for c in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(c.get(key), str) and c[key] in _DTYPE_NAMES:
                return _DTYPE_NAMES[c[key]]
    return _DTYPE_NAMES["bfloat16"]


@dataclass
class Fp8SourceReader:
    """A CheckpointReader view of an FP8 checkpoint: float tensors, no scales, no quantization_config."""

    inner: CheckpointReader
    scheme: fp8.Fp8Scheme
    config: dict
    source_quantization: dict  # the checkpoint's own quantization_config
    dtype: torch.dtype
    scales: dict[str, tuple[str, tuple[int, int]]]  # FP8 tensor -> (its scale, the block one scale covers)
    tensors: dict[str, TensorInfo]

    @classmethod
    def wrap(cls, reader: CheckpointReader) -> "Fp8SourceReader | CheckpointReader":
        """``reader`` itself unless its config.json declares an FP8 checkpoint."""
        qcfg = reader.config.get("quantization_config")
        scheme = fp8.scheme_from_config(qcfg)
        if scheme is None:
            stray = next((n for n, info in reader.tensors.items() if info.dtype in fp8.FP8_DTYPES), None)
            if stray is not None:  # read as floats, FP8 codes without their scales would be garbage
                raise UserError(f"{reader.path}: {stray} is stored in FP8 but config.json declares no FP8 "
                                "quantization_config (quant_method 'fp8' or compressed-tensors float-quantized)")
            return reader
        dtype, dtype_name = _model_dtype(reader.config)
        names = set(reader.tensors)
        scales = {}
        for name, info in reader.tensors.items():
            if info.dtype in ("F4", "F6_E2M3", "F6_E3M2"):  # MXFP4/6 experts (two values a byte...)
                raise UserError(f"{reader.path}: {name} is stored as {info.dtype}, which moecompress cannot read "
                                "(FP8 e4m3/e5m2 weights with float or E8M0 scales only)")
            if info.dtype not in fp8.FP8_DTYPES:
                continue
            s = fp8.scale_name(names, name, scheme)
            if s is None:
                raise UserError(f"{reader.path}: {name} is stored in FP8 but the shards hold no scale for it "
                                f"(expected {name}{scheme.scale_names[0]})")
            scales[name] = (s, fp8.block_of(info.shape, reader.tensors[s].shape, scheme.blocks, name))
        hidden = {s for s, _ in scales.values()} | {n for n in names if n.endswith(fp8.ACTIVATION_SUFFIXES)}
        tensors = {n: replace(info, dtype=dtype_name) if n in scales else info
                   for n, info in reader.tensors.items() if n not in hidden}
        config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
        return cls(reader, scheme, config, qcfg, dtype, scales, tensors)

    # the parts of CheckpointReader the rest of the package uses
    @property
    def path(self) -> Path:
        return self.inner.path

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(name)
        if name in self.scales:
            scale, block = self.scales[name]
            return fp8.dequantize(self.inner.get(name), self.inner.get(scale), block, self.dtype)
        return self.inner.get(name)

    def total_bytes(self) -> int:
        return self.inner.total_bytes()

    def describe(self) -> str:
        return f"{self.scheme.describe()}: {len(self.scales)} tensors, read as {str(self.dtype).split('.')[-1]}"

    def close(self) -> None:
        self.inner.close()
