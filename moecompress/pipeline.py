"""`moecompress quantize`: stream a checkpoint layer by layer through calibration, GPTQ/RTN and export.

Peak memory is one decoder layer plus the calibration activations: the model is built on the meta
device, each layer is read from the shards, calibrated, quantized, written and dropped before the
next one is read; the *quantized* layer's outputs feed the next layer (true sequential).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .arch.handle import ModelHandle, decoder_layers
from .calib.capture import HessianCapture
from .calib.runner import (LayerFeed, attention_half, capture_layer_kwargs, mlp_half, prepare_embeddings,
                           run_layer)
from .checkpoint.partial import PartialRun, check_stale, resumable_output_dir, source_fingerprint
from .checkpoint.writer import ShardedWriter, check_output_path, copy_side_files
from .errors import UserError
from .export import encode, kept_module_names, layer_tensors, quantization_config
from .finite import check_finite, check_finite_layer
from .lm_head import check_lm_head, quantize_lm_head
from .memory import release_freed_memory
from .quant.balance import AwqSettings, ResidualSampler, apply_stage, resolve
from .quant.targets import Target, capture_spec, layer_targets, solve, stages_of, target_weight
from .recipe import QuantizeConfig

log = logging.getLogger("moecompress")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return dev


def compute_dtype(cfg: QuantizeConfig, handle: ModelHandle, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # CPUs are slow and inexact in half precision: calibrate in fp32 there
    return torch.float32 if device.type == "cpu" else handle.float_dtype


def load_calibration(cfg: QuantizeConfig, model_dir: Path):
    from transformers import AutoTokenizer

    from .calib.data import load_texts, make_calibration_windows

    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
    if not any((model_dir / f).is_file() for f in files):
        raise UserError(f"{model_dir} has no tokenizer files ({', '.join(files[:3])}...): calibration needs the tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer of {model_dir} (needed for calibration): {str(e).splitlines()[0]}") from None
    texts = load_texts(cfg.calib)
    return make_calibration_windows(texts, tok, cfg.calib_samples, cfg.seq_len, cfg.seed)


class _RouterPrecision:
    """Run the layer's routers in ``router_dtype`` (fp32 by default) whatever the activations' dtype."""

    def __init__(self, layer, names, dtype):
        self.mods = [layer.get_submodule(n) for n in names if _has(layer, n)]
        self.dtype = dtype

    def __enter__(self):
        self.handles = []
        for m in self.mods:
            m.to(self.dtype)
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def _pre(self, module, args):
        module._in_dtype = args[0].dtype
        return (args[0].to(self.dtype),) + tuple(args[1:])

    def _post(self, module, args, out):
        dt = module._in_dtype
        if isinstance(out, tuple):
            return tuple(o.to(dt) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(dt)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _has(layer, name) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def quantize(model_dir: str | Path, out_dir: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
             command: list[str] | None = None, max_shard_bytes: int = 4 << 30, resume: bool = False) -> dict:
    """Quantize ``model_dir`` into ``out_dir``; returns the run summary also saved as moecompress.json.

    The output is built in ``.<out>.partial`` and committed after every layer (``checkpoint.partial``):
    ``resume`` goes on from a killed run's last committed layer, with a byte-identical result."""
    t_start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    handle = ModelHandle.open(model_dir)
    if handle.reader.config.get("quantization_config"):
        raise UserError(f"{model_dir} is already quantized ({handle.reader.config['quantization_config'].get('quant_method')}); "
                        "quantize its float original instead")
    check_output_path(model_dir, out_dir, overwrite)
    partial = PartialRun(out_dir, {**cfg.model_dump(), "max_shard_bytes": max_shard_bytes},
                         source_fingerprint(model_dir))
    saved = check_stale(partial, resume, overwrite)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, handle, device)
    router_dtype = dtype if cfg.router_dtype == "auto" else _DTYPES[cfg.router_dtype]
    store_dtype = handle.float_dtype
    qspec = cfg.spec()
    # transformers' grouped_mm experts path is its fastest on CPU and GPU; our hooks see the same call
    model = handle.skeleton(experts_implementation="grouped_mm")
    layers = decoder_layers(model)
    all_targets = [layer_targets(layer, handle.spec, cfg.only_experts) for layer in layers]
    for i, targets in enumerate(all_targets):  # fail before any work on a group size that cannot fit
        for t in targets:
            qspec.check_shape(target_weight(layers[i], t).shape[-1], f"layer {i} {t.name}")
    if cfg.quantize_lm_head:
        check_lm_head(handle, qspec, cfg.format)
    if cfg.awq and not handle.spec.awq_groups:
        raise UserError(f"the {handle.family} family has no AWQ balance groups; use --method gptq or rtn")
    awq = AwqSettings(qspec, cfg.awq_grid, cfg.awq_scales, cfg.awq_duo_scaling, cfg.awq_search_tokens,
                      store_dtype) if cfg.awq else None

    summary: dict = {"moecompress_version": __version__, "command": command, "recipe": cfg.model_dump(),
                     "source": str(model_dir.resolve()), "family": handle.family,
                     "versions": _versions(), "timings_s": {}, "layers": []}
    feed = None
    if cfg.needs_calibration:
        t0 = time.perf_counter()
        windows = load_calibration(cfg, model_dir)
        summary["calibration"] = windows.metadata
        prepare_embeddings(handle, model, device, dtype)
        check_finite(model.model.embed_tokens.weight, handle.non_layer_disk_name("model.embed_tokens.weight")
                      or "model.embed_tokens.weight", dtype, store_dtype)
        feed = capture_layer_kwargs(model, windows.input_ids, cfg.batch_size, device)
        model.model.embed_tokens.to("meta")
        summary["timings_s"]["calibration_data"] = time.perf_counter() - t0

    # log lines (starved experts...) go through tqdm.write while the bars are up, not into them
    with resumable_output_dir(partial, overwrite, saved is not None), logging_redirect_tqdm():
        tmp = partial.path
        start = 0
        if saved is not None:
            start = _resume_from(partial, saved, feed, summary, device)
            writer = ShardedWriter(tmp, max_shard_bytes, resume=saved["writer"])
        else:
            writer = ShardedWriter(tmp, max_shard_bytes)
        quantized_names: set[str] = {n for r in summary["layers"] for n in r.pop("_quantized", [])}
        for i in tqdm(range(start, handle.num_layers), desc="layers", unit="layer", initial=start,
                      total=handle.num_layers):
            t0 = time.perf_counter()
            layer = handle.load_layer(model, i, device, dtype)
            check_finite_layer(layer, i, handle, dtype, store_dtype)
            if awq is not None:  # folded float tensors round to their own stored dtype (fp32 routers stay fp32)
                awq = dataclasses.replace(awq, stored=_stored_dtypes(handle, i))
            record, results, overrides = _quantize_layer(layer, i, all_targets[i], feed, cfg, qspec, store_dtype, handle,
                                                         router_dtype, awq)
            for name, tensor in layer_tensors(handle, i, results, cfg.format, store_dtype, overrides).items():
                writer.add(name, tensor)
            quantized_names.update(f"{i}.{t.module_name}" for t in results)
            layers[i].to("meta")
            del layer, results
            release_freed_memory()  # else glibc keeps the freed layer's pages and RSS creeps per layer
            record["seconds"] = time.perf_counter() - t0
            summary["layers"].append(record)
            _commit(partial, i + 1, handle.num_layers, writer, summary, quantized_names, feed)
        if cfg.quantize_lm_head:
            qw, summary["lm_head"] = quantize_lm_head(handle, model, feed.hidden if feed else None, cfg, qspec,
                                                      store_dtype, device, dtype)
            for k, v in encode(cfg.format, qw, store_dtype).items():
                writer.add(f"lm_head.{k}", v)
            quantized_names.add("lm_head")
        for name in handle.non_layer_tensor_names():
            if not (cfg.quantize_lm_head and name == "lm_head.weight"):
                writer.add(name, handle.reader.get(name))
        shards = writer.close()
        kept = kept_module_names(handle, model, quantized_names)
        qcfg = quantization_config(cfg.format, qspec, kept, handle, {"damp_percent": cfg.damp,
                                                                     "true_sequential": cfg.true_sequential,
                                                                     "lm_head": cfg.quantize_lm_head})
        config = dict(handle.reader.config)
        config["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if cfg.format == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        copy_side_files(model_dir, tmp)
        summary["kept_in_float"] = kept
        summary["shards"] = shards
        summary["size_bytes"] = writer.total_bytes
        summary["starved_experts_total"] = sum(len(r.get("starved_experts", [])) for r in summary["layers"])
        summary["timings_s"]["total"] = time.perf_counter() - t_start
        (tmp / "moecompress.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _commit(partial: PartialRun, done: int, num_layers: int, writer: ShardedWriter, summary: dict,
            quantized_names: set[str], feed: LayerFeed | None) -> None:
    """Make the first ``done`` layers survive a crash (``checkpoint.partial``)."""
    records = [dict(r) for r in summary["layers"]]
    records[-1]["_quantized"] = sorted(quantized_names)  # what export's ignore list needs from every layer
    partial.commit(done, num_layers, writer.commit(), records, feed.hidden if feed is not None else None,
                   {"resumed_at": summary.get("resumed_at", [])})
    writer.drop_finished_spills()


def _resume_from(partial: PartialRun, saved: dict, feed: LayerFeed | None, summary: dict, device) -> int:
    """Take a checked manifest's state into this run: the layer records, the feed; returns the next layer."""
    partial.adopt(saved)
    done = int(saved["layers_done"])
    summary["layers"] = [dict(r) for r in saved["records"]]
    summary["resumed_at"] = list(saved.get("resumed_at", [])) + [done]
    hidden = partial.load_feed(saved)
    if feed is not None:
        if hidden is None or len(hidden) != len(feed.hidden):
            raise UserError(f"cannot resume {partial.path}: its calibration feed does not match this run's "
                            "(pass --overwrite to start over)")
        feed.hidden = [h.to(device=device, dtype=cur.dtype) for h, cur in zip(hidden, feed.hidden)]
    log.info("resuming %s after layer %d of %d", partial.path, done, saved["num_layers"])
    return done


def _quantize_layer(layer, i: int, targets: list[Target], feed: LayerFeed | None, cfg: QuantizeConfig, qspec,
                    store_dtype, handle: ModelHandle, router_dtype, awq: AwqSettings | None = None):
    """Calibrate and solve one layer: (record, {target: QuantizedWeight}, {local name: modified float tensor})."""
    record: dict = {"layer": i, "linears": {}}
    results: dict[Target, object] = {}
    overrides: dict = {}
    starved: set[int] = set()
    bar = tqdm(total=len(targets), desc=f"layer {i}", unit="linear", leave=False)
    split = feed is not None and cfg.true_sequential
    mids = None  # the residual stream after (quantized) attention, once it is final
    with _RouterPrecision(layer, handle.spec.routers, router_dtype), bar:
        for stage in stages_of(targets, cfg.true_sequential):
            bar.set_postfix_str(f"calibrating {stage[0].stage}")
            stats = {}
            if feed is not None:
                if split and mids is None and stage[0].stage != "attn":
                    mids = attention_half(layer, i, feed)
                run = (lambda: mlp_half(layer, mids)) if mids is not None else (
                    (lambda: attention_half(layer, i, feed)) if split else (lambda: run_layer(layer, i, feed, False)))
                specs = {t.module_name if t.expert_proj is None else t.name: capture_spec(
                    t, starved if cfg.starved_experts == "all-tokens" and t.expert_proj == "down" else (),
                    cfg.weight_by_routing) for t in stage}
                groups = resolve(layer, handle.spec, {t.name for t in stage}, {t.name for t in targets}) if awq else []
                sampler = _sampler(layer, handle, feed, awq) if any(g.group.loss == "block" for g in groups) else None
                stats = _capture(layer, specs, run, sampler)
                stats = _starved_pass(layer, i, stage, stats, record, starved, cfg, run)
                if groups:
                    bar.set_postfix_str(f"AWQ scales ({len(groups)} groups)")
                    record.setdefault("awq", []).extend(_awq_stage(layer, i, handle, groups, stats, sampler, awq,
                                                                   results, overrides))
            for t in stage:
                bar.set_postfix_str(t.name + (f" ({target_weight(layer, t).shape[0]} experts)" if t.expert_proj else ""))
                _solve_target(layer, i, t, stats, cfg, qspec, store_dtype, record, results, starved, handle)
                bar.update()
        if feed is not None:
            if split:
                feed.hidden = mlp_half(layer, mids if mids is not None else attention_half(layer, i, feed))
            else:
                run_layer(layer, i, feed, update=True)
    return record, results, overrides


def _capture(layer, specs, run, sampler=None):
    # the capture passes' outputs are thrown away: the experts' statistics need only their inputs
    with HessianCapture(layer, specs, skip_expert_outputs=True) as cap, (sampler or contextlib.nullcontext()):
        run()
    return cap.stats


def _stored_dtypes(handle: ModelHandle, i: int):
    from .checkpoint.reader import torch_dtype

    def stored(local: str) -> torch.dtype:
        src = handle.source_name(i, local)
        return handle.float_dtype if src is None else torch_dtype(handle.reader.tensors[src].dtype)

    return stored


def _sampler(layer, handle: ModelHandle, feed: LayerFeed, awq: AwqSettings) -> ResidualSampler:
    """Every n-th residual row at the router-input norm, about ``awq.search_tokens`` of them."""
    total = sum(h.numel() // h.shape[-1] for h in feed.hidden)
    return ResidualSampler(layer.get_submodule(handle.spec.router_input_norm), -(-total // awq.search_tokens))


def _awq_stage(layer, i: int, handle: ModelHandle, groups, stats, sampler, awq: AwqSettings, results, overrides):
    solved = {t.name: qw for t, qw in results.items()}
    try:
        recs = apply_stage(layer, handle.spec, groups, stats, sampler.tensor() if sampler else None, awq, solved,
                           overrides)
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


def _starved_pass(layer, i, stage, stats, record, starved: set, cfg, run):
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
            log.info("layer %d: %d experts got fewer than %d tokens (%s): %s", i, len(new), cfg.min_expert_tokens,
                     sorted(new), "Hessian from all tokens" if cfg.starved_experts == "all-tokens" else "RTN")
        # down_proj stats captured in this same pass used routed tokens only: redo them for starved experts
        downs = [d for d in stage if d.expert_proj == "down"]
        if starved and cfg.starved_experts == "all-tokens" and downs:
            specs = {d.name: capture_spec(d, starved, cfg.weight_by_routing) for d in downs}
            stats.update(_capture(layer, specs, run))
    return stats


def _solve_target(layer, i: int, t: Target, stats, cfg, qspec, store_dtype, record, results, starved,
                  handle: ModelHandle):
    param = target_weight(layer, t)
    st = stats.get(t.module_name if t.expert_proj is None else t.name)
    h = None
    if st is not None:
        h = st.hessian()
        if t.expert_proj == "gate_up" and starved and cfg.starved_experts == "all-tokens":
            # the gate/up input of a starved expert is any token of the layer: use all of them
            all_h = 2.0 * st.extra["all_sums"] / max(int(st.extra["all_count"]), 1)
            for e in starved:
                h[e] = all_h
    experts = param.shape[0] if param.dim() == 3 else 0
    bar = tqdm(total=experts, desc=f"  {t.name}", unit="expert", leave=False, disable=experts <= cfg.expert_chunk)
    try:
        with bar:
            res = solve(param.data, h, qspec, cfg.method, store_dtype, damp=cfg.damp, block_size=cfg.block_size,
                        rtn_members=starved if (t.expert_proj and cfg.starved_experts == "rtn") else set(),
                        chunk=cfg.expert_chunk, refine_rounds=cfg.refine_rounds, on_chunk=bar.update)
    except ValueError as e:  # the algorithms' NaN/Inf guard; the weights themselves were checked at load
        if "NaN/Inf" not in str(e):
            raise
        name = f"{handle.layer_prefix(i)}{handle.disk_local(t.module_name)}"
        raise UserError(f"the calibration activations reaching {name} are not finite ({e}); "
                        "an overflow in half precision? try --dtype float32") from None
    param.data.copy_(res.dequantized.to(param.dtype))
    results[t] = res.qweight
    record["linears"][t.name] = res.info if t.expert_proj else res.info[0]


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": sys.platform}


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)
