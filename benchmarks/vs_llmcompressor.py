"""moecompress GPTQ vs llm-compressor ``oneshot`` GPTQ (W{bits}A16, router ignored) on the same windows.

For each setting (default W4 g128 and W3 g64) both tools quantize the same float MoE model on the same
calibration windows, each in a fresh subprocess of its own virtual environment:

* ours:   ``/work/venv/bin/python -c ...`` -> ``moecompress.pipeline.quantize`` (compressed-tensors);
* theirs: ``<llmc venv>/bin/python benchmarks/_llmc_child.py`` -> ``llmcompressor.oneshot`` with
  ``GPTQModifier(targets="Linear", ignore=["lm_head", "re:.*mlp.gate$"])``, sequential pipeline,
  ``save_compressed=True`` (setup of that venv: benchmarks/README.md).

The calibration windows are made here with ``load_texts`` + ``make_calibration_windows`` and written to
a safetensors file that the llm-compressor child feeds to ``oneshot`` unchanged; ``quantize`` rebuilds
them from the same (spec, tokenizer, n, seq_len, seed), and the run stops unless the sha256 of the
windows both tools report equals the one made here.

Wall time is the whole subprocess (interpreter start, imports, load, calibration, save); CPU time
(user + sys) and peak RSS are the child's ``ru_utime + ru_stime`` and ``ru_maxrss`` from ``os.wait4``
(that process and its waited-for descendants), taken by a small stdlib-only launcher process so that
the driver's own memory does not leak into ``ru_maxrss``; each child also reports its ``VmHWM``. On a
shared CPU the wall time depends on the load, CPU time much less so (``--repeats N`` keeps the
fastest of N runs). Both outputs are then read back in this process -- with moecompress's own
reader, cross-checked against transformers + compressed-tensors -- and evaluated in fp32 against the
original model on held-out windows (``builtin:heldout-code`` / ``builtin:heldout-prose``):
perplexity, mean KL(original || quantized) and top-1 agreement (``moecompress.evals.lm_metrics``).

    python benchmarks/vs_llmcompressor.py [--model DIR] [--settings 4:128,3:64] [--json out.json]

Without ``--model`` the demo model (``moecompress.demo_model.demo_model_path()``) is used, built
first if it is not cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLMC_CHILD = Path(__file__).resolve().parent / "_llmc_child.py"
HELDOUT = ("builtin:heldout-code", "builtin:heldout-prose")
ACTORDER_ALIASES = {"static": "weight", "dynamic": "group"}  # compressed-tensors' ActivationOrdering aliases

OURS_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import torch
from moecompress.pipeline import quantize
from moecompress.settings import build_config
a = json.loads(sys.argv[1])
cfg = build_config(**a["config"])
t_import = time.perf_counter() - t_start
t0 = time.perf_counter()
summary = quantize(a["model"], a["out"], cfg)
t_quantize = time.perf_counter() - t0
print("OURS_RESULT " + json.dumps({
    "windows_sha256": summary["calibration"]["input_ids_sha256"],
    "calibration": summary["calibration"],
    "recipe": summary["recipe"],
    "starved_experts_total": summary["starved_experts_total"],
    "timings_s": {"imports": t_import, "quantize": t_quantize, "pipeline": summary["timings_s"],
                  "total": time.perf_counter() - t_start},
    "vm_hwm": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")),
    "torch_threads": torch.get_num_threads(),
    "versions": summary["versions"],
}), flush=True)
"""


# ------------------------------------------------------------------------------------------- helpers


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        bits, _, gs = item.strip().lower().removeprefix("w").partition(":")
        if not gs:
            bits, _, gs = item.strip().lower().removeprefix("w").partition("g")
        out.append((int(bits), int(gs)))
    return out


def setting_name(bits: int, gs: int) -> str:
    return f"W{bits}g{gs}"


def windows_sha256(input_ids) -> str:
    return hashlib.sha256(input_ids.numpy().astype("<i8").tobytes()).hexdigest()


# Children are started by this small stdlib-only process, not by the driver: on Linux a child's
# ru_maxrss starts at the RSS of the process it was forked from (exec keeps the old high-water mark),
# so a child forked from the driver (which holds the float model) would report the driver's RSS.
LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    with open(job["log"], "w") as f:
        proc = subprocess.Popen(job["cmd"], stdout=f, stderr=subprocess.STDOUT, cwd=job["cwd"], env=job["env"])
        _, status, ru = os.wait4(proc.pid, 0)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "returncode": os.waitstatus_to_exitcode(status),
                      "maxrss_kib": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}), flush=True)
"""


class Launcher:
    """A clean process that runs each command as its child and reports wall time and os.wait4 usage."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, cmd: list[str], log: Path, env: dict) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "log": str(log), "cwd": str(REPO), "env": env}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the launcher process died")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def run_child(launcher: Launcher, cmd: list[str], log: Path, marker: str, env: dict) -> dict:
    """Run ``cmd`` as a fresh process; its JSON result line, wall time, CPU time and peak RSS (os.wait4)."""
    usage = launcher.run(cmd, log, env)
    text = log.read_text(errors="replace")
    if usage["returncode"] != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise SystemExit(f"{cmd[0]} ... exited with {usage['returncode']}; log {log}:\n{tail}")
    lines = [ln for ln in text.splitlines() if ln.startswith(marker + " ")]
    if not lines:
        raise SystemExit(f"no {marker} line in {log}")
    result = json.loads(lines[-1][len(marker) + 1:])
    result["wall_s"] = usage["wall_s"]
    result["peak_rss"] = usage["maxrss_kib"] * 1024  # Linux: KiB
    result["cpu_s"] = usage["cpu_s"]
    result["log"] = str(log)
    return result


def packed_modules(out: Path) -> dict:
    """How many linears ``out`` stores packed (``*.weight_packed``, GPTQ/AWQ ``*.qweight``), and how many are experts."""
    from safetensors import safe_open

    names = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names += [k for k in st.keys() if k.endswith((".weight_packed", ".qweight"))]
    return {"total": len(names), "experts": sum(".experts." in n for n in names)}


def readable_copy(src: Path, dst: Path) -> list[str]:
    """``dst``: links to ``src``'s files with the config's actorder aliases spelled canonically.

    llm-compressor writes ``"actorder": "static"`` (compressed-tensors' alias of ``"weight"``: the
    columns are processed in activation order, nothing about the stored format changes); our reader
    only knows the canonical names. Returns what was renamed.
    """
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    renamed = []
    for group in config.get("quantization_config", {}).get("config_groups", {}).values():
        w = group.get("weights") or {}
        if w.get("actorder") in ACTORDER_ALIASES:
            renamed.append(f"actorder {w['actorder']!r} -> {ACTORDER_ALIASES[w['actorder']]!r}")
            w["actorder"] = ACTORDER_ALIASES[w["actorder"]]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return renamed


def load_quantized(out: Path, tmp: Path):
    """(fp32 model, how it was read, cross-check) for a compressed-tensors checkpoint ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.checkpoint.dequant import write_dequantized
    from moecompress.errors import UserError

    info: dict = {}
    try:
        write_dequantized(out, tmp / "dense")
        info["loader"] = "moecompress write_dequantized"
    except UserError as e:
        info["reader_error"] = str(e)
        renamed = readable_copy(out, tmp / "normalized")
        try:
            write_dequantized(tmp / "normalized", tmp / "dense")
            info["loader"] = "moecompress write_dequantized after renaming " + ", ".join(renamed)
        except UserError as e2:
            info["reader_error_after_rename"] = str(e2)
            shutil.rmtree(tmp / "dense", ignore_errors=True)
    ct = _load_with_compressed_tensors(out)
    if (tmp / "dense").is_dir():
        model = AutoModelForCausalLM.from_pretrained(tmp / "dense", dtype=torch.float32).eval()
        if ct is not None:
            other = dict(ct.named_parameters())
            with torch.no_grad():
                diffs = [float((p - other[n].float()).abs().max()) for n, p in model.named_parameters() if n in other]
            info["crosscheck_transformers_ct"] = {"max_abs_diff": max(diffs), "params_compared": len(diffs),
                                                  "params_total": sum(1 for _ in model.parameters())}
        return model, info
    if ct is None:
        raise SystemExit(f"neither moecompress's reader nor transformers + compressed-tensors can read {out}: {info}")
    info["loader"] = "transformers + compressed-tensors (dequantize)"
    return ct.float().eval(), info


def _load_with_compressed_tensors(out: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    try:
        try:
            qcfg = CompressedTensorsConfig(dequantize=True)
        except TypeError:  # transformers < 5.2x
            qcfg = CompressedTensorsConfig(run_compressed=False)
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=qcfg).eval()
    except Exception as e:  # noqa: BLE001 - only a cross-check
        print(f"  (transformers + compressed-tensors could not load {out}: {str(e).splitlines()[0]})")
        return None


def quantize_with(launcher: Launcher, tool: str, bits: int, gs: int, out: Path, work: Path, model_dir: Path,
                  windows_file: Path, env: dict, args) -> dict:
    name = setting_name(bits, gs)
    if tool == "ours":
        config = dict(method="gptq", bits=bits, group_size=gs, calib=args.calib, calib_samples=args.calib_samples,
                      seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size)
        if args.ours_act_order != "default":
            config["act_order"] = None if args.ours_act_order == "none" else args.ours_act_order
        payload = json.dumps({"model": str(model_dir), "out": str(out), "config": config})
        cmd = [args.ours_python, "-c", OURS_CHILD, payload]
        r = run_child(launcher, cmd, work / f"{name}-ours.log", "OURS_RESULT", env)
        r["core_s"] = r["timings_s"]["quantize"]
    else:
        cmd = [args.llmc_python, str(LLMC_CHILD), "--model", str(model_dir), "--out", str(out),
               "--windows", str(windows_file), "--bits", str(bits), "--group-size", str(gs),
               "--batch-size", str(args.batch_size), "--actorder", args.llmc_actorder, "--dtype", args.llmc_dtype]
        r = run_child(launcher, cmd, work / f"{name}-llmc.log", "LLMC_RESULT", env)
        r["core_s"] = r["timings_s"]["oneshot"]
    return r


def evaluate(model, ref, windows: dict, batch_size: int) -> dict:
    from moecompress.evals.lm_metrics import kl_and_top1, perplexity

    res: dict = {}
    for spec, ids in windows.items():
        r = {"perplexity": perplexity(model, ids, batch_size)}
        if ref is not None:
            r["kl"], r["top1"] = kl_and_top1(model, ref, ids, batch_size)
        res[spec] = r
    if ref is not None:
        res["mean_kl"] = sum(res[s]["kl"] for s in windows) / len(windows)  # equal token counts per set
        res["top1"] = sum(res[s]["top1"] for s in windows) / len(windows)
    return res


def targets(bits: int, gs: int, ours: dict, theirs: dict) -> dict:
    """The project's targets for this setting, judged on the measured numbers."""
    t = {}
    for spec in HELDOUT:
        o, l = ours["eval"][spec]["perplexity"], theirs["eval"][spec]["perplexity"]
        t[f"ppl {spec.split(':')[1]} <= llmc * 1.002"] = o <= l * 1.002
    o, l = ours["eval"]["mean_kl"], theirs["eval"]["mean_kl"]
    if (bits, gs) == (3, 64):
        t["mean KL <= 0.8 * llmc"] = o <= 0.8 * l
    else:
        t["mean KL <= llmc"] = o <= l
    t["wall time <= llmc / 3"] = ours["wall_s"] * 3 <= theirs["wall_s"]
    return t


# ------------------------------------------------------------------------------------------- output


def _fmt(v, kind):
    if v is None:
        return "-"
    return {"s": f"{v:.1f}", "mib": f"{v / 2**20:.0f}", "ppl": f"{v:.4f}", "kl": f"{v:.5f}",
            "pct": f"{100 * v:.2f}%"}[kind]


def table(name: str, ours: dict, theirs: dict, base: dict, meta: dict) -> str:
    rows = [("wall time, whole process (s)", "wall_s", "s"), ("  of which quantize / oneshot (s)", "core_s", "s"),
            ("CPU time user+sys, whole process (s)", "cpu_s", "s"), ("peak RSS (MiB)", "peak_rss", "mib")]
    for spec in HELDOUT:
        short = spec.split(":")[1]
        rows += [(f"ppl {short} (float {base[spec]['perplexity']:.4f})", ("eval", spec, "perplexity"), "ppl")]
    for spec in HELDOUT:
        rows += [(f"KL {spec.split(':')[1]}", ("eval", spec, "kl"), "kl")]
    rows += [("mean KL to original", ("eval", "mean_kl"), "kl"), ("top-1 agreement", ("eval", "top1"), "pct")]

    def get(d, key):
        if isinstance(key, tuple):
            for k in key:
                d = d[k]
            return d
        return d[key]

    w = 38
    lines = [f"{name}  calib {meta['calib']}  held-out {meta['heldout']}",
             f"{'':{w}} {'moecompress':>13} {'llm-compressor':>15} {'ours/theirs':>12}"]
    for label, key, kind in rows:
        o, t = get(ours, key), get(theirs, key)
        ratio = f"{o / t:.4f}" if t else "-"
        lines.append(f"{label:{w}} {_fmt(o, kind):>13} {_fmt(t, kind):>15} {ratio:>12}")
    lines.append("targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in ours["targets"].items()))
    if len(ours["wall_s_runs"]) > 1:
        lines.append("wall time runs (s): ours " + ", ".join(f"{x:.1f}" for x in ours["wall_s_runs"])
                     + "; llm-compressor " + ", ".join(f"{x:.1f}" for x in theirs["wall_s_runs"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="float MoE checkpoint (default: the demo model, built if missing)")
    ap.add_argument("--demo-variant", default="demo", choices=["demo", "wide"],
                    help="without --model: which demo model (wide: 64 experts, top-8; built if missing)")
    ap.add_argument("--settings", default="4:128,3:64", help="comma-separated bits:group_size (default 4:128,3:64)")
    ap.add_argument("--calib", default="builtin:stdlib")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch size of both tools")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--ours-act-order", choices=["default", "none", "weight"], default="default",
                    help="moecompress act_order (default: moecompress's default, weight)")
    ap.add_argument("--llmc-actorder", choices=["default", "static", "none"], default="default",
                    help="GPTQModifier actorder (default: llm-compressor's default, static)")
    ap.add_argument("--llmc-dtype", choices=["float32", "auto"], default="float32",
                    help="dtype llm-compressor loads and calibrates the model in (default float32, as ours on CPU)")
    ap.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--repeats", type=int, default=1,
                    help="quantize N times per tool (alternating); report the fastest wall time")
    ap.add_argument("--only", choices=["ours", "llmc"], help="run one tool only (no comparison table)")
    ap.add_argument("--workdir", help="keep outputs and logs here (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write all results to this JSON file")
    args = ap.parse_args(argv)
    launcher = Launcher()  # before the heavy imports: its children inherit its (small) RSS high-water mark

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from moecompress.calib.data import load_texts, make_calibration_windows

    settings = parse_settings(args.settings)
    if args.model:
        model_dir = Path(args.model).expanduser().resolve()
    else:
        from moecompress.demo_model import demo_model_path

        if not (demo_model_path(build=False, variant=args.demo_variant) / "demo_model.json").is_file():
            print("building the demo model (once; cached) ...", flush=True)
        model_dir = demo_model_path(variant=args.demo_variant)
    if not Path(args.llmc_python).is_file() and args.only != "ours":
        raise SystemExit(f"llm-compressor python {args.llmc_python} not found; set it up as in benchmarks/README.md")

    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="vs_llmc-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib = make_calibration_windows(load_texts(args.calib), tok, args.calib_samples, args.seq_len, args.seed)
        sha = windows_sha256(calib.input_ids)
        assert sha == calib.metadata["input_ids_sha256"]
        windows_file = work / "calib_windows.safetensors"
        save_file({"input_ids": calib.input_ids.contiguous()}, windows_file)
        heldout = {s: make_calibration_windows(load_texts(s), tok, args.eval_windows, args.eval_seq_len,
                                               args.eval_seed).input_ids for s in HELDOUT}
        meta = {"calib": f"{args.calib} {args.calib_samples}x{args.seq_len} seed {args.seed} (sha256 {sha[:12]})",
                "heldout": f"{args.eval_windows}x{args.eval_seq_len} seed {args.eval_seed}"}
        report: dict = {
            "model": str(model_dir), "command": [sys.executable, *sys.argv], "host": platform.node(),
            "cpu_count": os.cpu_count(), "calibration": calib.metadata,
            "heldout": {s: {"windows": args.eval_windows, "seq_len": args.eval_seq_len, "seed": args.eval_seed,
                            "sha256": windows_sha256(ids)} for s, ids in heldout.items()},
            "args": vars(args), "settings": {},
        }
        print(f"model {model_dir}\ncalibration windows {tuple(calib.input_ids.shape)} sha256 {sha}", flush=True)

        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        report["model_parameters"] = sum(p.numel() for p in ref.parameters())
        base = evaluate(ref, None, heldout, args.eval_batch_size)
        report["float"] = base

        for bits, gs in settings:
            name = setting_name(bits, gs)
            res: dict = {}
            tools = [t for t in ("ours", "llmc") if args.only in (None, t)]
            for rep in range(args.repeats):
                for tool in tools:
                    out = work / f"{name}-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"[{name}] {tool}: quantizing{f' (run {rep + 1}/{args.repeats})' if args.repeats > 1 else ''}"
                          " ...", flush=True)
                    r = quantize_with(launcher, tool, bits, gs, out, work, model_dir, windows_file, env, args)
                    if r["windows_sha256"] != sha:
                        raise SystemExit(f"{tool} calibrated on other windows: sha256 {r['windows_sha256']} != {sha}")
                    r["packed_modules"] = packed_modules(out)
                    print(f"[{name}] {tool}: {r['wall_s']:.1f}s wall, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
                          f"{r['packed_modules']['total']} linears packed ({r['packed_modules']['experts']} experts); "
                          "same windows (sha256 ok)", flush=True)
                    if tool in res:  # a repeat: keep the fastest wall time and the largest peak RSS
                        prev = res[tool]
                        r["wall_s_runs"] = prev["wall_s_runs"] + [r["wall_s"]]
                        r["core_s_runs"] = prev["core_s_runs"] + [r["core_s"]]
                        r["wall_s"], r["core_s"] = min(r["wall_s_runs"]), min(r["core_s_runs"])
                        r["cpu_s_runs"] = prev["cpu_s_runs"] + [r["cpu_s"]]
                        r["cpu_s"] = min(r["cpu_s_runs"])
                        r["peak_rss"] = max(r["peak_rss"], prev["peak_rss"])
                    else:
                        r["wall_s_runs"], r["core_s_runs"], r["cpu_s_runs"] = [r["wall_s"]], [r["core_s"]], [r["cpu_s"]]
                    res[tool] = r
            for tool in tools:
                r, out = res[tool], work / f"{name}-{tool}"
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    model, r["read"] = load_quantized(out, Path(tmp))
                    r["eval"] = evaluate(model, ref, heldout, args.eval_batch_size)
                    del model
                print(f"[{name}] {tool}: read with {r['read']['loader']}; mean KL {r['eval']['mean_kl']:.5f}",
                      flush=True)
            if len(res) == 2:
                res["ours"]["targets"] = targets(bits, gs, res["ours"], res["llmc"])
                print("\n" + table(name, res["ours"], res["llmc"], base, meta) + "\n", flush=True)
            report["settings"][name] = res
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
