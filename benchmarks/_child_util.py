"""Helpers shared by the benchmark children that run in other tools' virtual environments.

Standard library only at import (torch and safetensors are imported where used): the children import it
from their own folder and must not import moecompress.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def windows_sha256(input_ids) -> str:
    """Same definition as moecompress.calib.data: sha256 of the little-endian int64 bytes."""
    return hashlib.sha256(input_ids.numpy().astype("<i8").tobytes()).hexdigest()


def vm_hwm() -> int | None:
    """Peak RSS of this process since its exec (``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def write_dense_twin(src: str | Path, dst: str | Path, dense: dict) -> None:
    """Write ``dense`` (name -> float tensor) as a float32 checkpoint in ``dst``: the config of quantized
    checkpoint ``src`` without its quantization_config, and its tokenizer and generation config."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
