"""Tile configs: JSON files in moecompress/kernels/configs/, one per op, keyed by device name then shape key.

File layout (``configs/<op>.json``)::

    {"default": {"default": {...}, "int4": {...}, "int4:t16": {...}},
     "NVIDIA H200": {"default": {...}, "int4:t16": {...}}}

A shape key is ``:``-separated from general to specific (``"int4:t16"`` = int4 weights, up to 16
tokens); a key falls back by dropping its last component. The result merges, from least to most
specific: default/default, default/<key prefixes>..., <device>/default, <device>/<key prefixes>...
so a device entry only lists what it changes. Keys starting with ``_`` are comments.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


@functools.lru_cache(maxsize=None)
def _load(op: str) -> dict:
    path = CONFIG_DIR / f"{op}.json"
    if not path.exists():
        return {}
    with path.open() as f:
        return json.load(f)


def _prefixes(shape_key: str) -> list[str]:
    parts = shape_key.split(":") if shape_key else []
    return [":".join(parts[: i + 1]) for i in range(len(parts))]


def get_config(op: str, device_name: str, shape_key: str) -> dict:
    """The merged tile config for ``op`` on ``device_name`` at ``shape_key`` (a fresh dict)."""
    table = _load(op)
    out: dict = {}
    for dev in ("default", device_name) if device_name != "default" else ("default",):
        entries = table.get(dev)
        if not entries:
            continue
        for key in ["default", *_prefixes(shape_key)]:
            cfg = entries.get(key)
            if cfg:
                out.update({k: v for k, v in cfg.items() if not k.startswith("_")})
    return out


def token_bucket(t: int, buckets=(1, 16, 64, 256, 1024)) -> str:
    """``"t<b>"`` for the smallest bucket >= t, or ``"tmax"``."""
    for b in buckets:
        if t <= b:
            return f"t{b}"
    return "tmax"
