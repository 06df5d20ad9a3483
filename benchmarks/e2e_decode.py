"""End-to-end decode speed, int4 vs bf16, on moecompress.runtime, against the bandwidth floor.

    python benchmarks/e2e_decode.py                                   # GPU: Qwen3-30B-A3B shapes, 4 layers
    python benchmarks/e2e_decode.py --layers 8 --batches 1,16 --json e2e.json
    python benchmarks/e2e_decode.py --shape tiny --device cpu         # CPU smoke run (< 1 min)

Steps:

1. a random bf16 checkpoint of the chosen shape (Qwen3-MoE: ``moecompress.tiny.build_tiny`` with the
   shape's dims, built on ``--device`` so that GPU machines do not spend minutes in CPU random init),
   cached in ``--workdir``;
2. RTN int4, group 128, symmetric, compressed-tensors (``moecompress.pipeline.quantize`` on ``--device``;
   RTN needs no calibration), cached too;
3. for bf16 and int4: ``Runtime.load`` on the device (Triton kernels and CUDA graphs on CUDA, the torch
   path on CPU), then ``moecompress.runtime.benchmark`` per batch size (random prompts, one warm-up
   generation that captures the graph, median decode tokens/s of ``--repeats`` generations; decode
   time is taken between device syncs around the decode loop and excludes the prefill).

Bytes per decode step (the floor's numerator), for the model actually run (``--layers`` layers, not
the 48 of the real model), with weights in the form the runtime reads them:

* every layer: q/k/v/o projections, the two RMSNorms and q/k norms, the router (fp32 in the runtime);
* the routed experts actually hit: per step and layer, the distinct expert ids the router picked,
  counted from the router's real output (a second, eager generation of the same prompts with a hook
  on each MoE block's ``route``; CUDA-graph replays cannot be hooked) and averaged over steps/layers;
  ``experts_hit_uniform`` gives E * (1 - (1 - k/E)^b) for comparison;
* float linears at the run dtype; int4 linears as packed codes (K/2 bytes per row) + one scale per
  group of 128 (bf16 on bf16 runs, fp32 on fp32 runs; symmetric: no zero points);
* the embedding rows gathered, the final norm, and lm_head (float in both models: RTN leaves it);
* KV cache read: K and V of every layer over the filled context, averaged over the decode steps
  (prompt_len + new_tokens / 2). The runtime's CUDA-graph step actually reads its whole static
  buffer (``kv_len_static``, the length rounded up to 256): that surplus is the runtime's, not the floor's.

Activations, logits and scratch buffers are not counted. Floor time = bytes / copy bandwidth, where
the bandwidth is ``Tensor.copy_``'s (read + write bytes) measured in the same run
(``moecompress.kernels._bench_util.copy_bandwidth``); % of floor = achieved GB/s / copy GB/s.
``held_vs_counted`` checks the weight part of the count against the tensors the loaded runtime holds
(attention, one expert, router per layer; 1.0 = the floor counts exactly what is resident).

With a few layers, lm_head (151936 x 2048, float in both models) is a large share of a step, far
larger than in the 48-layer model. So each model is also timed with its decoder layers taken out
(embedding, final norm, lm_head, sampling: the "fixed" part); step - fixed = the layers' time, which
gives the layers-only % of floor and an estimate for the real depth: fixed + 48 x (layers' time / N),
against the 48-layer floor. That estimate is labelled "est." everywhere; the measured rows are for
the N layers run.

On CPU the figures are a smoke test only: fp32 runs; int4 stays packed there too (torch's CPU int4
kernel, ``runtime.cpu_packed``), but the floor's bandwidth is the GPU's idea of a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bytes model, also when loaded by path
from _e2e_model import (SHAPES, Dims, WeightFormat, expected_unique_experts, held_weight_bytes,  # noqa: E402
                        layer_weight_bytes, step_bytes)

FAMILY = "qwen3_moe"
REAL_LAYERS = {"qwen3-30b-a3b": 48, "tiny": None}
DEFAULT_LAYERS = {"qwen3-30b-a3b": 4, "tiny": 2}
TARGET_PCT = {1: 35.0, 16: 50.0}  # int4 % of the bandwidth floor, by batch


# ---------------------------------------------------------------------------------------------- checkpoints
def build_checkpoint(shape: str, layers: int, path: Path, device: torch.device, seed: int) -> float:
    """Random bf16 checkpoint at ``path`` (kept if already there); returns the seconds spent."""
    if (path / "config.json").exists():
        return 0.0
    from moecompress.tiny import build_tiny, byte_tokenizer

    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    overrides = dict(SHAPES[shape], num_hidden_layers=layers)
    try:  # random init on the device: seconds on a GPU instead of minutes of CPU normal_()
        with torch.device(device) if device.type == "cuda" else nullcontext():
            model = build_tiny(FAMILY, seed, torch.bfloat16, **overrides)
    except Exception as exc:  # noqa: BLE001 -- any failure there: the (slower) CPU build
        print(f"note: building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU", flush=True)
        model = build_tiny(FAMILY, seed, torch.bfloat16, **overrides)
    model.to("cpu")
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    del model
    tmp.rename(path)
    return time.perf_counter() - t0


def quantize_checkpoint(src: Path, out: Path, device: torch.device, group_size: int) -> float:
    if (out / "config.json").exists():
        return 0.0
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config

    t0 = time.perf_counter()
    quantize(src, out, build_config(method="rtn", bits=4, group_size=group_size, device=str(device)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def count_experts_hit(rt, prompt: torch.Tensor, new_tokens: int) -> float:
    """Mean over decode steps and layers of the distinct routed experts the router picked: one eager
    generation of ``prompt`` with each MoE block's ``route`` wrapped to keep its ids."""
    from moecompress.runtime.moe import MoEBlock

    blocks = [m for m in rt.model.lm.modules() if isinstance(m, MoEBlock)]
    if not blocks:
        raise RuntimeError("no MoE blocks in the runtime's model")
    calls: list[tuple[int, torch.Tensor]] = []

    def wrap(block):
        inner = block.route  # the bound method

        def route(x):
            weights, ids = inner(x)
            calls.append((block.experts.num_experts, ids.clone()))
            return weights, ids
        return route

    graph = rt.cuda_graph
    fast = [b._one_token_route for b in blocks]
    try:
        for b in blocks:
            # the one-token CPU path routes in a closure: send every token through the wrapped general
            # route instead (same experts)
            b.route, b._one_token_route = wrap(b), False
        rt.cuda_graph = False  # a graph replay runs no Python: decode eagerly for the count
        rt.generate(prompt, new_tokens, stop_ids=[])
    finally:
        rt.cuda_graph = graph
        for b, f in zip(blocks, fast):
            del b.route
            b._one_token_route = f
    decode = calls[len(blocks):]  # the first forward (one call per block) is the prefill
    if not decode:
        raise RuntimeError("no decode step was recorded")
    hits = [int(torch.unique(ids[ids < e]).numel()) for e, ids in decode]
    return sum(hits) / len(hits)


@torch.no_grad()
def fixed_part_tokens_per_s(rt, args, batch: int) -> float:
    """Decode tokens/s of the same runtime with its decoder layers taken out: embedding, final norm,
    lm_head and sampling only -- the part of a step that does not grow with the layer count."""
    from moecompress.runtime import benchmark

    layers, windows = rt.model.layers, rt.model.windows
    rt.model.layers, rt.model.windows = [], []
    rt._cache = rt._graph = None  # a cache (and graph) for zero layers
    try:
        return benchmark("(no decoder layers)", runtime=rt, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         batch=batch, repeats=args.repeats, seed=args.seed)["decode_tokens_per_s"]
    finally:
        rt.model.layers, rt.model.windows = layers, windows
        rt._cache = rt._graph = None


def split_layers(row: dict, real_layers: int | None) -> None:
    """Add the decoder layers' share (step minus the zero-layer step) and, for a real model, the estimate
    of its step at ``real_layers`` layers: fixed part + real_layers x the measured time per layer."""
    bd, copy = row["bytes_breakdown"], row["copy_gbps"] * 1e9
    layers_bytes = bd["total"] - bd["embed_rows"] - bd["final_norm"] - bd["lm_head"]
    layers_ms = row["ms_per_step"] - row["fixed_ms_per_step"]
    ok = layers_ms > 0
    row["layers_bytes_per_step"] = layers_bytes
    row["layers_ms_per_step"] = layers_ms
    row["layers_pct_of_floor"] = 100.0 * layers_bytes / (layers_ms / 1e3) / copy if ok else None
    if real_layers:
        est_ms = row["fixed_ms_per_step"] + real_layers * layers_ms / row["layers"]
        row["real_model_est_ms_per_step"] = est_ms if ok else None
        row["real_model_est_tokens_per_s"] = 1e3 * row["batch"] / est_ms if ok else None
        row["real_model_est_pct_of_floor"] = (100.0 * row["real_model_bytes_per_step"] / (est_ms / 1e3) / copy
                                              if ok else None)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, path: Path, args, dims: Dims, copy_gbps: float) -> tuple[list[dict], float]:
    from moecompress.runtime import Runtime, benchmark

    t0 = time.perf_counter()
    rt = Runtime.load(path, device=args.device)
    load_s = time.perf_counter() - t0
    fb = torch.empty(0, dtype=rt.dtype).element_size()
    fmt = WeightFormat(fb) if name == "bf16" else WeightFormat(fb, 4, args.group_size, 2 if fb == 2 else 4)
    held, counted = held_weight_bytes(rt), layer_weight_bytes(dims, fmt)
    held_ratio = {k: held[k] / counted[k] for k in counted}  # 1.0: the floor counts what the runtime holds
    rows = []
    for b in args.batches:
        res = benchmark(path, runtime=rt, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=b,
                        repeats=args.repeats, seed=args.seed)
        # the very prompt benchmark() drew, so the count sees the same decode
        prompt = torch.randint(0, rt.model.vocab_size, (b, args.prompt_len),
                               generator=torch.Generator().manual_seed(args.seed))
        hit = count_experts_hit(rt, prompt, args.new_tokens)
        kv_len = args.prompt_len + args.new_tokens / 2  # mean filled context over the decode steps
        parts = step_bytes(dims, fmt, b, hit, kv_len)
        tok_s = res["decode_tokens_per_s"]
        step_s = b / tok_s
        gbps = parts["total"] / step_s / 1e9
        row = {
            "weights": name, "batch": b, "layers": dims.layers, "run_dtype": str(rt.dtype).removeprefix("torch."),
            "quant_format": rt.report.quant_format, "kernels": rt.use_kernels, "cuda_graph": rt.cuda_graph,
            "packed_linears": rt.report.packed_linears, "packed_expert_layers": rt.report.packed_expert_layers,
            "dequantized_tensors": len(rt.report.dequantized),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "decode_tokens_per_s": tok_s, "prefill_tokens_per_s": res["prefill_tokens_per_s"],
            "ms_per_step": 1e3 * step_s,
            "experts_hit_per_layer": hit, "experts_hit_source": "router ids counted (eager rerun, same prompts)",
            "experts_hit_uniform": expected_unique_experts(dims.experts, dims.top_k, b),
            "kv_len_mean": kv_len, "kv_len_static": rt._cache.max_len if rt._cache is not None else None,
            "weight_format": asdict(fmt), "bytes_per_step": parts["total"], "bytes_breakdown": parts,
            "held_vs_counted": held_ratio,
            "achieved_gbps": gbps, "copy_gbps": copy_gbps, "pct_of_floor": 100.0 * gbps / copy_gbps,
            "floor_ms_per_step": 1e3 * parts["total"] / (copy_gbps * 1e9),
        }
        real_layers = REAL_LAYERS.get(args.shape)
        if real_layers:
            real = Dims(**{**asdict(dims), "layers": real_layers})
            row["real_model_bytes_per_step"] = step_bytes(real, fmt, b, hit, kv_len)["total"]
        row["fixed_ms_per_step"] = 1e3 * b / fixed_part_tokens_per_s(rt, args, b)
        split_layers(row, real_layers)
        rows.append(row)
        print(f"  {name} batch {b}: {tok_s:.1f} tok/s, {row['ms_per_step']:.2f} ms/step, "
              f"{row['pct_of_floor']:.1f}% of floor", flush=True)
    del rt
    _free(args.device)
    return rows, load_s


def evaluate_targets(rows: list[dict], smoke: bool, layers: int, real_layers: int | None) -> list[dict]:
    """Add speedup_vs_bf16 (and its estimate for the real model) to the int4 rows; return the target verdicts:
    on the model run (basis "measured, N layers") and, for a real model, on the estimate of its full depth."""
    bf16 = {r["batch"]: r for r in rows if r["weights"] == "bf16"}
    targets = []

    def add(what, value, target, met, basis):
        if value is not None:
            targets.append({"what": what, "basis": basis, "value": value, "target": target, "met": met(value),
                            "meaningful": not smoke})

    for r in rows:
        r["speedup_vs_bf16"] = r["real_model_est_speedup_vs_bf16"] = None
        if r["weights"] != "int4":
            continue
        base = bf16.get(r["batch"])
        if base:
            r["speedup_vs_bf16"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if r.get("real_model_est_tokens_per_s") and base.get("real_model_est_tokens_per_s"):
                r["real_model_est_speedup_vs_bf16"] = (r["real_model_est_tokens_per_s"]
                                                       / base["real_model_est_tokens_per_s"])
        bases = [(f"measured, {layers} layers", r["pct_of_floor"], r["speedup_vs_bf16"])]
        if real_layers:
            bases.append((f"est. {real_layers} layers", r.get("real_model_est_pct_of_floor"),
                           r["real_model_est_speedup_vs_bf16"]))
        for basis, pct, speedup in bases:
            if base:
                add(f"int4 faster than bf16 at batch {r['batch']}", speedup, "> 1.0x", lambda v: v > 1.0, basis)
            if r["batch"] in TARGET_PCT:
                t = TARGET_PCT[r["batch"]]
                add(f"int4 % of floor at batch {r['batch']}", pct, f">= {t:.0f}%", lambda v, t=t: v >= t, basis)
    return targets


# ---------------------------------------------------------------------------------------------- output
_COLS = (("weights", "weights", 7, "s"), ("run as", "run_dtype", 8, "s"), ("batch", "batch", 5, "d"), ("tok/s", "decode_tokens_per_s", 9, ".1f"),
         ("ms/step", "ms_per_step", 8, ".3f"), ("MB/step", "bytes_per_step", 9, ".1f"),
         ("GB/s", "achieved_gbps", 7, ".1f"), ("%floor", "pct_of_floor", 6, ".1f"),
         ("x bf16", "speedup_vs_bf16", 6, ".2f"), ("hit/layer", "experts_hit_per_layer", 9, ".2f"),
         ("uniform", "experts_hit_uniform", 7, ".2f"))


_SPLIT_COLS = (("weights", "weights", 7, "s"), ("batch", "batch", 5, "d"), ("fixed ms", "fixed_ms_per_step", 8, ".3f"),
               ("layers ms", "layers_ms_per_step", 9, ".3f"), ("layers MB", "layers_bytes_per_step", 9, ".1f"),
               ("layers %floor", "layers_pct_of_floor", 13, ".1f"), ("est tok/s", "real_model_est_tokens_per_s", 9, ".1f"),
               ("est %floor", "real_model_est_pct_of_floor", 10, ".1f"),
               ("est x bf16", "real_model_est_speedup_vs_bf16", 10, ".2f"))


def _cell(row: dict, key: str, width: int, fmt: str) -> str:
    v = row.get(key)
    if key in ("bytes_per_step", "layers_bytes_per_step") and v is not None:
        v = v / 1e6
    text = "-" if v is None else format(v, fmt)
    return text.ljust(width) if fmt == "s" else text.rjust(width)


def print_report(meta: dict, rows: list[dict], targets: list[dict]) -> None:
    print()
    if meta["smoke"]:
        print("CPU SMOKE RUN: numbers are not meaningful (fp32 torch path, int4 on torch's CPU int4 kernel; the "
              "int4 floor is the packed format's, not what this run read). Run on a GPU for the real figures.")
    print(f"e2e decode, {meta['shape']} x {meta['layers']} layers"
          + (f" (the real model has {meta['real_layers']}; the floor is for the {meta['layers']} run)"
             if meta["real_layers"] else "")
          + f" on {meta['device_name']}; prompt {meta['prompt_len']}, {meta['new_tokens']} new tokens, "
          f"median of {meta['repeats']}; copy_ bandwidth {meta['copy_gbps']:.0f} GB/s")
    print(" ".join(h.ljust(w) if f == "s" else h.rjust(w) for h, _, w, f in _COLS))
    for r in rows:
        print(" ".join(_cell(r, k, w, f) for _, k, w, f in _COLS))
    for r in rows:
        if r["weights"] == "int4" and (not r["packed_expert_layers"] or r["dequantized_tensors"]):
            print(f"  note: int4 batch {r['batch']}: {r['packed_expert_layers']}/{r['layers']} expert layers packed, "
                  f"{r['packed_linears']} linears packed, {r['dequantized_tensors']} tensors run dequantized"
                  + (" (expected on CPU: no packed kernels)" if meta["smoke"] else
                     " -- the int4 floor assumes every linear packed: check the runtime's conversion report"))
            break
    if any("layers_ms_per_step" in r for r in rows):
        real = meta["real_layers"]
        print("decoder layers only (step minus a zero-layer step: embedding, final norm, lm_head, sampling)"
              + (f" and the estimate for {real} layers (zero-layer step + {real} x the time per layer measured "
                 f"here; floor for {real} layers):" if real else ":"))
        print(" ".join(h.ljust(w) if f == "s" else h.rjust(w) for h, _, w, f in _SPLIT_COLS))
        for r in rows:
            print(" ".join(_cell(r, k, w, f) for _, k, w, f in _SPLIT_COLS))
    seen = set()
    for r in rows:
        off = {k: v for k, v in r["held_vs_counted"].items() if abs(v - 1) > 0.01}
        if off and r["weights"] not in seen:
            seen.add(r["weights"])
            print(f"  note: {r['weights']}: the runtime holds {', '.join(f'{k} x{v:.2f}' for k, v in off.items())} "
                  "the bytes the floor counts" + (" (expected on CPU: int4 runs dequantized)" if meta["smoke"] else
                                                  " -- the floor does not describe what this run reads"))
    stat = rows[0].get("kv_len_static") if rows else None
    if stat:
        print(f"  KV: the floor reads the mean filled context ({rows[0]['kv_len_mean']:g} positions); the runtime's "
              f"{'graph' if rows[0]['cuda_graph'] else 'eager'} step reads "
              + (f"its whole static buffer ({stat} positions)" if rows[0]["cuda_graph"] else "the filled context"))
    int4_b1 = next((r for r in rows if r["weights"] == "int4"), None)
    if int4_b1:
        bd = int4_b1["bytes_breakdown"]
        print(f"  lm_head (float, not quantized) = {100 * bd['lm_head'] / bd['total']:.0f}% of int4 bytes/step at "
              f"batch {int4_b1['batch']}" + (f"; {100 * bd['lm_head'] / int4_b1['real_model_bytes_per_step']:.0f}% "
                                             f"with the real model's {meta['real_layers']} layers"
                                             if "real_model_bytes_per_step" in int4_b1 else ""))
    if meta.get("int4_error"):
        print(f"  int4 NOT MEASURED: quantization failed: {meta['int4_error']}")
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        unit = "x" if t["target"].endswith("x") else "%"
        print(f"  target {t['what']} ({t['basis']}): {t['value']:.2f}{unit} (target {t['target']}): {verdict}"
              + ("" if t["meaningful"] else " [smoke run: not meaningful]"))


# ---------------------------------------------------------------------------------------------- main
def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="e2e_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 for qwen3-30b-a3b, 2 tiny)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 512 on CUDA, 16 on CPU")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 on CUDA, 8 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per batch (default 5 CUDA, 2 CPU)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--copy-mb", type=int, default=None, help="copy_ bandwidth buffer (default 1024 CUDA, 64 CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("E2E_WORKDIR", "/tmp/moecompress_e2e")),
                    help="checkpoints are cached here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    cuda = args.device == "cuda"
    if cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: unset it to measure the compiled kernels")
    args.device = torch.device(args.device)
    args.layers = args.layers or DEFAULT_LAYERS[args.shape]
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: comma-separated positive integers")
    for name, gpu, cpu in (("prompt_len", 512, 16), ("new_tokens", 128, 8), ("repeats", 5, 2), ("copy_mb", 1024, 64)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if not args.batches or min(args.batches) < 1 or args.layers < 1 or args.prompt_len < 1 or args.repeats < 1:
        ap.error("batches, layers, prompt length and repeats must be >= 1")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import transformers
    import triton

    from moecompress.kernels._bench_util import Timer, copy_bandwidth

    dev = args.device
    cuda = dev.type == "cuda"
    dims = Dims.of(args.shape, args.layers)
    tag = f"{args.shape}-L{args.layers}-s{args.seed}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    bf16_dir = args.workdir / f"bf16-{tag}"
    int4_dir = args.workdir / f"int4-g{args.group_size}-{tag}"

    timings = {}
    print(f"[1/4] random bf16 checkpoint {bf16_dir}", flush=True)
    timings["build_s"] = build_checkpoint(args.shape, args.layers, bf16_dir, dev, args.seed)
    print(f"[2/4] RTN int4 g{args.group_size} (compressed-tensors) {int4_dir}", flush=True)
    models = [("bf16", bf16_dir), ("int4", int4_dir)]
    int4_error = None
    try:
        timings["quantize_s"] = quantize_checkpoint(bf16_dir, int4_dir, dev, args.group_size)
    except Exception as exc:  # noqa: BLE001 -- e.g. pydantic missing: still measure bf16, say why int4 is absent
        int4_error = f"{type(exc).__name__}: {exc}"
        models = models[:1]
        print(f"ERROR: int4 quantization failed ({int4_error}); measuring bf16 only", flush=True)
    _free(dev)
    print("[3/4] copy bandwidth", flush=True)
    copy_gbps = copy_bandwidth(Timer(dev), dev, args.copy_mb << 20)
    meta = {
        "shape": args.shape, "layers": args.layers, "real_layers": REAL_LAYERS[args.shape], "dims": asdict(dims),
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if cuda else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "smoke": not cuda, "batches": args.batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "group_size": args.group_size, "seed": args.seed,
        "copy_gbps": copy_gbps, "copy_bytes": args.copy_mb << 20,
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "checkpoints": {"bf16": str(bf16_dir), "int4": str(int4_dir)},
        "int4_error": int4_error,
        "bytes_model": "weights as the runtime reads them + experts hit (router ids counted) + KV read over the "
                       "mean filled context; lm_head float; activations not counted",
    }
    print("[4/4] decode", flush=True)
    rows: list[dict] = []
    for name, path in models:
        got, timings[f"load_{name}_s"] = measure(name, path, args, dims, copy_gbps)
        rows.extend(got)
    meta["timings_s"] = timings
    targets = evaluate_targets(rows, meta["smoke"], args.layers, REAL_LAYERS[args.shape])
    print_report(meta, rows, targets)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if int4_error else 0


if __name__ == "__main__":
    sys.exit(main())
