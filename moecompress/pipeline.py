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
from .calib.runner import LayerFeed, capture_layer_kwargs, prepare_embeddings
from .checkpoint.partial import (FINISHED, PartialRun, ResumeError, claim, json_default, resumable_output_dir,
                                 source_fingerprint)
from .checkpoint.writer import ShardedWriter, copy_side_files
from .devices import resolve_device
from .distributed import SINGLE, Ranks, chunk_batches
from .errors import UserError
from .export import encode, kept_module_names, layer_tensors, quantization_config
from .finite import check_finite, check_finite_layer
from .lm_head import check_lm_head, lm_head_hessian, quantize_lm_head
from .memory import gc_paused, release_freed_memory
from .layer_quantize import CalibPlan
from .layer_quantize import quantize_layer as _quantize_layer
from .quant.balance import AwqSettings
from .quant.formats import scale_dtype
from .quant.overrides import assign as assign_schemes
from .quant.overrides import check_shapes
from .quant.overrides import describe as describe_schemes
from .quant.targets import apply_ignore, layer_targets, target_weight
from .settings import QuantizeConfig
from .tune_reference import TuneReference

log = logging.getLogger("moecompress")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(cfg: QuantizeConfig, handle: ModelHandle, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # CPUs are slow and inexact in half precision: calibrate in fp32 there
    return torch.float32 if device.type == "cpu" else handle.float_dtype


def load_calibration(cfg: QuantizeConfig, model_dir: Path):
    from .calib.chat import chat_renderer
    from .calib.data import load_texts, make_calibration_windows
    from .calib.specs import load_tokenizer

    with gc_paused():  # the tokenizer's imports and construction
        tok = load_tokenizer(model_dir)
    texts = load_texts(cfg.calib, chat=chat_renderer(tok))
    return make_calibration_windows(texts, tok, cfg.calib_samples, cfg.seq_len, cfg.seed)


# which third-party loaders fail on an asymmetric (zero-point) MoE checkpoint of each format (README;
# vLLM: benchmarks/vllm_interop.py)
ASYM_UNSERVED = {
    "compressed-tensors": "transformers 5 fails to load asymmetric MoE experts, and vLLM's CPU build has no kernel "
                          "for them (its GPU kernels are not checked here)",
    "gptq": "vLLM refuses asymmetric GPTQ ('Unsupported quantization config: bits=4, sym=False') and GPTQModel "
            "refuses asymmetric GPTQ v1 from other producers",
}


def loader_warnings(cfg: QuantizeConfig, symmetric: bool) -> list[str]:
    """What third-party loaders will refuse in the checkpoint these settings write (measured: README)."""
    out = []
    if not symmetric and cfg.format in ASYM_UNSERVED:
        out.append(f"asymmetric {cfg.format} checkpoint: {ASYM_UNSERVED[cfg.format]}; moecompress's own tools read "
                   "it. To serve it, quantize with --format awq (4-bit) or without --asym")
    if cfg.format == "gptq" and cfg.act_order == "group":
        out.append("--act-order group writes desc_act: true, which vLLM refuses ('GPTQ group activation ordering "
                   "... is no longer supported'); GPTQModel and moecompress read it. To serve it with vLLM, use "
                   "--act-order weight (the default)")
    return out


def quantize(model_dir: str | Path, out_dir: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
             command: list[str] | None = None, max_shard_bytes: int = 4 << 30, resume: bool = False,
             ranks: Ranks = SINGLE) -> dict:
    """Quantize ``model_dir`` into ``out_dir``; returns the run summary also saved as moecompress.json.

    The output is built in ``.<out>.partial`` and committed after every layer (``checkpoint.partial``):
    ``resume`` goes on from a killed run's last committed layer, with a byte-identical result.
    ``ranks``: this process's place in a torchrun launch (``moecompress.distributed``); rank 0 writes."""
    t_start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    handle = ModelHandle.open(model_dir)
    if handle.reader.config.get("quantization_config"):
        raise UserError(f"{model_dir} is already quantized ({handle.reader.config['quantization_config'].get('quant_method')}); "
                        "quantize its float original instead")
    if cfg.needs_calibration:
        handle.check_context(cfg.seq_len)
    reference = TuneReference(cfg.tune_reference, handle) if cfg.tune_reference else None
    # the reference, like the source, is known by its files' fingerprint, not by how its path is spelt
    partial = PartialRun(out_dir, {**cfg.model_dump(exclude={"tune_reference"}), "max_shard_bytes": max_shard_bytes,
                                   **_arithmetic(), "tune_reference": reference and source_fingerprint(reference.path)},
                         source_fingerprint(model_dir))
    try:
        try:
            return _quantize(handle, model_dir, out_dir, partial, cfg, overwrite, resume, command, max_shard_bytes,
                             ranks, t_start, reference)
        except ResumeError as e:  # --resume --overwrite: a partial run that cannot be taken up is started over
            if not (resume and overwrite) or ranks.active:
                raise
            log.warning("--resume --overwrite: %s; starting over", str(e).split(" (pass")[0].split("; pass")[0])
            partial.discard()
            return _quantize(handle, model_dir, out_dir, partial, cfg, overwrite, False, command, max_shard_bytes,
                             ranks, t_start, reference)
    finally:
        partial.unlock()


def fit_settings(handle: ModelHandle, cfg: QuantizeConfig, model=None) -> tuple[list[list], list[str], dict]:
    """``(targets per layer, linears kept in float by --ignore, schemes by --override)`` of ``cfg`` on ``handle``'s
    model (``model``: its skeleton, if built), checked to fit: every group size divides its linear's input
    dimension, the format packs every shape, the family has what the method needs. Raises a UserError otherwise
    (``moecompress run`` checks every variant this way before building the first)."""
    model = model if model is not None else handle.skeleton()
    layers = decoder_layers(model)
    qspec = cfg.spec()
    all_targets, ignored = apply_ignore([layer_targets(layer, handle.spec, cfg.only_experts) for layer in layers],
                                        cfg.ignore)
    schemes = assign_schemes(all_targets, cfg.override_list(), qspec, ("lm_head",) if cfg.quantize_lm_head else ())
    check_shapes(layers, all_targets, schemes, qspec, target_weight, cfg.format)
    if cfg.quantize_lm_head:
        check_lm_head(handle, schemes.get("lm_head", qspec), cfg.format)
    if cfg.awq and not handle.spec.awq_groups:
        raise UserError(f"the {handle.family} family has no AWQ balance groups; use --method gptq or rtn")
    return all_targets, ignored, schemes


def _arithmetic() -> dict:
    """What else decides the output's bytes besides the settings: a resume under another thread count (CPU
    GEMMs split their sums by threads), torch build or deterministic mode is refused."""
    import transformers

    return {"arithmetic": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "deterministic": torch.are_deterministic_algorithms_enabled()}}


def _quantize(handle: ModelHandle, model_dir: Path, out_dir: Path, partial: PartialRun, cfg: QuantizeConfig,
              overwrite: bool, resume: bool, command, max_shard_bytes: int, ranks: Ranks, t_start: float,
              reference: TuneReference | None = None) -> dict:
    from .calib.specs import spec_paths

    inputs = [*spec_paths(cfg.calib), *([reference.path] if reference is not None else [])]  # named by the user: never deleted, read or not
    saved = _agree(ranks, lambda: claim(partial, model_dir, resume, overwrite, inputs))
    if saved == FINISHED:  # a finished run killed before its rename, now in place
        ranks.barrier()
        return json.loads((partial.out / "moecompress.json").read_text())
    device = resolve_device(ranks.device(cfg.device))
    dtype = compute_dtype(cfg, handle, device)
    router_dtype = dtype if cfg.router_dtype == "auto" else _DTYPES[cfg.router_dtype]
    store_dtype = handle.float_dtype
    qspec = cfg.spec()
    for warning in loader_warnings(cfg, qspec.symmetric) if ranks.main else ():
        log.warning("%s", warning)
    extra = handle.undeclared_layers() if ranks.main else []
    if extra:
        log.warning("the shards hold %s.layers.%s past config.json's num_hidden_layers %d, which declares no MTP "
                    "layer (num_nextn_predict_layers): carried through unchanged, in float; if num_hidden_layers is "
                    "wrong, correct it in config.json", handle.disk_prefix,
                    extra[0] if len(extra) == 1 else f"{extra[0]}-{extra[-1]}", handle.num_layers)
    # transformers' grouped_mm experts path is its fastest on CPU and GPU; our hooks see the same call
    model = handle.skeleton(experts_implementation="grouped_mm")
    layers = decoder_layers(model)
    all_targets, ignored, schemes = fit_settings(handle, cfg, model)  # fail before any work that cannot fit
    if ignored:
        log.info("kept in float by --ignore: %d linears (%s%s)", len(ignored), ", ".join(ignored[:4]),
                 ", ..." if len(ignored) > 4 else "")
    if schemes:
        log.info("other schemes by --override: %s", "; ".join(
            f"{d['linears']} linears at {d['bits']} bits, group {d['group_size'] or 'channel'} ({', '.join(d['examples'])}"
            f"{', ...' if d['linears'] > len(d['examples']) else ''})" for d in describe_schemes(schemes)))
    awq = AwqSettings(qspec, cfg.awq_grid, cfg.awq_scales, cfg.awq_duo_scaling, cfg.awq_search_tokens,
                      store_dtype, scale_dtype(cfg.format, store_dtype)) if cfg.awq else None

    summary: dict = {"moecompress_version": __version__, "command": command, "recipe": cfg.model_dump(),
                     "source": str(model_dir.resolve()), "family": handle.family,
                     "versions": _versions(), "timings_s": {}, "layers": []}
    feed = plan = None
    if cfg.needs_calibration:
        t0 = time.perf_counter()
        windows = load_calibration(cfg, model_dir)
        summary["calibration"] = windows.metadata
        n_batches = -(-windows.input_ids.shape[0] // cfg.batch_size)
        plan = CalibPlan(chunk_batches(n_batches, cfg.reduce_chunks), ranks)
        mine = torch.cat([windows.input_ids[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in plan.my_batches]) \
            if plan.my_batches else windows.input_ids[:0]
        prepare_embeddings(handle, model, device, dtype)
        check_finite(model.model.embed_tokens.weight, handle.non_layer_disk_name("model.embed_tokens.weight")
                      or "model.embed_tokens.weight", dtype, store_dtype)
        feed = capture_layer_kwargs(model, mine, cfg.batch_size, device)
        model.model.embed_tokens.to("meta")
        summary["timings_s"]["calibration_data"] = time.perf_counter() - t0

    # log lines (starved experts...) go through tqdm.write while the bars are up, not into them
    out_ctx = resumable_output_dir(partial, overwrite, saved is not None) if ranks.main else contextlib.nullcontext()
    with out_ctx, logging_redirect_tqdm():
        tmp = partial.path
        ranks.barrier()  # the partial folder exists before any rank saves its feed there
        start, writer = 0, None
        try:
            if saved is not None:
                start = _resume_from(partial, saved, feed, plan, summary, device, ranks, bool(cfg.tune_steps))
            if ranks.main:
                writer = ShardedWriter(tmp, max_shard_bytes, resume=saved["writer"] if saved is not None else None)
        except (OSError, RuntimeError, ValueError) as e:  # a damaged partial run (truncated files...)
            raise ResumeError(f"cannot resume {partial.path}: its files are damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass --overwrite to start over") from None
        quantized_names: set[str] = {n for r in summary["layers"] for n in r.pop("_quantized", [])}
        targets_of = None if reference is None else (  # the tuning's targets from the reference's layers
            lambda j, f: reference.outputs(j, f, device, dtype, router_dtype))
        for i in tqdm(range(start, handle.num_layers), desc="layers", unit="layer", initial=start,
                      total=handle.num_layers, disable=not ranks.main):
            t0 = time.perf_counter()
            layer = handle.load_layer(model, i, device, dtype)
            check_finite_layer(layer, i, handle, dtype, store_dtype)
            if awq is not None:  # folded float tensors round to their own stored dtype (fp32 routers stay fp32)
                awq = dataclasses.replace(awq, stored=_stored_dtypes(handle, i), original=_stored_tensors(handle, i),
                                          spec_of=_layer_schemes(schemes, i))
            record, results, overrides = _quantize_layer(layer, i, all_targets[i], feed, cfg, qspec, store_dtype,
                                                         handle, router_dtype, awq, plan, schemes, targets_of)
            if writer is not None:
                for name, tensor in layer_tensors(handle, i, results, cfg.format, store_dtype, overrides).items():
                    writer.add(name, tensor)
            quantized_names.update(f"{i}.{t.module_name}" for t in results)
            layers[i].to("meta")
            del layer, results
            release_freed_memory()  # else glibc keeps the freed layer's pages and RSS creeps per layer
            record["seconds"] = time.perf_counter() - t0
            summary["layers"].append(record)
            _commit(partial, i + 1, handle.num_layers, writer, summary, quantized_names, feed, plan, ranks)
        head_h = None  # lm_head's Hessian: every rank adds its batches' part
        if cfg.quantize_lm_head and feed is not None:
            head_h = lm_head_hessian(handle, model, feed.hidden, plan, device, dtype, store_dtype)
        summary["distributed"] = _rank_report(ranks, plan, t_start)
        if ranks.main:
            _finish(handle, model, model_dir, tmp, writer, cfg, qspec, summary, quantized_names, store_dtype, device,
                    dtype, head_h, t_start, schemes)
        ranks.barrier()  # every rank got here: only then does rank 0 rename the output into place
    ranks.barrier()  # the other ranks return once the output is in place
    return summary


def _finish(handle: ModelHandle, model, model_dir: Path, tmp: Path, writer: ShardedWriter, cfg: QuantizeConfig, qspec,
            summary: dict, quantized_names: set[str], store_dtype, device, dtype, head_h: torch.Tensor | None,
            t_start: float, schemes: dict) -> None:
    """Rank 0, after the layers: lm_head, the other float tensors, the configs, moecompress.json."""
    if cfg.quantize_lm_head:
        qw, summary["lm_head"] = quantize_lm_head(handle, model, head_h, cfg, schemes.get("lm_head", qspec),
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
                                                                 "lm_head": cfg.quantize_lm_head}, quantized_names,
                               schemes)
    config = dict(handle.reader.config)
    config["quantization_config"] = qcfg
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if cfg.format == "gptq":
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    copy_side_files(model_dir, tmp)
    summary["kept_in_float"] = kept
    summary["schemes"] = describe_schemes(schemes)
    summary["shards"] = shards
    # the shards on disk, headers included: what eval, inspect and the report count as the checkpoint's size
    summary["size_bytes"] = sum((tmp / name).stat().st_size for name in shards)
    summary["starved_experts_total"] = sum(len(r.get("starved_experts", [])) for r in summary["layers"])
    summary["timings_s"]["total"] = time.perf_counter() - t_start
    (tmp / "moecompress.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")


def _agree(ranks: Ranks, fn):
    """``fn()`` on rank 0, its result (or its UserError) on every rank."""
    if not ranks.active:
        return fn()
    result = err = None
    if ranks.main:
        try:
            result = fn()
        except UserError as e:
            err = str(e)
    result, err = ranks.broadcast_object((result, err))
    if err is not None:
        raise UserError(err)
    return result


def _rank_report(ranks: Ranks, plan: CalibPlan | None, t_start: float) -> dict:
    """Rank count, and per rank: wall time so far, time and bytes in collectives, chunks run."""
    mine = {"rank": ranks.rank, "seconds": time.perf_counter() - t_start, "comm_s": ranks.comm_s,
            "comm_bytes_received": ranks.comm_bytes, "chunks": plan.mine if plan is not None else [],
            "peak_stats_bytes": plan.peak_stats_bytes if plan is not None else 0}
    return {"world_size": ranks.world, "reduce_chunks": len(plan.chunks) if plan is not None else 0,
            "ranks": ranks.all_gather_objects(mine)}


def _layer_schemes(schemes: dict, i: int):
    """Layer i's scheme lookup by layer-local name (None where the base scheme applies), for AWQ's search."""
    return lambda local: schemes.get(f"layers.{i}.{local}")


def _stored_dtypes(handle: ModelHandle, i: int):
    from .checkpoint.reader import torch_dtype

    def stored(local: str) -> torch.dtype:
        src = handle.source_name(i, local)
        return handle.float_dtype if src is None else torch_dtype(handle.reader.tensors[src].dtype)

    return stored


def _stored_tensors(handle: ModelHandle, i: int):
    """Layer i's float tensors as the checkpoint stores them, by layer-local name (None where absent)."""
    def original(local: str) -> torch.Tensor | None:
        src = handle.source_name(i, local)
        return None if src is None else handle.reader.get(src)

    return original


def _commit(partial: PartialRun, done: int, num_layers: int, writer: ShardedWriter | None, summary: dict,
            quantized_names: set[str], feed: LayerFeed | None, plan: CalibPlan | None, ranks: Ranks) -> None:
    """Make the first ``done`` layers survive a crash (``checkpoint.partial``): every rank saves its chunks'
    feed, then rank 0 the shards' state and the manifest."""
    if feed is not None:
        for c in plan.mine:
            partial.save_feed(done, c, {b: feed.hidden[plan.local[b]] for b in plan.chunks[c]},
                              None if feed.reference is None else
                              {b: feed.reference[plan.local[b]] for b in plan.chunks[c]})
    ranks.barrier()
    if writer is None:
        return
    records = [dict(r) for r in summary["layers"]]
    records[-1]["_quantized"] = sorted(quantized_names)  # what export's ignore list needs from every layer
    partial.commit(done, num_layers, writer.commit(), records, feed is not None,
                   {"resumed_at": summary.get("resumed_at", []), "calibration": summary.get("calibration")})
    writer.drop_finished_spills()


def _resume_from(partial: PartialRun, saved: dict, feed: LayerFeed | None, plan: CalibPlan | None, summary: dict,
                 device, ranks: Ranks, reference: bool = False) -> int:
    """Take a checked manifest's state into this run: the layer records, the feed; returns the next layer."""
    if ranks.main:
        partial.adopt(saved)
    else:
        partial.layers_done = int(saved["layers_done"])
    done = int(saved["layers_done"])
    was, now = (saved.get("calibration") or {}).get("text_hash"), (summary.get("calibration") or {}).get("text_hash")
    if was != now:  # the saved feed came from the text the run started with: its record must say so
        raise ResumeError(f"cannot resume {partial.path}: the calibration text changed since the run started "
                          "(pass the same data, or --overwrite to start over)")
    summary["layers"] = [dict(r) for r in saved["records"]]
    summary["resumed_at"] = list(saved.get("resumed_at", [])) + [done]
    if feed is not None:
        hidden = partial.load_feed(saved, {c: list(plan.chunks[c]) for c in plan.mine})
        if hidden is None or len(hidden) != len(feed.hidden):
            raise UserError(f"cannot resume {partial.path}: its calibration feed does not match this run's "
                            "(pass --overwrite to start over)")
        dtypes = [feed.hidden[plan.local[b]].dtype for b in plan.my_batches]
        feed.hidden = [hidden[b].to(device=device, dtype=dt) for b, dt in zip(plan.my_batches, dtypes)]
        if reference and done:  # block-output tuning's float trajectory
            ref = partial.load_feed(saved, {c: list(plan.chunks[c]) for c in plan.mine}, key="reference")
            feed.reference = [ref[b].to(device=device, dtype=dt) for b, dt in zip(plan.my_batches, dtypes)]
    if ranks.main:
        log.info("resuming %s: %d of %d layers done, going on from layer %d (layers count from 0)", partial.path,
                 done, saved["num_layers"], done)
    return done


def _versions() -> dict:
    import transformers

    from .build_id import build_id

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": sys.platform, "moecompress": build_id()}
