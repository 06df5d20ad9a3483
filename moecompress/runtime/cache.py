"""The runtime's per-layer decoding state: a static KV cache, and recurrent states for linear attention.

transformers 5 attention calls ``past_key_values.update(key, value, layer_idx)`` and attends over
what it returns; that is the whole interface its attention layers use (we run the decoder layers
ourselves). Per layer the cache owns two preallocated buffers ``[B, heads, max_len, dim]``
(allocated on the first write, so the shapes follow the family: DeepSeek-V3 caches its compressed
latents, whose key and value widths differ). Before each forward the runtime says where the new
tokens go (:meth:`KVCache.prepare`): either the filled length after the step (eager steps write the
new tokens at its end and attend over exactly the filled prefix), or ``None`` with a device tensor
of positions (graph steps: a captured CUDA graph replays the step at a new position after a
``copy_`` into that tensor, and attends over the whole buffer, the mask hiding the tail).

DeepSeek-V3.2's sparse attention also keeps its indexer's keys ``[B, max_len, D]`` per layer
(``update_indexer``, written and read like the keys and values).

Hybrid families (Qwen3.5/3.6-MoE's Gated DeltaNet layers) also keep, per linear-attention layer, a
conv state ``[B, channels, kernel]`` (the last inputs of the causal depthwise conv) and a recurrent
state ``[B, heads, k_dim, v_dim]``; those layers call the ``get_/update_conv_state``,
``get_/update_recurrent_state`` and ``is_recording_past`` methods (5.25 adds
``get_recurrent_states_to_keep`` and ``increase_count``) of transformers' ``Cache``, which
:class:`KVCache` provides with the same meaning (states are written in place, so their addresses
stay fixed for a CUDA graph). That is transformers >= 5.18's interface; 5.17 instead asks
``has_previous_state(layer_idx)`` and reads ``layers[i].record_past``, ``layers[i].conv_states[0]``
(which its decode conv updates in place) and ``layers[i].recurrent_states[0]``, while still writing
through ``update_conv_state``/``update_recurrent_state``: :class:`_LinearStateView` serves those reads
from the same buffers, so both versions drive one state. A step that fills the cache from empty
(``kv_len`` equal to the number of new tokens: a prefill) reads no previous state, so a reused cache
needs no reset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated per-layer key/value buffers and linear-attention states (see module docstring)."""

    def __init__(self, num_layers: int, batch: int, max_len: int) -> None:
        self.num_layers = num_layers
        self.batch = batch
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.conv: list[torch.Tensor | None] = [None] * num_layers
        self.recurrent: list[torch.Tensor | None] = [None] * num_layers
        self.index_keys: list[torch.Tensor | None] = [None] * num_layers  # DSA indexers' keys [B, max_len, D]
        self._positions: torch.Tensor | None = None
        self._kv_len: int | None = None
        self._fresh = True  # the step starts a sequence: no previous linear-attention state
        # transformers 5.17's Gated DeltaNet reads the states through ``cache.layers[i]`` (see _LinearStateView)
        self.layers = [_LinearStateView(self, i) for i in range(num_layers)]

    def prepare(self, positions: torch.Tensor, kv_len: int | None) -> None:
        """Where the next forward writes (``positions [q]``, int64) and how much it reads (None: all)."""
        self._positions = positions
        self._kv_len = kv_len
        self._fresh = kv_len is not None and kv_len == positions.shape[0]

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
        n, q = self._kv_len, key.shape[2]
        k.narrow(2, n - q, q).copy_(key)
        v.narrow(2, n - q, q).copy_(value)
        return k.narrow(2, 0, n), v.narrow(2, 0, n)

    def update_indexer(self, key: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """A sparse-attention (DSA) indexer's keys ``[B, q, D]``: written and read back like :meth:`update`'s."""
        if self.index_keys[layer_idx] is None:
            self.index_keys[layer_idx] = key.new_zeros(key.shape[0], self.max_len, key.shape[-1])
        k = self.index_keys[layer_idx]
        if self._kv_len is None:
            k.index_copy_(1, self._positions, key)
            return k
        n, q = self._kv_len, key.shape[1]
        k.narrow(1, n - q, q).copy_(key)
        return k.narrow(1, 0, n)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len or 0

    # ------------------------------------------------------------------ linear attention
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The layer's conv state, or None when the step has no previous state (a prefill)."""
        return None if self._fresh else self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return None if self._fresh else self.recurrent[layer_idx]

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """transformers 5.17: whether the layer (default: the last linear-attention one) has a state to
        continue from -- the 5.17 spelling of ``get_conv_state(...) is not None``."""
        if layer_idx is None:
            layer_idx = max((i for i, c in enumerate(self.conv) if c is not None), default=None)
            if layer_idx is None:
                return False
        return not self._fresh and self.conv[layer_idx] is not None

    def is_recording_past(self, layer_idx: int) -> bool:
        return False  # no speculative rollback: only the last ``kernel`` conv inputs are kept

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """transformers >= 5.25: intermediate recurrent states to keep for a rollback -- none here."""
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        """transformers >= 5.25 counts tokens its in-place decode conv consumed; positions are ours."""

    def update_conv_state(self, x: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """Keep the last ``conv_kernel_size`` columns of the conv input ``x [B, C, L]``; return the input
        with its left context (previous state, or zeros on a prefill) for the causal conv to run over."""
        kernel = conv_kernel_size or x.shape[-1]
        if self._fresh or self.conv[layer_idx] is None:
            full = F.pad(x, (kernel - x.shape[-1], 0)) if x.shape[-1] < kernel else x
        else:
            full = torch.cat([self.conv[layer_idx], x], dim=-1)
        if self.conv[layer_idx] is None:
            self.conv[layer_idx] = x.new_zeros(*x.shape[:-1], kernel)
        self.conv[layer_idx].copy_(full[..., -kernel:])
        return full

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        if self.recurrent[layer_idx] is None:
            self.recurrent[layer_idx] = torch.zeros_like(state)
        self.recurrent[layer_idx].copy_(state)
        return self.recurrent[layer_idx]

    def snapshot_states(self) -> list[torch.Tensor]:
        """Copies of the linear-attention states (a decode step advances them, unlike key/value writes)."""
        return [t.clone() for t in self.conv + self.recurrent if t is not None]

    def restore_states(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip([t for t in self.conv + self.recurrent if t is not None], saved, strict=True):
            t.copy_(s)


class _LinearStateView:
    """``KVCache.layers[i]`` for transformers 5.17's Gated DeltaNet (5.18+ uses the cache's methods).

    5.17 reads ``record_past``, ``conv_states[0]`` and ``recurrent_states[0]``; the tensors handed out are
    the cache's own buffers, so the in-place ``copy_`` of its single-token conv update lands in them.
    Its other writes go through ``KVCache.update_*_state``; an assignment ``conv_states[0] = t`` is
    copied into the buffer too, so no write is lost and the addresses stay fixed (CUDA graphs).
    """

    record_past = False  # no speculative rollback (as ``KVCache.is_recording_past``)

    def __init__(self, cache: KVCache, layer_idx: int) -> None:
        self.conv_states = _StateSlot(cache.conv, layer_idx)
        self.recurrent_states = _StateSlot(cache.recurrent, layer_idx)


class _StateSlot:
    """A one-state "list" (``state_idx`` 0) over the cache's per-layer buffer list."""

    def __init__(self, buffers: list[torch.Tensor | None], layer_idx: int) -> None:
        self.buffers, self.layer_idx = buffers, layer_idx

    def __getitem__(self, state_idx: int) -> torch.Tensor | None:
        if state_idx != 0:
            raise IndexError(state_idx)
        return self.buffers[self.layer_idx]

    def __setitem__(self, state_idx: int, value: torch.Tensor) -> None:
        if state_idx != 0:
            raise IndexError(state_idx)
        if self.buffers[self.layer_idx] is None:
            self.buffers[self.layer_idx] = value.clone()
        elif value is not self.buffers[self.layer_idx]:
            self.buffers[self.layer_idx].copy_(value)
