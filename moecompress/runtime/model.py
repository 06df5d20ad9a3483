"""One forward of the runtime's model: embedding, rotary tables, decoder layers over our KV cache, head.

We call transformers' decoder layers ourselves instead of the model's ``forward``: no mask
factories, output dataclasses or cache bookkeeping per step, and the attention mask is ours to
build -- ``None`` wherever sdpa's own causal handling is exact (a prefill from an empty cache, a
single decode token over exactly the filled prefix), an explicit boolean mask otherwise (a
sliding window, the whole static buffer of a CUDA-graph step, or a sparse-attention indexer that
ranks the keys the mask allows). Linear-attention layers of hybrid
families (``config.layer_types`` says ``linear_attention``) take no mask: their state lives in the
cache (:mod:`.cache`), and the only mask they accept is a 2-D padding mask, which we never need.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import cache_name, decode_layer
from .cache import KVCache


class RuntimeModel:
    """The converted causal LM and the forward the generation loop drives."""

    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm
        self.layers = list(lm.model.layers)
        self.windows = [sliding_window(lm.config, i) for i in range(len(self.layers))]
        types = getattr(lm.config, "layer_types", None) or [None] * len(self.layers)
        self.linear_attention = [t == "linear_attention" for t in types]
        # sparse attention (DeepSeek-V3.2's DSA) reads the mask to rank keys: it always gets an explicit one
        self.explicit_masks = any(getattr(getattr(layer, "self_attn", None), "indexer", None) is not None
                                  for layer in self.layers)
        # Multimodal rotary (Qwen3.5/3.6-MoE: ``mrope_section``) takes position ids per rope axis,
        # ``[3, B, T]``: transformers 5.17 indexes them so and fails on ``[B, T]``, 5.18+ expands
        # ``[B, T]`` itself and accepts ``[3, B, T]`` unchanged. Text tokens use one position on every axis.
        self.mrope = getattr(lm.model.rotary_emb, "mrope_section", None) is not None
        # one-token decode steps skip the decoder layer's own forward where it is the plain pre-norm residual
        # block around our fast attention (runtime.attention); checked on each layer
        self.fast = [None if w is not None or lin else decode_layer(layer, lm.model.rotary_emb)
                     for layer, w, lin in zip(self.layers, self.windows, self.linear_attention)]
        self.cache_kw = [cache_name(layer) for layer in self.layers]  # "cache" (5.25) or "past_key_values" (5.17)

    @property
    def vocab_size(self) -> int:
        return self.lm.lm_head.weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        """``max_position_embeddings`` of the config: the longest sequence the model was built for."""
        return getattr(self.lm.config, "max_position_embeddings", None)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, kv_len: int | None,
                last_only: bool = True) -> torch.Tensor:
        """fp32 logits ``[B, V]`` of the last position (``[B, q, V]`` without ``last_only``).

        ``ids [B, q]`` sit at ``positions [q]`` (int64, on the device). With a cache, ``kv_len`` is the
        filled length after this step (eager), or None to attend over the whole static buffer (graphs).
        """
        base = self.lm.model
        hidden = base.embed_tokens(ids)
        pos_ids = positions.unsqueeze(0).expand(ids.shape[0], -1)
        rope = base.rotary_emb(hidden, pos_ids[None].expand(3, -1, -1) if self.mrope else pos_ids)
        if cache is not None:
            cache.prepare(positions, kv_len)
            total = cache.max_len if kv_len is None else kv_len
        else:
            total = ids.shape[1]
        masks: dict[int | None, torch.Tensor | None] = {}
        decode = ids.shape[1] == 1 and cache is not None and kv_len is not None
        for layer, window, linear, fast, kw in zip(self.layers, self.windows, self.linear_attention, self.fast,
                                                   self.cache_kw):
            if decode and fast is not None:
                hidden = fast(hidden, rope, cache)
                continue
            if not linear and window not in masks:
                masks[window] = attention_mask(positions, total, window,
                                               explicit=self.explicit_masks or (cache is not None and kv_len is None))
            hidden = layer(hidden, attention_mask=None if linear else masks[window], position_ids=pos_ids,
                           position_embeddings=rope, **{kw: cache})
            if isinstance(hidden, tuple):  # GLM-5's layers also return their sparse attention's key selection
                hidden = hidden[0]
        if last_only:
            hidden = hidden[:, -1]
        return self.lm.lm_head(base.norm(hidden)).float()


def sliding_window(config, layer: int) -> int | None:
    """The attention window of a layer, as transformers decides it: ``config.sliding_window`` (0/None:
    none) on the layers ``config.layer_types`` marks sliding, or on every layer without layer types."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] != "sliding_attention":
        return None
    return window


def attention_mask(positions: torch.Tensor, kv_total: int, window: int | None, explicit: bool) -> torch.Tensor | None:
    """Boolean ``[1, 1, q, kv_total]`` (True = attend) for queries at ``positions``, or None when sdpa's
    default is exact: no window, the keys are exactly positions ``[0, kv_total)`` and the queries are
    the last ``q`` of them (one decode token, or a prefill from position 0)."""
    q = positions.shape[0]
    if not explicit and window is None and (q == 1 or q == kv_total):
        return None
    kv = torch.arange(kv_total, device=positions.device)
    keep = kv[None, :] <= positions[:, None]
    if window is not None:
        keep &= kv[None, :] > positions[:, None] - window
    return keep[None, None]
