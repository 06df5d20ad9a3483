"""moecompress GPTQ / AWQ+GPTQ vs Intel's AutoRound (sign-gradient rounding) on the same windows.

A sibling of ``vs_llmcompressor_awq.py``, whose launcher, children, readers and evaluation it reuses. For
each setting (default W4 g128 and W3 g64; symmetric unless ``--asym``) every variant quantizes the same
float MoE model on the same calibration windows, each in a fresh subprocess on ``--threads`` threads:

* ``ours-rtn``, ``ours-gptq``, ``ours-awq+gptq``, ``ours-gptq+tune`` (``--tune-steps 200``; ``+tune50`` and
  ``+tune1000``: the step counts of AutoRound's light and best recipes):
  ``moecompress.pipeline.quantize`` (its defaults otherwise: routers and lm_head in high precision,
  compressed-tensors output);
* ``autoround`` (its default recipe, 200 iterations), ``autoround-light`` (50), ``autoround-best``
  (1000), ``autoround-opt-rtn`` (no iterations): ``benchmarks/_autoround_child.py`` in AutoRound's own
  virtual environment (setup: benchmarks/README.md, "AutoRound"), saved as GPTQ (``auto_gptq``).

The windows are made here and written to a safetensors file that AutoRound's child feeds unchanged;
``quantize`` rebuilds them from the same spec, and the run stops unless both report the same sha256.
Each output is read back with moecompress's reader -- AutoRound's checkpoints also unpacked by AutoRound's
own torch ``QuantLinear`` into a twin and compared parameter by parameter -- and evaluated with
``moecompress.evals.evaluate`` against the float model on the held-out windows (``builtin:heldout-code``
/ ``builtin:heldout-prose``, fp32): perplexity, mean KL(float || quantized), top-1 agreement, and the
routers' top-k exact match and Jaccard per MoE layer on each model's own hidden states.

    python benchmarks/vs_autoround.py [--demo-variant wide] [--settings 4:128,3:64] [--asym] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_llmcompressor import OURS_CHILD, Launcher, parse_settings, run_child, setting_name  # noqa: E402
from vs_llmcompressor_awq import evaluate_variant, markdown_table, prepare_run, quantize_repeats  # noqa: E402

AUTOROUND_CHILD = Path(__file__).resolve().parent / "_autoround_child.py"
OURS = {"ours-rtn": {"method": "rtn"}, "ours-gptq": {"method": "gptq"}, "ours-awq+gptq": {"method": "awq+gptq"},
        "ours-gptq+tune": {"method": "gptq", "tune_steps": 200},
        # the step counts of AutoRound's light and best recipes
        "ours-gptq+tune50": {"method": "gptq", "tune_steps": 50}, "ours-gptq+tune1000": {"method": "gptq", "tune_steps": 1000},
        # 1000 steps at a fixed first step (sessions 25-26 chose the default from these: since session 26 the
        # default past 200 steps is 0.4 / 200 = 2e-3, 0.8 / 200 = 4e-3 at 3 bits or fewer)
        "ours-gptq+tune1000-lr2e-3": {"method": "gptq", "tune_steps": 1000, "tune_lr": 2e-3},
        "ours-gptq+tune1000-lr4e-3": {"method": "gptq", "tune_steps": 1000, "tune_lr": 4e-3}}
AUTOROUND = {"autoround": "default", "autoround-light": "light", "autoround-best": "best",
             "autoround-opt-rtn": "opt_rtn"}
DEFAULT_VARIANTS = "ours-rtn,ours-gptq,ours-gptq+tune,ours-awq+gptq,autoround-opt-rtn,autoround"


def quantize_variant(launcher: Launcher, variant: str, bits: int, gs: int, out: Path, log: Path, model_dir: Path,
                     windows_file: Path, env: dict, args) -> dict:
    if variant in OURS:
        config = dict(**OURS[variant], bits=bits, group_size=gs, symmetric=not args.asym, calib=args.calib,
                      calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
                      batch_size=args.batch_size)
        payload = json.dumps({"model": str(model_dir), "out": str(out), "config": config})
        r = run_child(launcher, [args.ours_python, "-c", OURS_CHILD, payload], log, "OURS_RESULT", env)
    else:
        cmd = [args.autoround_python, str(AUTOROUND_CHILD), "--model", str(model_dir), "--out", str(out),
               "--windows", str(windows_file), "--bits", str(bits), "--group-size", str(gs),
               "--recipe", AUTOROUND[variant], "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--twin", str(out) + "-twin"] + (["--asym"] if args.asym else [])
        r = run_child(launcher, cmd, log, "AUTOROUND_RESULT", env)
    r["core_s"] = r["timings_s"]["quantize"]
    return r


def targets(res: dict) -> dict:
    """Ours against AutoRound's default recipe on one setting (None: a variant is missing)."""
    t = {}

    def add(name, ours, theirs, key, ok):
        a = res[ours]["eval"][key] if ours in res and key != "wall_s" else res.get(ours, {}).get("wall_s")
        b = res[theirs]["eval"][key] if theirs in res and key != "wall_s" else res.get(theirs, {}).get("wall_s")
        t[name] = {"met": None if a is None or b is None else bool(ok(a, b)), "ours": a, "other": b,
                   "ratio": a / b if a is not None and b else None}

    add("ours-gptq mean KL <= autoround", "ours-gptq", "autoround", "mean_kl", lambda a, b: a <= b)
    add("ours-awq+gptq mean KL <= autoround", "ours-awq+gptq", "autoround", "mean_kl", lambda a, b: a <= b)
    add("ours-gptq top-k exact >= autoround", "ours-gptq", "autoround", "topk_exact", lambda a, b: a >= b)
    add("ours-gptq wall time <= autoround / 3", "ours-gptq", "autoround", "wall_s", lambda a, b: 3 * a <= b)
    add("ours-gptq+tune mean KL <= autoround", "ours-gptq+tune", "autoround", "mean_kl", lambda a, b: a <= b)
    add("ours-gptq+tune top-1 >= autoround", "ours-gptq+tune", "autoround", "top1", lambda a, b: a >= b)
    add("ours-gptq+tune wall time <= autoround", "ours-gptq+tune", "autoround", "wall_s", lambda a, b: a <= b)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="float MoE checkpoint (default: the demo model, built if missing)")
    ap.add_argument("--demo-variant", default="demo", choices=["demo", "wide"])
    ap.add_argument("--settings", default="4:128,3:64", help="comma-separated bits:group_size")
    ap.add_argument("--asym", action="store_true", help="asymmetric (zero points) for every variant")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join([*OURS, *AUTOROUND])}")
    ap.add_argument("--calib", default="builtin:stdlib")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch size of every tool")
    ap.add_argument("--threads", type=int, default=2, help="threads of every quantizing child (default 2)")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--autoround-python", default=os.environ.get("AUTOROUND_PYTHON", "/work/autoround-venv/bin/python"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--repeats", type=int, default=1, help="quantize N times per variant; report the fastest wall time")
    ap.add_argument("--workdir", help="keep outputs and logs here (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write all results to this JSON file")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in OURS and v not in AUTOROUND]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {[*OURS, *AUTOROUND]}")
    if any(v in AUTOROUND for v in variants) and not Path(args.autoround_python).is_file():
        raise SystemExit(f"{args.autoround_python} not found; set up AutoRound's venv as in benchmarks/README.md")
    launcher = Launcher()  # before the heavy imports (see vs_llmcompressor.Launcher)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    run = prepare_run(args, "vs_autoround-")
    model_dir, work, env, windows_file, sha, heldout_sha, report = (
        run.model_dir, run.work, run.env, run.windows_file, run.sha, run.heldout_sha, run.report)
    try:
        for bits, gs in parse_settings(args.settings):
            name = setting_name(bits, gs) + ("-asym" if args.asym else "-sym")
            res = quantize_repeats(variants, args.repeats, name, work, sha, lambda v, out: quantize_variant(
                launcher, v, bits, gs, out, work / f"{out.name}.log", model_dir, windows_file, env, args))
            for v in variants:
                evaluate_variant(v, res[v], work / f"{name}-{v}", model_dir, work, args, heldout_sha, None)
            t = targets(res)
            report["settings"][name] = {"variants": res, "targets": t}
            lines = [f"{k}: " + ("not judged (variant missing)" if x["met"] is None else
                                 f"{'met' if x['met'] else 'NOT met'} ({x['ours']:.5g} vs {x['other']:.5g}, "
                                 f"ratio {x['ratio']:.3f})") for k, x in t.items()]
            print("\n" + markdown_table(name, res, "autoround") + "\n\n" + "\n".join(lines) + "\n", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    finally:
        launcher.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
