"""moecompress AWQ (pow2 / free scales, +GPTQ) vs llm-compressor's AWQModifier (and GPTQModel's AWQ) on the same windows.

A sibling of ``vs_llmcompressor.py`` (whose launcher, children and readers it reuses). For each setting
(default W4 g128 and W3 g64, asymmetric) every variant quantizes the same float MoE model on the same
calibration windows, each in a fresh subprocess:

* ``ours-rtn``, ``ours-gptq``, ``ours-awq`` (``--method awq``, pow2 scales: the router-read group's scales
  are powers of two so routing stays bit-identical), ``ours-awq-free`` (``--awq-scales free``),
  ``ours-awq+gptq``: ``moecompress.pipeline.quantize`` with ``symmetric=False`` and its defaults otherwise;
* ``llmc-awq``: ``benchmarks/_llmc_child.py --method awq``: ``AWQModifier`` (llm-compressor's own
  mappings for the architecture, duo scaling, 20-point grid) + ``QuantizationModifier`` (scheme
  ``W4A16_ASYM`` at W4 g128, an int/group/asymmetric ``config_groups`` otherwise), routers and lm_head
  ignored, sequential pipeline, in the llm-compressor venv (benchmarks/README.md);
* ``gptqmodel-awq``: ``benchmarks/_gptqmodel_awq_child.py``: GPTQModel's ``AWQConfig`` (GEMM) on the
  CPU, in the GPTQModel venv; its AWQ GEMM module packs fp16/bf16 only, so it calibrates in bf16;
* optional ``llmc-gptq`` (asymmetric GPTQModifier), not run by default.

The windows are made here (``load_texts`` + ``make_calibration_windows``) and written to a safetensors
file that the other tools' children feed unchanged; ``quantize`` rebuilds them from the same spec, and
the run stops unless every tool reports the same sha256. Wall time covers the whole subprocess
(interpreter start, imports, load, calibration, save); CPU time and peak RSS come from ``os.wait4``
in a small launcher process (see vs_llmcompressor.py). ``--threads N`` (default 1) sets
``OMP_NUM_THREADS`` for every child and the llm-compressor / GPTQModel children's
``torch.set_num_threads``, so all tools run on the same number of threads.

Each output is read back with moecompress's reader (cross-checked against transformers +
compressed-tensors where that loads it -- it loads no asymmetric checkpoint with fused experts -- and,
module by module, against compressed-tensors' own decompression run in the llm-compressor venv
(``_llmc_child.py --check``); GPTQModel's 4-bit output against its child's twin; GPTQModel's 3-bit "AWQ GEMM", which only GPTQModel reads, via
the dense twin its child unpacks with GPTQModel's own ``dequantize_gemm``) and evaluated with
``moecompress.evals.evaluate`` against the float model on the held-out windows
(``builtin:heldout-code`` / ``builtin:heldout-prose``, fp32, eager experts): perplexity per set,
mean KL(float || quantized), top-1 agreement, and per MoE layer the routers' top-k exact match and
Jaccard on each model's own hidden states. The float model's outputs are cached once
(``reference_cache``) and replayed for every variant. For ours, the per-layer AWQ records of
``moecompress.json`` are summarized: the alpha each balance group chose (None = the identity), the
search loss before/after, and the router check (``float_readers_check``: bit-identical, max |change|,
top-k flips on the sampled calibration rows).

    python benchmarks/vs_llmcompressor_awq.py [--demo-variant wide] [--settings 4:128,3:64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_llmcompressor import (HELDOUT, LLMC_CHILD, OURS_CHILD, Launcher, load_quantized,  # noqa: E402
                              packed_modules, parse_settings, run_child, setting_name, windows_sha256)

GPTQMODEL_CHILD = Path(__file__).resolve().parent / "_gptqmodel_awq_child.py"
OURS = {"ours-rtn": {"method": "rtn"}, "ours-gptq": {"method": "gptq"}, "ours-awq": {"method": "awq"},
        "ours-awq-free": {"method": "awq", "awq_scales": "free"}, "ours-awq+gptq": {"method": "awq+gptq"},
        "ours-awq+gptq-free": {"method": "awq+gptq", "awq_scales": "free"}}
DEFAULT_VARIANTS = "ours-rtn,ours-gptq,ours-awq,ours-awq-free,ours-awq+gptq,llmc-awq,gptqmodel-awq"
ALL_VARIANTS = [*OURS, "llmc-awq", "llmc-gptq", "gptqmodel-awq"]


# ------------------------------------------------------------------------------------------- quantize


def quantize_variant(launcher: Launcher, variant: str, bits: int, gs: int, out: Path, work: Path, model_dir: Path,
                     windows_file: Path, env: dict, args) -> dict:
    log = work / f"{setting_name(bits, gs)}-asym-{variant}.log"
    if variant in OURS:
        config = dict(bits=bits, group_size=gs, symmetric=False, calib=args.calib, calib_samples=args.calib_samples,
                      seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size, **OURS[variant])
        payload = json.dumps({"model": str(model_dir), "out": str(out), "config": config})
        r = run_child(launcher, [args.ours_python, "-c", OURS_CHILD, payload], log, "OURS_RESULT", env)
        r["core_s"] = r["timings_s"]["quantize"]
    elif variant.startswith("llmc-"):
        cmd = [args.llmc_python, str(LLMC_CHILD), "--model", str(model_dir), "--out", str(out),
               "--windows", str(windows_file), "--bits", str(bits), "--group-size", str(gs), "--asym",
               "--method", variant.removeprefix("llmc-"), "--batch-size", str(args.batch_size),
               "--dtype", "float32", "--threads", str(args.threads)]
        r = run_child(launcher, cmd, log, "LLMC_RESULT", env)
        r["core_s"] = r["timings_s"]["oneshot"]
    else:
        cmd = [args.gptqmodel_python, str(GPTQMODEL_CHILD), "--model", str(model_dir), "--out", str(out),
               "--windows", str(windows_file), "--bits", str(bits), "--group-size", str(gs), "--asym",
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--dtype", args.gptqmodel_dtype, "--twin", str(out) + "-twin"]
        r = run_child(launcher, cmd, log, "GPTQMODEL_RESULT", env)
        r["core_s"] = r["timings_s"]["quantize"]
    return r


def awq_summary(out: Path) -> dict | None:
    """What our AWQ did per layer and balance group (from moecompress.json), and the router check."""
    summary = json.loads((out / "moecompress.json").read_text())
    groups, checks, seconds = [], [], []
    for rec in summary["layers"]:
        seconds.append(round(rec.get("seconds", 0.0), 3))
        for g in rec.get("awq", []):
            alpha = g.get("alpha")
            per_expert = isinstance(alpha, list)
            row = {"layer": rec["layer"], "source": g["source"], "readers": g["readers"],
                   "float_readers": g.get("float_readers", []), "skipped": g.get("skipped"), "pow2": g.get("pow2"),
                   "alpha": alpha, "loss_before": g.get("loss_before"), "loss_after": g.get("loss_after")}
            if "skipped" not in g:
                alphas = alpha if per_expert else [alpha]
                row["identity_members"] = sum(a is None for a in alphas)
                row["members"] = len(alphas)
                lb = g["loss_before"] if per_expert else [g["loss_before"]]
                la = g["loss_after"] if per_expert else [g["loss_after"]]
                row["loss_ratio"] = sum(la) / sum(lb) if sum(lb) else None
            if g.get("float_readers_check"):
                row["float_readers_check"] = g["float_readers_check"]
                checks += list(g["float_readers_check"].values())
            groups.append(row)
    if not groups:
        return None
    by_source: dict = {}
    for row in groups:
        s = by_source.setdefault(row["source"], {"layers": 0, "skipped": 0, "identity_members": 0, "members": 0})
        s["layers"] += 1
        if row.get("skipped"):
            s["skipped"] += 1
            continue
        s["identity_members"] += row["identity_members"]
        s["members"] += row["members"]
    check = None
    if checks:
        check = {"groups_checked": len(checks), "all_bit_identical": all(c["bit_identical"] for c in checks),
                 "max_abs_change": max(c["max_abs_change"] for c in checks),
                 "topk_flips": sum(c["topk_flips"] for c in checks), "rows": sum(c["rows"] for c in checks)}
    return {"groups": groups, "by_source": by_source, "router_check": check, "layer_seconds": seconds,
            "pipeline_timings_s": summary["timings_s"]}


# ------------------------------------------------------------------------------------------- evaluate


def _params_max_diff(a: Path, b: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    mb = dict(AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).named_parameters())
    with torch.no_grad():
        diffs = [float((p - mb[n]).abs().max()) for n, p in ma.named_parameters() if n in mb]
    return {"max_abs_diff": max(diffs), "params_compared": len(diffs)}


def dense_copy(variant: str, out: Path, tmp: Path, llmc_python: str | None = None) -> tuple[Path, dict]:
    """A float checkpoint of ``out`` to evaluate, and how it was read."""
    info: dict = {}
    twin = Path(str(out) + "-twin")
    try:
        model, info = load_quantized(out, tmp)
    except SystemExit as e:  # neither our reader nor compressed-tensors: GPTQModel's 3-bit GEMM
        if not twin.is_dir():
            raise
        info = {"reader_error": str(e).splitlines()[0][:300], "loader": "GPTQModel dequantize_gemm twin"}
        return twin, info
    if not (tmp / "dense").is_dir():  # read by transformers + compressed-tensors only
        model.save_pretrained(tmp / "dense")
    del model
    if twin.is_dir():
        info["crosscheck_twin"] = _params_max_diff(tmp / "dense", twin)
    if "crosscheck_transformers_ct" not in info and llmc_python and Path(llmc_python).is_file():
        info["crosscheck_compressed_tensors"] = ct_crosscheck(llmc_python, out, tmp / "dense")
    return tmp / "dense", info


def ct_crosscheck(llmc_python: str, out: Path, dense: Path) -> dict:
    """compressed-tensors' own per-module decompression of ``out`` (in the llm-compressor venv) vs ``dense``.

    vs_llmcompressor.py's cross-check loads the checkpoint in transformers with
    ``CompressedTensorsConfig(dequantize=True)``; neither transformers 5.25 (main venv) nor 5.17
    (llm-compressor's) loads an *asymmetric* compressed-tensors checkpoint into fused experts
    ("Asymmetric quant requires zero-point values"), whoever wrote it. ``_llmc_child.py --check``
    decompresses module by module with no model instead."""
    config = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    if config.get("quant_method") != "compressed-tensors":
        return {"skipped": f"quant_method {config.get('quant_method')}"}
    import subprocess

    proc = subprocess.run([llmc_python, str(LLMC_CHILD), "--check", str(out), "--against", str(dense)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LLMC_CHECK ")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][len("LLMC_CHECK "):])


def evaluate_dense(dense: Path, model_dir: Path, work: Path, args) -> dict:
    from moecompress.evals.evaluate import evaluate

    r = evaluate(dense, model_dir, samples=args.eval_windows, seq_len=args.eval_seq_len, seed=args.eval_seed,
                 batch_size=args.eval_batch_size, reference_cache=work / "reference-cache")
    return {"ppl": r["ppl"], "ppl_reference": r["ppl_reference"], "mean_kl": r["kl"], "kl": r["kl_per_dataset"],
            "top1": r["top1_agreement"], "topk_exact": r["routing"]["topk_exact"], "jaccard": r["routing"]["jaccard"],
            "router_kl": r["routing"]["router_kl"], "routing_per_layer": r["routing"]["per_layer"],
            "windows_sha256": r["settings"]["windows_sha256"], "reference_cache": r["reference_cache"]["status"],
            "seconds": r["seconds"]}


# ------------------------------------------------------------------------------------------- set-up


@dataclass
class RunSetup:
    model_dir: Path
    work: Path
    env: dict  # the children's environment: offline, ``--threads`` threads
    windows_file: Path  # the calibration windows every tool is fed (safetensors, ``input_ids``)
    sha: str  # their sha256
    heldout_sha: dict  # the held-out sets' windows' sha256, by spec
    report: dict  # the JSON report's header


def prepare_run(args, prefix: str) -> RunSetup:
    """The model (``--model`` or a demo model), the work folder, the children's environment, the calibration
    windows written for the other tools' children, and the report's header."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from moecompress.calib.data import load_texts, make_calibration_windows

    if args.model:
        model_dir = Path(args.model).expanduser().resolve()
    else:
        from moecompress.demo_model import demo_model_path

        model_dir = demo_model_path(variant=args.demo_variant)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.pop("PYTHONPATH", None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = make_calibration_windows(load_texts(args.calib), tok, args.calib_samples, args.seq_len, args.seed)
    sha = windows_sha256(calib.input_ids)
    windows_file = work / "calib_windows.safetensors"
    save_file({"input_ids": calib.input_ids.contiguous()}, windows_file)
    heldout_sha = {s: windows_sha256(make_calibration_windows(load_texts(s), tok, args.eval_windows,
                                                              args.eval_seq_len, args.eval_seed).input_ids)
                   for s in HELDOUT}
    report: dict = {"model": str(model_dir), "command": [sys.executable, *sys.argv], "host": platform.node(),
                    "cpu_count": os.cpu_count(), "calibration": calib.metadata, "heldout_sha256": heldout_sha,
                    "args": vars(args), "settings": {}}
    print(f"model {model_dir}\ncalibration windows {tuple(calib.input_ids.shape)} sha256 {sha}", flush=True)
    return RunSetup(model_dir, work, env, windows_file, sha, heldout_sha, report)


# ------------------------------------------------------------------------------------------- run


def quantize_repeats(variants: list[str], repeats: int, name: str, work: Path, sha: str, quantize) -> dict:
    """Quantize every variant ``repeats`` times (alternating) into ``work/{name}-{variant}``.

    ``quantize(variant, out)`` returns a child's result; it must have calibrated on windows ``sha``.
    The fastest wall / quantize / CPU time and the largest peak RSS of the runs are kept."""
    res: dict = {}
    for rep in range(repeats):
        for v in variants:
            out = work / f"{name}-{v}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(str(out) + "-twin", ignore_errors=True)
            print(f"[{name}] {v}: quantizing" + (f" (run {rep + 1}/{repeats})" if repeats > 1 else "") + " ...",
                  flush=True)
            r = quantize(v, out)
            if r["windows_sha256"] != sha:
                raise SystemExit(f"{v} calibrated on other windows: sha256 {r['windows_sha256']} != {sha}")
            r["packed_modules"] = packed_modules(out)
            print(f"[{name}] {v}: {r['wall_s']:.1f}s wall ({r['core_s']:.1f}s quantize), CPU {r['cpu_s']:.1f}s, "
                  f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB; same windows (sha256 ok)", flush=True)
            if v in res:
                prev = res[v]
                for k in ("wall_s", "core_s", "cpu_s"):
                    r[f"{k}_runs"] = prev[f"{k}_runs"] + [r[k]]
                    r[k] = min(r[f"{k}_runs"])
                r["peak_rss"] = max(r["peak_rss"], prev["peak_rss"])
            else:
                for k in ("wall_s", "core_s", "cpu_s"):
                    r[f"{k}_runs"] = [r[k]]
            res[v] = r
    return res


def evaluate_variant(v: str, r: dict, out: Path, model_dir: Path, work: Path, args, heldout_sha: dict,
                     llmc_python: str | None) -> None:
    """Read ``out`` back (``r["read"]``) and evaluate it against the float model (``r["eval"]``)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        dense, r["read"] = dense_copy(v, out, Path(tmp), llmc_python)
        r["eval"] = evaluate_dense(dense, model_dir, work, args)
    if r["eval"]["windows_sha256"] != heldout_sha_by_name(heldout_sha):
        raise SystemExit(f"{v}: evaluated on other windows than the driver's")
    e, twin = r["eval"], r["read"].get("crosscheck_twin")
    if twin:
        print(f"[{v}] the tool's own twin vs our reading: max |diff| {twin['max_abs_diff']:.3g} over "
              f"{twin['params_compared']} parameters", flush=True)
    print(f"[{v}] read with {r['read']['loader']}; mean KL {e['mean_kl']:.5f}, top-k exact "
          f"{100 * e['topk_exact']:.2f}%, Jaccard {e['jaccard']:.4f}", flush=True)


# ------------------------------------------------------------------------------------------- targets, table


def targets(res: dict) -> dict:
    """The AWQ issue's targets, judged on one setting's measured numbers (None: a variant is missing)."""
    def kl(v):
        return res[v]["eval"]["mean_kl"] if v in res else None

    def val(v, k):
        return res[v]["eval"][k] if v in res else None

    t = {}

    def add(name, a, b, ok, ratio):
        t[name] = {"met": None if a is None or b is None else bool(ok(a, b)),
                   "ratio": None if a is None or b is None or not b else a / b if ratio else a - b, "ours": a,
                   "other": b}

    add("ours-awq mean KL <= 0.6 x llmc-awq", kl("ours-awq"), kl("llmc-awq"), lambda a, b: a <= 0.6 * b, True)
    add("ours-awq mean KL < ours-rtn", kl("ours-awq"), kl("ours-rtn"), lambda a, b: a < b, True)
    add("ours-awq+gptq mean KL <= ours-gptq", kl("ours-awq+gptq"), kl("ours-gptq"), lambda a, b: a <= b, True)
    add("ours-awq top-k exact >= llmc-awq", val("ours-awq", "topk_exact"), val("llmc-awq", "topk_exact"),
        lambda a, b: a >= b, False)
    wa = res["ours-awq"]["wall_s"] if "ours-awq" in res else None
    wl = res["llmc-awq"]["wall_s"] if "llmc-awq" in res else None
    add("ours-awq wall time <= llmc-awq / 3", wa, wl, lambda a, b: 3 * a <= b, True)
    return t


def markdown_table(name: str, res: dict, base_variant: str = "llmc-awq") -> str:
    first = next(iter(res.values()))["eval"]
    ref = first["ppl_reference"]
    lines = [f"{name} (float ppl code / prose {ref['heldout-code']:.3f} / {ref['heldout-prose']:.3f})", "",
             f"| variant | wall s | quantize s | CPU s | peak RSS MiB | ppl code | ppl prose | mean KL | KL / {base_variant} "
             "| top-1 | top-k exact | Jaccard | routing check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = res.get(base_variant, {}).get("eval", {}).get("mean_kl")
    for v, r in res.items():
        e = r["eval"]
        chk = "-"
        rc = (r.get("awq") or {}).get("router_check")
        if rc:
            chk = ("bit-identical" if rc["all_bit_identical"] else
                   f"max change {rc['max_abs_change']:.2e}, {rc['topk_flips']} flips / {rc['rows']} rows")
        ratio = f"{e['mean_kl'] / base:.3f}" if base else "-"
        lines.append(f"| {v} | {r['wall_s']:.1f} | {r['core_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss'] / 2**20:.0f} "
                     f"| {e['ppl']['heldout-code']:.3f} | {e['ppl']['heldout-prose']:.3f} | {e['mean_kl']:.5f} | {ratio} "
                     f"| {100 * e['top1']:.2f}% | {100 * e['topk_exact']:.2f}% | {e['jaccard']:.4f} | {chk} |")
    return "\n".join(lines)


def targets_text(t: dict) -> str:
    out = []
    for k, v in t.items():
        if v["met"] is None:
            out.append(f"{k}: not judged (variant missing)")
        else:
            how = f"ratio {v['ratio']:.3f}" if "top-k" not in k else f"difference {100 * v['ratio']:+.2f} points"
            out.append(f"{k}: {'met' if v['met'] else 'NOT met'} ({v['ours']:.5g} vs {v['other']:.5g}, {how})")
    return "\n".join(out)


def identity_text(res: dict) -> str:
    lines = []
    for v, r in res.items():
        a = r.get("awq")
        if not a:
            continue
        parts = []
        for src, s in a["by_source"].items():
            if s["skipped"] == s["layers"]:
                parts.append(f"{src}: skipped in all {s['layers']} layers")
            else:
                parts.append(f"{src}: identity {s['identity_members']}/{s['members']}"
                             + (f", skipped {s['skipped']}" if s["skipped"] else ""))
        lines.append(f"{v}: " + "; ".join(parts))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="float MoE checkpoint (default: the demo model, built if missing)")
    ap.add_argument("--demo-variant", default="demo", choices=["demo", "wide"])
    ap.add_argument("--settings", default="4:128,3:64", help="comma-separated bits:group_size (asymmetric)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--calib", default="builtin:stdlib")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch size of every tool")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every quantizing child (default 1)")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--eval-threads", type=int, default=1, help="torch threads of the evaluation (this process)")
    ap.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python"))
    ap.add_argument("--gptqmodel-python", default=os.environ.get("GPTQMODEL_PYTHON", "/work/gptqmodel-venv/bin/python"))
    ap.add_argument("--gptqmodel-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--repeats", type=int, default=1, help="quantize N times per variant; report the fastest wall time")
    ap.add_argument("--workdir", help="keep outputs and logs here (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write all results to this JSON file")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    for prefix, py in (("llmc-", args.llmc_python), ("gptqmodel-", args.gptqmodel_python)):
        if any(v.startswith(prefix) for v in variants) and not Path(py).is_file():
            raise SystemExit(f"{py} not found (needed for {prefix}* variants); see benchmarks/README.md")
    launcher = Launcher()  # before the heavy imports (see vs_llmcompressor.Launcher)

    import torch
    import transformers

    torch.set_num_threads(args.eval_threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    settings = parse_settings(args.settings)
    run = prepare_run(args, "vs_llmc_awq-")
    model_dir, work, env, windows_file, sha, heldout_sha, report = (
        run.model_dir, run.work, run.env, run.windows_file, run.sha, run.heldout_sha, run.report)
    try:
        for bits, gs in settings:
            name = setting_name(bits, gs) + "-asym"
            res = quantize_repeats(variants, args.repeats, name, work, sha, lambda v, out: quantize_variant(
                launcher, v, bits, gs, out, work, model_dir, windows_file, env, args))
            for v in variants:
                if v in OURS and res[v]["recipe"]["method"].startswith("awq"):
                    res[v]["awq"] = awq_summary(work / f"{name}-{v}")
                evaluate_variant(v, res[v], work / f"{name}-{v}", model_dir, work, args, heldout_sha,
                                 args.llmc_python)
            t = targets(res)
            report["settings"][name] = {"variants": res, "targets": t}
            print("\n" + markdown_table(name, res) + "\n\n" + targets_text(t) + "\n\nAWQ groups that chose the "
                  "identity (members: layers, or experts for per-expert groups):\n" + identity_text(res) + "\n",
                  flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    finally:
        launcher.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def heldout_sha_by_name(heldout_sha: dict) -> dict:
    """The driver's held-out sha256s keyed as moecompress.evals names the data sets (``heldout-code``...)."""
    return {spec.split(":", 1)[1]: sha for spec, sha in heldout_sha.items()}


if __name__ == "__main__":
    sys.exit(main())
