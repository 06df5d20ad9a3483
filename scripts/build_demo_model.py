#!/usr/bin/env python
"""Build the demo model and, with --sensitivity, measure float / RTN / GPTQ held-out perplexity.

    python scripts/build_demo_model.py                       # build (or reuse) the cached demo model
    python scripts/build_demo_model.py --out /tmp/demo       # build into a folder
    python scripts/build_demo_model.py --sensitivity --calib-seeds 0 1 2 --report /tmp/demo-sens.json

The sensitivity check quantizes with ``moecompress.pipeline.quantize`` (RTN once: it needs no
calibration; GPTQ once per calibration seed), reads each output back with our own reader
(``write_dequantized``) and evaluates it with transformers on the held-out text.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sensitivity(model_dir: Path, work: Path, calib_seeds, bits: int, group_size: int, calib_samples: int,
                seq_len: int, n: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.checkpoint.dequant import write_dequantized
    from moecompress.demo_model import heldout_windows, perplexity
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config

    tok = AutoTokenizer.from_pretrained(model_dir)
    specs = ("builtin:heldout-code", "builtin:heldout-prose")
    windows = {s: heldout_windows(tok, s, n=n, seq_len=seq_len) for s in specs}

    def evaluate(path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return {s: perplexity(model, ids) for s, ids in windows.items()}

    runs = [("float", None)] + [("rtn", None)] + [("gptq", s) for s in calib_seeds]
    rows = []
    for method, seed in runs:
        t0 = time.perf_counter()
        if method == "float":
            ppl, q_s = evaluate(model_dir), 0.0
        else:
            cfg = build_config(method=method, bits=bits, group_size=group_size, calib_samples=calib_samples,
                               seq_len=seq_len, seed=seed or 0)
            out, dense = work / f"{method}-{seed}", work / f"{method}-{seed}-dense"
            summary = quantize(model_dir, out, cfg)
            q_s = summary["timings_s"]["total"]
            write_dequantized(out, dense)
            ppl = evaluate(dense)
        row = {"method": method, "calib_seed": seed, "quantize_s": round(q_s, 1),
               "total_s": round(time.perf_counter() - t0, 1), **{s.split(":")[1]: round(p, 4) for s, p in ppl.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = rows[0]
    report = {"model": str(model_dir), "bits": bits, "group_size": group_size, "calib_samples": calib_samples,
              "seq_len": seq_len, "windows": n, "rows": rows, "summary": {}}
    for s in specs:
        key = s.split(":")[1]
        rtn = rows[1][key]
        gptq = [r[key] for r in rows[2:]]
        report["summary"][key] = {
            "float": base[key], "rtn": rtn, "gptq_mean": sum(gptq) / len(gptq),
            "rtn_increase_pct": 100 * (rtn / base[key] - 1),
            "gptq_increase_pct": 100 * (sum(gptq) / len(gptq) / base[key] - 1),
            "gptq_seed_spread": max(gptq) - min(gptq),
            "rtn_minus_worst_gptq": rtn - max(gptq),
        }
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="build into this folder (default: the cache, reused when present)")
    ap.add_argument("--cache-dir", type=Path, help="cache folder (default $MOECOMPRESS_CACHE or ~/.cache/moecompress)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--quick", action="store_true", help="the ~1 minute CI variant")
    ap.add_argument("--variant", default="demo", help="recipe variant: demo (8 experts, top-2) or wide (64 experts, top-8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sensitivity", action="store_true", help="measure float / RTN / GPTQ held-out perplexity")
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--report", type=Path, help="write the sensitivity report (JSON) here")
    args = ap.parse_args(argv)

    import torch

    from moecompress.demo_model import build_demo_model, demo_model_path

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "datasets", "moecompress"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.out:
        path = args.out
        if not (path / "demo_model.json").is_file():
            build_demo_model(path, seed=args.seed, steps=args.steps, quick=args.quick, threads=args.threads,
                             log=lambda m: print(m, flush=True), variant=args.variant)
    else:
        path = demo_model_path(args.cache_dir, seed=args.seed, steps=args.steps, quick=args.quick, build=False,
                                variant=args.variant)
        if not (path / "demo_model.json").is_file():
            build_demo_model(path, seed=args.seed, steps=args.steps, quick=args.quick, threads=args.threads,
                             log=lambda m: print(m, flush=True), variant=args.variant)
    info = json.loads((path / "demo_model.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"demo model: {path} ({size / 1e6:.1f} MB; built in {info['timings_s']['total']:.0f}s)")
    print("held-out loss: " + ", ".join(f"{k} {v['loss']:.3f} (ppl {v['perplexity']:.2f})"
                                        for k, v in info["heldout"].items())
          + f"; uniform {info['uniform_loss']:.3f}; min expert share {info['min_expert_share']:.3f}")
    if args.sensitivity:
        with tempfile.TemporaryDirectory(prefix="demo-sens-") as work:
            report = sensitivity(path, Path(work), args.calib_seeds, args.bits, args.group_size,
                                 args.calib_samples, args.seq_len, args.windows)
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        for key, s in report["summary"].items():
            print(f"{key}: float {s['float']:.3f}  RTN {s['rtn']:.3f} (+{s['rtn_increase_pct']:.1f}%)  "
                  f"GPTQ {s['gptq_mean']:.3f} (+{s['gptq_increase_pct']:.1f}%, seed spread {s['gptq_seed_spread']:.3f})"
                  f"  RTN - worst GPTQ {s['rtn_minus_worst_gptq']:.3f}")
        print(f"elapsed {report['elapsed_s']:.0f}s")
        if args.report:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
        ok = all(s["rtn_increase_pct"] >= 3 and s["rtn_minus_worst_gptq"] > s["gptq_seed_spread"]
                 for s in report["summary"].values())
        print("sensitive: " + ("yes" if ok else "NO"))
        if math.isnan(sum(s["rtn"] for s in report["summary"].values())):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
