"""Values users type on the command line: sizes (``4GiB``, ``500MB``, ``123`` bytes) and paths."""

from __future__ import annotations

import re

from .errors import UserError

SEED_MAX = 2**32 - 1  # seeds are mixed with layer and step numbers into 64-bit generator seeds


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str, memory: bool = False) -> int:
    """'4GiB' / '500MB' / '123' -> bytes; UserError naming the flag otherwise. ``memory``: a device's memory,
    where a bare number under a MiB is a unit left out (``--vram 6``), not a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise UserError(f"{flag} {text!r}: give a positive size such as 500MB, 4GiB or a number of bytes")
    if memory and not unit and float(m.group(1)) < 2 ** 20:
        raise UserError(f"{flag} {m.group(1)} reads as {m.group(1)} bytes: give a unit, e.g. {m.group(1)}GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def nonempty_path(_ctx, param, value):
    """click callback: an empty path (``--out ""``) is a slip, not the current directory."""
    if value is not None and not str(value).strip():
        name = param.opts[0] if param.param_type_name == "option" else param.human_readable_name
        raise UserError(f"{name} is empty; give a path")
    return value
