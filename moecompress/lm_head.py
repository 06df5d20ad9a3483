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
from .quant.formats import scale_dtype
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
def final_norm_hessian(norm: torch.nn.Module, hidden: list[torch.Tensor], plan=None) -> torch.Tensor:
    """GPTQ's ``H = 2/n sum x x^T`` over the normed final hidden states of every calibration batch.

    ``plan`` (``layer_quantize.CalibPlan``): ``hidden`` holds this rank's batches; the sums are taken chunk by
    chunk and added in chunk order across the ranks, so any rank count gives the bytes of one process."""
    if plan is None:
        from .layer_quantize import CalibPlan

        plan = CalibPlan([range(len(hidden))])
    ranks, total, n = plan.ranks, None, 0
    width = hidden[0].shape[-1] if hidden else norm.weight.shape[-1]
    for rnd in plan.rounds():
        c = plan.my_chunk(rnd)
        part = torch.zeros(width * width + 1, dtype=torch.float64, device=norm.weight.device)
        if c is not None:
            sums = torch.zeros(width, width, dtype=torch.float32, device=norm.weight.device)
            for b in plan.batches(c):
                x = norm(hidden[b]).reshape(-1, width).float()
                sums.addmm_(x.T, x)
                part[-1] += x.shape[0]
            part[:-1] = sums.reshape(-1)
        for r in range(len(rnd)):  # rank r holds chunk rnd[r]: chunk order, one chunk at a time
            p = ranks.broadcast_flat(part if r == ranks.rank else torch.zeros_like(part), src=r).to(part.device)
            sums = p[:-1].reshape(width, width).float()
            total = sums if total is None else total + sums
            n += int(p[-1].item())
    return 2.0 * total / max(n, 1)


def lm_head_hessian(handle: ModelHandle, model, hidden: list[torch.Tensor], plan, device, dtype,
                    store_dtype: torch.dtype) -> torch.Tensor:
    """The head's Hessian from the final residual stream (every rank takes part under torchrun)."""
    norm = handle.load_module(model, "model.norm", device, dtype)
    check_finite(norm.weight, handle.non_layer_disk_name("model.norm.weight") or "model.norm.weight", dtype, store_dtype)
    h = final_norm_hessian(norm, hidden, plan)
    model.model.norm.to("meta")
    return h


def quantize_lm_head(handle: ModelHandle, model, h: torch.Tensor | None, cfg, qspec,
                     store_dtype: torch.dtype, device, dtype) -> tuple[QuantizedWeight, dict]:
    """(quantized head, its error record); ``h``: its Hessian (:func:`lm_head_hessian`; None: RTN without data)."""
    head = handle.load_module(model, "lm_head", device, dtype)
    check_finite(head.weight, "lm_head.weight", dtype, store_dtype)
    try:
        res = solve(head.weight.data, h, qspec, cfg.solver, scale_dtype(cfg.format, store_dtype), damp=cfg.damp,
                    block_size=cfg.block_size, refine_rounds=cfg.refine_rounds)
    except ValueError as e:  # the algorithms' NaN/Inf guard: here only the activations can be the cause
        if "NaN/Inf" not in str(e):
            raise
        raise UserError(f"the calibration activations reaching lm_head are not finite ({e}); "
                        "an overflow in half precision? try --dtype float32") from None
    model.lm_head.to("meta")
    return res.qweight, res.info[0]
