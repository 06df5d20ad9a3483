"""Run a model on token windows and record what its routers decided, whole or one layer at a time.

``RouterTap`` (a context manager: its hooks cannot outlive it) hooks the router module of every
MoE layer (``ArchSpec.routers[0]``, i.e. ``mlp.gate``) and turns each call's output
``(router_logits, top_k_weights, top_k_ids)`` into a :class:`RouterOut`: the selection scores the
family ranks experts by, normalized over all router rows, and the ids the family's own top-k chose.

Two ways to produce, for every batch, both models' final-layer logits and routing:

* :class:`WholeModel` -- the causal LM loaded whole (quantized weights dequantized); one forward per
  batch;
* :class:`StreamedModel` -- a meta skeleton; the embedding runs once per batch
  (``capture_layer_kwargs`` records each layer's call arguments exactly as the family builds them),
  then decoder layer ``i`` is loaded, run on every batch's hidden states, and put back on the meta
  device; at the end, the final norm and ``lm_head`` give the logits of one window at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from moecompress.arch.handle import ModelHandle, decoder_layers
from moecompress.calib.runner import LayerFeed, capture_layer_kwargs, prepare_embeddings, run_layer
from moecompress.checkpoint.load import load_model, materialize_outer, open_model

from moecompress.zero.modules import router_bias

from .routing_metrics import RouterOut, selection_probs


def router_name(handle: ModelHandle) -> str:
    return handle.spec.routers[0]


def moe_layer_ids(model: nn.Module, handle: ModelHandle) -> list[int]:
    """Indices of the decoder layers that hold a router and routed experts (works on a meta skeleton)."""
    name = router_name(handle)
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        try:
            gate = layer.get_submodule(name)
            layer.get_submodule(name.rsplit(".", 1)[0] + ".experts")
        except AttributeError:
            continue
        if getattr(gate, "weight", None) is not None and gate.weight.dim() == 2:
            out.append(i)
    return out


def _num_experts(layer: nn.Module, name: str, default: int) -> int:
    experts = layer.get_submodule(name.rsplit(".", 1)[0] + ".experts")
    w = getattr(experts, "gate_up_proj", None)
    return int(w.shape[0]) if w is not None else default


class RouterTap:
    """Within the context, ``self.calls[layer]`` collects one RouterOut per router call."""

    def __init__(self, layers: dict[int, nn.Module], handle: ModelHandle):
        self.layers, self.handle = layers, handle
        self.calls: dict[int, list[RouterOut]] = {i: [] for i in layers}
        self._hooks: list = []

    def __enter__(self) -> "RouterTap":
        name = router_name(self.handle)
        for i, layer in self.layers.items():
            gate = layer.get_submodule(name)
            n_exp = _num_experts(layer, name, self.handle.num_experts)
            self._hooks.append(gate.register_forward_hook(self._hook(i, n_exp)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, i: int, n_exp: int):
        scoring = self.handle.spec.scoring
        bias_path = self.handle.spec.bias_path  # the router's selection bias (ERNIE: in moe_statics)

        def hook(module, args, out):
            logits, weights, ids = out[0], out[1], out[-1]
            bias = router_bias(module, bias_path, args)
            probs = selection_probs(logits.detach(), scoring, bias)
            ids = ids.detach().reshape(probs.shape[0], -1).long()
            self.calls[i].append(RouterOut(probs, ids, n_exp, weights.detach().reshape(ids.shape).float()))

        return hook

    def take(self) -> dict[int, list[RouterOut]]:
        out, self.calls = self.calls, {i: [] for i in self.layers}
        return out


class WholeModel:
    """A whole causal LM: ``forward(ids)`` -> (fp32 logits [B, T, V], {moe layer: RouterOut})."""

    def __init__(self, path, device, dtype, experts_implementation: str = "eager"):
        # quantized checkpoints stay packed on the CPU (dequantized per use, the same numbers): RAM about the
        # checkpoint's size rather than the float model's
        self.handle, self.model = load_model(path, dtype, device, experts_implementation, packed=True)
        self.device = torch.device(device)
        layers = decoder_layers(self.model)
        self.moe_layers = moe_layer_ids(self.model, self.handle)
        self.tap = RouterTap({i: layers[i] for i in self.moe_layers}, self.handle)
        self.head_input: torch.Tensor | None = None  # of the last forward, when asked for

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, keep_head_input: bool = False) -> tuple[torch.Tensor, dict[int, RouterOut]]:
        seen: list[torch.Tensor] = []
        hook = self.model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) \
            if keep_head_input else None
        try:
            with self.tap:
                logits = self.model(input_ids=ids.to(self.device), use_cache=False).logits.float()
        finally:
            if hook is not None:
                hook.remove()
        self.head_input = seen[0] if seen else None
        calls = self.tap.take()
        return logits, {i: c[0] for i, c in calls.items()}

    @torch.no_grad()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``lm_head`` inputs ``x``."""
        return self.model.lm_head(x).float()


class StreamedModel:
    """A meta skeleton fed one decoder layer at a time; holds the hidden states of every batch."""

    def __init__(self, path, device, dtype, experts_implementation: str = "eager"):
        self.handle, self.model = open_model(path, experts_implementation)
        self.device, self.dtype = torch.device(device), dtype
        self.moe_layers = moe_layer_ids(self.model, self.handle)
        self.num_layers = self.handle.num_layers
        self.feed = LayerFeed([], [])

    @torch.no_grad()
    def embed(self, batches: list[torch.Tensor]) -> None:
        """Run the embedding on every batch and record each layer's call arguments."""
        prepare_embeddings(self.handle, self.model, self.device, self.dtype)
        for ids in batches:
            f = capture_layer_kwargs(self.model, ids, ids.shape[0], self.device)
            self.feed.hidden += f.hidden
            self.feed.calls += f.calls
        self.model.model.embed_tokens.to("meta")

    @torch.no_grad()
    def run_layer(self, i: int) -> list[RouterOut] | None:
        """Load layer ``i``, advance every batch through it, unload it; its routing per batch if MoE."""
        layer = self.handle.load_layer(self.model, i, self.device, self.dtype)
        try:
            if i not in self.moe_layers:
                run_layer(layer, i, self.feed, update=True)
                return None
            with RouterTap({i: layer}, self.handle) as tap:
                run_layer(layer, i, self.feed, update=True)
            return tap.calls[i]
        finally:
            layer.to("meta")

    def load_head(self) -> None:
        materialize_outer(self.handle, self.model, self.device, self.dtype)

    @torch.no_grad()
    def window_head_input(self, b: int, w: int) -> torch.Tensor:
        """The final-normed hidden states ``[1, T, H]`` of window ``w`` of batch ``b`` (after every layer)."""
        return self.model.model.norm(self.feed.hidden[b][w:w + 1])

    @torch.no_grad()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(x).float()

    def window_logits(self, b: int, w: int) -> torch.Tensor:
        """fp32 logits ``[1, T, V]`` of window ``w`` of batch ``b`` (after every layer has run)."""
        return self.head(self.window_head_input(b, w))

    def release(self) -> None:
        self.feed = LayerFeed([], [])
        self.model.to("meta")


class HeadOnly:
    """Only the ``lm_head`` of a checkpoint (tied to the embedding where the checkpoint ties them):
    ``head(x)`` gives the fp32 logits of cached ``lm_head`` inputs, exactly as the whole model would."""

    def __init__(self, path, device, dtype, experts_implementation: str = "eager"):
        handle, model = open_model(path, experts_implementation)
        self.lm_head = handle.load_module(model, "lm_head", torch.device(device), dtype)

    @torch.no_grad()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x).float()
