"""CUDA-graph capture of the decode step (one graph per batch size and cache).

A decode step is a few hundred small kernel launches for one token per sequence; replaying them
as one graph removes the launch overhead that otherwise dominates decode on a GPU. What makes the
step capturable: every input lives in a static buffer (token ids, the position tensor the KV cache
writes at), the cache buffers are allocated before capture (by the prefill), attention reads the
whole static buffer behind a mask computed on the device from the position, and nothing in the step
syncs with the host (the kernel path's routing and MoE avoid ``.item()``/``.tolist()``).

Capture happens at the first decode step of a generation, with that step's real inputs: the warm-up
runs write exactly the key/value the real step writes, so they leave the KV cache as it must be.
Linear-attention states (hybrid families) do advance at each warm-up: the caller snapshots them
before and restores them after (``KVCache.snapshot_states``). Their step has what capture needs
(fixed state buffers updated in place, no host sync in transformers' torch path), but it has only
been checked on the CPU in graph mode (tests/test_runtime_generate.py), not yet captured on a GPU;
a failed capture falls back to eager decode with a warning.
"""

from __future__ import annotations

from typing import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraph:
    """``run(ids [B, 1], positions [1]) -> logits [B, V]`` (a buffer overwritten by the next run)."""

    def __init__(self, step: Step, ids: torch.Tensor, positions: torch.Tensor, warmup: int = 2) -> None:
        if not ids.is_cuda:
            raise ValueError("CUDA graphs need CUDA tensors")
        self.ids = ids.clone()
        self.positions = positions.clone()
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side), torch.no_grad():  # compiles Triton kernels, fills allocator pools
            for _ in range(warmup):
                step(self.ids, self.positions)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = step(self.ids, self.positions)

    def run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
