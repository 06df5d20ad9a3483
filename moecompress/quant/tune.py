"""Block-output tuning of a solved layer's integer codes and scales (``quantize --tune-steps N``).

After GPTQ/RTN/AWQ has solved every linear of a decoder layer one at a time, this step looks at the
layer as a whole: it nudges each weight's codes by at most one step and each group's scale by a bounded
factor so that the quantized layer, fed the quantized model's hidden states, gives the float model's
hidden states: the targets are the float layers' outputs along the float model's own trajectory
(``LayerFeed.reference``), so each layer also makes up for what the layers before it got wrong (as
AutoRound does; targets on the quantized inputs measured 5% worse in KL on the demo model).

Parametrization, per quantized weight: ``W = s * (1 + a) * (clamp(round(q + u), 0, qmax) - z)``, with
``a`` (one per group, ``|a| <= max_scale_change``) starting at 0 and ``u`` (one per code, ``|u| <= 1``)
starting at the float weight's distance to its code where that lies inside the code's rounding cell, else
at 0 (``start``), so step 0 is exactly the solved layer. Rounding passes gradients straight through; the
update is signed gradient descent (the sign of each gradient times a rate that decays linearly to 0,
``default_lr``), as in SignRound (Cheng et al., arXiv 2309.05516), which tunes from round-to-nearest;
here it starts from what the solver chose, and a scale change does not re-round the codes (that undid
GPTQ's error compensation: measured worse than no tuning). The loss is the mean squared error of the
layer's output, one calibration batch a step. The tuned layer is kept only if its loss over all batches
is lower than the solved layer's; a weight's tuned scales are rounded to the dtype the format stores them in.

Experts that receive no token get no gradient and keep their codes. No I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .spec import QuantizedWeight

log = logging.getLogger("moecompress")


@dataclass
class TuneItem:
    """One quantized weight of the layer: the parameter its dequantized values live in, and its codes."""

    name: str  # the parameter's name in the layer (``layer.named_parameters()``)
    qw: QuantizedWeight
    offset: torch.Tensor | None = None  # where each code's offset starts (``start_offsets``); None: at 0
    frozen: torch.Tensor | None = None  # bool per member of a batched weight (experts) that must not move


# just under 0.5 and exact in fp16: an offset stored in fp16 never rounds to a neighbouring code
_EDGE = 0.5 - 2.0 ** -11


def start_offsets(qw: QuantizedWeight, weight: torch.Tensor) -> torch.Tensor:
    """Where each code's offset ``u`` starts, given the float weight ``W`` that was quantized: its distance
    from the code, ``W / s + z - q``, where that lies inside the code's rounding cell, else 0 (fp16).

    As in SignRound, which starts from ``W / s`` itself, codes whose float value lies near the edge of their
    cell need only a short push to change, and the others a long one; starting every offset at 0 would
    make all the codes with a steady gradient change together, at the same step. Codes the solver moved
    away from the nearest (GPTQ's error compensation) start at 0: at the edge they flipped back first,
    measured worse. Scaling a row of ``W`` and of its scales alike (AWQ's folds) leaves the offsets as they are."""
    x = weight.float() / qw.per_column(qw.scales.float()).clamp_min(1e-30) + qw.per_column(qw.zeros.float())
    d = x - qw.qweight.float()
    return torch.where(d.abs() < 0.5, d, torch.zeros_like(d)).clamp(-_EDGE, _EDGE).half()


def _weight(qw: QuantizedWeight, u: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    q = qw.qweight.float() + u
    q = q + (torch.round(q) - q).detach()  # round, gradient straight through
    q = q.clamp(0, qw.spec.qmax)
    s = qw.scales.float() if a is None else qw.scales.float() * (1 + a)
    return qw.per_column(s) * (q - qw.per_column(qw.zeros.float()))


def _final(qw: QuantizedWeight, u: torch.Tensor, a: torch.Tensor | None, scale_dtype) -> QuantizedWeight:
    q = torch.clamp(torch.round(qw.qweight.float() + u), 0, qw.spec.qmax).to(qw.qweight.dtype)
    s = qw.scales if a is None else (qw.scales.float() * (1 + a)).to(scale_dtype).float()
    return QuantizedWeight(q, s, qw.zeros, qw.spec, qw.g_idx)


def default_lr(steps: int, bits: int) -> float:
    """The first step's size when none is given: 0.4 / steps, twice that at 3 bits or fewer (measured on the
    demo model against 0.2 and 0.8 / steps; benchmarks/RESULTS.md, session 24)."""
    return (0.8 if bits <= 3 else 0.4) / steps


def tune_codes(layer: torch.nn.Module, items: list[TuneItem], run, refs: list[torch.Tensor], steps: int,
               lr: float | None = None, max_scale_change: float = 0.2, scale_dtype=torch.float32,
               seed: int = 0, on_step=None) -> tuple[list[QuantizedWeight], dict]:
    """Tune ``items``' codes and scales so that ``layer``'s output on each batch approaches ``refs``.

    ``run(b, weights)`` calls the layer on calibration batch ``b`` with the parameters named in ``weights``
    replaced and returns its output (hidden states);
    ``refs[b]`` is the float layer's output there. Returns the weights to keep (the solved ones when
    tuning did not lower the loss over all batches) and a record of what happened."""
    lr = default_lr(steps, min((it.qw.spec.bits for it in items), default=4)) if lr is None else lr
    params = dict(layer.named_parameters())
    dtypes = {it.name: params[it.name].dtype for it in items}
    us = [(torch.zeros(it.qw.qweight.shape, device=it.qw.qweight.device) if it.offset is None
           else it.offset.float()).requires_grad_() for it in items]
    as_ = [torch.zeros(it.qw.scales.shape, device=it.qw.scales.device, requires_grad=True)
           if max_scale_change > 0 else None for it in items]
    trainable = [t for t in us + as_ if t is not None]
    # members that must keep their codes (experts solved from too few tokens): their steps are masked
    masks = [None if it.frozen is None else (~it.frozen).float().view(-1, *[1] * (it.qw.qweight.dim() - 1))
             for it in items]

    def overrides() -> dict:
        return {it.name: _weight(it.qw, u, a).to(dtypes[it.name]) for it, u, a in zip(items, us, as_)}

    def full_loss(qws: list[QuantizedWeight]) -> float:
        with torch.no_grad():
            w = {it.name: q.dequantize(dtypes[it.name]) for it, q in zip(items, qws)}
            return sum(float(torch.mean((run(b, w).float() - refs[b].float()) ** 2)) for b in range(len(refs)))

    before = full_loss([it.qw for it in items])  # step 0 gives exactly these weights (``start_offsets``)
    order = torch.randperm(len(refs), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        b = int(order[step % len(refs)])
        with torch.enable_grad():  # gradients of the offsets only: nothing accumulates on the layer's parameters
            loss = torch.mean((run(b, overrides()).float() - refs[b].float()) ** 2)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        rate = lr * (1 - step / steps)
        with torch.no_grad():
            g = iter(grads)
            for u, m in zip(us, masks):
                gu = next(g)
                if gu is not None:
                    u.sub_(rate * torch.sign(gu) * (1 if m is None else m)).clamp_(-1.0, 1.0)
            for a, m in zip(as_, masks):
                ga = next(g) if a is not None else None
                if ga is not None:
                    a.sub_(rate * torch.sign(ga) * (1 if m is None else m)).clamp_(-max_scale_change, max_scale_change)
        if on_step is not None:
            on_step(float(loss.detach()))
    with torch.no_grad():
        tuned = [_final(it.qw, u, a, scale_dtype) for it, u, a in zip(items, us, as_)]
    after = full_loss(tuned)  # what would be written (scales rounded to their stored dtype)
    changed = sum(int((t.qweight != it.qw.qweight).sum()) for it, t in zip(items, tuned))
    total = sum(it.qw.qweight.numel() for it in items)
    kept = after < before
    info = {"steps": steps, "lr": lr, "loss_before": before / len(refs), "loss_after": after / len(refs),
            "kept": kept, "codes_changed": changed, "codes": total,
            "frozen_members": sum(int(it.frozen.sum()) for it in items if it.frozen is not None)}
    return (tuned if kept else [it.qw for it in items]), info


def layer_runner(layer: torch.nn.Module, feed, idx: int):
    """``run(b, overrides)`` for ``tune_codes``: layer ``idx`` on batch ``b`` with some parameters replaced."""
    from ..calib.runner import layer_output

    def run(b: int, weights: dict) -> torch.Tensor:
        args, kwargs = feed.calls[b][idx]
        return layer_output(functional_call(layer, weights, (feed.hidden[b], *args), kwargs, strict=False))

    return run


@torch.no_grad()
def float_outputs(layer, i: int, feed) -> list[torch.Tensor]:
    """Layer ``i``'s outputs, its weights still float, on every calibration batch of the float model's
    trajectory (``feed.reference``, started from the quantized model's inputs if absent): the tuning's
    targets, and the float trajectory's next step (stored back in ``feed.reference``)."""
    from ..calib.runner import layer_output as _layer_output

    src = feed.reference if feed.reference is not None else feed.hidden
    out = []
    for b in range(len(src)):
        args, kwargs = feed.calls[b][i]
        out.append(_layer_output(layer(src[b], *args, **kwargs)))
    return out


def tune_layer(layer, i: int, results: dict, refs: list[torch.Tensor], offsets: dict, feed, cfg,
               store_dtype, starved: set[int] = frozenset()) -> dict:
    """Tune the solved layer's codes and scales on its output (``quant.tune``); update ``results`` and the
    layer's weights in place; the tuning record."""
    from .formats import scale_dtype
    from .targets import target_weight

    names = {id(p): n for n, p in layer.named_parameters()}
    keys, items = [], []
    for t, qw in results.items():
        param = target_weight(layer, t)
        if tuple(qw.shape) == tuple(param.shape) and id(param) in names:
            frozen = None
            if t.expert_proj and starved:
                frozen = torch.zeros(qw.shape[0], dtype=torch.bool, device=qw.qweight.device)
                frozen[[e for e in starved if e < qw.shape[0]]] = True
            keys.append((t, param))
            items.append(TuneItem(names[id(param)], qw, offsets.get(t), frozen))
    with tqdm(total=cfg.tune_steps, desc=f"  tuning layer {i}", unit="step", leave=False) as bar:
        def step(loss: float) -> None:
            bar.set_postfix_str(f"batch loss {loss:.4g}", refresh=False)
            bar.update()

        new, info = tune_codes(layer, items, layer_runner(layer, feed, i), refs, cfg.tune_steps, cfg.tune_lr,
                               cfg.tune_scale_change, scale_dtype(cfg.format, store_dtype), seed=cfg.seed + i,
                               on_step=step)
    for (t, param), qw in zip(keys, new):
        results[t] = qw
        param.data.copy_(qw.dequantize().to(param.dtype))
    info["linear_errors"] = "the linears' recorded errors are the solved weights', before this tuning"
    log.info("layer %d: tuned %d weights' codes on the layer output: loss %.4g -> %.4g (%s), %d of %d codes changed",
             i, len(items), info["loss_before"], info["loss_after"], "kept" if info["kept"] else "not kept",
             info["codes_changed"], info["codes"])
    return info
