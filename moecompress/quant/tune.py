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
    """``W`` from offsets ``u`` and scale changes ``a`` by torch's autograd: the twin ``_TunedWeight`` is tested on."""
    q = qw.qweight.float() + u
    q = q + (torch.round(q) - q).detach()  # round, gradient straight through
    q = q.clamp(0, qw.spec.qmax)
    s = qw.scales.float() if a is None else qw.scales.float() * (1 + a)
    return qw.per_column(s) * (q - qw.per_column(qw.zeros.float()))


def _group_sum(qw: QuantizedWeight, t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[..., N, K]`` summed over each group's columns: ``[..., N, G]`` (the adjoint of ``per_column``)."""
    g = qw.scales.shape[-1]
    if qw.g_idx is None:
        return t.reshape(*t.shape[:-1], g, t.shape[-1] // g).sum(-1)
    idx = qw.group_index()
    idx = idx.expand(t.shape[:-2] + idx.shape[-1:]).unsqueeze(-2).expand(t.shape)
    return torch.zeros(*t.shape[:-1], g, dtype=t.dtype, device=t.device).scatter_add_(-1, idx, t)


class _TunedWeight(torch.autograd.Function):
    """``_weight`` with its own backward: it keeps only ``u`` and ``a`` and recomputes the codes there, a slice
    of rows at a time, where the autograd graph of ``_weight`` holds several float copies of the weight from
    the forward to the backward (13x the weight's bf16 size at the peak; ``benchmarks/tune_memory.py``).
    Same values, and the same gradients: straight through the rounding, zero where the clamp bites."""

    @staticmethod
    def forward(ctx, u, a, qw: QuantizedWeight, dtype):
        ctx.qw = qw
        ctx.save_for_backward(u, a)
        out = torch.empty(u.shape, dtype=dtype, device=u.device)
        for sl in _slices(u):
            part = _part(qw, sl)
            q = torch.round(part.qweight.float() + u[sl]).clamp_(0, qw.spec.qmax)
            out[sl] = QuantizedWeight(q, _scales(part, None if a is None else a[sl]), part.zeros, qw.spec,
                                      part.g_idx).dequantize(dtype)
        return out

    @staticmethod
    def backward(ctx, gw):
        u, a = ctx.saved_tensors
        qw = ctx.qw
        gu = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        ga = torch.empty_like(a) if a is not None and ctx.needs_input_grad[1] else None
        for sl in _slices(u):
            part, ap = _part(qw, sl), None if a is None else a[sl]
            q = torch.round(part.qweight.float() + u[sl])
            if gu is not None:
                gu[sl] = _per_group_(part, gw[sl].to(torch.float32, copy=True), _scales(part, ap)).mul_(
                    (q >= 0) & (q <= qw.spec.qmax))
            if ga is not None:
                q = _per_group_(part, q.clamp_(0, qw.spec.qmax), None, shift=True).mul_(gw[sl])
                ga[sl] = _group_sum(part, q).mul_(part.scales.float())
        return gu, ga, None, None


_SLICE_ELEMENTS = 1 << 22  # the backward's float scratch: a few of these at a time (16 MiB each)


def _slices(t: torch.Tensor):
    """Slices of ``t``'s first dimension (experts, or rows of an unbatched weight) of about ``_SLICE_ELEMENTS``."""
    step = max(1, _SLICE_ELEMENTS // max(1, t[0].numel()))
    return [slice(i, min(i + step, t.shape[0])) for i in range(0, t.shape[0], step)]


def _part(qw: QuantizedWeight, sl: slice) -> QuantizedWeight:
    """Rows ``sl`` of ``qw``'s first dimension (experts of a batched weight, or output rows)."""
    g = qw.g_idx
    if g is not None and g.dim() == qw.qweight.dim() - 1 and g.dim() > 1:  # one g_idx per member
        g = g[sl]
    return QuantizedWeight(qw.qweight[sl], qw.scales[sl], qw.zeros[sl], qw.spec, g)


def _scales(qw: QuantizedWeight, a: torch.Tensor | None) -> torch.Tensor:
    return qw.scales.float() if a is None else qw.scales.float() * (1 + a)


def _per_group_(qw: QuantizedWeight, t: torch.Tensor, s: torch.Tensor | None, shift: bool = False) -> torch.Tensor:
    """``t`` (float ``[..., N, K]``, a scratch tensor: changed in place): minus each
    column's zero point if ``shift``, then times its group's ``s``; by broadcasting over natural-order groups."""
    if qw.g_idx is None:
        k, g = t.shape[-1], qw.scales.shape[-1]
        v = t.reshape(*t.shape[:-1], g, k // g)
        if shift:
            v = v.sub_(qw.zeros.float()[..., None])
        if s is not None:
            v = v.mul_(s[..., None])
        return v.reshape(t.shape)
    if shift:
        t = t.sub_(qw.per_column(qw.zeros.float()))
    return t if s is None else t.mul_(qw.per_column(s))


def _final(qw: QuantizedWeight, u: torch.Tensor, a: torch.Tensor | None, scale_dtype) -> QuantizedWeight:
    q = torch.clamp(torch.round(qw.qweight.float() + u), 0, qw.spec.qmax).to(qw.qweight.dtype)
    s = qw.scales if a is None else (qw.scales.float() * (1 + a)).to(scale_dtype).float()
    return QuantizedWeight(q, s, qw.zeros, qw.spec, qw.g_idx)


def default_lr(steps: int, bits: int) -> float:
    """The first step's size when none is given: 0.4 / steps, twice that at 3 bits or fewer (measured on the
    demo model against 0.2 and 0.8 / steps; benchmarks/RESULTS.md, session 24), and past 200 steps the
    200-step size: a longer run then moves its codes further, where the same total movement in smaller steps
    gained nothing (1000 steps on the demo model: KL 0.00726 -> 0.00648 at W4 g128, 0.01799 -> 0.01691 at
    W3 g64; session 26)."""
    return (0.8 if bits <= 3 else 0.4) / min(steps, 200)


def tune_codes(layer: torch.nn.Module, items: list[TuneItem], run, refs: list[torch.Tensor], steps: int,
               lr: float | None = None, max_scale_change: float = 0.2, scale_dtype=torch.float32,
               seed: int = 0, on_step=None, plan=None) -> tuple[list[QuantizedWeight], dict]:
    """Tune ``items``' codes and scales so that ``layer``'s output on each batch approaches ``refs``.

    ``run(b, weights)`` calls the layer on calibration batch ``b`` with the parameters named in ``weights``
    replaced and returns its output (hidden states);
    ``refs[b]`` is the float layer's output there. Returns the weights to keep (the solved ones when
    tuning did not lower the loss over all batches) and a record of what happened.

    Across processes (``plan``: a ``layer_quantize.CalibPlan``; None: one process holding every batch), ``run``
    and ``refs`` take this rank's local batch positions. Each step's batch is the one a single process would
    take; the rank that holds it computes the step's signs and broadcasts them, and the losses over all batches
    are gathered and summed in batch order, so every rank makes the same moves as one process would."""
    share = _Share(plan, len(refs))
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
        return {it.name: _TunedWeight.apply(u, a, it.qw, dtypes[it.name]) for it, u, a in zip(items, us, as_)}

    def full_loss(qws: list[QuantizedWeight]) -> float:
        with torch.no_grad():
            w = {it.name: q.dequantize(dtypes[it.name]) for it, q in zip(items, qws)}
            return share.total({g: float(torch.mean((run(j, w).float() - refs[j].float()) ** 2))
                                for g, j in share.local.items()})

    before = full_loss([it.qw for it in items])  # step 0 gives exactly these weights (``start_offsets``)
    order = torch.randperm(share.n, generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        g = int(order[step % share.n])
        signs, loss = None, None
        if g in share.local:
            j = share.local[g]
            with torch.enable_grad():  # gradients of the offsets only: nothing accumulates on the layer's parameters
                loss = torch.mean((run(j, overrides()).float() - refs[j].float()) ** 2)
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            # (a NaN gradient moves nothing, in one process as across several)
            signs, loss = [None if x is None else x.sign_().nan_to_num_(0.0) for x in grads], float(loss.detach())
        signs, loss = share.from_holder(g, signs, loss, trainable)
        rate = lr * (1 - step / steps)
        with torch.no_grad():
            d = iter(signs)
            for u, m in zip(us, masks):
                du = next(d)
                if du is not None:
                    u.sub_(rate * du * (1 if m is None else m)).clamp_(-1.0, 1.0)
            for a, m in zip(as_, masks):
                da = next(d) if a is not None else None
                if da is not None:
                    a.sub_(rate * da * (1 if m is None else m)).clamp_(-max_scale_change, max_scale_change)
        if on_step is not None:
            on_step(loss)
    with torch.no_grad():
        tuned = [_final(it.qw, u, a, scale_dtype) for it, u, a in zip(items, us, as_)]
    after = full_loss(tuned)  # what would be written (scales rounded to their stored dtype)
    changed = sum(int((t.qweight != it.qw.qweight).sum()) for it, t in zip(items, tuned))
    total = sum(it.qw.qweight.numel() for it in items)
    kept = after < before
    info = {"steps": steps, "lr": lr, "loss_before": before / share.n, "loss_after": after / share.n,
            "kept": kept, "codes_changed": changed, "codes": total,
            "frozen_members": sum(int(it.frozen.sum()) for it in items if it.frozen is not None)}
    return (tuned if kept else [it.qw for it in items]), info


class _Share:
    """Which process holds which calibration batch during the tuning (one process: all of them)."""

    def __init__(self, plan, n_local: int):
        from ..distributed import SINGLE

        self.ranks = plan.ranks if plan is not None else SINGLE
        self.local = dict(plan.local) if plan is not None else {b: b for b in range(n_local)}  # global -> local
        self.n = sum(len(c) for c in plan.chunks) if plan is not None else n_local
        self.plan = plan

    def total(self, losses: dict[int, float]) -> float:
        """The sum over every batch, in batch order (whichever rank computed each)."""
        if self.ranks.active:
            losses = {g: v for part in self.ranks.all_gather_objects(losses) for g, v in part.items()}
        return sum(losses[g] for g in range(self.n))

    def from_holder(self, g: int, signs, loss, like: list[torch.Tensor]):
        """Batch ``g``'s step signs (one tensor or None per trainable tensor) and loss, broadcast by its holder."""
        if not self.ranks.active:
            return signs, loss
        src = self.plan.holder(g)
        flat = torch.zeros(sum(t.numel() for t in like), dtype=torch.int8, device=self.ranks.comm_device())
        if self.ranks.rank == src:
            start = 0
            for i, t in enumerate(like):  # each float sign tensor is let go once copied
                if signs[i] is not None:
                    flat[start:start + t.numel()] = signs[i].reshape(-1)
                    signs[i] = None
                start += t.numel()
        flat = self.ranks.broadcast_flat(flat, src)
        box = self.ranks.broadcast_object(loss, src)
        out, start = [], 0
        for t in like:  # zeros where the holder had no gradient: a move of 0 leaves the value as it was
            out.append(flat[start:start + t.numel()].view(t.shape).to(device=t.device, dtype=torch.float32))
            start += t.numel()
        return out, box


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
               store_dtype, starved: set[int] = frozenset(), plan=None) -> dict:
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
                               on_step=step, plan=plan)
    for (t, param), qw in zip(keys, new):
        results[t] = qw
        param.data.copy_(qw.dequantize().to(param.dtype))
    info["linear_errors"] = "the linears' recorded errors are the solved weights', before this tuning"
    log.info("layer %d: tuned %d weights' codes on the layer output: loss %.4g -> %.4g (%s), %d of %d codes changed",
             i, len(items), info["loss_before"], info["loss_after"], "kept" if info["kept"] else "not kept",
             info["codes_changed"], info["codes"])
    return info
