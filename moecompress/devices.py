"""The ``--device`` every command takes: ``cpu`` or ``cuda[:N]``, checked in one place."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str | torch.device) -> torch.device:
    """``torch.device`` of ``name``; UserError for anything but cpu / cuda[:N], or CUDA where there is none."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}' (use cpu or cuda[:N])")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but CUDA is not available here")
    return dev
