"""Interop: GPTQModel loads what ``moecompress quantize --format gptq`` writes, and computes the same model.

GPTQModel needs torch >= 2.14 (several GB of CUDA wheels from PyPI), so it lives in its own virtual
environment outside the repository and is not part of CI (setup: benchmarks/README.md, section
"GPTQModel interop"). This driver runs in the main environment (where moecompress is installed):

1. for every setting, ``moecompress make-tiny`` a random checkpoint of the family and ``moecompress
   quantize --format gptq`` it (``--group-size 32 --calib-samples 8 --seq-len 64`` by default), then
   writes our own dequantized float twin (``moecompress.checkpoint.dequant.write_dequantized``);
2. starts ``benchmarks/_gptqmodel_child.py`` once with GPTQModel's interpreter: it loads every
   quantized checkpoint with ``GPTQModel.load(..., device="cpu", backend="gptq_torch",
   dtype=float16)`` (the torch kernel; it takes fp16/bf16 only), audits keys and module types, compares
   GPTQModel's own dequantization of every quantized module with the twin, and saves the logits of one
   forward on fixed token ids;
3. loads each twin with transformers (``experts_implementation="eager"``) in float32 -- the
   reference -- and in float16 (the noise floor of an fp16 forward), runs the same ids and compares.

A setting is ``family:bits:act_order[:asym][:rename][:bypass][:lmhead][:attn8]``. ``lmhead`` quantizes
lm_head too (``--quantize-lm-head``, on a tiny model with a 264-token vocabulary so that GPTQ v1
can pack its rows); GPTQModel must then load it as a quantized module. ``attn8`` gives attention and
the shared expert 8 bits beside the routed experts' ``bits`` (``--override``: positive ``dynamic`` rules),
which GPTQModel must read module by module. Two flags are diagnostics
that tell a GPTQModel-side refusal from a problem in our format:

* ``rename`` loads a copy of the checkpoint whose tensor names are spelled as GPTQModel's runtime
  modules (Mixtral's ``block_sparse_moe.experts.E.w1`` -> ``mlp.experts.E.gate_proj``);
* ``bypass`` (with ``asym``) answers GPTQModel's "was this asymmetric v1 checkpoint written by
  gptqmodel >= 0.9.0?" check with yes for that one load (``_gptqmodel_child.asym_guard_bypassed``),
  so its v1 -> v2 zero-point conversion runs on our zero points.

Two rows are expected failures in GPTQModel 7.7 (``xfail``, as long as they fail with the known
error): plain Mixtral (its quantized loader reads checkpoint keys without the family's checkpoint
renaming, so the original HF names ``block_sparse_moe.experts.E.w1`` are "missing") and plain
asymmetric (it refuses ``sym=False`` GPTQ v1 from any other producer).

Every other row must load, report no missing/unexpected tensors, keep the routers (``mlp.gate``,
``shared_expert_gate``, ``block_sparse_moe.gate``) unquantized with our ``dynamic`` negative rules
matching them, have GPTQModel's dequantized weights equal to ours rounded to fp16 exactly, and a
relative logit error against the fp32 twin of at most ``max(--tol, 2 x the fp16 twin's own error)``
(an fp16 forward's rounding, which depends on the model). Exit status 1 otherwise.

    /work/venv/bin/python benchmarks/gptqmodel_interop.py [--settings ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _interop_util import compare, interpreter_missing, moecompress_cmd, run, workdir, write_report

CHILD = Path(__file__).resolve().parent / "_gptqmodel_child.py"
DEFAULT_PYTHON = "/work/gptqmodel-venv/bin/python"
DEFAULT_SETTINGS = ("qwen3_moe:4:none,qwen3_moe:4:group,qwen3_moe:8:none,qwen3_moe:3:none,qwen3_moe:4:none:asym,"
                    "qwen3_moe:4:none:asym:bypass,qwen2_moe:4:none,mixtral:4:none,mixtral:4:none:rename")
FLAGS = ("asym", "rename", "bypass", "lmhead", "attn8")
ATTN8 = "self_attn|shared_expert=8"  # the attn8 flag: --override, int8 attention and shared expert beside int4 experts


def expected_failure(s: dict) -> tuple[str, str] | None:
    """(exception type, message prefix) of a known GPTQModel 7.7 refusal of this setting, or None."""
    if s["family"] == "mixtral" and not s["rename"]:
        return "ValueError", "Missing required quantized weights in checkpoint"
    if not s["sym"] and not s["bypass"]:
        return "ValueError", "Format: Loading of a sym=False model with format=FORMAT.GPTQ is only supported"
    return None
RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))


def renames(family: str) -> tuple[tuple[str, str], ...]:
    """RENAMES, then the family's own (``ArchSpec.disk_renames``, on disk -> in memory): routers' selection
    biases stored beside the gate and held in it in memory (ERNIE-4.5, K-EXAONE; not MiniMax-M2, whose
    block holds it)."""
    from moecompress.arch.registry import BY_MODEL_TYPE

    spec = BY_MODEL_TYPE[family]
    return RENAMES + tuple((f".{disk}", f".{mem}") for mem, disk in spec.disk_renames)


def parse_settings(text: str) -> list[dict]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) < 3 or parts[2] not in ("none", "weight", "group") or not parts[1].isdigit():
            raise SystemExit(f"bad setting {item!r}: want family:bits:act_order[:asym][:rename][:bypass][:lmhead][:attn8]")
        flags = set(parts[3:])
        if flags - set(FLAGS):
            raise SystemExit(f"bad flags in {item!r}: only {', '.join(FLAGS)}")
        out.append({"id": item, "family": parts[0], "bits": int(parts[1]), "act_order": parts[2],
                    "sym": "asym" not in flags, "rename": "rename" in flags, "bypass": "bypass" in flags,
                    "lmhead": "lmhead" in flags, "attn8": "attn8" in flags})
    return out


def renamed_copy(src: Path, dst: Path, family: str) -> int:
    """``dst``: ``src`` with tensor names spelled as GPTQModel's runtime modules; how many were renamed."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    n = 0
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {}
            for k, v in load_file(str(f)).items():
                new = k
                for a, b in renames(family):
                    new = new.replace(a, b)
                n += new != k
                tensors[new] = v
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        elif f.name.endswith(".index.json"):
            raise SystemExit("renamed_copy handles single-file checkpoints only")
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    return n


def prepare(settings: list[dict], work: Path, args, log: Path) -> None:
    """make-tiny, quantize, write the twin (each quantized output shared by settings that differ only in rename)."""
    from moecompress.checkpoint.dequant import write_dequantized

    mc = moecompress_cmd()
    tiny_done, quant_done = {}, {}
    for s in settings:
        fam = s["family"]
        tkey = (fam, s["lmhead"])
        if tkey not in tiny_done:
            tiny = work / f"tiny_{fam}" if not s["lmhead"] else work / f"tiny_{fam}_v264"
            if not tiny.exists() and s["lmhead"]:  # GPTQ v1 packs lm_head rows by 8: a vocab of 264, not 260
                from moecompress.tiny import save_tiny

                save_tiny(fam, tiny, seed=args.seed, vocab_size=264)
            elif not tiny.exists():
                run(mc + ["make-tiny", str(tiny), "--family", fam, "--seed", str(args.seed)], log)
            tiny_done[tkey] = tiny
        key = (fam, s["bits"], s["act_order"], s["sym"], s["lmhead"], s["attn8"])
        if key not in quant_done:
            tag = f"{fam}_w{s['bits']}_{s['act_order']}_{'sym' if s['sym'] else 'asym'}" + ("_lmhead" if s["lmhead"] else "") \
                + ("_attn8" if s["attn8"] else "")
            q, twin = work / f"q_{tag}", work / f"q_{tag}_deq"
            secs = 0.0
            if not q.exists():
                secs = run(mc + ["quantize", str(tiny_done[tkey]), "--out", str(q), "--format", "gptq",
                                 *(["--quantize-lm-head"] if s["lmhead"] else []),
                                 *(["--override", ATTN8] if s["attn8"] else []),
                                 "--bits", str(s["bits"]), "--group-size", str(args.group_size),
                                 "--act-order", s["act_order"], "--sym" if s["sym"] else "--asym",
                                 "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
                                 "--seed", str(args.seed)], log)
            if not twin.exists():
                write_dequantized(q, twin)
            quant_done[key] = (q, twin, secs)
        q, twin, secs = quant_done[key]
        s["quantized"], s["twin"], s["quantize_s"] = str(q), str(twin), secs
        s["model"] = str(q)
        if s["rename"]:
            r = work / (q.name + "_renamed")
            s["renamed_tensors"] = renamed_copy(q, r, s["family"])
            s["model"] = str(r)
        s["quantize_config"] = json.loads((q / "quantize_config.json").read_text())


def run_child(python: str, spec: dict, work: Path) -> dict:
    jobs, out, log = work / "jobs.json", work / "child_result.json", work / "child.log"
    jobs.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([python, str(CHILD), str(jobs), "--out", str(out)], stdout=f,
                              stderr=subprocess.STDOUT, cwd=work)
    wall = time.perf_counter() - t0
    if proc.returncode or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"GPTQModel child exited with {proc.returncode}; log {log}:\n{tail}")
    res = json.loads(out.read_text())
    res["wall_s"], res["log"] = wall, str(log)
    return res


def twin_logits(twin: str, input_ids, torch) -> dict:
    from transformers import AutoModelForCausalLM

    out = {}
    for dtype in (torch.float32, torch.float16):
        model, info = AutoModelForCausalLM.from_pretrained(twin, dtype=dtype, experts_implementation="eager",
                                                           output_loading_info=True)
        bad = {k: list(v) for k, v in info.items() if v}
        if bad:
            raise SystemExit(f"transformers reports {bad} loading our twin {twin}")
        with torch.no_grad():
            out[str(dtype).removeprefix("torch.")] = model(input_ids=input_ids).logits.float()
        del model
    return out


def judge(s: dict, r: dict, tol: float, floor: float) -> tuple[str, list[str]]:
    """('pass' | 'FAIL' | 'xfail' | 'XPASS', reasons)."""
    xf = expected_failure(s)
    if not r.get("loaded"):
        err = r.get("error", {})
        if xf and err.get("type") == xf[0] and err.get("message", "").startswith(xf[1]):
            return "xfail", [f"{err['type']}: {err['message'][:160]}"]
        return "FAIL", [f"load: {err.get('type')}: {err.get('message', '')[:300]}"]
    why = []
    if r.get("missing") or r.get("unexpected"):
        why.append(f"missing {len(r.get('missing', []))} / unexpected {len(r.get('unexpected', []))} tensors")
    if r.get("tensors_mismatched"):
        why.append(f"{len(r['tensors_mismatched'])} stored tensors differ after loading")
    if not r.get("routers_ok"):
        why.append("routers not kept (or not matched by the dynamic rules)")
    w = r.get("weights", {})
    if not w or w["compared"] != r.get("n_quantized_modules") or w["max_abs_diff"] != 0.0:
        why.append(f"dequantized weights differ from ours (max |diff| {w.get('max_abs_diff')})")
    if s.get("lmhead") and not r.get("lm_head", {}).get("quantized"):
        why.append(f"lm_head loaded as {r.get('lm_head', {}).get('type')}, not quantized (quantize_config lm_head: true)")
    if not r.get("logits_finite"):
        why.append("non-finite logits")
    limit = max(tol, 2 * floor)
    if r.get("vs_twin_fp32", {}).get("rel_err", float("inf")) > limit:
        why.append(f"relative logit error {r['vs_twin_fp32']['rel_err']:.2e} > {limit:.2e}")
    if why:
        return "FAIL", why
    return ("XPASS" if xf else "pass"), []


def table(rows: list[dict]) -> str:
    head = ("setting", "family", "bits", "act-order", "sym", "loads?", "weights == ours", "rel. logit err vs fp32 twin",
            "fp16 twin vs fp32 twin", "vs fp16 twin", "top-1", "routers kept?", "missing/unexpected", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s, r = row["setting"], row["gptqmodel"]
        w = r.get("weights") or {}
        v32, floor, v16 = r.get("vs_twin_fp32") or {}, row.get("twin_fp16_vs_fp32") or {}, r.get("vs_twin_fp16") or {}
        loaded = r.get("loaded")
        cells = (
            s["id"], s["family"] + (" (renamed keys)" if s["rename"] else ""), s["bits"], s["act_order"],
            ("sym" if s["sym"] else "asym") + (" (guard bypassed)" if s["bypass"] else ""),
            "yes" if loaded else f"no ({(r.get('error') or {}).get('type')})",
            f"{w['exact']}/{w['compared']} exact" if w else "-",
            f"{v32['rel_err']:.2e}" if v32 else "-",
            f"{floor['rel_err']:.2e}" if floor else "-",
            f"{v16['rel_err']:.2e}" if v16 else "-",
            f"{v32['top1_agree']:.3f}" if v32 else "-",
            ("yes" if r.get("routers_ok") else "NO") + (f" ({len(r['routers'])})" if r.get("routers") else "")
            if loaded else "-",
            f"{len(r.get('missing', []))}/{len(r.get('unexpected', []))}" if loaded else "-",
            row["result"],
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="GPTQModel loads moecompress's GPTQ output (see module docstring)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="comma list of family:bits:act_order[:asym][:rename][:bypass]")
    ap.add_argument("--gptqmodel-python", default=os.environ.get("GPTQMODEL_PYTHON", DEFAULT_PYTHON),
                    help=f"interpreter of the GPTQModel venv (default $GPTQMODEL_PYTHON or {DEFAULT_PYTHON})")
    ap.add_argument("--workdir", help="keep checkpoints, logs and logits here (default: a temporary folder, removed)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2, help="rows of fixed token ids in the forward")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per row")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="GPTQModel load dtype")
    ap.add_argument("--tol", type=float, default=5e-3,
                    help="max relative logit error vs the fp32 twin (raised to 2x the fp16 twin's own error)")
    ap.add_argument("--json", help="write everything measured here")
    args = ap.parse_args()

    settings = parse_settings(args.settings)
    if interpreter_missing(args.gptqmodel_python, "GPTQModel", "--gptqmodel-python"):
        return 2

    import torch
    from safetensors.torch import load_file

    work = workdir(args.workdir, "gptqmodel_interop_")
    try:
        log = work / "moecompress.log"
        t0 = time.perf_counter()
        prepare(settings, work, args, log)
        t_prepare = time.perf_counter() - t0

        vocab = min(json.loads((Path(s["quantized"]) / "config.json").read_text())["vocab_size"] for s in settings)
        gen = torch.Generator().manual_seed(args.seed)
        input_ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen)
        spec = {"dtype": args.dtype, "backend": "gptq_torch", "input_ids": input_ids.tolist(),
                "jobs": [{"name": s["id"], "model": s["model"], "twin": s["twin"],
                          "logits": str(work / f"logits_{i}.safetensors"), "bypass_asym_guard": s["bypass"]}
                         for i, s in enumerate(settings)]}
        child = run_child(args.gptqmodel_python, spec, work)

        rows, twins = [], {}
        for s, r in zip(settings, child["results"]):
            row = {"setting": s, "gptqmodel": r}
            if s["twin"] not in twins:
                twins[s["twin"]] = twin_logits(s["twin"], input_ids, torch)
            t = twins[s["twin"]]
            row["twin_fp16_vs_fp32"] = compare(t["float16"], t["float32"])
            if r.get("loaded") and r.get("logits"):
                g = load_file(r["logits"])["logits"]
                r["vs_twin_fp32"] = compare(g, t["float32"])
                r["vs_twin_fp16"] = compare(g, t["float16"])
            row["result"], row["why"] = judge(s, r, args.tol, row["twin_fp16_vs_fp32"]["rel_err"])
            rows.append(row)

        print(table(rows))
        for row in rows:
            if row["why"]:
                print(f"- {row['setting']['id']}: {row['result']}: " + "; ".join(row["why"]))
        ok = all(row["result"] in ("pass", "xfail", "XPASS") for row in rows)
        print(f"\nGPTQModel {child['versions'].get('gptqmodel')} (torch {child['versions'].get('torch')}, "
              f"transformers {child['versions'].get('transformers')}), load dtype {args.dtype}, backend gptq_torch, "
              f"CPU; {'OK' if ok else 'FAILED'}")
        if args.json:
            write_report(args.json, args, gptqmodel_env=child["versions"],
                         timings_s={"prepare": t_prepare, "child_wall": child["wall_s"]},
                         input_ids_shape=list(input_ids.shape), rows=rows, ok=ok)
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
