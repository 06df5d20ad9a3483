"""Calibrate and quantize one decoder layer: the per-layer work of `moecompress quantize`.

True-sequential stages (attention, MLP inputs, MLP outputs), each calibrated on the outputs of what was
already quantized; per stage the statistics of its targets are captured chunk by chunk (a fixed
grouping of the calibration batches, ``CalibPlan``) and added in chunk order, then every target is
solved (GPTQ/RTN/AWQ codes). Across processes (``moecompress.distributed``) each rank runs only its
chunks' forward passes and solves only the parts it owns; each expert block's sums reach only its owner,
the rest of the statistics and the solved parts reach every rank, so that every rank ends the layer with
the quantized layer one process would have made.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .arch.handle import ModelHandle
from .calib.capture import HessianCapture, add_stats, pack_stats, stats_bytes, stats_layout, unpack_stats
from .calib.expert_inputs import ExpertInputs
from .calib.runner import LayerFeed, attention_half, mlp_half, run_layer
from .distributed import SINGLE, Ranks, to_device
from .errors import UserError
from .quant.balance import AwqSettings, ResidualSampler, apply_stage, resolve
from .quant.formats import scale_dtype
from .quant.targets import Target, capture_spec, solve, stages_of, target_weight
from .quant.tune import float_outputs, start_offsets, tune_layer
from .settings import QuantizeConfig

log = logging.getLogger("moecompress")


@dataclass
class CalibPlan:
    """Which calibration batches this process runs, and how the statistics are summed.

    ``chunks[c]`` lists the global batch indices of chunk ``c``; chunk ``c`` is rank ``c mod N``'s. The
    local feed holds this rank's batches only, in global order (``local[b]`` = its position there)."""

    chunks: list[range]
    ranks: Ranks = field(default_factory=Ranks)
    mine: list[int] = field(init=False)
    local: dict[int, int] = field(init=False)
    peak_stats_bytes: int = field(init=False, default=0)  # the most statistics this rank held at once

    def __post_init__(self):
        self.mine = [c for c in range(len(self.chunks)) if c % self.ranks.world == self.ranks.rank]
        self.local = {b: j for j, b in enumerate(b for c in self.mine for b in self.chunks[c])}

    @property
    def my_batches(self) -> list[int]:
        return sorted(self.local)

    def rounds(self):
        w = self.ranks.world
        for start in range(0, len(self.chunks), w):
            yield list(range(start, min(start + w, len(self.chunks))))

    def batches(self, c: int) -> list[int]:
        return [self.local[b] for b in self.chunks[c]]

    def holder(self, b: int) -> int:
        """The rank holding global batch ``b`` (that of its chunk)."""
        return next(c for c, ch in enumerate(self.chunks) if b in ch) % self.ranks.world

    def my_chunk(self, rnd: list[int]) -> int | None:
        return rnd[self.ranks.rank] if self.ranks.rank < len(rnd) else None


class RouterPrecision:
    """Run the layer's routers in ``router_dtype`` (fp32 by default) whatever the activations' dtype.

    Each call runs on copies of the router's tensors in that dtype, swapped in before and out after, so the
    module keeps its stored weights: a lower ``router_dtype`` rounds no weight that is then written (AWQ folds
    its scales into the stored router, and the checkpoint keeps the router's source bits)."""

    def __init__(self, layer, names, dtype):
        self.mods = [layer.get_submodule(n) for n in names if _has(layer, n)]
        self.dtype = dtype
        self.swapped: dict[int, list] = {}  # id(module) -> [(owner, kind, name, original)] while a call runs

    def __enter__(self):
        self.handles = []
        for m in self.mods:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def _pre(self, module, args):
        module._in_dtype = args[0].dtype
        saved = []
        for owner in module.modules():
            for name, p in owner._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != self.dtype:
                    saved.append((owner, "p", name, p.data))
                    p.data = p.data.to(self.dtype)
            for name, b in owner._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != self.dtype:
                    saved.append((owner, "b", name, b))
                    owner._buffers[name] = b.to(self.dtype)
        self.swapped[id(module)] = saved
        return (args[0].to(self.dtype),) + tuple(args[1:])

    def _restore(self, module_id: int) -> None:
        for owner, kind, name, original in reversed(self.swapped.pop(module_id, [])):
            if kind == "p":
                owner._parameters[name].data = original
            else:
                owner._buffers[name] = original

    def _post(self, module, args, out):
        self._restore(id(module))
        dt = module._in_dtype
        if isinstance(out, tuple):
            return tuple(o.to(dt) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(dt)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for module_id in list(self.swapped):  # a call that raised
            self._restore(module_id)


def _has(layer, name) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def quantize_layer(layer, i: int, targets: list[Target], feed: LayerFeed | None, cfg: QuantizeConfig, qspec,
                   store_dtype, handle: ModelHandle, router_dtype, awq: AwqSettings | None = None,
                   plan: CalibPlan | None = None, schemes: dict | None = None, reference=None):
    """Calibrate and solve one layer: (record, {target: QuantizedWeight}, {local name: modified float tensor}).

    ``schemes``: ``{"layers.{i}.{name}": QuantSpec}`` of the targets an override gives another scheme than
    ``qspec`` (``quant.overrides.assign``); ``reference(i, feed)``: the tuning's targets from another model's
    layer (``tune_reference``), else this layer's float outputs."""
    schemes = schemes or {}
    record: dict = {"layer": i, "linears": {}}
    results: dict[Target, object] = {}
    overrides: dict = {}
    starved: set[int] = set()
    if plan is None and feed is not None:  # one process, all batches as one chunk
        plan = CalibPlan([range(len(feed.hidden))])
    ranks = plan.ranks if plan is not None else SINGLE
    bar = tqdm(total=len(targets), desc=f"layer {i}", unit="linear", leave=False, disable=not ranks.main)
    split = feed is not None and cfg.true_sequential
    mids = None  # the residual stream after (quantized) attention, once it is final
    kept = None  # the experts' down-projection inputs of the last capture
    clock = {"calib_s": 0.0, "solve_s": 0.0}
    comm0 = (ranks.comm_s, ranks.comm_bytes)
    with RouterPrecision(layer, handle.spec.routers, router_dtype), bar:
        # block-output tuning's targets: the float layer's outputs along the float model's trajectory
        refs = None
        if cfg.tune_steps and feed is not None:
            refs = reference(i, feed) if reference is not None else float_outputs(layer, i, feed)
        offsets = {} if refs is not None else None
        for stage in stages_of(targets, cfg.true_sequential):
            bar.set_postfix_str(f"calibrating {stage[0].stage}")
            stats = {}
            if feed is not None:
                if split and mids is None and stage[0].stage != "attn":
                    mids = attention_half(layer, i, feed)
                run = _runner(layer, i, feed, mids, split)
                specs = {t.module_name if t.expert_proj is None else t.name: capture_spec(
                    t, starved if cfg.starved_experts == "all-tokens" and t.expert_proj == "down" else (),
                    cfg.weight_by_routing) for t in stage}
                groups = resolve(layer, handle.spec, {t.name for t in stage}, {t.name for t in targets}) if awq else []
                sampler = _sampler(layer, handle, feed, awq, ranks) if any(g.group.loss == "block" for g in groups) else None
                # across processes, each expert block's sums go to the rank that solves it (AWQ's search
                # reads every expert's, so it keeps them all)
                owners = {t.name: _owner_of(ranks, cfg.expert_chunk, targets.index(t)) for t in stage
                          if t.expert_proj is not None} if ranks.active and not awq else None
                # the down projections' inputs, computed for their statistics, feed the next layer too (not
                # under AWQ, whose scales change them after the capture; nor with all-token experts)
                if mids is not None and awq is None and not (starved and cfg.starved_experts == "all-tokens") \
                        and any(t.expert_proj == "down" for t in stage):
                    kept = ExpertInputs()
                t0 = time.perf_counter()
                stats = capture(layer, specs, run, plan, sampler, owners, cfg.expert_chunk, awq is not None, kept)
                stats = _starved_pass(layer, i, stage, stats, record, starved, cfg, run, plan, owners, awq is not None)
                plan.peak_stats_bytes = max(plan.peak_stats_bytes, stats_bytes(stats))
                clock["calib_s"] += time.perf_counter() - t0
                if groups:
                    bar.set_postfix_str(f"AWQ scales ({len(groups)} groups)")
                    t0 = time.perf_counter()
                    windows = (_attention_windows(layer, i, feed, plan, cfg, awq)
                               if any(g.group.loss == "attention" for g in groups) else None)
                    record.setdefault("awq", []).extend(_awq_stage(layer, i, handle, groups, stats, sampler, awq,
                                                                   results, overrides, windows))
                    clock["awq_s"] = clock.get("awq_s", 0.0) + time.perf_counter() - t0
            for group in _split_by_scheme(same_input_groups(stage, stats), i, schemes):
                t = group[0]
                bar.set_postfix_str("+".join(x.name for x in group)
                                    + (f" ({target_weight(layer, t).shape[0]} experts)" if t.expert_proj else ""))
                t0 = time.perf_counter()
                spec = schemes.get(f"layers.{i}.{t.name}", qspec)
                _solve_target(layer, i, group, stats, cfg, spec, store_dtype, record, results, starved, handle,
                              ranks, targets.index(t), offsets)
                clock["solve_s"] += time.perf_counter() - t0
                bar.update(len(group))
        if refs is not None and results:
            bar.set_postfix_str(f"tuning codes ({cfg.tune_steps} steps)")
            t0 = time.perf_counter()
            record["tune"] = tune_layer(layer, i, results, refs, offsets, feed, cfg, store_dtype, starved, plan)
            clock["tune_s"] = time.perf_counter() - t0
            mids = kept = None  # computed with the solved weights: stale once tuning changed them
        if refs is not None:
            feed.reference = refs
        t0 = time.perf_counter()
        if feed is not None:
            if split:
                mids = mids if mids is not None else attention_half(layer, i, feed)
                batches = list(range(len(mids)))
                with kept.replay(batches) if kept is not None and kept.covers(batches) else contextlib.nullcontext():
                    feed.hidden = mlp_half(layer, mids)
            else:
                run_layer(layer, i, feed, update=True)
        clock["feed_s"] = time.perf_counter() - t0
    # where the layer's time went (calibration and solving include this rank's waits in collectives)
    record["timings_s"] = dict(clock, comm_s=ranks.comm_s - comm0[0])
    record["comm_bytes_received"] = ranks.comm_bytes - comm0[1]
    return record, results, overrides


def _runner(layer, i: int, feed: LayerFeed, mids, split: bool):
    """``run(local batch indices)``: the forward pass a capture needs (its outputs are discarded)."""
    if mids is not None:
        return lambda bs: mlp_half(layer, [mids[b] for b in bs])
    if split:
        return lambda bs: attention_half(layer, i, feed, bs)
    return lambda bs: run_layer(layer, i, feed, False, bs)


def capture(layer, specs, run, plan: CalibPlan, sampler=None, owners: dict | None = None, block: int = 16,
            abs_sums: bool = True, keep: ExpertInputs | None = None) -> dict:
    """The targets' statistics: captured chunk by chunk (each summed from zero over its batches), the chunks
    added in chunk order; the capture passes' outputs are thrown away (experts compute nothing there).

    ``owners`` (across processes): ``{stats name: owner_of(first expert)}`` for the experts' statistics
    whose per-expert sums only the owner of each ``block`` of experts receives (:func:`_reduce_owned`).
    ``keep``: where the down projections' inputs computed on the way are kept for the feed."""
    ranks, total, layout = plan.ranks, None, None
    owned_sums: dict = {}
    for rnd in plan.rounds():
        c, part = plan.my_chunk(rnd), None
        sampled = len(sampler.rows) if sampler is not None else 0
        if c is not None:
            with HessianCapture(layer, specs, skip_expert_outputs=True, abs_sums=abs_sums, keep=keep) as cap, \
                    (sampler or contextlib.nullcontext()):
                run(plan.batches(c))
            part = cap.stats
            if keep is not None:
                keep.assign(plan.batches(c))
        if ranks.active and sampler is not None:  # AWQ's residual rows, every rank's in chunk order
            rows = sampler.rows[sampled:]
            del sampler.rows[sampled:]
            for got in ranks.all_gather_objects(torch.cat(rows) if rows else None):
                if got is not None:
                    sampler.rows.append(got.to(_layer_device(layer)))
        if not ranks.active:
            total = part if total is None else add_stats(total, part)
            continue
        # rank r holds chunk rnd[r]: each chunk's sums in turn from its rank, added in chunk order. One
        # chunk at a time, so a rank holds the total and one chunk's statistics, whatever the rank count
        device = _layer_device(layer)  # where the statistics are captured
        if owners:
            sharded = _take_sums(part, owners)
            _reduce_owned(sharded, owners, block, len(rnd), ranks, owned_sums, device)
            del sharded
        if layout is None:
            layout = ranks.broadcast_object(stats_layout(part) if ranks.main else None)
        mine = pack_stats(part, layout) if part is not None else None
        del part
        for r in range(len(rnd)):
            buf, mine = (mine, None) if r == ranks.rank else (pack_stats(None, layout), mine)
            p = unpack_stats({k: ranks.broadcast_flat(v, src=r) for k, v in buf.items()}, layout, device)
            total = p if total is None else add_stats(total, p)
            del buf, p
    for name in owners or {}:
        if total is not None and name in total and torch.is_tensor(total[name].sums) and total[name].sums.numel() == 0:
            total[name].sums = owned_sums.get(name, {})  # the blocks this rank owns (maybe none)
    return total or {}


def _take_sums(part: dict | None, owners: dict) -> dict:
    """The per-expert sums of the sharded statistics, replaced in ``part`` by empty tensors (the rest of
    ``part`` is reduced to every rank; these go to their owners)."""
    out = {}
    if part is None:
        return out
    for name in owners:
        st = part.get(name)
        if st is not None and torch.is_tensor(st.sums) and st.sums.dim() == 3:
            out[name], st.sums = st.sums, st.sums.new_zeros(0)
    return out


def _reduce_owned(sharded: dict, owners: dict, block: int, chunks: int, ranks: Ranks, owned: dict, device) -> None:
    """Add this round's chunks of every sharded sum into ``owned[name][first expert]`` on the block's owner
    only, in chunk order (rank r holds chunk r of the round): what one process would add, held by one rank.
    Names and shapes come from rank 0 (it always holds the round's first chunk)."""
    shapes = ranks.broadcast_object({n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in
                                     sharded.items()} if ranks.main else None)
    for name in sorted(shapes):
        (e, k, _), dtype = shapes[name]
        for s in range(0, e, block):
            o, n = owners[name](s), min(block, e - s)
            for r in range(chunks):
                if r == ranks.rank:
                    part = sharded[name][s:s + n]
                    if o != r:
                        ranks.send(part, dst=o)
                        continue
                elif o == ranks.rank:
                    part = ranks.recv((n, k, k), getattr(torch, dtype), src=r).to(device)
                else:
                    continue
                acc = owned.setdefault(name, {})
                acc[s] = part.clone() if s not in acc else acc[s].add_(part)


def _layer_device(layer) -> torch.device:
    return next(p.device for p in layer.parameters())


def _sampler(layer, handle: ModelHandle, feed: LayerFeed, awq: AwqSettings, ranks: Ranks = SINGLE) -> ResidualSampler:
    """Every n-th residual row at the router-input norm, about ``awq.search_tokens`` of them (n from the
    row count of every rank's batches, so that the rows are those of one process)."""
    total = sum(ranks.all_gather_objects(sum(h.numel() // h.shape[-1] for h in feed.hidden)))
    return ResidualSampler(layer.get_submodule(handle.spec.router_input_norm), -(-total // awq.search_tokens))


def _attention_windows(layer, i: int, feed: LayerFeed, plan: CalibPlan, cfg: QuantizeConfig, awq: AwqSettings) -> LayerFeed:
    """The calibration batches AWQ's attention loss runs on: about ``awq.search_tokens`` tokens of whole
    batches, evenly spaced by global batch index, the same on every rank (gathered from their holders), so
    that the scales do not depend on the rank count. Layer ``i``'s call arguments only."""
    n = sum(len(c) for c in plan.chunks)
    k = max(1, min(n, -(-awq.search_tokens // max(1, cfg.batch_size * cfg.seq_len))))
    chosen = list(range(0, n, max(1, n // k)))[:k]
    mine = {b: (feed.hidden[plan.local[b]], feed.calls[plan.local[b]][i]) for b in chosen if b in plan.local}
    if plan.ranks.active:
        held: dict = {}
        for got in plan.ranks.all_gather_objects(mine):
            held.update(got)
        mine = to_device(held, _layer_device(layer))
    return LayerFeed([mine[b][0] for b in chosen], [{i: mine[b][1]} for b in chosen])


def _awq_stage(layer, i: int, handle: ModelHandle, groups, stats, sampler, awq: AwqSettings, results, overrides,
               windows: LayerFeed | None = None):
    solved = {t.name: qw for t, qw in results.items()}
    attention = (lambda: attention_half(layer, i, windows)) if windows is not None else None
    try:
        recs = apply_stage(layer, handle.spec, groups, stats, sampler.tensor() if sampler else None, awq, solved,
                           overrides, attention)
    except ValueError as e:
        if "NaN/Inf" not in str(e):
            raise
        raise UserError(f"layer {i}: the AWQ scale search met non-finite values ({e}); an overflow in half "
                        "precision? try --dtype float32") from None
    for r in recs:
        chk = r.get("float_readers_check", {})
        flips = sum(v["topk_flips"] for v in chk.values())
        if chk and not all(v["bit_identical"] for v in chk.values()):
            log.info("layer %d: AWQ %s changed float readers' outputs (max %.3g, %d top-k flips)", i, r["source"],
                     max(v["max_abs_change"] for v in chk.values()), flips)
    return recs


def _starved_pass(layer, i, stage, stats, record, starved: set, cfg, run, plan, owners=None, abs_sums=True):
    """Find experts with too few routed tokens, log the decision, and recapture what they need."""
    for t in stage:
        if t.expert_proj != "gate_up" or t.name not in stats:
            continue
        routed = stats[t.name].extra["routed_tokens"]
        record["expert_tokens"] = routed.tolist()
        new = {e for e, n in enumerate(routed.tolist()) if n < cfg.min_expert_tokens}
        if new:
            starved |= new
            record["starved_experts"] = sorted(starved)
            record["starved_policy"] = cfg.starved_experts
            if plan is None or plan.ranks.main:
                log.info("layer %d: %d experts got fewer than %d tokens (%s): %s", i, len(new), cfg.min_expert_tokens,
                         sorted(new), "Hessian from all tokens" if cfg.starved_experts == "all-tokens" else "RTN")
        # down_proj stats captured in this same pass used routed tokens only: redo them for starved experts
        downs = [d for d in stage if d.expert_proj == "down"]
        if starved and cfg.starved_experts == "all-tokens" and downs:
            specs = {d.name: capture_spec(d, starved, cfg.weight_by_routing) for d in downs}
            stats.update(capture(layer, specs, run, plan, owners=owners, block=cfg.expert_chunk, abs_sums=abs_sums))
    return stats


def same_input_groups(stage: list[Target], stats: dict) -> list[list[Target]]:
    """The stage's targets in solve order, the dense linears with bit-equal statistics (one input read by
    q/k/v: ``HessianCapture`` shares it) grouped, to be solved as one stacked weight: each row's GPTQ
    problem depends on H alone, so stacking changes no row's problem and factors H once. Equal sums
    on every rank (they are reduced alike), so the grouping is the same for any rank count."""
    groups: list[list[Target]] = []
    for t in stage:
        st = stats.get(t.module_name) if t.expert_proj is None else None
        for g in groups:
            lead = stats.get(g[0].module_name) if g[0].expert_proj is None else None
            if st is not None and lead is not None and torch.equal(st.counts, lead.counts) \
                    and torch.equal(st.sums, lead.sums):
                g.append(t)
                break
        else:
            groups.append([t])
    return groups


def _split_by_scheme(groups: list[list[Target]], i: int, schemes: dict) -> list[list[Target]]:
    """Linears that read one input are solved as one stacked weight only when they share a scheme."""
    out = []
    for g in groups:
        by: dict = {}
        for t in g:
            by.setdefault(schemes.get(f"layers.{i}.{t.name}"), []).append(t)
        out.extend(by.values())
    return out


def _solve_target(layer, i: int, group: list[Target], stats, cfg, qspec, store_dtype, record, results, starved,
                  handle: ModelHandle, ranks: Ranks = SINGLE, t_index: int = 0, offsets: dict | None = None):
    t = group[0]
    params = [target_weight(layer, x) for x in group]
    param = params[0]
    st = stats.get(t.module_name if t.expert_proj is None else t.name)
    h = None
    if st is not None:
        h = st.hessian()
        if t.expert_proj == "gate_up" and starved and cfg.starved_experts == "all-tokens":
            # the gate/up input of a starved expert is any token of the layer: use all of them
            all_h = 2.0 * st.extra["all_sums"] / max(int(st.extra["all_count"]), 1)
            for s, blk in (h.items() if isinstance(h, dict) else [(0, h)]):
                for e in starved:
                    if s <= e < s + blk.shape[0]:
                        blk[e - s] = all_h
    experts = param.shape[0] if param.dim() == 3 else 0
    owned = gather = None
    if ranks.active:  # expert blocks, or the whole dense linear, spread over the ranks
        owner_of = _owner_of(ranks, cfg.expert_chunk, t_index)
        owned = lambda s: owner_of(s) == ranks.rank  # noqa: E731
        gather = lambda parts: ranks.gather_solved(parts, owner_of)  # noqa: E731
    bar = tqdm(total=experts, desc=f"  {t.name}", unit="expert", leave=False,
               disable=experts <= cfg.expert_chunk or not ranks.main)
    stacked = len(group) > 1
    try:
        with bar:
            res = solve(torch.cat([p.data for p in params]) if stacked else param.data, h, qspec, cfg.method,
                        scale_dtype(cfg.format, store_dtype), damp=cfg.damp, block_size=cfg.block_size,
                        rtn_members=starved if (t.expert_proj and cfg.starved_experts == "rtn") else set(),
                        chunk=cfg.expert_chunk, refine_rounds=cfg.refine_rounds, on_chunk=bar.update, owned=owned,
                        gather=gather, splits=[p.shape[0] for p in params] if stacked else None)
    except ValueError as e:  # the algorithms' NaN/Inf guard; the weights themselves were checked at load
        if "NaN/Inf" not in str(e):
            raise
        name = f"{handle.layer_prefix(i)}{handle.disk_local(t.module_name)}"
        raise UserError(f"the calibration activations reaching {name} are not finite ({e}); "
                        "an overflow in half precision? try --dtype float32") from None
    floats = [p.data.clone() for p in params] if offsets is not None else None
    _place(t, group, params, res, results, record, stacked)
    if offsets is not None:  # block-output tuning starts from the float weights' distance to their codes
        for x, w in zip(group, floats):
            offsets[x] = start_offsets(results[x], w)


def _place(t: Target, group: list[Target], params, res, results: dict, record: dict, stacked: bool) -> None:
    """Write a solve's dequantized weights into the layer and its codes into ``results``."""
    param = params[0]
    if t.expert_proj:
        param.data.copy_(res.dequantized.to(param.dtype))
        results[t] = res.qweight
        record["linears"][t.name] = res.info
        return
    start = 0
    for x, p, info in zip(group, params, res.info):
        rows = slice(start, start + p.shape[0])
        p.data.copy_(res.dequantized[rows].to(p.dtype))
        results[x] = res.qweight.rows(rows.start, rows.stop)
        record["linears"][x.name] = dict(info, solved_with=[y.name for y in group]) if stacked else info
        start = rows.stop


def _owner_of(ranks: Ranks, chunk: int, t_index: int):
    """The rank that solves the block of ``chunk`` experts (or the dense linear) starting at ``s``, for the
    ``t_index``-th target of the layer: blocks dealt round-robin, each target starting one rank further."""
    return lambda s: (s // chunk + t_index) % ranks.world
