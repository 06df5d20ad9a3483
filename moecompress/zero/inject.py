"""``zero-experts add``: give every MoE router Z zero experts, leaving the model's outputs unchanged.

New router rows are drawn (seeded, per layer) from a normal distribution with the per-column mean
and standard deviation of the layer's original rows, so training starts them at the scale of the
real ones. An offset then makes sure they are never chosen at injection, for any input:

* softmax routers: the router reads ``x = norm(h)``, an RMSNorm output, so ``|w . x| <=
  sqrt(H) * ||w * g||`` with ``g`` the norm's effective weight (bounded by ``max(|g|, |1 + g|)`` to
  cover zero-centred norms). ``zero_expert_bias = -(max bound of a zero row + max bound of a real row
  + margin)`` puts every zero logit ``margin`` nats below every real one: the zero rows' share of
  the softmax is below ``Z e^-margin``, under half an fp32 ulp, so the real experts' probabilities
  -- and the whole model -- are bit for bit the original's (:mod:`.routing`).
* sigmoid routers: the selection adds ``e_score_correction_bias``; the zero rows get
  ``min(real bias) - 2``, below every real expert's selection score (a sigmoid lies in (0, 1)).
  Their weights are never used at injection, and no ``zero_expert_bias`` is written (so the stock
  layout can express the model).
* softmax routers with a selection bias (ERNIE-4.5): both -- the logit offset keeps the real
  probabilities bit for bit, and the zero rows' bias ``min(real bias) - 2`` keeps them last in the
  top-k's ranking (a probability lies in [0, 1]).

``topk_mode``: ``same`` keeps k (zero experts compete for the k slots: the injected model *is* the
original); ``plus-one`` raises k by one, one extra slot that training may send to a zero expert. At
injection nothing goes to a zero expert, so a plus-one model runs k+1 real experts: it is not the
original until trained (its KL to the original is what ``eval`` then measures).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..arch.handle import ModelHandle
from ..errors import UserError
from .layout import MAX_ZERO_EXPERTS, TOPK_MODES, ZeroExperts, text_config_dict, write_zero_experts
from .rewrite import rewrite_checkpoint

log = logging.getLogger("moecompress")
MARGIN_NATS = 30.0


def open_float_original(model_dir: str | Path, what: str) -> ModelHandle:
    handle = ModelHandle.open(model_dir)
    if handle.reader.config.get("quantization_config"):
        raise UserError(f"{model_dir} is quantized; {what} the float model, then quantize the result")
    return handle


def check_num_zero(num_zero: int, num_experts: int) -> None:
    limit = min(MAX_ZERO_EXPERTS, 4 * num_experts)
    if not 1 <= num_zero <= limit:
        raise UserError(f"--num-zero {num_zero} must lie in [1, {limit}] (at most 4x the {num_experts} real experts)")


def logit_bounds(rows: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``[R]``: the largest ``|w_r . x|`` over every RMSNorm output ``x = g * h / rms(h)``."""
    g = torch.maximum(norm_weight.float().abs(), (1.0 + norm_weight.float()).abs())
    return math.sqrt(rows.shape[-1]) * torch.linalg.vector_norm(rows.float() * g, dim=-1)


def new_router_rows(w: torch.Tensor, num_zero: int, seed: int, layer: int) -> torch.Tensor:
    """``[Z, H]`` rows drawn from the column-wise statistics of the real rows ``w [E, H]`` (seeded)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    wf = w.float()
    mean, std = wf.mean(0), wf.std(0, unbiased=False)
    return (mean + std * torch.randn(num_zero, w.shape[1], generator=gen)).to(w.dtype)


@dataclass
class RouterInit:
    """A router with zero experts at injection: ``weight [E+Z, H]`` (source dtype), and either the
    sigmoid routers' ``correction_bias [E+Z]`` or the softmax routers' ``zero_bias [Z]`` (fp32)."""

    weight: torch.Tensor
    correction_bias: torch.Tensor | None
    zero_bias: torch.Tensor | None


def zero_router_init(w: torch.Tensor, norm_weight: torch.Tensor, correction_bias: torch.Tensor | None,
                     num_zero: int, seed: int, layer: int, scoring: str = "sigmoid") -> RouterInit:
    """Router ``w [E, H]`` with ``num_zero`` new rows that no input chooses (see the module docstring);
    ``correction_bias`` (``[E]``, or ERNIE's ``[1, E]``; returned in the same layout): the router's selection bias."""
    rows = new_router_rows(w, num_zero, seed, layer)
    bias = None
    if correction_bias is not None:
        zb = float(correction_bias.float().min()) - 2.0
        flat = correction_bias.reshape(-1)
        bias = torch.cat([flat, torch.full((num_zero,), zb, dtype=flat.dtype)])
        bias = bias.reshape(1, -1) if correction_bias.dim() == 2 else bias
        if scoring == "sigmoid":
            return RouterInit(torch.cat([w, rows]), bias, None)
    offset = float(logit_bounds(rows, norm_weight).max() + logit_bounds(w, norm_weight).max()) + MARGIN_NATS + \
        math.log(num_zero)
    return RouterInit(torch.cat([w, rows]), bias, torch.full((num_zero,), -offset, dtype=torch.float32))


def add_zero_experts(model_dir: str | Path, out_dir: str | Path, num_zero: int, topk_mode: str = "same",
                     seed: int = 0, overwrite: bool = False, command: list[str] | None = None,
                     rule: tuple[str, float] | None = None, extra: dict | None = None,
                     recipe: dict | None = None) -> dict:
    """Write ``model_dir`` with ``num_zero`` zero experts per MoE router to ``out_dir`` (native layout);
    ``rule``: a skipping rule for the config (the baselines); ``extra``: more for the record."""
    if topk_mode not in TOPK_MODES:
        raise UserError(f"--topk-mode must be one of {', '.join(TOPK_MODES)}, not {topk_mode!r}")
    handle = open_float_original(model_dir, "add zero experts to")
    if handle.zero is not None:
        raise UserError(f"{model_dir} already has {handle.num_zero} zero experts ({handle.zero.layout} layout); "
                        "use 'zero-experts convert' to change its layout, or start from the original model")
    e, k = handle.num_experts, handle.top_k
    check_num_zero(num_zero, e)
    new_k = k + 1 if topk_mode == "plus-one" else k
    layers: list[dict] = []

    def layer_fn(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {handle.output_name(n): t for n, t in tensors.items()}
        router = handle.source_name(i, "mlp.gate.weight")
        if router is None or tensors[router].dim() != 2 or tensors[router].shape[0] != e:
            return out  # a dense layer
        bname = handle.source_name(i, handle.spec.bias_name) if handle.spec.bias_name else None
        norm = tensors[handle.source_name(i, handle.spec.router_input_norm + ".weight")]
        init = zero_router_init(tensors[router], norm, tensors[bname] if bname else None, num_zero, seed, i,
                                handle.spec.scoring)
        out[handle.output_name(router)] = init.weight
        rec: dict = {"layer": i}
        if init.correction_bias is not None:
            out[handle.output_name(bname)] = init.correction_bias
            rec["zero_selection_bias"] = float(init.correction_bias.reshape(-1)[-1])
        if init.zero_bias is not None:
            out[handle.output_name(router).removesuffix("weight") + "zero_expert_bias"] = init.zero_bias
            rec["zero_logit_bias"] = float(init.zero_bias[0])
        layers.append(rec)
        return out

    zero = ZeroExperts(num_zero, "native", rule, topk_mode)
    config = write_zero_experts(handle.reader.config, zero)
    text_config_dict(config)[handle.spec.top_k_attr] = new_k
    record = {"moecompress_version": __version__, "command": command, "source": str(Path(model_dir).resolve()),
              **({"recipe": recipe} if recipe is not None else {}),
              "zero_experts": {"action": "add", "num_zero": num_zero, "topk_mode": topk_mode, "seed": seed,
                               "top_k": {"before": k, "after": new_k}, "layers": layers, **(extra or {})}}
    record = rewrite_checkpoint(handle, out_dir, config, layer_fn, record, overwrite, desc="adding zero experts")
    log.info("added %d zero experts to %d MoE layers (top-k %d -> %d, %s)", num_zero, len(layers), k, new_k, topk_mode)
    return record
