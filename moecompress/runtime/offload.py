"""Expert offload: some routed experts of a layer on the GPU ("near"), the rest in host memory on the CPU ("far").

``SplitExperts`` runs a token's slots on whichever side holds their expert: the near part sees the far
experts' slots as zero-expert ids (dropped before any work, as the fused kernel drops ids >= E) and the far
part the near ones', and the two outputs are added. The far part is kept out of the module tree, so
moving the layer to the GPU leaves it in host memory. Which experts are near comes from ``moecompress
plan`` (measured expert load) or a count per layer. A step that needs the far side syncs with the host, so
offloaded models decode without CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from .cpu_packed import CpuExperts
from .moe import Experts
from .qlinear import PackedWeight


def subset(experts: nn.Module, ids: list[int]) -> nn.Module:
    """The experts ``ids`` (in that order) of a dense/packed ``Experts`` or a ``CpuExperts``, as a module
    of the same kind whose expert j is ``ids[j]``."""
    if isinstance(experts, CpuExperts):
        return CpuExperts([experts.gate_up[e] for e in ids], [experts.down[e] for e in ids])
    idx = torch.tensor(ids, dtype=torch.long)

    def pick(w):
        if isinstance(w, PackedWeight):
            qw = w.get()
            from ..kernels.packing import QuantWeights

            return PackedWeight(QuantWeights(qw.qweight[idx], qw.scales[idx], None if qw.zeros is None else qw.zeros[idx],
                                             qw.bits, qw.group_size, qw.k))
        return w[idx].contiguous()

    return Experts(pick(experts.w13), pick(experts.w2), experts.use_kernels)


class SplitExperts(nn.Module):
    """Routed experts split between the layer's device (``near``) and the CPU (``far``)."""

    def __init__(self, near: nn.Module, far: nn.Module, near_ids: list[int], num_experts: int):
        super().__init__()
        self.near = near
        object.__setattr__(self, "_far", far)  # not a submodule: .to(device) must leave it on the CPU
        self.num_experts = num_experts
        self.use_kernels = getattr(near, "use_kernels", False)
        near_map = torch.full((num_experts + 1,), len(near_ids), dtype=torch.long)
        near_map[torch.tensor(near_ids, dtype=torch.long)] = torch.arange(len(near_ids))
        far_ids = [e for e in range(num_experts) if e not in set(near_ids)]
        far_map = torch.full((num_experts + 1,), len(far_ids), dtype=torch.long)
        if far_ids:
            far_map[torch.tensor(far_ids, dtype=torch.long)] = torch.arange(len(far_ids))
        self.register_buffer("near_map", near_map)
        self.far_map, self.n_far, self.near_ids = far_map, len(far_ids), list(near_ids)

    @property
    def far(self) -> nn.Module:
        return self._far

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.long().clamp(max=self.num_experts)  # zero experts and beyond: dropped on both sides
        out = self.near(x, weights, self.near_map[flat].to(ids.dtype))
        far_ids = self.far_map[flat.cpu()]
        if self.n_far and bool((far_ids < self.n_far).any()):
            y = self._far(x.to("cpu"), weights.to("cpu"), far_ids)
            out = out + y.to(out.device, out.dtype)
        return out
