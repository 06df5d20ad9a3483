"""The quantization scheme of one weight and the quantized result every algorithm returns.

Conventions shared by every algorithm, packer and kernel in the project:

* A weight is ``W [N, K]`` (``N`` outputs, ``K`` inputs, as in ``nn.Linear``) or a batch of them
  ``W [B, N, K]`` (all experts of one projection).
* Integer codes ``q`` are *unsigned*, in ``[0, 2**bits - 1]``; the zero point ``z`` is unsigned too.
  Dequantization is ``W[n, k] = scale[n, g(k)] * (q[n, k] - z[n, g(k)])``.
* Symmetric schemes fix ``z = 2**(bits-1)`` (int4: 8), which is what compressed-tensors stores
  (signed value + offset) and what GPTQ v1 stores (minus one).
* ``g(k) = k // group_size`` unless the result carries a ``g_idx`` (act-order with permuted groups,
  GPTQ format only). Per-channel is ``group_size=None``: one group spanning all of K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
ActOrder = Literal["weight", "group"]


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized.

    act_order: None (columns in natural order), "weight" (GPTQ processes columns by decreasing
    Hessian diagonal but groups stay contiguous in the original order, so no g_idx is stored:
    what compressed-tensors calls actorder="weight"), or "group" (groups follow the permuted order
    and a g_idx is stored: GPTQ v1 ``desc_act=True``).
    clip_ratios: the candidate shrink factors of each group's range searched for the scale that
    minimizes the (Hessian-diagonal-weighted, when a Hessian is given) reconstruction error;
    ``(1.0,)`` is plain min/max.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    act_order: ActOrder | None = None
    clip_ratios: tuple[float, ...] = field(
        default=(1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.7, 0.65, 0.6)
    )
    # smallest asymmetric zero point: GPTQ v1 stores zero points minus one, so it needs 1 (a group of
    # all-positive weights then loses its top code rather than failing at export)
    zero_min: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"bits={self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size & (self.group_size - 1)):
            raise UserError(f"group size {self.group_size} must be a power of two (or per-channel)")
        if self.act_order not in (None, "weight", "group"):
            raise UserError(f"act_order must be null, 'weight' or 'group', not {self.act_order!r}")
        if self.zero_min not in (0, 1):
            raise UserError(f"zero_min must be 0 or 1, not {self.zero_min}")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise UserError("clip ratios must lie in (0, 1]")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def group_for(self, k: int) -> int:
        """The group size actually used for an input dimension ``k`` (per-channel: k)."""
        return k if self.group_size is None else self.group_size

    def check_shape(self, k: int, name: str = "weight") -> None:
        """Raise a UserError when the group size does not divide the input dimension."""
        if self.group_size is not None and k % self.group_size:
            raise UserError(f"group size {self.group_size} does not divide the input dimension {k} of {name}; use "
                            f"a power of two that divides {k}, or -1 (one scale per output channel)")


@dataclass
class QuantizedWeight:
    """A quantized weight (or a batch of them, leading dim B) in the canonical layout above.

    qweight: uint8 ``[..., N, K]`` codes; scales: float32 ``[..., N, G]``; zeros: uint8 ``[..., N, G]``;
    g_idx: int32 ``[..., K]`` group of each input column, or None for ``k // group_size``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    def group_index(self) -> torch.Tensor:
        """g_idx if set, else ``arange(K) // group_size`` (int64, broadcastable over the batch)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.qweight.shape[-1]
        return torch.arange(k, device=self.qweight.device) // self.spec.group_for(k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = scale * (q - z), in ``dtype``; computed in float32."""
        if self.g_idx is None:  # groups in natural order: broadcast each group's scale over its columns
            k, g = self.qweight.shape[-1], self.scales.shape[-1]
            q = self.qweight.float().reshape(*self.qweight.shape[:-1], g, k // g)
            return (self.scales.float()[..., None] * (q - self.zeros.float()[..., None])).reshape(
                self.qweight.shape).to(dtype)
        s, z = self.per_column(self.scales.float()), self.per_column(self.zeros.float())
        return (s * (self.qweight.float() - z)).to(dtype)

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor ``[..., N, G]`` (scales, zero points) spread over the columns: ``[..., N, K]``."""
        gi = self.group_index()
        if gi.dim() == 1:
            return t[..., gi]
        idx = gi.unsqueeze(-2).expand(*t.shape[:-1], gi.shape[-1])  # per-batch g_idx [B, K]
        return torch.gather(t, -1, idx)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` of an unbatched weight (its groups, and g_idx, are per input column)."""
        return QuantizedWeight(self.qweight[start:stop], self.scales[start:stop], self.zeros[start:stop], self.spec,
                               self.g_idx)

    def __getitem__(self, i: int) -> "QuantizedWeight":
        """One member of a batched result."""
        g = None if self.g_idx is None else (self.g_idx[i] if self.g_idx.dim() > 1 else self.g_idx)
        return QuantizedWeight(self.qweight[i], self.scales[i], self.zeros[i], self.spec, g)
