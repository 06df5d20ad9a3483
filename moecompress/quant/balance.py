"""AWQ on one decoder layer: resolve the family's balance groups, search their scales, fold them.

The stateful half of AWQ (``quant/awq.py`` is the pure half). For each group of the calibration
stage at hand (``arch.registry.BalanceGroup``): find which readers exist and which of them this stage
quantizes; search the scales on the captured statistics; then fold them in place --

* the source's output divides by ``s``: a norm's weight (``(offset + w) / s - offset``), a Linear's
  output rows and bias, or the up half of every expert's fused gate/up rows; a source that is
  already quantized (true-sequential: the experts' gate/up before their down) divides its group
  scales instead, which keeps its codes;
* every reader's input columns multiply by ``s``; quantized readers' statistics transform with
  them (``H -> S^-1 H S^-1``, ``|x| -> |x| / s``), so the solver that runs next sees the scaled problem;
* readers that stay in float (routers, ``shared_expert_gate``, kept modules) multiply too. With
  power-of-two scales both the norm's division and their multiplication are exponent shifts, exact
  in every float format: routing logits come out bit-identical, which is measured on the
  calibration tokens and recorded, never assumed.

Every modified float tensor is rounded to the checkpoint's dtype at once (calibration continues on
exactly what gets exported) and returned in ``overrides`` for the writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..arch.registry import ArchSpec, BalanceGroup
from .awq import alpha_grid, hessian_loss, scale_summary, scaled_error, search_scales, weight_mean
from .spec import QuantSpec

log = logging.getLogger("moecompress")
UP = "#up"


@dataclass(frozen=True)
class AwqSettings:
    spec: QuantSpec
    grid: int = 20
    scales: str = "pow2"  # "pow2": groups with a float reader (a router) use powers of two; "free": none do
    duo: bool = True  # also try s = x**a / w**(1-a) (AutoAWQ's duo scaling) beside s = x**a; False: s = x**a only
    search_tokens: int = 8192  # residual rows kept for the block loss and the routing check
    store_dtype: torch.dtype = torch.bfloat16  # the checkpoint's float dtype
    scale_dtype: torch.dtype | None = None  # the format's dtype for quantization scales (None: store_dtype)
    # the stored dtype of a float tensor by layer-local name (a router may be kept in fp32 on disk)
    stored: Callable[[str], torch.dtype] | None = None
    # the stored tensor itself by layer-local name (None if absent): folds into norms, routers and biases start
    # from it, not from the calibration dtype's copy (a bf16 calibration of an fp32 checkpoint)
    original: Callable[[str], torch.Tensor | None] | None = None
    # a reader's own scheme by layer-local name (``--override``), None where ``spec`` applies
    spec_of: Callable[[str], QuantSpec | None] | None = None

    def reader_specs(self, readers: list["Reader"]) -> list[QuantSpec]:
        own = self.spec_of or (lambda name: None)
        return [own(r.name) or self.spec for r in readers]


@dataclass
class Reader:
    name: str
    kind: str  # "linear" | "experts_gate_up" | "experts_down" (quantized) or "float" (not quantized)

    def weight(self, layer: nn.Module) -> nn.Parameter:
        return layer.get_parameter(self.name if self.kind.startswith("experts") else f"{self.name}.weight")


@dataclass
class Resolved:
    group: BalanceGroup
    source_kind: str  # "norm" | "linear" | "experts_up"
    quantized: list[Reader]
    floats: list[Reader] = field(default_factory=list)


def _exists(layer: nn.Module, name: str) -> bool:
    """A module, or a fused experts parameter (``mlp.experts.gate_up_proj``), of this name is in ``layer``."""
    base = name.removesuffix(UP)
    for get in (layer.get_submodule, layer.get_parameter):
        try:
            get(base)
            return True
        except AttributeError:
            pass
    return False


def _reader_kind(layer: nn.Module, name: str) -> str:
    """A fused experts parameter (``[E, 2I, H]`` gate/up or ``[E, H, I]`` down), else a Linear."""
    try:
        p = layer.get_parameter(name)
    except AttributeError:
        return "linear"
    if p.dim() != 3:
        raise ValueError(f"{name}: a balance-group reader must be a Linear or a fused experts parameter")
    return "experts_gate_up" if name.endswith("gate_up_proj") else "experts_down"


def resolve(layer: nn.Module, spec: ArchSpec, stage_targets: set[str], all_targets: set[str]) -> list[Resolved]:
    """The family's groups that apply to ``layer`` in this stage (``stage_targets``: names of its targets)."""
    out = []
    kept = set(spec.routers) | set(spec.keep_float)
    for g in spec.awq_groups:
        if not _exists(layer, g.source):
            continue
        present = [r for r in g.readers if _exists(layer, r)]
        quantized, floats = [], []
        for r in present:
            if r in stage_targets:
                quantized.append(Reader(r, _reader_kind(layer, r)))
            elif r in kept or r not in all_targets:
                floats.append(Reader(r, "float"))
            else:
                quantized = []  # its readers are quantized in another stage: not this stage's group
                break
        if not quantized:
            continue
        src = layer.get_submodule(g.source) if not g.source.endswith(UP) else None
        kind = "experts_up" if src is None else ("linear" if isinstance(src, nn.Linear) else "norm")
        if kind == "linear" and g.source not in all_targets:
            continue  # a linear kept in float (--ignore) would have to be written divided: left unbalanced
        out.append(Resolved(g, kind, quantized, floats))
    return out


def _stats_key(r: Reader) -> str:
    return r.name


def _x_mean(r: Reader, stats) -> torch.Tensor | None:
    st = stats.get(_stats_key(r))
    if st is None:
        return None
    if r.kind == "experts_gate_up":
        return st.extra["all_abs_sums"][None] / max(int(st.extra["all_count"]), 1)
    if r.kind == "experts_down":
        return st.extra["abs_sums"] / st.counts.to(st.extra["abs_sums"].device).clamp(min=1)[:, None].to(st.extra["abs_sums"].dtype)
    return st.extra["abs_sums"][None] / max(int(st.counts), 1)


def _as_batch(r: Reader, w: torch.Tensor) -> torch.Tensor:
    """The reader's weight as ``[B, N, K]``: B = 1 except for the experts' down (per-expert scales)."""
    if r.kind == "experts_gate_up":
        return w.reshape(1, -1, w.shape[-1])  # one shared scale over every expert's rows
    if r.kind == "experts_down":
        return w
    return w[None]


class _HeadRepeat:
    """Map source scales ``[B, R]`` onto reader columns ``[B, C]``: identity, or GQA's repeat per query head."""

    def __init__(self, rows: int, cols: int, head_dim: int | None):
        self.rows, self.cols = rows, cols
        self.rep = cols // rows if rows else 0
        self.hd = head_dim
        self.ok = cols == rows or (self.rep > 1 and cols == self.rep * rows and head_dim and rows % head_dim == 0)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        if self.rep <= 1:
            return s
        b = s.shape[0]
        return s.view(b, self.rows // self.hd, 1, self.hd).expand(-1, -1, self.rep, -1).reshape(b, self.cols)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        if self.rep <= 1:
            return v
        b = v.shape[0]
        return v.view(b, self.rows // self.hd, self.rep, self.hd).mean(2).reshape(b, self.rows)


def _store_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


class ResidualSampler:
    """Keep every ``stride``-th input row of ``module`` (the post-attention norm): the MoE block's residual."""

    def __init__(self, module: nn.Module, stride: int):
        self.module, self.stride, self.rows = module, max(1, stride), []

    def __enter__(self):
        self.h = self.module.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, _m, args):
        x = args[0].detach()
        self.rows.append(x.reshape(-1, x.shape[-1])[:: self.stride].clone())

    def __exit__(self, *exc):
        self.h.remove()

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.rows) if self.rows else None


def apply_stage(layer: nn.Module, spec: ArchSpec, groups: list[Resolved], stats: dict, residual: torch.Tensor | None,
                settings: AwqSettings, solved: dict, overrides: dict,
                attention: Callable[[], list[torch.Tensor]] | None = None) -> list[dict]:
    """Search and fold every group of one stage; returns one record per group (for moecompress.json).

    ``solved``: ``{target name: QuantizedWeight}`` already solved in earlier stages of this layer
    (a quantized source is folded into its scales). ``overrides`` collects the modified float tensors.
    ``attention()``: the attention block's outputs (anything that differs from them by the block's
    output only) on a few calibration batches, with the layer's current weights: the "attention" loss.
    """
    records = []
    for g in groups:
        records.append(_apply_group(layer, spec, g, stats, residual, settings, solved, overrides, attention))
    return records


def _apply_group(layer, spec: ArchSpec, g: Resolved, stats, residual, settings: AwqSettings, solved, overrides,
                 attention=None) -> dict:
    grp = g.group
    rec: dict = {"source": grp.source, "readers": [r.name for r in g.quantized], "float_readers": [r.name for r in g.floats]}
    offset = spec.norm_weight_offset if g.source_kind == "norm" else 0.0
    pow2 = settings.scales == "pow2" and bool(g.floats)
    if pow2 and offset:
        rec["skipped"] = ("the norm multiplies by (1 + weight): no scale folds into it exactly, and its float "
                          "readers (routers) would change; --awq-scales free applies it and measures the change")
        log.info("AWQ %s: skipped (%s)", grp.source, rec["skipped"])
        return rec
    ws = [_as_batch(r, r.weight(layer).data) for r in g.quantized]
    xs = [_x_mean(r, stats) for r in g.quantized]
    x_mean = next((x for x in xs if x is not None), None)
    if x_mean is None:
        rec["skipped"] = "no calibration statistics"
        return rec
    # source rows vs reader columns: grouped-query attention repeats v's rows per query head
    rep = _head_repeat(layer, g)
    if not rep.ok:
        rec["skipped"] = f"source has {rep.rows} outputs and its readers {rep.cols} inputs: no per-head mapping"
        return rec
    specs = settings.reader_specs(g.quantized)
    w_mean = weight_mean(ws, specs) if settings.duo else None
    x_src = rep.reduce(x_mean.float())
    w_src = rep.reduce(w_mean) if w_mean is not None else None
    rec["loss"] = grp.loss if grp.loss != "attention" or attention is not None else "outputs"
    if grp.loss == "block":
        if residual is None:
            rec["skipped"] = "no residual samples for the block loss"
            return rec
        loss = _block_loss(layer, g, residual, settings, spec, stats)
    elif rec["loss"] == "attention":
        loss = _attention_loss(layer, g, attention, settings, stats, rep)
    else:
        hs = [stats[_stats_key(r)].hessian() for r in g.quantized]
        hs = [h if h.dim() == 3 else h[None] for h in hs]
        if any(r.kind == "experts_gate_up" for r in g.quantized):
            raise ValueError("the experts' gate/up is searched with the block loss")

        def loss(s):
            return hessian_loss(ws, hs, rep(s), specs)

    choice = search_scales(loss, x_src, w_src, alpha_grid(settings.grid), pow2)
    checked = g.floats and grp.source == spec.router_input_norm and residual is not None
    router_before = _float_outputs(layer, g, residual, spec) if checked else None
    s_eff, s_cols = fold(layer, spec, g, choice.scales, settings.store_dtype, solved, overrides, stats,
                         settings.stored, settings.original, settings.scale_dtype)
    if router_before is not None:
        rec["float_readers_check"] = _compare(router_before, _float_outputs(layer, g, residual, spec))
    rec.update({"pow2": pow2, "alpha": choice.alpha if grp.per_expert else choice.alpha[0],
                "duo": choice.duo if grp.per_expert else choice.duo[0],
                "loss_before": choice.loss_before if grp.per_expert else choice.loss_before[0],
                "loss_after": choice.loss_after if grp.per_expert else choice.loss_after[0],
                "scales": scale_summary(s_eff)})
    if g.floats:  # the exact scales the float readers got: their source weights are recoverable
        rec["float_reader_scales"] = s_cols[0].tolist()
    return rec


def fold(layer, spec: ArchSpec, g: Resolved, s: torch.Tensor, store_dtype, solved: dict, overrides: dict,
         stats: dict | None = None, stored=None, original=None, scale_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold source scales ``s [B, R]`` into ``g``'s source and readers (and their statistics).

    ``stored(name)``: the on-disk dtype of a float tensor (default ``store_dtype``): modified float
    tensors are rounded to it at once; an already quantized source's scales to ``scale_dtype`` (the format's). ``original(name)``: the stored tensor (None: use the module's): what
    is written is computed from it, so a calibration in a narrower dtype rounds nothing that is written.
    Returns (the scales actually applied to the source, after rounding it; the readers' column scales)."""
    offset = spec.norm_weight_offset if g.source_kind == "norm" else 0.0
    rep = _head_repeat(layer, g)
    dt = stored or (lambda name: store_dtype)
    base = _originals(original)
    s_eff = _fold_source(layer, g, s, offset, scale_dtype or store_dtype, dt, solved, overrides, base)
    s_cols = rep(s_eff)
    for r in g.quantized:
        _scale_reader(layer, r, s_cols, stats or {})
    for r in g.floats:
        w = r.weight(layer)
        name = f"{r.name}.weight"
        new = _store_round(base(name, w).float() * s_cols[0], dt(name))
        w.data = new.to(w.dtype)
        overrides[name] = new.to(dt(name))
    return s_eff, s_cols


def _originals(original):
    """``base(name, module_tensor)``: the stored tensor of ``name`` (same shape), else the module's own."""
    def base(name: str, t: torch.Tensor) -> torch.Tensor:
        o = original(name) if original is not None else None
        return t.data if o is None or tuple(o.shape) != tuple(t.shape) else o
    return base


def _head_repeat(layer, g: Resolved) -> "_HeadRepeat":
    src = g.group.source
    head_dim = getattr(layer.get_submodule(src.rsplit(".", 1)[0]), "head_dim", None) if "." in src else None
    return _HeadRepeat(_source_rows(layer, g), g.quantized[0].weight(layer).shape[-1], head_dim)


def _source_rows(layer, g: Resolved) -> int:
    if g.source_kind == "norm":
        return layer.get_submodule(g.group.source).weight.shape[0]
    if g.source_kind == "linear":
        return layer.get_submodule(g.group.source).out_features
    return layer.get_parameter(g.group.source.removesuffix(UP)).shape[1] // 2


class _Swap:
    """Temporarily replace parameters' data; ``restore`` puts the originals back."""

    def __init__(self):
        self.saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def set(self, p: nn.Parameter, data: torch.Tensor):
        self.saved.append((p, p.data))
        p.data = data

    def restore(self):
        for p, d in reversed(self.saved):
            p.data = d
        self.saved.clear()


def _block_loss(layer, g: Resolved, residual, settings: AwqSettings, spec: ArchSpec, stats: dict):
    """loss(s) = ||mlp(x) - mlp_q(x)||^2 on the sampled rows, routers untouched (the routing stays the original).

    Every reader is quantized as the method will, its clip search weighted by the diagonal of the
    Hessian of the whole layer's input (per expert it would be of its routed tokens: close enough
    for scoring a shared scale)."""
    mlp = layer.mlp
    with torch.no_grad():
        x = layer.get_submodule(spec.router_input_norm)(residual)[None]
        ref = _out(mlp(x))
    params = [r.weight(layer) for r in g.quantized]
    diag = None
    for r in g.quantized:
        st = stats.get(_stats_key(r))
        if st is not None:
            sums = st.extra["all_sums"] if r.kind == "experts_gate_up" else st.sums
            diag = sums.diagonal()[None].float()
            break

    def loss(s):
        out = _out(_run_quantized(params, s, settings.reader_specs(g.quantized), [diag] * len(params), lambda: mlp(x)))
        return ((out.float() - ref.float()) ** 2).sum().reshape(1)

    return loss


def _run_quantized(params: list[nn.Parameter], cols: torch.Tensor, specs: list[QuantSpec], diags, run):
    """``run()`` with every reader's weight replaced by its fake-quantized twin at column scales ``cols [1, K]``
    (clip search weighted by ``diags[i] [1, K]``, or unweighted where None); the originals are restored after."""
    swap = _Swap()
    with torch.no_grad():
        try:
            for p, d, sp in zip(params, diags, specs):
                w0 = p.data
                flat = w0.reshape(-1, w0.shape[-1])[None]
                swap.set(p, w0 - scaled_error(flat, cols, sp, d).reshape(w0.shape).to(w0.dtype))
            return run()
        finally:
            swap.restore()


def _attention_loss(layer, g: Resolved, attention, settings: AwqSettings, stats: dict, rep):
    """loss(s) = ||attention_q(x) - attention(x)||^2 on ``attention()``'s batches: the readers quantized as in
    :func:`hessian_loss` (clip search weighted by each one's Hessian diagonal), everything else as it is.

    On the demo model (W4 g128, three calibration seeds) scoring the input norm's group this way instead of
    by the q/k/v output errors lowered the KL by 2-5%; scoring it with the exact final quantizer (Hessian-
    block clip search and refits) or on a finer alpha grid did not help further (measured worse, within the
    run-to-run spread of the choice)."""
    with torch.no_grad():
        ref = attention()
    params = [r.weight(layer) for r in g.quantized]
    diags = [stats[_stats_key(r)].hessian().diagonal(dim1=-2, dim2=-1).reshape(1, -1).float() for r in g.quantized]

    def loss(s):
        outs = _run_quantized(params, rep(s), settings.reader_specs(g.quantized), diags, attention)
        total = sum(((o.double() - r.double()) ** 2).sum() for o, r in zip(outs, ref))
        return torch.as_tensor(total, dtype=torch.float64).reshape(1)

    return loss


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _fold_source(layer, g: Resolved, s: torch.Tensor, offset: float, scale_dtype, dt, solved, overrides,
                 base=None) -> torch.Tensor:
    """Divide the source's output by ``s``; returns the scales actually applied (after rounding the source).
    ``scale_dtype``: what a quantized source's scales are rounded to."""
    src = g.group.source
    base = base or _originals(None)
    if g.source_kind == "norm":
        w = layer.get_submodule(src).weight
        old = base(f"{src}.weight", w).float()
        new = _store_round((offset + old) / s[0] - offset, dt(f"{src}.weight")).float()
        denom = offset + new
        ok = denom != 0
        eff = torch.where(ok, (offset + old) / torch.where(ok, denom, torch.ones_like(denom)), torch.ones_like(old))
        new = torch.where(ok, new, old)
        w.data = new.to(w.dtype)
        overrides[f"{src}.weight"] = new.to(dt(f"{src}.weight"))
        return eff[None]
    if g.source_kind == "linear":
        mod = layer.get_submodule(src)
        if src in solved:
            qw = solved[src]
            qw.scales = _store_round(qw.scales / s[0][:, None], scale_dtype)
            mod.weight.data = qw.dequantize(mod.weight.dtype)
        else:
            mod.weight.data = mod.weight.data / s[0][:, None].to(mod.weight.dtype)
        if mod.bias is not None:  # a bias stays in float: round it as stored
            new = _store_round(base(f"{src}.bias", mod.bias).float() / s[0], dt(f"{src}.bias"))
            mod.bias.data = new.to(mod.bias.dtype)
            overrides[f"{src}.bias"] = new.to(dt(f"{src}.bias"))
        return s
    # the experts' up half: rows I..2I of every expert's fused gate/up, one scale vector per expert
    name = src.removesuffix(UP)
    p = layer.get_parameter(name)
    half = p.shape[1] // 2
    if name in solved:
        qw = solved[name]
        qw.scales[:, half:] = _store_round(qw.scales[:, half:] / s[:, :, None], scale_dtype)
        p.data = qw.dequantize(p.dtype)
    else:
        p.data[:, half:] /= s[:, :, None].to(p.dtype)
    return s


def _scale_reader(layer, r: Reader, s: torch.Tensor, stats) -> None:
    """Multiply a quantized reader's input columns by ``s`` and transform its statistics to match."""
    p = r.weight(layer)
    sv = s if r.kind == "experts_down" else s[0]
    if r.kind == "experts_down":
        p.data = p.data * sv[:, None, :].to(p.dtype)
    else:
        p.data = p.data * sv.to(p.dtype)
    st = stats.get(_stats_key(r))
    if st is None:
        return
    inv = 1.0 / sv.to(st.sums.dtype)
    outer = inv[..., :, None] * inv[..., None, :]
    st.sums.mul_(outer)
    st.extra["abs_sums"].mul_(inv)
    if "all_sums" in st.extra and r.kind == "experts_gate_up":
        st.extra["all_sums"].mul_(outer)
        st.extra["all_abs_sums"].mul_(inv)


def _float_outputs(layer, g: Resolved, residual, spec: ArchSpec) -> list:
    """What the float readers of the router-input norm compute on the sampled residual rows."""
    with torch.no_grad():
        x = layer.get_submodule(g.group.source)(residual)
        outs = []
        for r in g.floats:
            # a router whose block passes it the selection bias (MiniMax-M2) is called with it
            args = (x, layer.get_buffer(spec.bias_name)) if r.name == spec.routers[0] and spec.bias_passed else (x,)
            out = layer.get_submodule(r.name)(*args)
            outs.append((r.name, out if isinstance(out, tuple) else (out,)))
    return outs


def _compare(before, after) -> dict:
    """Bit-identity of the float readers' outputs, their largest change, and top-k flips (int outputs)."""
    if before is None or after is None:
        return {}
    res = {}
    for (name, b), (_, a) in zip(before, after):
        same = all(torch.equal(x, y) for x, y in zip(b, a) if torch.is_tensor(x))
        floats = [(x, y) for x, y in zip(b, a) if torch.is_tensor(x) and x.is_floating_point()]
        ints = [(x, y) for x, y in zip(b, a) if torch.is_tensor(x) and not x.is_floating_point()]
        d = max((float((x.float() - y.float()).abs().max()) for x, y in floats), default=0.0)
        flips = 0
        for x, y in ints:
            flips += int((x.reshape(x.shape[0], -1).sort(-1).values != y.reshape(y.shape[0], -1).sort(-1).values)
                         .any(-1).sum())
        res[name] = {"bit_identical": same, "max_abs_change": d, "topk_flips": flips, "rows": int(b[0].shape[0])}
    return res
