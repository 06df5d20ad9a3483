"""Quantizing ``lm_head`` when asked (``--quantize-lm-head``): kept in float by default.

The head's input is the final norm of the residual stream leaving the last (quantized) decoder
layer, so its Hessian comes from the same calibration feed, after every layer is done. The
Gram matrix is accumulated from the normed hidden states directly: running the head itself would
compute logits over the whole vocabulary for nothing.
"""

from __future__ import annotations

import torch

from .arch.handle import ModelHandle
from .errors import UserError
from .finite import check_finite
from .quant.formats import awq as awq_format
from .quant.formats import gptq as gptq_format
from .quant.spec import QuantizedWeight
from .quant.targets import solve


def check_lm_head(handle: ModelHandle, qspec, fmt: str) -> None:
    """Refuse up front what cannot be done: a tied head (it is the embedding matrix) or one the group size does not fit."""
    tied = handle.reader.config.get("tie_word_embeddings", getattr(handle.text_config, "tie_word_embeddings", False))
    if tied:
        raise UserError("lm_head is tied to the input embeddings (tie_word_embeddings) and is stored once; "
                        "quantizing it would quantize the embeddings too, which no loader reads: drop --quantize-lm-head")
    if "lm_head.weight" not in handle.reader:
        raise UserError(f"{handle.reader.path}: no lm_head.weight in the shards to quantize; drop --quantize-lm-head")
    n, k = handle.reader.tensors["lm_head.weight"].shape
    qspec.check_shape(k, "lm_head")
    if fmt == "gptq":
        gptq_format.check_dims(n, k, qspec.bits)
    if fmt == "awq":
        awq_format.check_dims(n, k, "lm_head")


@torch.no_grad()
def final_norm_hessian(norm: torch.nn.Module, hidden: list[torch.Tensor]) -> torch.Tensor:
    """GPTQ's ``H = 2/n sum x x^T`` over the normed final hidden states of every calibration batch."""
    sums, n = None, 0
    for h in hidden:
        x = norm(h).reshape(-1, h.shape[-1]).float()
        sums = x.T @ x if sums is None else sums.addmm_(x.T, x)
        n += x.shape[0]
    return 2.0 * sums / max(n, 1)


def quantize_lm_head(handle: ModelHandle, model, hidden: list[torch.Tensor] | None, cfg, qspec,
                     store_dtype: torch.dtype, device, dtype) -> tuple[QuantizedWeight, dict]:
    """(quantized head, its error record); ``hidden``: the final residual stream per batch (None: RTN without data)."""
    head = handle.load_module(model, "lm_head", device, dtype)
    check_finite(head.weight, "lm_head.weight", dtype, store_dtype)
    h = None
    if hidden is not None:
        norm = handle.load_module(model, "model.norm", device, dtype)
        check_finite(norm.weight, handle.non_layer_disk_name("model.norm.weight") or "model.norm.weight",
                     dtype, store_dtype)
        h = final_norm_hessian(norm, hidden)
        model.model.norm.to("meta")
    try:
        res = solve(head.weight.data, h, qspec, cfg.solver, store_dtype, damp=cfg.damp,
                    block_size=cfg.block_size, refine_rounds=cfg.refine_rounds)
    except ValueError as e:  # the algorithms' NaN/Inf guard: here only the activations can be the cause
        if "NaN/Inf" not in str(e):
            raise
        raise UserError(f"the calibration activations reaching lm_head are not finite ({e}); "
                        "an overflow in half precision? try --dtype float32") from None
    model.lm_head.to("meta")
    return res.qweight, res.info[0]
