"""A static KV cache that transformers' attention modules write into.

transformers 5 attention calls ``past_key_values.update(key, value, layer_idx)`` and attends over
what it returns; that is the whole interface used here (we run the decoder layers ourselves). Per
layer the cache owns two preallocated buffers ``[B, heads, max_len, dim]`` (allocated on the first
write, so the shapes follow the family: DeepSeek-V3 caches its compressed latents, whose key and
value widths differ). Before each forward the runtime says where the new tokens go
(:meth:`KVCache.prepare`): either the filled length after the step (eager steps write the new
tokens at its end and attend over exactly the filled prefix), or ``None`` with a device tensor of
positions (graph steps: a captured CUDA graph replays the step at a new position after a ``copy_``
into that tensor, and attends over the whole buffer, the mask hiding the tail).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer key/value buffers (see module docstring)."""

    def __init__(self, num_layers: int, batch: int, max_len: int) -> None:
        self.num_layers = num_layers
        self.batch = batch
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._positions: torch.Tensor | None = None
        self._kv_len: int | None = None

    def prepare(self, positions: torch.Tensor, kv_len: int | None) -> None:
        """Where the next forward writes (``positions [q]``, int64) and how much it reads (None: all)."""
        self._positions = positions
        self._kv_len = kv_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``key``/``value`` ``[B, heads, q, dim]`` at the prepared positions; return what to attend over."""
        if self._positions is None:
            raise RuntimeError("KVCache.prepare() must be called before a forward")
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = key.new_zeros(*key.shape[:2], self.max_len, key.shape[-1])
            self.values[layer_idx] = value.new_zeros(*value.shape[:2], self.max_len, value.shape[-1])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._kv_len is None:  # graph step: the position is only known on the device
            k.index_copy_(2, self._positions, key)
            v.index_copy_(2, self._positions, value)
            return k, v
        # eager step: the new tokens are the last ones of the filled prefix (a slice copy is cheaper
        # than index_copy_, which runs a parallel region even for one row on the CPU)
        start = self._kv_len - key.shape[2]
        k[:, :, start : self._kv_len].copy_(key)
        v[:, :, start : self._kv_len].copy_(value)
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len or 0
