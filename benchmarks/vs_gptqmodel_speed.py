"""Whole-process wall time of ``moecompress quantize`` (GPTQ W4 g128) vs GPTQModel's GPTQ, same model, same windows.

The model is a random bf16 Qwen3-MoE built in code (``moecompress.tiny.save_tiny``: hidden 256, 3 layers,
16 experts of width 256, top-4, byte tokenizer; ~10.2M parameters), made once and cached in
``--workdir``. The calibration windows (``builtin:stdlib``, 128 x 256, seed 0) are made once here with
``load_texts`` + ``make_calibration_windows`` and written to a safetensors file that GPTQModel's child
(``benchmarks/_gptqmodel_gptq_child.py``, in its own venv: benchmarks/README.md, "GPTQModel interop")
feeds unchanged; ``quantize`` rebuilds them from the same spec, and the run stops unless both tools
report the sha256 made here. Each tool runs ``--repeats`` times (alternating), each run a fresh process
started by the stdlib-only launcher of ``vs_llmcompressor.py`` (wall time; peak RSS and CPU time from
``os.wait4``), both on ``--threads`` torch threads (``OMP_NUM_THREADS`` too):

* ours:  ``python -m moecompress quantize MODEL --out OUT --method gptq --bits 4 --group-size 128 --calib
  builtin:stdlib --calib-samples 128 --seq-len 256 --seed 0 --batch-size 8 --threads 2`` (our defaults
  otherwise: fp32 calibration on CPU, act-order weight, clip search, 1 refine round);
* GPTQModel: ``GPTQConfig(bits=4, group_size=128, sym=True)``, its defaults otherwise (desc_act off,
  act_group_aware on, damp 0.05), bf16, CPU, ``GPTQMODEL_CPU_WORKERS=2``.

Where the time goes: the interpreter's start (``python -c pass``) and ours' imports (``import
moecompress.cli, moecompress.pipeline`` + transformers' Qwen3-MoE modeling) and GPTQModel's (``import
torch, gptqmodel``) are timed as fresh processes too; the pipeline's own total (``moecompress.json``) is
read back; one extra run of ours under ``python -X importtime`` (not in the medians) sums every import
of a real run, lazy ones included, by root package; GPTQModel's child reports imports / load / quantize
/ save. On a loaded machine ``--threads 1`` is much less noisy than 2 (see benchmarks/RESULTS.md).
With ``--eval-windows N`` (default 16; 0 skips) both outputs are evaluated against the float model
(``moecompress.evals.evaluate``: perplexity, mean KL, top-1, routers' top-k exact), a quality sanity
check only (random weights).

    python benchmarks/vs_gptqmodel_speed.py [--workdir /tmp/vs_gptqmodel_speed] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_llmcompressor import REPO, Launcher  # noqa: E402

CHILD = Path(__file__).resolve().parent / "_gptqmodel_gptq_child.py"
MODEL_DIMS = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
OURS_IMPORTS = "import moecompress.cli, moecompress.pipeline, transformers.models.qwen3_moe.modeling_qwen3_moe"


def timed(launcher: Launcher, cmd: list[str], log: Path, env: dict) -> dict:
    r = launcher.run(cmd, log, env)
    if r["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited with {r['returncode']}; log {log}:\n{tail}")
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss": r["maxrss_kib"] * 1024,
            "loadavg_1min_after": os.getloadavg()[0]}


def importtime_by_package(text: str) -> dict[str, float]:
    """Seconds spent importing each root package (sum of its modules' self times) in a ``-X importtime`` log."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        if not self_us.strip().isdigit():  # the header
            continue
        root = name.strip().split(".")[0]
        out[root] = out.get(root, 0.0) + int(self_us) / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/vs_gptqmodel_speed", help="model, windows, outputs, logs (kept)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ours-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="our calibration dtype (auto: fp32 on CPU; GPTQModel computes in bf16)")
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows per set for the quality check")
    ap.add_argument("--gptqmodel-python", default=os.environ.get("GPTQMODEL_PYTHON", "/work/gptqmodel-venv/bin/python"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    launcher = Launcher()  # before the heavy imports (see vs_llmcompressor.py)
    if not Path(args.gptqmodel_python).is_file():
        raise SystemExit(f"GPTQModel python {args.gptqmodel_python} not found; set it up as in benchmarks/README.md")

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from moecompress.calib.data import load_texts, make_calibration_windows
    from moecompress.tiny import save_tiny

    work = Path(args.workdir).resolve()
    model_dir = work / "model"
    if not (model_dir / "model.safetensors").is_file():
        shutil.rmtree(model_dir, ignore_errors=True)
        save_tiny("qwen3_moe", model_dir, dtype=torch.bfloat16, **MODEL_DIMS)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    calib_spec = "builtin:stdlib"
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = make_calibration_windows(load_texts(calib_spec), tok, args.calib_samples, args.seq_len, args.seed)
    sha = calib.metadata["input_ids_sha256"]
    windows_file = work / "calib_windows.safetensors"
    save_file({"input_ids": calib.input_ids.contiguous()}, windows_file)
    print(f"model {model_dir}: {n_params:,} parameters ({n_params / 1e6:.2f}M), "
          f"{MODEL_DIMS['num_experts']} experts x {MODEL_DIMS['num_hidden_layers']} layers, bf16", flush=True)
    print(f"calibration windows {tuple(calib.input_ids.shape)} sha256 {sha}", flush=True)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    env.pop("PYTHONPATH", None)
    # an installed wheel comes with bytecode (GPTQModel's does); an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would compile our modules on every run
    subprocess.run([args.ours_python, "-c", "import compileall, os, moecompress; "
                    "compileall.compile_dir(os.path.dirname(moecompress.__file__), quiet=1)"], env=env, check=True)
    ours_cmd = [args.ours_python, "-m", "moecompress", "quantize", str(model_dir), "--method", "gptq", "--bits", "4",
                "--group-size", "128", "--calib", calib_spec, "--calib-samples", str(args.calib_samples),
                "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads), "--dtype", args.ours_dtype]
    runs: dict[str, list[dict]] = {"ours": [], "gptqmodel": []}
    startup: dict[str, list[dict]] = {"ours_interpreter": [], "ours_imports": [], "gptqmodel_interpreter": [],
                                      "gptqmodel_imports": []}
    for rep in range(args.repeats):
        out = work / "out-ours"
        shutil.rmtree(out, ignore_errors=True)
        r = timed(launcher, ours_cmd + ["--out", str(out)], work / f"ours-{rep}.log", env)
        summary = json.loads((out / "moecompress.json").read_text())
        if summary["calibration"]["input_ids_sha256"] != sha:
            raise SystemExit(f"ours calibrated on other windows: {summary['calibration']['input_ids_sha256']}")
        r["pipeline_s"] = summary["timings_s"]["total"]
        r["layer_s"] = [round(rec["seconds"], 2) for rec in summary["layers"]]
        r["layer_split_s"] = {k: round(sum(rec["timings_s"].get(k, 0.0) for rec in summary["layers"]), 2)
                              for k in summary["layers"][0]["timings_s"]}
        r["versions"] = summary["versions"]
        runs["ours"].append(r)
        print(f"[{rep + 1}/{args.repeats}] ours: {r['wall_s']:.1f}s wall (pipeline {r['pipeline_s']:.1f}s), "
              f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)

        out = work / "out-gptqmodel"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"gptqmodel-{rep}.log"
        r = timed(launcher, [args.gptqmodel_python, str(CHILD), "--model", str(model_dir), "--out", str(out),
                             "--windows", str(windows_file), "--bits", "4", "--group-size", "128",
                             "--batch-size", str(args.batch_size), "--threads", str(args.threads)], log, env)
        line = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("GPTQMODEL_RESULT ")][-1]
        r.update(json.loads(line[len("GPTQMODEL_RESULT "):]))
        if r["windows_sha256"] != sha:
            raise SystemExit(f"GPTQModel calibrated on other windows: {r['windows_sha256']}")
        runs["gptqmodel"].append(r)
        print(f"[{rep + 1}/{args.repeats}] GPTQModel: {r['wall_s']:.1f}s wall "
              f"(quantize {r['timings_s']['quantize']:.1f}s, imports {r['timings_s']['imports']:.1f}s), "
              f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)

        for key, cmd in (("ours_interpreter", [args.ours_python, "-c", "pass"]),
                         ("ours_imports", [args.ours_python, "-c", OURS_IMPORTS]),
                         ("gptqmodel_interpreter", [args.gptqmodel_python, "-c", "pass"]),
                         ("gptqmodel_imports", [args.gptqmodel_python, "-c", "import torch, gptqmodel"])):
            startup[key].append(timed(launcher, cmd, work / f"{key}.log", env))
    # one more run of ours under -X importtime (not in the medians): every import of a real run, lazy ones too
    out = work / "out-ours-importtime"
    shutil.rmtree(out, ignore_errors=True)
    it_run = timed(launcher, [ours_cmd[0], "-X", "importtime", *ours_cmd[1:], "--out", str(out)],
                   work / "ours_importtime.log", env)
    by_package = importtime_by_package((work / "ours_importtime.log").read_text())
    it_run["imports_s"] = sum(by_package.values())
    launcher.close()

    med = statistics.median
    o, g = runs["ours"], runs["gptqmodel"]
    res = {
        "ours_wall_s": med([r["wall_s"] for r in o]), "gptqmodel_wall_s": med([r["wall_s"] for r in g]),
        "ours_pipeline_s": med([r["pipeline_s"] for r in o]),
        "gptqmodel_quantize_s": med([r["timings_s"]["quantize"] for r in g]),
        "gptqmodel_inproc_imports_s": med([r["timings_s"]["imports"] for r in g]),
        "ours_cpu_s": med([r["cpu_s"] for r in o]), "gptqmodel_cpu_s": med([r["cpu_s"] for r in g]),
        "ours_peak_rss": max(r["peak_rss"] for r in o), "gptqmodel_peak_rss": max(r["peak_rss"] for r in g),
        **{f"{k}_s": med([r["wall_s"] for r in v]) for k, v in startup.items()},
    }
    res["ratio"] = res["gptqmodel_wall_s"] / res["ours_wall_s"]
    res["target_3x_met"] = res["ratio"] >= 3

    quality = {}
    if args.eval_windows:
        from moecompress.evals.evaluate import evaluate

        for tool in ("ours", "gptqmodel"):
            e = evaluate(work / f"out-{tool}", model_dir, samples=args.eval_windows, seq_len=256, seed=1234,
                         reference_cache=work / "reference-cache")
            quality[tool] = {"ppl": e["ppl"], "ppl_reference": e["ppl_reference"], "mean_kl": e["kl"],
                             "top1": e["top1_agreement"], "topk_exact": e["routing"]["topk_exact"]}

    mib = 2**20
    w = res["ours_wall_s"]
    print(f"\nwhole-process wall time, median of {args.repeats} (2-core CPU, {args.threads} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}):")
    print(f"{'':34} {'moecompress':>12} {'GPTQModel':>12}")
    for label, a, b, fmt in (("wall time (s)", w, res["gptqmodel_wall_s"], ".1f"),
                        ("  interpreter start (s)", res["ours_interpreter_s"], res["gptqmodel_interpreter_s"], ".2f"),
                        ("  interpreter + imports (s)", res["ours_imports_s"], res["gptqmodel_imports_s"], ".1f"),
                        ("  pipeline / quantize() (s)", res["ours_pipeline_s"], res["gptqmodel_quantize_s"], ".1f"),
                        ("CPU time user+sys (s)", res["ours_cpu_s"], res["gptqmodel_cpu_s"], ".1f"),
                        ("peak RSS (MiB)", res["ours_peak_rss"] / mib, res["gptqmodel_peak_rss"] / mib, ".0f")):
        print(f"{label:34} {a:12{fmt}} {b:12{fmt}}")
    print(f"GPTQModel / ours wall time: {res['ratio']:.2f}x -> target >= 3x "
          f"{'MET' if res['target_3x_met'] else 'NOT met'}")
    m = sorted(o, key=lambda r: r["wall_s"])[len(o) // 2]  # the median run
    print(f"ours, median run: wall {m['wall_s']:.1f}s = {m['wall_s'] - m['pipeline_s']:.1f}s before/after the pipeline "
          f"(interpreter, CLI, imports, exit) + pipeline {m['pipeline_s']:.1f}s (layers {m['layer_s']}, summed "
          f"{m['layer_split_s']}); a fresh 'interpreter + imports' process takes {res['ours_imports_s']:.1f}s = "
          f"{100 * res['ours_imports_s'] / w:.0f}% of the median wall time")
    print(f"ours under -X importtime: {it_run['imports_s']:.1f}s of imports in a {it_run['wall_s']:.1f}s run "
          f"({100 * it_run['imports_s'] / it_run['wall_s']:.0f}%); by root package (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in list(by_package.items())[:6]))
    print("runs (s): ours " + ", ".join(f"{r['wall_s']:.1f}" for r in o)
          + "; GPTQModel " + ", ".join(f"{r['wall_s']:.1f}" for r in g)
          + "; 1-min load average after each (ours / GPTQModel): "
          + ", ".join(f"{a['loadavg_1min_after']:.1f}/{b['loadavg_1min_after']:.1f}" for a, b in zip(o, g)))
    for tool, q in quality.items():
        print(f"quality {tool}: mean KL {q['mean_kl']:.3e}, top-1 {q['top1']:.4f}, top-k exact {q['topk_exact']:.4f}, "
              "ppl " + ", ".join(f"{k} {v:.3f}" for k, v in q["ppl"].items()))
    from importlib.metadata import version

    versions = {"ours": o[0]["versions"] | {"moecompress": version("moecompress")}, "gptqmodel": g[0]["versions"],
                "gptqmodel_quantization_config": g[0]["quantization_config"]}
    print("versions: " + json.dumps(versions))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "command": [sys.executable, *sys.argv],
                                               "repo": str(REPO), "model_parameters": n_params,
                                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                               "model_dims": MODEL_DIMS, "windows_sha256": sha, "summary": res,
                                               "importtime_run": it_run,
                                               "importtime_by_package_s": by_package, "quality": quality,
                                               "runs": runs, "startup": startup, "versions": versions},
                                              indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
