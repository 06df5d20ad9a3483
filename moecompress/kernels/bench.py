"""Benchmark of the fused MoE kernel (``fused_moe``) against its torch twin and a torch bf16 grouped path.

    python -m moecompress.kernels.bench                     # CUDA: Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V2-Lite
    python -m moecompress.kernels.bench --shapes mixtral-8x7b --tokens 1,64 --dtypes bf16,int4 --json out.json
    python -m moecompress.kernels.bench --device cpu        # CPU smoke run: torch twins only, tiny shape

For each (layer shape, token count, weight dtype) one MoE layer call is timed, with inputs from random
router logits (softmax top-k, seeded) and bf16 activations: int8/int4 weights are RTN-quantized from
the same bf16 weights (group ``--group-size``, symmetric unless ``--asym``) and repacked for the kernel.

* ours: ``fused_moe`` (CUDA only); twin: ``fused_moe_torch`` (fp32 reference, dequantizes every call);
  torch: the bf16 grouped path (slots sorted by expert, ``torch._grouped_mm`` when it works here,
  else a loop over experts) on the bf16 weights whatever the row's weight dtype.
* CUDA timing: median over calls of torch.cuda.Event pairs, with a write larger than L2 (``--flush-mb``)
  before each call, after warmup. CPU: time.perf_counter; the Triton kernels are not run at all.
* bytes: the weights of the experts the routing hits (distinct ids in topk_ids; codes + scales + zeros
  when quantized) + activations in and out. GB/s = bytes / time, also as a fraction of the
  ``Tensor.copy_`` bandwidth measured in the same run (read + write bytes).
  TFLOP/s = 2 * T * top_k * 3 * H * I / time. x bf16 = time(bf16 row) / time(row), x torch = torch / time.
* ``--zero-frac 0,0.5``: the same inputs with a share of each token's lowest-weight slots routed to a
  zero expert (id E), as a zero-expert (ZEDA) model routes: ``x skip0`` = time / time at share 0 (the
  same T and weight dtype). The torch baseline drops those slots too. TFLOP/s still counts all k slots.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from ..errors import UserError
from . import _bench_util as bu


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad argument
        raise UserError(message)


def _parse(argv) -> argparse.Namespace:
    ap = _Parser(prog="python -m moecompress.kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated: {', '.join(bu.SHAPES)} or E:K:H:I (default: the three real "
                         f"layers on CUDA, cpu-smoke on CPU)")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,16,64,256,1024,4096; "
                                                   "CPU 1,7,33)")
    ap.add_argument("--dtypes", default=",".join(bu.WDTYPES), help="weight dtypes among bf16,int8,int4")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group (0: per-channel)")
    ap.add_argument("--asym", action="store_true", help="asymmetric quantization (uint8 zero points)")
    ap.add_argument("--config", default=None,
                    help='tile config overriding the table for every row, as JSON: \'{"BLOCK_N": 32, "BLOCK_K": 256}\'')
    ap.add_argument("--zero-frac", default="0", help="comma-separated shares of each token's slots routed to a "
                                                     "zero expert (id E: no compute, no weight reads), e.g. 0,0.5")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 CUDA, 1 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls of ours (default 50 CUDA, 5 CPU)")
    ap.add_argument("--baseline-iters", type=int, default=None, help="timed calls of twin/torch (default 10 CUDA, "
                                                                    "5 CPU)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time ours as a CUDA-graph replay (no host launch overhead); eager if capture fails")
    ap.add_argument("--flush-mb", type=int, default=256, help="L2 flush write before each CUDA call (MiB)")
    ap.add_argument("--copy-mb", type=int, default=None, help="copy_ bandwidth buffer (MiB; default 1024 CUDA, 64 CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write {meta, rows} here")
    args = ap.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    cuda = args.device == "cuda"
    args.shapes = bu.parse_shapes(args.shapes or ",".join(bu.GPU_SHAPES if cuda else bu.CPU_SHAPES))
    args.tokens = bu.parse_tokens(args.tokens or ",".join(map(str, bu.GPU_TOKENS if cuda else bu.CPU_TOKENS)))
    args.dtypes = bu.parse_dtypes(args.dtypes)
    args.zero_frac = bu.parse_zero_fracs(args.zero_frac)
    if args.config is not None:
        try:
            args.config = json.loads(args.config)
            assert isinstance(args.config, dict)
        except (ValueError, AssertionError):
            raise UserError(f"--config {args.config!r} is not a JSON object") from None
    if args.group_size != 0 and (args.group_size < 32 or args.group_size & (args.group_size - 1)):
        raise UserError(f"--group-size {args.group_size}: the kernels need a power of two >= 32 (or 0: per-channel)")
    if any(d != "bf16" for d in args.dtypes) and args.group_size:
        bad = [s.name for s in args.shapes if s.hidden % args.group_size or s.inter % args.group_size]
        if bad:
            raise UserError(f"--group-size {args.group_size} does not divide hidden/inter of {', '.join(bad)}")
    for name, default in (("warmup", 5 if cuda else 1), ("iters", 50 if cuda else 5),
                          ("baseline_iters", 10 if cuda else 5), ("copy_mb", 1024 if cuda else 64)):
        value = getattr(args, name)
        value = default if value is None else value
        if value < (0 if name == "warmup" else 1):
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range")
        setattr(args, name, value)
    if args.flush_mb < 0:
        raise UserError(f"--flush-mb {args.flush_mb} is out of range")
    return args


def _quantized(w13, w2, wdtype: str, group_size: int, asym: bool):
    from moecompress.quant.rtn import rtn_quantize
    from moecompress.quant.spec import QuantSpec

    from .packing import from_quantized

    spec = QuantSpec(bits=int(wdtype[3:]), group_size=group_size or None, symmetric=not asym, clip_ratios=(1.0,))
    try:
        return tuple(from_quantized(rtn_quantize(w, spec)) for w in (w13, w2))
    except ValueError as exc:  # a shape the kernel layout cannot pack
        raise UserError(f"{wdtype} group {group_size}: {exc}") from exc


def _meta(args, device: torch.device, copy_gbps: float) -> dict:
    import triton

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "mode": "kernel" if cuda else "cpu-twin",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": copy_gbps,
        "copy_bytes": args.copy_mb << 20,
        "flush_bytes": (args.flush_mb << 20) if cuda else 0,
        "warmup": args.warmup,
        "iters": args.iters,
        "baseline_iters": args.baseline_iters,
        "group_size": args.group_size,
        "symmetric": not args.asym,
        "seed": args.seed,
        "config_override": args.config,
    }


def run(args, emit=lambda item: None) -> tuple[dict, list[dict]]:
    """Benchmark every configuration; ``emit`` gets ``{"meta": ...}`` first, then each row as it is done."""
    device = torch.device(args.device)
    if device.type == "cuda":
        from . import _common

        if _common.interpreting():
            raise UserError("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels")
    timer = bu.Timer(device, args.flush_mb << 20)
    meta = _meta(args, device, bu.copy_bandwidth(timer, device, args.copy_mb << 20))
    emit({"meta": meta})
    rows: list[dict] = []
    for si, shape in enumerate(args.shapes):
        _bench_shape(args, shape, args.seed + si, device, timer, meta, lambda row: (rows.append(row), emit(row)))
        if device.type == "cuda":  # the shape's weights are gone with _bench_shape's frame
            torch.cuda.empty_cache()
    return meta, rows


def _bench_shape(args, shape: bu.Shape, seed: int, device: torch.device, timer: bu.Timer, meta: dict, emit):
    from .fused_moe import fused_moe, fused_moe_torch

    cuda = device.type == "cuda"
    w13, w2 = bu.make_weights(shape, device, seed)
    weights = {d: (w13, w2) if d == "bf16" else _quantized(w13, w2, d, args.group_size, args.asym)
               for d in args.dtypes}
    base_us: dict = {}  # (tokens, wdtype) -> time at zero_frac 0, for the "x no skip" ratio
    for zf, t in ((zf, t) for zf in args.zero_frac for t in args.tokens):
        x, tw, ids = bu.make_inputs(shape, t, args.seed, device, zf)
        n_hit = bu.experts_hit(ids, shape.experts)
        use_gmm, impl = bu.pick_grouped(x, w13, w2, tw, ids)
        grouped = lambda: bu.torch_grouped_moe(x, w13, w2, tw, ids, use_gmm)  # noqa: E731
        grouped_us = timer(grouped, min(args.warmup, 2), args.baseline_iters)
        grouped_err = bu.rel_err(grouped(), fused_moe_torch(x, w13, w2, tw, ids))
        bf16_us = None
        for wdtype in args.dtypes:
            a, b = weights[wdtype]
            twin = lambda: fused_moe_torch(x, a, b, tw, ids)  # noqa: E731
            twin_us = timer(twin, min(args.warmup, 2), args.baseline_iters)
            kernel_us = err = timing = None
            if cuda:
                out = torch.empty_like(x)
                ours = lambda: fused_moe(x, a, b, tw, ids, out=out, config=args.config)  # noqa: E731
                fn, timing = _graphed(ours) if args.cuda_graph else (ours, "eager")
                kernel_us = timer(fn, args.warmup, args.iters)
                err = bu.rel_err(ours(), twin())
                del fn  # a captured graph holds its own memory pool
            us = kernel_us if cuda else twin_us
            if wdtype == "bf16":
                bf16_us = us
            if zf == 0:
                base_us[t, wdtype] = us
            nbytes = bu.moved_bytes(shape, t, n_hit, wdtype, args.group_size, args.asym)
            flops = bu.moe_flops(shape, t)
            gbps = nbytes / (us * 1e-6) / 1e9
            emit({
                "shape": shape.name, "experts": shape.experts, "top_k": shape.top_k, "hidden": shape.hidden,
                "inter": shape.inter, "tokens": t, "wdtype": wdtype, "zero_frac": zf,
                "zero_slots_per_token": bu.zero_slots(shape.top_k, zf),
                "group_size": None if wdtype == "bf16" else args.group_size,
                "symmetric": None if wdtype == "bf16" else not args.asym,
                "mode": meta["mode"], "experts_hit": n_hit, "bytes": nbytes, "flops": flops,
                "kernel_us": kernel_us, "kernel_timing": timing, "twin_us": twin_us, "torch_grouped_us": grouped_us,
                "torch_grouped_impl": impl, "time_us": us, "gbps": gbps, "pct_copy_bw": 100.0 * gbps / meta["copy_gbps"],
                "tflops": flops / (us * 1e-6) / 1e12,
                "speedup_vs_bf16": None if bf16_us is None or wdtype == "bf16" else bf16_us / us,
                "speedup_vs_torch_grouped": grouped_us / us,
                "time_vs_no_skip": us / base_us[t, wdtype] if (t, wdtype) in base_us else None,
                "rel_err_vs_twin": err, "torch_grouped_rel_err": grouped_err,
            })


def _graphed(fn):
    """(replay of fn captured in a CUDA graph, "graph"), or (fn, "eager (...)") when fn cannot be captured
    (a host sync inside it, for instance)."""
    fn()  # compile every kernel before capturing
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 -- any capture failure: fall back to eager timing
        torch.cuda.synchronize()
        return fn, f"eager (CUDA-graph capture failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
    return graph.replay, "graph"


_COLS = (  # header, row key, width, format
    ("shape", "shape", 16, "s"), ("T", "tokens", 5, "d"), ("w", "wdtype", 4, "s"), ("skip", "zero_frac", 5, ".2f"),
    ("hit", "experts_hit", 4, "d"),
    ("ours us", "kernel_us", 9, ".1f"), ("twin us", "twin_us", 10, ".1f"), ("torch us", "torch_grouped_us", 9, ".1f"),
    ("GB/s", "gbps", 7, ".1f"), ("%copy", "pct_copy_bw", 6, ".1f"), ("TFLOP/s", "tflops", 7, ".3g"),
    ("x bf16", "speedup_vs_bf16", 6, ".2f"), ("x torch", "speedup_vs_torch_grouped", 7, ".2f"),
    ("x skip0", "time_vs_no_skip", 7, ".3f"), ("err", "rel_err_vs_twin", 7, ".1e"),
)


def _cell(value, width: int, fmt: str) -> str:
    text = "-" if value is None else format(value, fmt)
    return text.ljust(width) if fmt == "s" else text.rjust(width)


def _print_header(meta: dict) -> None:
    if meta["mode"] == "kernel":
        print(f"fused_moe on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); median of "
              f"{meta['iters']} calls (twin/torch {meta['baseline_iters']}), L2 flushed "
              f"({meta['flush_bytes'] >> 20} MiB write) before each")
    else:
        print(f"CPU SMOKE RUN on {meta['device']}: the Triton kernels are NOT timed. 'twin us' is fused_moe_torch "
              f"(fp32 reference), 'torch us' the bf16 grouped torch path; GB/s, %copy, TFLOP/s and x columns "
              f"come from the twin time (time.perf_counter, median of {meta['baseline_iters']})")
    sym = "symmetric" if meta["symmetric"] else "asymmetric"
    group = meta["group_size"] or "per-channel"
    print(f"bf16 activations; int weights RTN group {group} {sym}, bf16 scales; copy_ bandwidth "
          f"{meta['copy_gbps']:.0f} GB/s (read+write, {meta['copy_bytes'] >> 20} MiB)")
    print(" ".join(h.ljust(w) if f == "s" else h.rjust(w) for h, _, w, f in _COLS))


def _print_row(row: dict) -> None:
    print(" ".join(_cell(row[k], w, f) for _, k, w, f in _COLS), flush=True)


def main(argv=None) -> int:
    try:
        args = _parse(argv)
        state: dict = {"rows": []}

        def emit(item: dict) -> None:
            if "meta" in item:
                state["meta"] = item["meta"]
                _print_header(item["meta"])
                return
            _print_row(item)
            state["rows"].append(item)
            if args.json:  # rewritten after every row: a run cut short still leaves its rows
                args.json.write_text(json.dumps({"meta": state["meta"], "rows": state["rows"]}, indent=1) + "\n")

        with torch.inference_mode():
            _, rows = run(args, emit)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"torch baseline: {'; '.join(sorted({r['torch_grouped_impl'] for r in rows}))}")
    timings = sorted({r["kernel_timing"] for r in rows if r["kernel_timing"]})
    if timings:
        print(f"ours timed: {'; '.join(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
