"""A safetensors file written one tensor at a time, holding none of them in memory.

``safetensors.torch.save_file`` takes every tensor of a file at once, so a writer built on it has to
keep a whole shard (gigabytes, on a 30B model) in RAM before it can write. The format is simple
enough to stream instead: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``[begin, end)`` byte range in the data section, then the data. Here each tensor's
bytes go to a spill file the moment it is added; :meth:`StreamingSafetensors.finish` writes the
header and appends the spilled data behind it. Offsets are consecutive from 0 without holes, as the
reference reader's validation requires.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import UserError

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
                     ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("complex64", "C64"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes in row-major order (little-endian, as safetensors stores them) as a numpy view."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


class StreamingSafetensors:
    """Spill tensors to ``<path>.data`` as they come; :meth:`finish` writes the safetensors file at ``path``."""

    def __init__(self, path: str | Path, resume: dict | None = None):
        """``resume``: a :meth:`state` taken earlier; the spill file is cut back to it and writing goes on
        from there (whatever was appended after that state is dropped)."""
        self.path = Path(path)
        self._spill_path = self.path.with_name(self.path.name + ".data")
        if resume is None:
            self._spill = open(self._spill_path, "wb")
            self._header: dict[str, dict] = {}
            self.nbytes = 0
        else:
            self._header = {k: dict(v) for k, v in resume["header"].items()}
            self.nbytes = int(resume["nbytes"])
            if not self._spill_path.is_file() or self._spill_path.stat().st_size < self.nbytes:
                raise RuntimeError(f"{self._spill_path} is missing or shorter than the saved state")
            self._spill = open(self._spill_path, "r+b")
            self._spill.truncate(self.nbytes)
            self._spill.seek(self.nbytes)

    def state(self) -> dict:
        """What :class:`StreamingSafetensors` needs to go on from here later (the bytes so far are flushed
        to the operating system, so a killed process loses none of them)."""
        self._spill.flush()
        return {"header": {k: dict(v) for k, v in self._header.items()}, "nbytes": self.nbytes}

    def __len__(self) -> int:
        return len(self._header)

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Write ``tensor`` out now (nothing is kept); returns its size in bytes."""
        if tensor.dtype not in _DTYPES:
            raise UserError(f"cannot write tensor {name}: dtype {tensor.dtype} has no safetensors code here")
        if name in self._header:
            raise RuntimeError(f"tensor {name} written twice")
        data = tensor_bytes(tensor)
        n = len(data)
        self._spill.write(data)
        self._header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + n]}
        self.nbytes += n
        return n

    def finish(self, metadata: dict[str, str] | None = None, keep_spill: bool = False) -> Path:
        """Write header + data to ``path`` and remove the spill file (``keep_spill``: leave it, for a writer
        that may have to go back to a state taken before this shard was finished)."""
        self._spill.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._spill_path, "rb") as spill:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(spill, out, 16 << 20)
        if not keep_spill:
            os.remove(self._spill_path)
        return self.path

    def discard(self) -> None:
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)
