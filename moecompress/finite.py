"""NaN/Inf guards at the point a checkpoint's tensors are read, naming the tensor as the checkpoint spells it.

The algorithms have their own guard (a ValueError); checking here names the culprit for the user,
including tensors no algorithm sees (norms, routers).
"""

from __future__ import annotations

import torch

from .arch.handle import FUSED_DOWN, FUSED_GATE_UP, ModelHandle
from .errors import UserError


def _source_name(handle: ModelHandle, i: int, key: str, member: int | None, row: int | None, rows: int) -> str:
    """The checkpoint name of layer i's in-memory tensor ``key`` (expert ``member``, row ``row`` when fused)."""
    if member is not None and (key.endswith(FUSED_GATE_UP) or key.endswith(FUSED_DOWN)):
        fused = handle.fused_source(i, key)
        if fused is not None:
            return f"{fused} (expert {member})"
        g, u, d = handle.expert_source_names(i, member)
        if key.endswith(FUSED_DOWN):
            return d + ".weight"
        return (g if row is None or row < rows // 2 else u) + ".weight"
    return handle.source_name(i, key) or f"{handle.layer_prefix(i)}{handle.disk_local(key)}"


def _nonfinite(t: torch.Tensor) -> torch.Tensor | None:
    """The mask of NaN/Inf elements of a float tensor, None when it has none (one reduction when clean)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return None  # NaN/Inf anywhere makes the sum non-finite
    bad = ~torch.isfinite(t)
    return bad if bool(bad.any()) else None  # else: finite values whose sum overflowed


def nonfinite_error(name: str, dtype: torch.dtype, store_dtype: torch.dtype) -> UserError:
    hint = ""
    if dtype == torch.float16 and store_dtype != torch.float16:  # may be an overflow of our cast, not the file
        hint = " in float16 (try --dtype float32)"
    return UserError(f"{name} has NaN/Inf values{hint}")


def check_finite(t: torch.Tensor, name: str, dtype: torch.dtype, store_dtype: torch.dtype) -> None:
    if _nonfinite(t) is not None:
        raise nonfinite_error(name, dtype, store_dtype)


def check_finite_layer(layer, i: int, handle: ModelHandle, dtype: torch.dtype, store_dtype: torch.dtype) -> None:
    """Refuse a layer whose checkpoint tensors hold NaN/Inf, naming the tensor as the checkpoint spells it.

    The algorithms have their own guard (a ValueError); checking here, where the layer is read,
    names the culprit for the user, including tensors no algorithm sees (norms, routers).
    """
    for key, t in layer.state_dict().items():
        bad = _nonfinite(t)
        if bad is None:
            continue
        member = row = None
        if t.dim() == 3:  # fused experts [E, rows, cols]: name the first bad expert (and gate/up half)
            member, row = (int(x) for x in torch.nonzero(bad.any(-1))[0])
        name = _source_name(handle, i, key, member, row, t.shape[-2] if t.dim() == 3 else 0)
        raise nonfinite_error(name, dtype, store_dtype)
