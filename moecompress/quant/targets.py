"""What gets quantized in a decoder layer, in which calibration stage, and how each target is solved.

A *target* is either an ``nn.Linear`` (attention, shared expert, dense MLP) or one projection of
the fused experts module (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``, all experts
batched). Routers and the family's ``keep_float`` modules are never targets. Stages implement
true-sequential calibration: attention first, then the MLP's input projections, then its output
projections, each calibrated on the outputs of what was already quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.registry import ArchSpec
from ..calib.capture import ExpertTarget
from ..errors import UserError
from .gptq import gptq_quantize
from .overrides import fused_siblings
from .refit import refine, refit_reround
from .rtn import rtn_quantize
from .spec import QuantizedWeight, QuantSpec

STAGES = ("attn", "mlp_up", "mlp_down")


@dataclass(frozen=True)
class Target:
    name: str  # layer-local in-memory name: "self_attn.q_proj" or "mlp.experts.gate_up_proj"
    stage: str
    expert_proj: str | None = None  # "gate_up" | "down" for fused experts, else None (a Linear)

    @property
    def module_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.expert_proj else self.name


def layer_targets(layer: nn.Module, spec: ArchSpec, only_experts: bool) -> list[Target]:
    kept = set(spec.routers) | set(spec.keep_float)
    out: list[Target] = []
    for name, mod in layer.named_modules():
        if name.endswith("experts") and hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            out.append(Target(f"{name}.gate_up_proj", "mlp_up", "gate_up"))
            out.append(Target(f"{name}.down_proj", "mlp_down", "down"))
        elif isinstance(mod, nn.Linear) and name not in kept and not only_experts:
            if not name.startswith("mlp."):
                stage = "attn"
            else:
                stage = "mlp_down" if name.endswith("down_proj") else "mlp_up"
            out.append(Target(name, stage))
    return out


def apply_ignore(all_targets: list[list[Target]], patterns: list[str]) -> tuple[list[list[Target]], list[str]]:
    """``all_targets`` (per layer) without the linears whose ``layers.{i}.{name}`` matches one of ``patterns``
    (``re.search``), and those names. A pattern that matches nothing, or matches routed experts (always
    quantized: their formats have no per-expert float fallback), is a UserError."""
    if not patterns:
        return all_targets, []
    compiled = [re.compile(p) for p in patterns]
    used = [False] * len(patterns)
    kept, ignored = [], []
    for i, targets in enumerate(all_targets):
        keep = []
        for t in targets:
            name = f"layers.{i}.{t.name}"
            hits = [j for j, c in enumerate(compiled) if c.search(name)]
            if hits and t.expert_proj is not None:
                raise UserError(f"--ignore {patterns[hits[0]]!r} matches the routed experts {name}: they are "
                                "always quantized (anchor the pattern, e.g. 'self_attn' or 'shared_experts')")
            for j in hits:
                used[j] = True
            if hits:
                ignored.append(name)
            else:
                keep.append(t)
        kept.append(keep)
    _check_fused(all_targets, ignored)
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
        example = next((f"layers.{i}.{t.name}" for i, ts in enumerate(all_targets) for t in ts
                        if t.expert_proj is None), "layers.0.self_attn.q_proj")
        raise UserError(f"--ignore {unused[0]!r} matches no quantized linear (names look like '{example}')")
    return kept, ignored


def _check_fused(all_targets: list[list[Target]], ignored: list[str]) -> None:
    """An ignored linear whose fused siblings stay quantized is a UserError (vLLM refuses such a layer)."""
    quantized = {f"layers.{i}.{t.name}" for i, ts in enumerate(all_targets) for t in ts}
    for name in ignored:
        parent, _, leaf = name.rpartition(".")
        group = fused_siblings(leaf)
        split = [f"{parent}.{x}" for x in group if f"{parent}.{x}" in quantized and f"{parent}.{x}" not in ignored]
        if split:
            members = "|".join(x for x in group if f"{parent}.{x}" in quantized)
            raise UserError(f"--ignore keeps {name} in float but not {', '.join(s.rpartition('.')[2] for s in split)}: "
                            f"serving engines load them as one fused layer; ignore all of them, e.g. "
                            f"'{re.escape(parent)}\\.({members})$'")


def target_weight(layer: nn.Module, t: Target) -> torch.Tensor:
    return layer.get_parameter(t.name if t.expert_proj else f"{t.name}.weight")


def stages_of(targets: list[Target], true_sequential: bool) -> list[list[Target]]:
    if not true_sequential:
        return [targets] if targets else []
    return [g for g in ([t for t in targets if t.stage == s] for s in STAGES) if g]


def capture_spec(t: Target, all_token_experts=frozenset(), weight_by_routing=False):
    if t.expert_proj is None:
        return None
    return ExpertTarget(t.expert_proj, frozenset(all_token_experts), weight_by_routing)


def output_energy(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||X W^T||^2 from H = 2/n X^T X (batched over a leading dim): :func:`output_rel_error`'s denominator."""
    return ((w.float() @ h) * w.float()).sum(dim=(-1, -2)).clamp(min=1e-30)


def output_rel_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
    """||X (W - Wq)^T||^2 / ||X W^T||^2 computed from H = 2/n X^T X (batched over a leading dim);
    ``energy``: the denominator, when already known (:func:`output_energy`)."""
    d = (w - wq).float()
    num = ((d @ h) * d).sum(dim=(-1, -2))
    return num / (output_energy(w, h) if energy is None else energy)


def weight_rel_error(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    d = (w - wq).float()
    return d.pow(2).sum(dim=(-1, -2)) / w.float().pow(2).sum(dim=(-1, -2)).clamp(min=1e-30)


@dataclass
class SolveResult:
    qweight: QuantizedWeight
    dequantized: torch.Tensor
    info: list[dict]


def round_scales(qw: QuantizedWeight, scale_dtype: torch.dtype) -> QuantizedWeight:
    """Scales as the checkpoint will store them (``scale_dtype``: the format's, :func:`.formats.scale_dtype`), so
    calibration and every error report see exactly the exported weights."""
    qw.scales = qw.scales.to(scale_dtype).to(torch.float32)
    return qw


def solve(w: torch.Tensor, h: torch.Tensor | None, qspec: QuantSpec, method: str, scale_dtype: torch.dtype,
          *, damp: float, block_size: int, rtn_members: set[int] = frozenset(), chunk: int = 16,
          refine_rounds: int = 0, on_chunk=None, owned=None, gather=None,
          splits: list[int] | None = None) -> SolveResult:
    """Quantize one target: w [N, K] (with h [K, K]) or all experts w [E, N, K] (with h [E, K, K]).

    ``method``: "gptq", "rtn", or "awq" (round to nearest with the Hessian-diagonal-weighted clip
    search; the AWQ scales are already folded into ``w`` and ``h``).

    Members listed in ``rtn_members`` (starved experts under the RTN policy) are rounded to nearest
    instead of solved with GPTQ. Batched members are solved ``chunk`` at a time to bound memory;
    ``on_chunk(n)`` (optional) is told after each chunk how many members it held (progress).

    Across processes (``moecompress.distributed``): ``owned(start)`` says which chunks (by first member)
    this process solves, and ``gather({start: part})`` returns every process's parts; each chunk is
    solved exactly as one process would, so the result does not depend on how the chunks were shared.

    ``splits`` (one weight only): its rows are several linears that read the same input, stacked and
    solved as one (every row's problem is its own given H); ``info`` then holds one entry per linear,
    with its own errors (GPTQ's loss, a joint figure, is left out).
    """
    if splits is not None and (w.dim() != 2 or sum(splits) != w.shape[0]):
        raise ValueError(f"splits {splits} do not partition the rows of a weight of shape {tuple(w.shape)}")
    batched = w.dim() == 3
    W = w.float() if batched else w.float().unsqueeze(0)
    # h may come as {first member: [chunk, K, K]}: the blocks this process owns (moecompress.distributed)
    H = None if h is None else (h if batched else h.unsqueeze(0))
    parts: dict[int, tuple] = {}
    for s in range(0, W.shape[0], chunk):
        if owned is not None and not owned(s):
            continue
        parts[s] = _solve_chunk(W, H, list(range(s, min(s + chunk, W.shape[0]))), qspec, method, scale_dtype, damp,
                                block_size, rtn_members, refine_rounds, splits)
        if on_chunk is not None:
            on_chunk(len(parts[s][1]))
    if gather is not None:
        parts = gather(parts)
    ordered = [(s, _to(parts[s][0], W.device), parts[s][1]) for s in sorted(parts)]
    qw = _cat([p[1] for p in ordered]) if len(ordered) > 1 else ordered[0][1]
    infos = [i for p in ordered for i in p[2]]
    # dequantized chunk by chunk: the float temporaries are one chunk's, not the whole projection's (three
    # fp32 copies of a Qwen3-235B layer's gate_up_proj would be ~19 GB)
    deq = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    for s, part, _ in ordered:
        deq[s:s + part.qweight.shape[0]] = part.dequantize(torch.float32)
    if not batched:
        qw = qw[0]
        deq = deq[0]
    return SolveResult(qw, deq, infos)


def _solve_chunk(W, H, idx: list[int], qspec: QuantSpec, method: str, scale_dtype, damp: float, block_size: int,
                 rtn_members, refine_rounds: int, splits: list[int] | None = None):
    """(QuantizedWeight, per-member info) of members ``idx``; the infos carry each member's errors and the
    RTN baseline's (its owner computes them: only it holds the member's Hessian)."""
    wc = W[idx]
    H = _members(H, idx)
    use_rtn = method in ("rtn", "awq") or H is None
    if use_rtn:
        # AWQ's codes: round to nearest after the scales, the clip search scoring each group by its block
        # of the Hessian (the group's exact share of the output error, as AWQ's own clip search measures)
        awq = method == "awq" and H is not None
        qw = rtn_quantize(wc, qspec, None, H.float() if awq else None)
        if awq and refine_rounds:  # scales refit to the codes by least squares, the weight re-rounded at them, ...
            qw, _ = refit_reround(wc, qw, H.float(), damp)
        stats = [{"method": "awq" if awq else "rtn"} for _ in idx]
    else:
        qw, st = gptq_quantize(wc, H.float(), qspec, damp=damp, block_size=block_size)
        stats = _per_member(st, len(idx))
        if refine_rounds:
            qw, _ = refine(wc, H.float(), qw, rounds=refine_rounds, damp=damp, block_size=block_size)
        rtn_idx = [j for j, m in enumerate(idx) if m in rtn_members]
        if rtn_idx:
            rq = rtn_quantize(wc[rtn_idx], qspec)
            for field in ("qweight", "scales", "zeros"):
                getattr(qw, field)[rtn_idx] = getattr(rq, field)
            if qw.g_idx is not None and qw.g_idx.dim() > 1:
                qw.g_idx[rtn_idx] = rq.group_index().to(qw.g_idx.dtype)
            for j in rtn_idx:
                stats[j] = {"method": "rtn", "reason": "starved"}
    # the RTN baseline on the same statistics: how much GPTQ bought, per linear, in every report
    rtn_deq = rtn_quantize(wc, qspec).dequantize() if H is not None and method != "rtn" else None
    qw = round_scales(qw, scale_dtype)
    deq = qw.dequantize(torch.float32)
    if splits is None:
        return qw, [dict(info, **err) for info, err in zip(stats, _errors(wc, deq, rtn_deq, H))]
    # one member whose rows are several linears: the shared solver facts (not GPTQ's joint loss), and each
    # linear's own errors
    shared = {k: v for k, v in stats[0].items() if k != "loss"}
    bounds = [0, *torch.tensor(splits).cumsum(0).tolist()]
    return qw, [dict(shared, **_errors(wc[:, a:b], deq[:, a:b], None if rtn_deq is None else rtn_deq[:, a:b], H)[0])
                for a, b in zip(bounds, bounds[1:])]


def _errors(w, deq, rtn_deq, H) -> list[dict]:
    """Per member of ``w [B, N, K]``: the weight's and the output's relative error, and RTN's output error."""
    h = None if H is None else H.float()
    energy = None if h is None else output_energy(w, h)
    werr = weight_rel_error(w, deq)
    oerr = None if h is None else output_rel_error(w, deq, h, energy)
    base = None if rtn_deq is None else output_rel_error(w, rtn_deq, h, energy)
    out = []
    for j in range(w.shape[0]):
        e = {"weight_rel_err": float(werr[j]), "output_rel_err": None if oerr is None else float(oerr[j])}
        if base is not None:
            e["rtn_output_rel_err"] = float(base[j])
        out.append(e)
    return out


def _members(H, idx: list[int]):
    """``H[idx]``: from a tensor, or from owned blocks ``{first member: [n, K, K]}`` holding exactly ``idx``."""
    if H is None or torch.is_tensor(H):
        return None if H is None else H[idx]
    block = H[idx[0]]
    if block.shape[0] != len(idx):
        raise ValueError(f"the Hessian block at {idx[0]} holds {block.shape[0]} members, not {len(idx)}")
    return block


def _to(qw: QuantizedWeight, device) -> QuantizedWeight:
    if qw.qweight.device == torch.device(device):
        return qw
    return QuantizedWeight(qw.qweight.to(device), qw.scales.to(device), qw.zeros.to(device), qw.spec,
                           None if qw.g_idx is None else qw.g_idx.to(device))


def _per_member(stats, n: int) -> list[dict]:
    """GPTQ's stats as one dict per batch member (accepts a list of dicts or a dict of lists)."""
    if isinstance(stats, list):
        return [dict(s, method=s.get("method", "gptq")) for s in stats]
    out = []
    for j in range(n):
        d = {"method": "gptq"}
        for k, v in stats.items():
            if isinstance(v, (list, tuple)) or (torch.is_tensor(v) and v.dim() > 0):
                v = v[j]
            d[k] = v.item() if torch.is_tensor(v) else v
        out.append(d)
    return out


def _cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    g = None
    if parts[0].g_idx is not None:
        g = torch.cat([p.g_idx if p.g_idx.dim() > 1 else p.g_idx.expand(p.qweight.shape[0], -1) for p in parts])
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), parts[0].spec, g)
