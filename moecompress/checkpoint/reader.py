"""Lazy, validated access to a Hugging Face checkpoint directory.

Only the headers of the safetensors shards are read up front; tensors are read one at a time on
request, so a 70 GB checkpoint costs nothing until a layer asks for its weights. Every problem a
user can cause (missing directory, pickle-only weights, truncated shards, broken config) becomes a
one-line ``UserError``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin", "tf_model.h5")
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offsets in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _DTYPE_SIZES.get(self.dtype, 2)


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def torch_dtype(stored: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16" ...); ValueError for one torch lacks."""
    if stored not in _TORCH_DTYPES:
        raise ValueError(f"safetensors dtype {stored} has no torch equivalent here")
    return _TORCH_DTYPES[stored]


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header and check the file holds all the bytes it announces."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: header announces {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def read_config(p: Path) -> dict:
    """The JSON object in checkpoint folder ``p``'s config.json (a one-line UserError for every way it is not)."""
    if not p.exists():
        raise UserError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{p} is not a directory (expected a Hugging Face checkpoint folder)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{p} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object")
    return config


@dataclass
class CheckpointReader:
    """A checkpoint directory: its config.json and a lazy index of every tensor in its shards."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CheckpointReader":
        p = Path(path)
        config = read_config(p)
        shards = sorted(p.glob("*.safetensors"))
        if not shards:
            pickles = [n for n in PICKLE_NAMES if (p / n).exists()] + [x.name for x in p.glob("pytorch_model-*.bin")]
            if pickles:
                raise UserError(
                    f"{p} holds only pickle weights ({pickles[0]}); moecompress reads safetensors only "
                    "(convert with `transformers` save_pretrained(safe_serialization=True) first)"
                )
            raise UserError(f"{p} holds no *.safetensors weights")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            header, base = _read_header(shard)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                a, b = meta["data_offsets"]
                tensors[name] = TensorInfo(shard.name, meta["dtype"], tuple(meta["shape"]), base + a, base + b)
        return cls(p, config, tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (exactly as stored: dtype and bytes untouched).

        Plain reads, not a memory map: mapped pages of a 70 GB checkpoint would count towards the
        process's resident memory as layers are touched; a read buffer is freed with its tensor.
        """
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(name)
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            h = self._handles.get(info.file)
            if h is None:
                h = self._handles[info.file] = safe_open(str(self.path / info.file), framework="pt")
            return h.get_tensor(name)
        buf = bytearray(info.end - info.start)
        with open(self.path / info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{self.path / info.file} is truncated while reading {name}")
        if not buf:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))

    def close(self) -> None:
        self._handles.clear()
