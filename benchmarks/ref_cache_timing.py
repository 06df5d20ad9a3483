"""Time of evaluating 2 variants against one reference, without and with the reference cache.

Uses the demo model (``builtin:demo-quick`` by default: built once into the moecompress cache if
missing) and two RTN variants of it (W4 g32 and W8 g32, quantized into --workdir), then runs, in
this process after a small warm-up evaluation:

* no cache: ``evaluate(variant, reference)`` for both variants -- the reference runs twice;
* cache:    the same two evaluations with ``reference_cache=`` a fresh folder -- the first runs the
  reference and writes the cache, the second replays it;

alternately, --repeats times (median per evaluation), and checks that both give the same numbers
(everything but timings).

    /work/venv/bin/python benchmarks/ref_cache_timing.py --workdir /tmp/ref_cache_timing [--low-memory]

Options: --model builtin:demo-quick|builtin:demo|DIR --samples 32 --seq-len 256 --batch-size 8 --threads 2
--repeats 3. With --model DIR, --variants DIR,DIR names the two variants instead of quantizing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model", default="builtin:demo-quick")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=None, help="Two checkpoint folders, comma-separated (default: RTN W4/W8).")
    ap.add_argument("--json", default=None, help="Also write the timings here.")
    a = ap.parse_args(argv)

    import torch

    from moecompress.evals.evaluate import evaluate
    from moecompress.evals.output import numeric_fields
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config
    from moecompress.run.inputs import resolve_model

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ref = resolve_model(a.model)
    variants = [Path(v) for v in a.variants.split(",")] if a.variants else []
    for bits in () if variants else (4, 8):
        out = work / f"rtn-w{bits}"
        if not (out / "moecompress.json").is_file():
            quantize(ref, out, build_config(method="rtn", bits=bits, group_size=32, measure_errors=False),
                     overwrite=out.exists())
        variants.append(out)
    settings = dict(samples=a.samples, seq_len=a.seq_len, batch_size=a.batch_size, low_memory=a.low_memory)
    evaluate(variants[0], ref, **settings)  # warm-up: imports, text loading, first-call costs

    def timed(**kw):
        out = []
        for v in variants:
            t0 = time.perf_counter()
            r = evaluate(v, ref, **settings, **kw)
            out.append((time.perf_counter() - t0, r))
        return out

    runs = {"no_cache": [], "cache": []}
    cache = work / "reference-cache"
    for _ in range(a.repeats):
        runs["no_cache"].append(timed())
        shutil.rmtree(cache, ignore_errors=True)
        runs["cache"].append(timed(reference_cache=cache))
    plain, cached = runs["no_cache"][0], runs["cache"][0]
    same = all(numeric_fields(p[1]) == numeric_fields(c[1]) for rep in runs["cache"] for p, c in zip(plain, rep))
    result = {"model": str(ref), "variants": [str(v) for v in variants], "settings": settings, "threads": a.threads,
              "repeats": a.repeats}
    for name, reps in runs.items():
        result[f"{name}_s"] = [round(statistics.median(rep[i][0] for rep in reps), 2) for i in range(len(variants))]
        result[f"{name}_all_s"] = [[round(t, 2) for t, _ in rep] for rep in reps]
    result.update({"cache_status": [c[1]["reference_cache"]["status"] for c in cached],
                   "cache_bytes": cached[0][1]["reference_cache"]["bytes"], "identical_numbers": same})
    result["no_cache_total_s"] = round(sum(result["no_cache_s"]), 2)
    result["cache_total_s"] = round(sum(result["cache_s"]), 2)
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
