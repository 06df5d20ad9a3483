"""Quantized weights kept packed on the device, and the linear layer that runs them with the Triton kernel.

Used on the kernel path only (CUDA, or the Triton interpreter in tests): on CPU the runtime
dequantizes once at load, which is both simpler and faster than dequantizing on every call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.packing import QuantWeights


class PackedWeight(nn.Module):
    """A :class:`QuantWeights` whose tensors are buffers, so ``.to(device)`` moves them."""

    def __init__(self, qw: QuantWeights) -> None:
        super().__init__()
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bits, self.group_size, self.k = qw.bits, qw.group_size, qw.k

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.k)

    def get(self) -> QuantWeights:
        return QuantWeights(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.k)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, group_size={self.group_size}"


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` through ``kernels.quant_matmul.quant_linear``."""

    def __init__(self, qw: QuantWeights, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = PackedWeight(qw)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = qw.k, qw.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.quant_matmul import quant_linear

        y = quant_linear(x.reshape(-1, self.in_features), self.packed.get())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
