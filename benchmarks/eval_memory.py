"""Memory contract of `moecompress eval`: the default mode vs `--low-memory`, on 2- and 4-layer models.

The contract: by default peak memory is at most ~1.2x the two models as loaded
(weights in the compute dtype -- fp32 on CPU -- quantized ones dequantized) plus activations; with
`--low-memory`, one decoder layer of each model is resident at a time plus activations and one
window of logits, so the peak must not grow with the number of layers. Both modes give the same numbers.

Builds (once, cached in --workdir) random bf16 Qwen3-MoE-shaped checkpoints with the builder of
`stream_memory.py` (default: hidden 1024, 32 experts x moe_intermediate 512, ~100 MB bf16 per decoder
layer) and an RTN W4 g128 copy of each; then runs `moecompress eval QUANT --reference FLOAT` in a
fresh process per (layers, mode) on tiny data (activations are negligible) and reads its peak RSS
(`ru_maxrss` from `os.wait4`). The driver itself imports only the standard library: a child's
ru_maxrss starts at the RSS of the process it was forked from, so the driver must stay small. The
import floor is the peak RSS of a process that imports torch, transformers, moecompress's eval and
CLI modules and the Qwen3-MoE modeling code, and nothing else.

    /work/venv/bin/python benchmarks/eval_memory.py --workdir /tmp/eval_memory --json eval_memory.json

Options: --layers 2,4 --experts 32 --hidden 1024 --moe-inter 512 --data builtin:heldout-code
--samples 2 --seq-len 64 --threads 1 --max-ratio 1.2 --max-growth 0.5. Exit status 0 when every
claim is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20

BUILD = r"""
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from stream_memory import build
from moecompress.pipeline import quantize
from moecompress.settings import build_config
a = json.loads(sys.argv[2])
if a["float"]:
    build(Path(a["out"]), a["layers"], argparse.Namespace(hidden=a["hidden"], experts=a["experts"], moe_inter=a["moe_inter"]))
else:
    quantize(a["src"], a["out"], build_config(method="rtn", bits=4, group_size=128))
"""

FLOOR = ("import torch, transformers, moecompress.cli, moecompress.evals.evaluate, "
         "transformers.models.qwen3_moe.modeling_qwen3_moe")


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child of this (small) process: wall time and peak RSS from os.wait4."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed; log {log}:\n{tail}")
    return {"peak_rss": ru.ru_maxrss * 1024, "wall_s": time.perf_counter() - t0}  # Linux: KiB


def ensure(out: Path, spec: dict, log: Path) -> Path:
    """Build ``out`` (a float checkpoint or an RTN copy) unless a finished one is cached."""
    if (out / ".built").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    run_measured([sys.executable, "-c", BUILD, str(HERE), json.dumps({**spec, "out": str(tmp)})], log)
    (tmp / ".built").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fp32_bytes(model: Path) -> tuple[int, int]:
    """(fp32 bytes of decoder layer 0, of the whole model), from the safetensors headers of a float checkpoint."""
    layer = total = 0
    for shard in sorted(model.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 4
            for d in info["shape"]:
                n *= d
            total += n
            layer += n if name.startswith("model.layers.0.") else 0
    return layer, total


def metrics(r: dict) -> dict:
    out = {f"ppl/{k}": v for k, v in r["ppl"].items()}
    out.update({f"ppl_reference/{k}": v for k, v in r["ppl_reference"].items()})
    out.update({"kl": r["kl"], "top1_agreement": r["top1_agreement"]})
    out.update({f"routing/{k}": r["routing"][k] for k in ("topk_exact", "jaccard", "router_kl")})
    return out


def max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-12) for k in a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4", help="comma-separated layer counts (growth: first vs last)")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--data", default="builtin:heldout-code")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-ratio", type=float, default=1.2, help="default mode: (peak - floor) / (model + reference fp32)")
    ap.add_argument("--max-growth", type=float, default=0.5, help="--low-memory: peak growth in layers' worth")
    ap.add_argument("--workdir", help="cache checkpoints, logs and eval JSONs here (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    layer_counts = [int(x) for x in args.layers.split(",")]
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="eval_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("moecompress")
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from moecompress.cli import entry; entry()"]
    shape = {"hidden": args.hidden, "experts": args.experts, "moe_inter": args.moe_inter}
    tag = f"h{args.hidden}-e{args.experts}-i{args.moe_inter}"

    floor = min(run_measured([sys.executable, "-c", FLOOR], work / f"floor{k}.log")["peak_rss"] for k in range(2))
    rows, sizes = [], {}
    for n in layer_counts:
        f = ensure(work / f"float{n}-{tag}", {"float": True, "layers": n, **shape}, work / f"build-float{n}.log")
        q = ensure(work / f"rtn{n}-{tag}", {"float": False, "src": str(f)}, work / f"build-rtn{n}.log")
        sizes[n] = fp32_bytes(f)
        for mode in ("default", "low-memory"):
            out = work / f"eval{n}-{mode}.json"
            cmd = cli + ["eval", str(q), "--reference", str(f), "--data", args.data, "--samples", str(args.samples),
                         "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--json", str(out)]
            r = run_measured(cmd + (["--low-memory"] if mode == "low-memory" else []), work / f"eval{n}-{mode}.log")
            res = json.loads(out.read_text())
            rows.append({"layers": n, "mode": mode, "layer_fp32": sizes[n][0], "model_fp32": sizes[n][1],
                         "peak_rss": r["peak_rss"], "over_floor": r["peak_rss"] - floor, "wall_s": r["wall_s"],
                         "metrics": metrics(res)})
            print(f"layers {n} {mode:>10}: peak RSS {r['peak_rss'] / MIB:.0f} MiB, {r['wall_s']:.1f} s", flush=True)

    print(f"\nimport floor: {floor / MIB:.0f} MiB; {args.data}, {args.samples} windows x {args.seq_len} tokens, "
          f"{args.threads} thread(s)\n")
    print("| layers | mode | layer fp32 MiB | model + reference fp32 MiB | peak RSS MiB | peak - floor MiB "
          "| (peak - floor) / (model + ref) | (peak - floor) / layer | wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        both = 2 * r["model_fp32"]
        print(f"| {r['layers']} | {r['mode']} | {r['layer_fp32'] / MIB:.1f} | {both / MIB:.1f} | {r['peak_rss'] / MIB:.0f} "
              f"| {r['over_floor'] / MIB:.0f} | {r['over_floor'] / both:.3f} | {r['over_floor'] / r['layer_fp32']:.2f} "
              f"| {r['wall_s']:.1f} |")

    by = {(r["layers"], r["mode"]): r for r in rows}
    verdicts = []
    worst = max(by[n, "default"]["over_floor"] / (2 * by[n, "default"]["model_fp32"]) for n in layer_counts)
    lo, hi = layer_counts[0], layer_counts[-1]
    d_lo, d_hi = by[lo, "default"], by[hi, "default"]  # per extra byte of models: the fixed overhead cancels
    marginal = (d_hi["peak_rss"] - d_lo["peak_rss"]) / max(2 * (d_hi["model_fp32"] - d_lo["model_fp32"]), 1)
    verdicts.append(("default mode <= %.2fx (model + reference fp32)" % args.max_ratio, worst <= args.max_ratio,
                     f"worst ratio {worst:.3f}; marginal {lo} -> {hi} layers {marginal:.3f}"))
    a, b = by[lo, "low-memory"], by[hi, "low-memory"]
    growth = (b["peak_rss"] - a["peak_rss"]) / a["layer_fp32"]
    verdicts.append((f"--low-memory peak O(one layer): growth {lo} -> {hi} layers <= {args.max_growth} layers",
                     growth <= args.max_growth,
                     f"{(b['peak_rss'] - a['peak_rss']) / MIB:+.0f} MiB = {growth:+.2f} layers' worth; peak - floor "
                     f"{a['over_floor'] / a['layer_fp32']:.2f} / {b['over_floor'] / b['layer_fp32']:.2f} layers"))
    diff = max(max_rel_diff(by[n, "default"]["metrics"], by[n, "low-memory"]["metrics"]) for n in layer_counts)
    verdicts.append(("both modes give the same numbers (ppl, KL, top-1, routing; rel. diff <= 1e-5)", diff <= 1e-5,
                     f"max relative difference {diff:.2e}"))
    print()
    for claim, ok, detail in verdicts:
        print(f"{'met' if ok else 'NOT MET'}: {claim}: {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"floor_rss": floor, "settings": vars(args), "rows": rows,
                                               "verdicts": [{"claim": c, "met": ok, "detail": d}
                                                            for c, ok, d in verdicts]}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
