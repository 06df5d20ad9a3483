"""ZEDA across processes: torch.distributed, launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

Every rank holds the model (``--shard ddp``: DDP) or its share of every parameter (``--shard fsdp``:
FSDP2's ``fully_shard`` per decoder layer and at the root, for weights that do not fit one device;
each layer's parameters are gathered for its forward and backward and freed after). Every rank
draws the same global batch of ``batch`` sequences and trains on its contiguous ``batch / world``
share; DDP (or FSDP2's reduce-scatter) averages the gradients. The losses are written so that this average is *the* gradient
of the global batch's loss: the distillation term is a mean over equal shares, and the balancing
term, a function of every layer's mean over the whole batch, enters each rank as its first-order
surrogate ``2 (m_global - target) * m_local`` (``m_global`` all-reduced, held fixed), whose
average over ranks has exactly the true gradient. So 1, 2 or N ranks compute the same step up to
the order of floating-point sums. Rank 0 alone writes checkpoints, logs and the output. The process
group is :class:`moecompress.distributed.Ranks`'s; the functions here are what ZEDA does with it.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..distributed import Ranks
from ..errors import UserError

log = logging.getLogger("moecompress")


def share(ranks: Ranks, batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch (rows)."""
    if batch.shape[0] % ranks.world:
        raise UserError(f"--batch {batch.shape[0]} must be a multiple of the {ranks.world} ranks")
    return batch.reshape(ranks.world, batch.shape[0] // ranks.world, *batch.shape[1:])[ranks.rank]


def mean(ranks: Ranks, values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``values`` (detached)."""
    out = values.detach().clone()
    if ranks.active:
        dist.all_reduce(out)
        out /= ranks.world
    return out


def wrap(ranks: Ranks, model: torch.nn.Module) -> torch.nn.Module:
    """DDP across the ranks (gradients averaged in the backward); the model itself on one process."""
    if not ranks.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def shard_fsdp(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """FSDP2 across the ranks, in place: each decoder layer is one unit (its parameters are gathered for
    its forward and backward only), the rest (embeddings, final norm, head) the root's. Sharding replaces
    every parameter object: returns ``params``' replacements (found again by name)."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    wanted = [names[id(p)] for p in params]
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    named = dict(model.named_parameters())
    local = sum(p.to_local().numel() * p.element_size() for p in named.values() if hasattr(p, "to_local"))
    whole = sum(p.numel() * p.element_size() for p in named.values())
    log.info("zeda: FSDP2 over %d ranks: this rank holds %.1f of %.1f MiB of parameters", dist.get_world_size(),
             local / 2**20, whole / 2**20)
    return [named[n] for n in wanted]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every rank) laid out like ``ref``: this rank's shard when ``ref`` is
    sharded (no communication), else ``value`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return value
    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def full_state(obj):
    """``obj`` (an optimizer's state dict, nested dicts and lists) with every sharded tensor made whole."""
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [full_state(v) for v in obj]
    return full(obj).cpu() if torch.is_tensor(obj) else obj
