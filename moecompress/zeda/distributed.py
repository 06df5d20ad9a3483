"""ZEDA across processes: torch.distributed, launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

Every rank holds the model (DDP; FSDP2 for weights that do not fit one device is still to come),
draws the same global batch of ``batch`` sequences and trains on its contiguous ``batch / world``
share; DDP averages the gradients. The losses are written so that this average is *the* gradient
of the global batch's loss: the distillation term is a mean over equal shares, and the balancing
term, a function of every layer's mean over the whole batch, enters each rank as its first-order
surrogate ``2 (m_global - target) * m_local`` (``m_global`` all-reduced, held fixed), whose
average over ranks has exactly the true gradient. So 1, 2 or N ranks compute the same step up to
the order of floating-point sums. Rank 0 alone writes checkpoints, logs and the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group (a `moecompress run` step joins its caller's)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """The process group torchrun describes in the environment (none: a single process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def device(self, requested: torch.device) -> torch.device:
        """``cuda:LOCAL_RANK`` for a multi-rank GPU run, else the requested device."""
        if self.world > 1 and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (rows)."""
        if batch.shape[0] % self.world:
            raise UserError(f"--batch {batch.shape[0]} must be a multiple of the {self.world} ranks")
        return batch.reshape(self.world, batch.shape[0] // self.world, *batch.shape[1:])[self.rank]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``values`` (detached)."""
        out = values.detach().clone()
        if self.world > 1:
            dist.all_reduce(out)
            out /= self.world
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
