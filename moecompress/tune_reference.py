"""Another model's layers as the block-output tuning's targets (``quantize --tune-steps N --tune-reference DIR``).

By default the tuning (``quant.tune``) pulls each quantized layer toward the source model's own float layer.
With a reference, the targets are the outputs of the reference model's layer ``i`` along the reference's own
trajectory: a ZEDA model (zero experts, ``moecompress zeda``) quantized with its original as the reference is
pulled toward the original, so the codes also make up for some of what skipping the experts costs. The
reference is read one layer at a time, like the source (while it runs, the reference's layer is in memory
beside the source's); its architecture must match the source's up to zero experts (same family, layers,
attention and widths)."""

from __future__ import annotations

from pathlib import Path

import torch

from .arch.handle import ModelHandle, decoder_layers
from .errors import UserError

# what the captured per-layer inputs (position embeddings, masks) and the hidden states depend on
_SAME = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "rope_theta", "rope_parameters", "rope_scaling", "partial_rotary_factor", "sliding_window", "layer_types",
         "max_position_embeddings", "vocab_size", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
         "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step")


class TuneReference:
    """The reference model, opened (config and shard index only) and checked against the source."""

    def __init__(self, path: str | Path, source: ModelHandle):
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--tune-reference {path}: not a folder")
        try:
            self.handle = ModelHandle.open(path)
        except UserError as e:
            raise UserError(f"--tune-reference: {e}") from None
        self.path = path
        if self.handle.reader.config.get("quantization_config"):
            raise UserError(f"--tune-reference {path} is quantized; the tuning's targets come from a float model")
        if self.handle.family != source.family:
            raise UserError(f"--tune-reference {path} is a {self.handle.family} model and the source a "
                            f"{source.family} one; the reference must have the source's architecture")
        a, b = source.text_config, self.handle.text_config
        for key in _SAME:
            if getattr(a, key, None) != getattr(b, key, None):
                raise UserError(f"--tune-reference {path}: its {key} is {getattr(b, key, None)!r}, the source's "
                                f"{getattr(a, key, None)!r}; the reference must have the source's architecture")
        # the trajectories start from the same embeddings (ZEDA leaves them as they are)
        names = [h.non_layer_disk_name("model.embed_tokens.weight") for h in (source, self.handle)]
        if None in names or not torch.equal(source.reader.get(names[0]), self.handle.reader.get(names[1])):
            raise UserError(f"--tune-reference {path}: its token embeddings differ from the source's; the "
                            "reference must be the model the source was made from")
        self.model = self.handle.skeleton(experts_implementation="grouped_mm")

    @torch.no_grad()
    def outputs(self, i: int, feed, device, dtype, router_dtype) -> list[torch.Tensor]:
        """Layer ``i`` of the reference on the reference trajectory of every calibration batch (as
        ``quant.tune.float_outputs``); the layer is freed again."""
        from .layer_quantize import RouterPrecision
        from .quant.tune import float_outputs

        layer = self.handle.load_layer(self.model, i, device, dtype)
        try:
            with RouterPrecision(layer, self.handle.spec.routers, router_dtype):
                return float_outputs(layer, i, feed)
        finally:
            decoder_layers(self.model)[i].to("meta")
