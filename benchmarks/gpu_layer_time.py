"""Per-layer quantize time of a Qwen3-30B-A3B-shaped layer on one device: the anchor of the scale-out projection.

    python benchmarks/gpu_layer_time.py --layers 2 --samples 128 --seq-len 2048 --methods gptq,rtn --json out.json
    python benchmarks/gpu_layer_time.py --shape tiny --device cpu --samples 4 --seq-len 64   # smoke run

A random bf16 checkpoint of the shape (``e2e_decode.build_checkpoint``: hidden 2048, 32 heads / 4 KV
heads, 128 experts of 768, top-8) with ``--layers`` decoder layers is quantized by
``moecompress.pipeline.quantize`` on ``--device`` (W4 g128 symmetric, compressed-tensors, calibration
``--samples`` x ``--seq-len`` tokens of the built-in stdlib text, byte tokenizer), once per method.
Printed per method: each layer's seconds (the first layer also pays kernel warm-up and allocator
growth, so the steady-state figure is the median of the later layers), the calibration-data time, the
whole run, and the device's peak memory. The real model has 48 layers: 48 x the steady-state layer time
+ the fixed part is printed as an estimate, labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_decode import REAL_LAYERS, build_checkpoint  # noqa: E402


def run(args) -> dict:
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config

    dev = torch.device(args.device)
    src = args.workdir / f"bf16-{args.shape}-L{args.layers}-s{args.seed}"  # e2e_decode.py's name: shared
    build_s = build_checkpoint(args.shape, args.layers, src, dev, args.seed)
    out: dict = {"shape": args.shape, "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "build_s": build_s, "methods": {}}
    for method in args.methods:
        dst = args.workdir / f"{method}-{args.shape}-L{args.layers}-s{args.seed}"
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        cfg = build_config(method=method, bits=4, group_size=128, device=args.device, calib_samples=args.samples,
                           seq_len=args.seq_len, batch_size=args.batch_size)
        t0 = time.perf_counter()
        summary = quantize(src, dst, cfg)
        wall = time.perf_counter() - t0
        per_layer = [r["seconds"] for r in summary["layers"]]
        steady = statistics.median(per_layer[1:]) if len(per_layer) > 1 else per_layer[0]
        fixed = wall - sum(per_layer)
        real = REAL_LAYERS.get(args.shape)
        out["methods"][method] = {
            "wall_s": wall, "per_layer_s": per_layer, "steady_layer_s": steady, "fixed_s": fixed,
            "calibration_data_s": summary["timings_s"].get("calibration_data"),
            "peak_device_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "est_real_model_s": fixed + real * steady if real else None,
            "tokens": args.samples * args.seq_len,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_layer_time.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(REAL_LAYERS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="gptq,rtn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("E2E_WORKDIR", "/tmp/moecompress_e2e")))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.workdir.mkdir(parents=True, exist_ok=True)
    res = run(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"quantize per layer, {res['shape']} x {res['layers']} layers on {res['device']} (torch {res['torch']}), "
          f"W4 g128, calibration {res['samples']} x {res['seq_len']} tokens")
    print(f"{'method':8s} {'wall s':>8s} {'layers s':>24s} {'steady s':>9s} {'fixed s':>8s} {'peak GiB':>9s} "
          f"{'est. 48L s':>10s}")
    for m, r in res["methods"].items():
        layers = ",".join(f"{s:.1f}" for s in r["per_layer_s"])
        peak = "-" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.1f}"
        est = "-" if r["est_real_model_s"] is None else f"{r['est_real_model_s']:.0f}"
        print(f"{m:8s} {r['wall_s']:8.1f} {layers:>24s} {r['steady_layer_s']:9.2f} {r['fixed_s']:8.1f} {peak:>9s} "
              f"{est:>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
