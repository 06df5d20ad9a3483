"""Group token-slots by expert into BLOCK_M-row blocks for the grouped GEMMs (our moe_align_block_size).

A *slot* is one (token, choice) pair, numbered ``t * top_k + j`` in the router's ``[T, top_k]`` output.
The result lists the slots of expert 0, padded with the sentinel ``num_slots`` up to a multiple of
``block_m``, then expert 1, and so on; every block of ``block_m`` rows belongs to one expert, so a GEMM
program loads exactly one expert's weights.

Zero experts: ids outside ``[0, num_experts)`` (the zero-output experts at ``[E, E+Z)``, or ``-1`` for
a slot another rank owns) are dropped *before* sorting: they get no row, no block and no padding, so
they cost no GEMM compute and no weight traffic. If every slot is dropped there are no blocks at all
(``num_tokens_post_padded == 0``) and the GEMM programs all exit at once.

Pure torch, vectorized and free of host syncs (CUDA-graph friendly): the buffers are sized by the
worst case ``S + min(E, S) * (block_m - 1)`` rows (S slots, at most min(E, S) experts non-empty)
and kernels read the device-side ``num_tokens_post_padded`` to skip the unused tail blocks.
It is ~10 small launches; a fused Triton version is only worth it if profiles say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedSlots:
    """Slots sorted by expert, padded per expert to a multiple of ``block_m``.

    sorted_ids: int32 ``[num_blocks * block_m]``; slot ids, padding rows hold ``num_slots``.
    expert_ids: int32 ``[num_blocks]``; the expert of each block, -1 past ``num_tokens_post_padded``.
    num_tokens_post_padded: int32 ``[1]`` (device); rows in use (a multiple of ``block_m``).
    counts: int64 ``[num_experts]``; live slots per expert (dropped slots excluded).
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    counts: torch.Tensor
    block_m: int
    num_slots: int

    @property
    def num_blocks(self) -> int:
        """Upper bound on the blocks in use (the launch grid); exact count needs the device value."""
        return self.expert_ids.numel()


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> AlignedSlots:
    """Sort the slots of ``topk_ids [T, k]`` by expert in blocks of ``block_m`` (see module docstring)."""
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    if num_experts <= 0:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).long()
    s, e = ids.numel(), num_experts
    max_rows = s + min(e, s) * (block_m - 1)
    num_blocks = -(-max_rows // block_m)
    rows = num_blocks * block_m

    live = (ids >= 0) & (ids < e)
    key = torch.where(live, ids, e)  # dropped slots share key e and sort past every real expert
    # not torch.bincount: on CUDA it reads min/max back to the host (a sync that breaks graph capture)
    counts = torch.zeros(e + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:e]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts

    # Stable: within an expert, slots keep token order (reproducible, and neighbouring tokens share rows).
    order = torch.argsort(key, stable=True)
    skey = key[order]
    e_of = skey.clamp(max=e - 1)
    dest = pad_start[e_of] + (torch.arange(s, device=dev) - cnt_start[e_of])
    dest = torch.where(skey < e, dest, rows)  # dropped slots go to a scratch row cut off below

    sorted_ids = torch.full((rows + 1,), s, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:rows]

    total = pad_end[-1:]
    starts = torch.arange(num_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(pad_end, starts, right=True)
    expert_ids = torch.where(starts < total, expert_ids, -1).to(torch.int32)
    return AlignedSlots(sorted_ids, expert_ids, total.to(torch.int32), counts, block_m, s)

