"""`moecompress eval`: a (compressed) model against its reference on the same held-out windows.

Both models read the same token windows (sampled with the reference's tokenizer from each data
source; a model whose vocabulary differs is refused). Per window position the evaluator compares
next-token distributions (perplexity of both, KL(reference || model), top-1 agreement) and, per MoE
layer, what each model's router decided on *its own* hidden states -- end-to-end routing drift:
top-k set match, Jaccard, router KL (see :mod:`.routing_metrics`), expert load and skip rates.

Memory: by default both models are loaded whole (quantized weights kept packed on a CPU, dequantized
on a GPU). ``low_memory`` streams instead: one decoder layer of each model resident at a time plus the
hidden states of all windows for both models, and one window of logits at a time. Both modes give the
same numbers (the same batches run through the same layers; only the final ``lm_head`` runs per
window), so where the two models would not fit whole in the device's free memory (:func:`whole_fits`)
the evaluation streams by itself, says so, and records ``settings.low_memory_auto``.

Reference cache: with ``reference_cache=DIR`` the reference's outputs (its ``lm_head`` inputs and
routing per batch) are stored in DIR under a key of everything they depend on, and a later
evaluation against the same reference, data and settings replays them instead of running the
reference -- with identical numbers (see :mod:`.ref_cache`). ``reference_cache`` in the result
records what happened (``hit`` / ``written`` / ``skipped`` over the size cap / None without a cache).

The returned dict (JSON-serializable) is a contract the report relies on::

    {"model", "reference", "family",
     "data": {name: {"spec", "windows", "seq_len", "text_sha256"}},
     "ppl": {name: float}, "ppl_reference": {name: float},
     "kl", "top1_agreement", "kl_per_dataset": {name}, "top1_per_dataset": {name},
     "routing": {"topk_exact", "jaccard", "router_kl", "per_layer": [{"layer", "topk_exact", "jaccard", "router_kl"}]},
     "expert_load": {"layers", "model": [[E]], "reference": [[E]], "entropy": {...}, "max_over_mean": {...}},
     "skip_rate": None | {"model": [..], "reference": [..], "model_overall", "reference_overall"},
     "active_experts": None | {"layers", "model": [mean real experts per token], "reference": [..],
                               "model_histogram": [[k + 1]], "reference_histogram": [[k + 1]],
                               "model_overall", "reference_overall", "expert_flops_saved": [..],
                               "expert_flops_saved_overall"},
     "size_bytes", "reference_size_bytes", "bits_per_weight", "quantization",
     "settings", "seconds", "lm_eval", "reference_cache": None | {"path", "key", "status", "reason", "bytes"}}
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecompress import memory
from moecompress.arch.handle import ModelHandle
from moecompress.errors import UserError

from .collect import StreamedModel, WholeModel
from .data import DEFAULT_DATA, as_batches, build_windows, check_vocab, load_tokenizer, windows_digest
from .lm_metrics import LMAccumulator, NonFiniteLogits
from .ref_cache import DEFAULT_MAX_BYTES, ReferenceCache, cache_key
from .ref_source import open_reference
from .routing_metrics import RoutingAccumulator
from .sizes import bits_per_weight, checkpoint_bytes, model_bytes, quantization_settings, stored_reader

log = logging.getLogger("moecompress")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(device: str, dtype: str, ref_handle: ModelHandle) -> tuple[torch.device, torch.dtype]:
    from moecompress.devices import resolve_device

    dev = resolve_device(device)
    if dtype == "auto":  # CPUs are slow and inexact in half precision
        return dev, torch.float32 if dev.type == "cpu" else ref_handle.float_dtype
    if dtype not in _DTYPES:
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return dev, _DTYPES[dtype]


def whole_fits(model_h: ModelHandle, ref_h: ModelHandle, device: torch.device, dtype: torch.dtype,
               processes: int = 1) -> tuple[bool, int, int]:
    """(whether both models fit loaded whole, the bytes they need, the bytes available): the weights as
    :func:`sizes.model_bytes` counts them (a quantized model stays packed on a CPU) plus 10% for
    activations and the allocator, times the ``processes`` that share the memory (torchrun on one host)."""
    need = model_bytes(ref_h, dtype, packed=False)
    if Path(model_h.reader.path).resolve() != Path(ref_h.reader.path).resolve():
        need += model_bytes(model_h, dtype, packed=device.type == "cpu")
    need = int(need * 1.1) * processes
    free = memory.available_bytes(device)
    return need <= free, need, free


def _check_pair(m: ModelHandle, r: ModelHandle) -> None:
    if m.family != r.family or m.num_layers != r.num_layers:
        raise UserError(f"model ({m.family}, {m.num_layers} layers) and reference ({r.family}, {r.num_layers} layers) "
                        "are not the same architecture")
    # the same real experts (zero experts aside: ids >= E are never compared), or routing agreement is noise
    if m.num_experts != r.num_experts:
        raise UserError(f"model ({m.num_experts} experts per layer) and reference ({r.num_experts}) are not the same "
                        "MoE: routing agreement compares expert ids")
    from ..checkpoint.dequant_reader import DequantizingReader  # an integer-quantized checkpoint (not FP8)

    if isinstance(r.reader, DequantizingReader) and not isinstance(m.reader, DequantizingReader):
        log.warning("eval: the reference is quantized and the model is not: were MODEL and --reference swapped? "
                    "(the metrics measure the model against the reference)")


def _same(a, b) -> bool:
    """The model *is* the reference (a run's reference row): load and run it once."""
    return Path(a).resolve() == Path(b).resolve()


def _open_pair(model_dir, reference_dir, device, dtype, cache: ReferenceCache | None, *, low_memory: bool):
    """(reference, its cache recording or None, model): the model is the reference itself for a reference row."""
    ref, record = open_reference(reference_dir, device, dtype, low_memory, cache)
    cls = StreamedModel if low_memory else WholeModel
    model = ref if _same(model_dir, reference_dir) else cls(model_dir, device, dtype)
    if model.moe_layers != ref.moe_layers:
        raise UserError(f"MoE layers differ: model {model.moe_layers} vs reference {ref.moe_layers}")
    return ref, record, model


def _save(cache: ReferenceCache | None, record, ref, batches, num_layers: int) -> None:
    if record is not None:
        cache.save(record, batch_windows=[int(ids.shape[0]) for _, ids in batches], moe_layers=ref.moe_layers,
                   num_layers=num_layers)


def _run_whole(model_dir, reference_dir, batches, device, dtype, lm: LMAccumulator, routing: RoutingAccumulator,
               cache: ReferenceCache | None = None, num_layers: int = 0):
    ref, record, model = _open_pair(model_dir, reference_dir, device, dtype, cache, low_memory=False)
    for name, ids in tqdm(batches, desc="eval batches", unit="batch"):
        ref_logits, ref_routes = ref.forward(ids)
        logits, routes = (ref_logits, ref_routes) if model is ref else model.forward(ids)
        lm.update(name, logits, ref_logits, ids)
        for i in ref.moe_layers:
            routing.update(i, routes[i], ref_routes[i])
    _save(cache, record, ref, batches, num_layers)
    del ref
    return model


def _run_streamed(model_dir, reference_dir, batches, device, dtype, lm: LMAccumulator, routing: RoutingAccumulator,
                  cache: ReferenceCache | None = None, num_layers: int = 0):
    ref, record, model = _open_pair(model_dir, reference_dir, device, dtype, cache, low_memory=True)
    ids_list = [ids for _, ids in batches]
    ref.embed(ids_list)
    if model is not ref:
        model.embed(ids_list)
    for i in tqdm(range(ref.num_layers), desc="eval layers (low memory)", unit="layer"):
        ref_routes = ref.run_layer(i)
        routes = ref_routes if model is ref else model.run_layer(i)
        if ref_routes is not None:
            for out, ref_out in zip(routes, ref_routes):
                routing.update(i, out, ref_out)
    ref.load_head()
    if model is not ref:
        model.load_head()
    for b, (name, ids) in enumerate(tqdm(batches, desc="eval logits", unit="batch")):
        for w in range(ids.shape[0]):
            ref_logits = ref.window_logits(b, w)
            logits = ref_logits if model is ref else model.window_logits(b, w)
            lm.update(name, logits, ref_logits, ids[w:w + 1])
    _save(cache, record, ref, batches, num_layers)
    ref.release()
    model.release()


def _task_list(tasks) -> list[str]:
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if items and not names:
        raise UserError(f"--tasks {tasks!r} names no lm-eval task")
    return names


def evaluate(model_dir, reference_dir, *, data=None, samples: int = 32, seq_len: int = 256, batch_size: int = 8,
             seed: int = 1234, low_memory: bool = False, device: str = "cpu", tasks=None, dtype: str = "auto",
             tasks_path: str | None = None, tasks_limit: int | None = None, reference_cache=None,
             reference_cache_max_bytes: int = DEFAULT_MAX_BYTES, ranks=None) -> dict:
    """Evaluate ``model_dir`` against ``reference_dir``; returns the report dict (module docstring).

    ``reference_cache``: a folder where the reference's outputs are stored and replayed from
    (:mod:`.ref_cache`); entries over ``reference_cache_max_bytes`` are not written.

    ``ranks`` (``moecompress.distributed.Ranks``, a torchrun launch): each rank evaluates every N-th batch
    and the sums are added over the ranks, so the numbers equal one process's up to the order of the
    floating-point sums (relative 1e-9 and below: the per-batch sums are float64)."""
    from moecompress.distributed import SINGLE

    ranks = ranks or SINGLE
    t0 = time.perf_counter()
    for name, value, low in (("samples", samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    task_names = _task_list(tasks)
    manager = None
    if task_names:  # fail on a missing lm-eval or an unknown task before any model is loaded
        from .lm_eval_adapter import load_tasks, task_manager

        manager = task_manager(task_names, tasks_path)
        load_tasks(task_names, manager)  # their datasets, too: a missing one fails now, not after the eval
    specs = list(data) if data else list(DEFAULT_DATA)
    ref_h, model_h = ModelHandle.open(reference_dir, dequantize=True), ModelHandle.open(model_dir, dequantize=True)
    _check_pair(model_h, ref_h)
    ref_h.check_context(seq_len)
    dev, dt = _resolve(device, dtype, ref_h)
    ref_tok = load_tokenizer(reference_dir, required=True)
    model_tok = load_tokenizer(model_dir, required=False)
    check_vocab(model_h, ref_h, model_tok, ref_tok)
    windows, data_info = build_windows(specs, ref_tok, samples, seq_len, seed, int(ref_h.text_config.vocab_size))
    batches = as_batches(windows, batch_size)
    if ranks.active:
        if task_names:
            raise UserError("--tasks run on one process for now; launch eval without torchrun")
        if reference_cache is not None:
            log.info("rank %d: the reference cache is not used across ranks", ranks.rank)
            reference_cache = None
        all_batches, batches = batches, batches[ranks.rank::ranks.world]

    low_memory_auto = False
    if not low_memory:
        procs = 1 if dev.type == "cuda" else memory.host_processes()
        fits, need, free = whole_fits(model_h, ref_h, dev, dt, procs)
        if not fits:
            low_memory = low_memory_auto = True
            log.warning("eval: the two models need ~%.1f GiB loaded whole and %.1f GiB is free on %s: streaming one "
                        "layer at a time instead (as --low-memory; the same numbers)", need / 2**30, free / 2**30, dev)

    cache = None
    if reference_cache is not None:
        key = cache_key(reference_dir, data_info=data_info, windows_sha256=windows_digest(windows),
                        batch_size=batch_size, low_memory=bool(low_memory), device=dev, dtype=dt)
        cache = ReferenceCache(reference_cache, key, reference_cache_max_bytes)

    lm, routing = LMAccumulator(), RoutingAccumulator()
    whole = None
    try:
        if low_memory:
            _run_streamed(model_dir, reference_dir, batches, dev, dt, lm, routing, cache, ref_h.num_layers)
        else:
            whole = _run_whole(model_dir, reference_dir, batches, dev, dt, lm, routing, cache, ref_h.num_layers)
    except NonFiniteLogits as e:
        raise UserError(f"{model_dir if e.which == 'model' else reference_dir}: NaN/Inf logits on the {e.name!r} "
                        f"windows (NaN/Inf weights, or an overflow in {str(dt).replace('torch.', '')})") from None

    if ranks.active:  # every rank's sums, added in rank order (the same on every rank)
        lms, routs = ranks.all_gather_objects(lm), ranks.all_gather_objects(routing)
        lm, routing = lms[0], routs[0]
        for other_lm, other_r in zip(lms[1:], routs[1:]):
            lm.merge(other_lm)
            routing.merge(other_r)
        batches = all_batches

    lm_eval_result = None
    if task_names:
        from .lm_eval_adapter import run_tasks

        if not isinstance(whole, WholeModel):  # low memory, or the reference replayed from the cache
            log.info("lm-eval tasks run on the whole model: loading it")
            whole = WholeModel(model_dir, dev, dt)
        lm_eval_result = run_tasks(whole.model, model_tok or ref_tok, task_names, tasks_path, batch_size, tasks_limit,
                                   manager)

    m_reader, r_reader = stored_reader(model_h), stored_reader(ref_h)  # the handles' own: no second open
    out = {"model": str(Path(model_dir)), "reference": str(Path(reference_dir)), "family": ref_h.family,
           "data": data_info}
    out.update(lm.result())
    for key in ("ppl", "ppl_reference"):
        for name, v in out[key].items():
            if v == sys.float_info.max:
                log.warning("eval: %s perplexity on %s overflows a float (more than ~709 nats per token): recorded "
                            "as the largest float", "the reference's" if key == "ppl_reference" else "the model's",
                            name)
    out.update(routing.result())
    out.update({
        "size_bytes": checkpoint_bytes(m_reader),
        "reference_size_bytes": checkpoint_bytes(r_reader),
        "bits_per_weight": bits_per_weight(m_reader),
        "quantization": quantization_settings(m_reader),
        "settings": {"samples": samples, "seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                     "low_memory": bool(low_memory), "low_memory_auto": low_memory_auto, "device": str(dev),
                     "dtype": str(dt).replace("torch.", ""),
                     "tasks": task_names or None, "tasks_path": tasks_path, "tasks_limit": tasks_limit,
                     "experts_implementation": "eager", "windows_sha256": windows_digest(windows),
                     "torch": torch.__version__, "ranks": ranks.world},
        "seconds": time.perf_counter() - t0,
        "lm_eval": lm_eval_result,
        "reference_cache": cache.summary() if cache is not None else None,
    })
    return out
