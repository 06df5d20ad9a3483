"""Run decoder layers one at a time on calibration batches.

``capture_layer_kwargs`` runs the model's own forward once per batch with every decoder layer
replaced by a recorder, so each layer's call arguments (attention masks of its own type, rotary
position embeddings, position ids) are captured exactly as the family's code builds them — no
per-family reimplementation of masks or rotary embeddings. ``run_layer`` then feeds one real layer
with those arguments and the previous layer's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.handle import ModelHandle


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call arguments and passes the input through."""

    def __init__(self, original: nn.Module, idx: int, sink: dict, last: bool):
        super().__init__()
        # the model's loop may read layer attributes (attention_type, layer_type) to pick masks
        for k, v in vars(original).items():
            if not k.startswith("_") and isinstance(v, (str, int, float, bool)):
                setattr(self, k, v)
        self.idx, self.sink, self.last = idx, sink, last
        # GLM-5's layers return (hidden, their sparse attention's key selection) for a later layer to share:
        # none here (configs with sharing layers are refused, ModelHandle)
        self.selection_out = hasattr(getattr(original, "self_attn", None), "skip_topk")

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "past_key_value")}
        self.sink[self.idx] = (args, kwargs)
        if self.idx == 0:
            self.sink["h0"] = hidden_states  # some families scale the embedding: take what layer 0 gets
        if self.last:
            raise _StopForward
        return (hidden_states, None) if self.selection_out else hidden_states


@dataclass
class LayerFeed:
    """Per batch: the current hidden states, and every layer's recorded call arguments."""

    hidden: list[torch.Tensor]
    calls: list[dict]
    # the float model's hidden states at the same layer, when a step needs the float trajectory too
    # (block-output tuning's targets): the float layers' outputs on the float inputs
    reference: list[torch.Tensor] | None = None


def prepare_embeddings(handle: ModelHandle, model: nn.Module, device, dtype) -> None:
    """Materialize what runs before the first layer: the embedding and the rotary tables."""
    handle.load_module(model, "model.embed_tokens", device, dtype)
    rot = getattr(model.model, "rotary_emb", None)
    if rot is not None:
        with torch.device(device):  # its inv_freq is a non-persistent buffer: rebuild it for real
            model.model.rotary_emb = type(rot)(config=handle.text_config)


@torch.no_grad()
def capture_layer_kwargs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device) -> LayerFeed:
    layers = model.model.layers
    originals = list(layers)
    n = model.config.num_hidden_layers
    feed = LayerFeed([], [])
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: dict = {}
            model.model.layers = nn.ModuleList(
                [_Recorder(layer, i, sink, i == n - 1) for i, layer in enumerate(originals)]
            )
            ids = input_ids[start:start + batch_size].to(device)
            try:
                model.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            feed.hidden.append(sink["h0"])
            feed.calls.append({i: sink[i] for i in range(n)})
    finally:
        model.model.layers = nn.ModuleList(originals)
    return feed


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, idx: int, feed: LayerFeed, update: bool, batches: list[int] | None = None) -> None:
    """Run layer ``idx`` on every batch (or those listed); with ``update`` its outputs become the next
    layer's inputs."""
    for b in range(len(feed.hidden)) if batches is None else batches:
        args, kwargs = feed.calls[b][idx]
        out = layer_output(layer(feed.hidden[b], *args, **kwargs))
        if update:
            feed.hidden[b] = out


# Every supported family's decoder layer is ``mid = x + attention(x)``, then
# ``out = mid + mlp(post_attention_layernorm(mid))``. Splitting the layer there lets true-sequential
# calibration run the attention once per attention stage and only the MLP for the MLP stages.


@torch.no_grad()
def attention_half(layer: nn.Module, idx: int, feed: LayerFeed, batches: list[int] | None = None) -> list[torch.Tensor]:
    """Per batch (every one, or those listed), the residual stream after the attention block (the input
    of the post-attention norm)."""
    got: dict = {}

    def stop(_module, args):
        got["mid"] = args[0]
        raise _StopForward

    handle = layer.post_attention_layernorm.register_forward_pre_hook(stop)
    mids = []
    try:
        for b in range(len(feed.hidden)) if batches is None else batches:
            args, kwargs = feed.calls[b][idx]
            try:
                layer(feed.hidden[b], *args, **kwargs)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"layer {idx}: post_attention_layernorm was never called")
            mids.append(got.pop("mid"))
    finally:
        handle.remove()
    return mids


@torch.no_grad()
def mlp_half(layer: nn.Module, mids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per batch, the layer output from the residual stream after attention."""
    return [m + layer.mlp(layer.post_attention_layernorm(m)) for m in mids]
