"""What skipping buys: MoE-block and end-to-end speed of zero-expert models at set skip rates.

    python benchmarks/zero_experts_speed.py [--model DIR | --demo-variant wide] [--threads 2] \
        [--rates 0,0.25,0.5,0.75] [--prompt-len 128] [--new-tokens 64] [--repeats 5] [--json out.json]

Two kinds of zero-expert model per skip rate s, both skipping exactly a share s of every token's
slots whatever the input (s = 0 is the original checkpoint itself, no zero experts at all):

* ``router``: synthetic zero ids through the router itself, as a ZEDA-trained model routes: Z = k s
  zero experts whose logit bias (+50) makes the router pick all of them for every token, while
  the real experts keep their own order (their probabilities shrink by ~e^-50 but stay distinct,
  so each token still gets its own top real experts). The outputs are meaningless; the cost is
  exactly a trained model's at that skip rate.
* ``rule``: one zero expert and the static top-k rule k' = k (1 - s) (``zero-experts`` baseline (c)),
  which also pays for applying the rule after the top-k.

Measured with our runtime on the CPU in fp32 (torch twins; ``--threads`` torch threads):

* MoE block at decode: one token through the first MoE layer's block (router, routing, the chosen
  experts), median of 2000 calls, the models taking turns every 100;
* end-to-end: decode tokens/s = (N - 1) / (t(N) - t(1)) from the wall time of generating N and 1
  tokens after the same prompt, and prefill tokens/s of that prompt, each the median of
  ``--repeats`` runs; the rates run interleaved so load on a shared machine hits all alike.

Every figure is printed beside its ratio to s = 0.

``--block-shape qwen3-30b-a3b`` also times one MoE block of Qwen3-30B-A3B's shapes (hidden 2048,
128 experts of 768, top-8; random fp32 weights, shared by every variant, built in memory), where
the experts' weight reads dominate a decode step as they do in the real model; on the small demo
model the per-call overhead of the router and of each expert's few torch calls is a large part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _force_zero_slots(path: Path) -> None:
    """Make the router choose every zero expert for every token (softmax: logit bias; sigmoid: selection
    bias, above every real expert's selection score)."""
    from safetensors.torch import load_file, save_file

    z = json.loads((path / "config.json").read_text())
    z = (z.get("text_config") or z)["num_zero_experts"]
    for shard in path.glob("*.safetensors"):
        sd = load_file(shard)
        for k, t in sd.items():
            if k.endswith("zero_expert_bias"):
                sd[k] = torch.full_like(t, 50.0)
            elif k.endswith("e_score_correction_bias"):
                sd[k] = t.clone()
                sd[k][-z:] = 10.0
        save_file(sd, shard, metadata={"format": "pt"})


def _variants(model: Path, rates: list[float], tmp: Path) -> dict[tuple[str, float], Path]:
    from moecompress.arch.handle import ModelHandle
    from moecompress.zero.inject import add_zero_experts

    k = ModelHandle.open(model).top_k
    out = {}
    for s in rates:
        keep = round(k * (1 - s))
        if abs(keep - k * (1 - s)) > 1e-9:
            raise SystemExit(f"skip rate {s} is not a whole number of the {k} slots")
        if keep == k:
            out[("original", s)] = model
            continue
        out[("router", s)] = tmp / f"router{int(round(100 * s))}"
        add_zero_experts(model, out[("router", s)], k - keep, "same")
        _force_zero_slots(out[("router", s)])
        out[("rule", s)] = tmp / f"rule{int(round(100 * s))}"
        add_zero_experts(model, out[("rule", s)], 1, "same", rule=("top-k", float(keep)))
    return out


def _interleaved_us(blocks: dict, x: torch.Tensor, rounds: int, calls: int, warmup: int) -> dict:
    """Median microseconds of ``block(x)`` per block; the blocks take turns (``rounds`` x ``calls``
    each) so that a slow spell of the machine hits them all alike."""
    times: dict = {key: [] for key in blocks}
    with torch.no_grad():
        for block in blocks.values():
            for _ in range(warmup):
                block(x)
        for _ in range(rounds):
            for key, block in blocks.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    block(x)
                    times[key].append(time.perf_counter() - t)
    return {key: 1e6 * statistics.median(v) for key, v in times.items()}


def _moe_blocks_us(rts: dict, rounds: int = 20, calls: int = 100) -> dict:
    """Median time of one decode token through each runtime's first MoE block, called as a decode step calls it
    (its one-token closure, ``MoEBlock.one_token``, where the step has one; else the module)."""
    blocks = {}
    for key, rt in rts.items():
        block = next(layer.mlp for layer in rt.model.layers if type(layer.mlp).__name__ == "MoEBlock")
        one = block.one_token()
        blocks[key] = block if one is None else (lambda x, one=one: one(x.view(1, -1)))
    h = next(iter(rts.values())).model.lm.config.hidden_size
    return _interleaved_us(blocks, torch.randn(1, 1, h, generator=torch.Generator().manual_seed(0)), rounds, calls, 20)


def block_at_shape(shape: str, rates: list[float], rounds: int = 10, calls: int = 20) -> list[dict]:
    """MoE-block decode time of one layer of ``shape`` (benchmarks/_e2e_model.py) at each skip rate,
    zero slots chosen by the router (the ``router`` kind above)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _e2e_model import SHAPES

    from moecompress.runtime.moe import Experts, MoEBlock, Routing

    c = SHAPES[shape]
    h, i, e, k = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["num_experts_per_tok"]
    g = torch.Generator().manual_seed(0)
    experts = Experts(torch.randn(e, 2 * i, h, generator=g) * h ** -0.5, torch.randn(e, h, i, generator=g) * i ** -0.5,
                      use_kernels=False)
    router = torch.randn(e, h, generator=g) * h ** -0.5
    blocks = {}
    for s in rates:
        z = round(k * s)
        rows = torch.cat([router, torch.randn(z, h, generator=g) * h ** -0.5])
        bias = torch.cat([torch.zeros(e), torch.full((z,), 50.0)]) if z else None
        blocks[s] = MoEBlock(rows, None, experts, Routing(top_k=k, scoring="softmax", renormalize=True, num_zero=z),
                             logit_bias=bias)
    us = _interleaved_us(blocks, torch.randn(1, 1, h, generator=g), rounds, calls, 1)
    return [{"skip_rate": s, "moe_block_decode_us": v, "moe_block_ratio": v / us[rates[0]]} for s, v in us.items()]


def run(model: Path, rates: list[float], prompt_len: int, new_tokens: int, repeats: int, tmp: Path,
        trained: list[Path] = ()) -> dict:
    from moecompress.runtime import Runtime

    paths = _variants(model, rates, tmp)
    for t in trained:  # a trained zero-expert model of the same original (its skip rate is its own, per token)
        paths[(f"trained:{t.name}", None)] = t
    rts = {key: Runtime.load(p, device="cpu", dtype="float32") for key, p in paths.items()}
    vocab = next(iter(rts.values())).model.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    for rt in rts.values():  # warm up
        rt.generate(prompt, 4, stop_ids=[])
    block = _moe_blocks_us(rts)
    dec: dict = {key: [] for key in rts}
    pre: dict = {key: [] for key in rts}
    for _ in range(repeats):
        for s, rt in rts.items():
            # the runtime times prefill and the decode steps apart (subtracting a 1-token run's wall time
            # from an n-token one's can go negative on a tiny model and a noisy machine)
            r = rt.generate(prompt, new_tokens, stop_ids=[])
            dec[s].append(r.decode_tokens_per_s)
            pre[s].append(r.prefill_tokens_per_s)
    base = next(key for key in rts if key[0] == "original")
    rows = []
    for key in rts:
        s = key
        d, p = statistics.median(dec[s]), statistics.median(pre[s])
        if key[1] is None:  # trained: the share of decode slots its routers sent to zero experts
            key = (key[0], _decode_skip(rts[s], prompt, new_tokens))
        rows.append({"kind": key[0], "skip_rate": key[1], "moe_block_decode_us": block[s],
                     "moe_block_ratio": block[s] / block[base],
                     "decode_tokens_per_s": d, "decode_ratio": d / statistics.median(dec[base]),
                     "prefill_tokens_per_s": p, "prefill_ratio": p / statistics.median(pre[base])})
    return {"model": str(model), "threads": torch.get_num_threads(), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeats": repeats, "rows": rows}


def _decode_skip(rt, prompt: torch.Tensor, new_tokens: int) -> float:
    """Share of the decode steps' routed slots that went to zero experts (ids >= E), over every MoE block:
    one generation through the blocks' general route (same choices as the one-token path), counted."""
    from moecompress.runtime.moe import MoEBlock

    blocks = [m for m in rt.model.lm.modules() if isinstance(m, MoEBlock)]
    counts = [0, 0]

    def wrap(b):
        inner = b.route

        def route(x):
            weights, ids = inner(x)
            if x.shape[0] == 1:  # decode steps only
                counts[0] += int((ids >= b.experts.num_experts).sum())
                counts[1] += ids.numel()
            return weights, ids
        return route

    fast = [b._one_token_route for b in blocks]
    try:
        for b in blocks:
            b.route, b._one_token_route = wrap(b), False
        rt.generate(prompt, new_tokens, stop_ids=[])
    finally:
        for b, f in zip(blocks, fast):
            del b.route
            b._one_token_route = f
    return counts[0] / max(counts[1], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--demo-variant", default="wide", help="Without --model: the cached demo model of this variant.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", default="0,0.25,0.5,0.75")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-shape", default=None, help="Also time one MoE block of these shapes (qwen3-30b-a3b).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--trained", type=Path, action="append", default=[],
                    help="A trained zero-expert model of --model (e.g. `moecompress zeda` output); repeatable.")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    model = a.model
    if model is None:
        from moecompress.demo_model import demo_model_path

        model = demo_model_path(variant=a.demo_variant)
    rates = [float(x) for x in a.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = run(Path(model), rates, a.prompt_len, a.new_tokens, a.repeats, Path(tmp), a.trained)
    print(f"{res['model']}  ({res['threads']} threads, fp32, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
          f"median of {a.repeats})")
    print(f"{'model':>9} {'skip':>5} {'MoE block us':>13} {'ratio':>6} {'decode tok/s':>13} {'ratio':>6} "
          f"{'prefill tok/s':>14} {'ratio':>6}")
    for r in sorted(res["rows"], key=lambda r: (r["kind"] != "original", r["kind"], r["skip_rate"])):
        print(f"{r['kind']:>9} {100 * r['skip_rate']:4.0f}% {r['moe_block_decode_us']:13.1f} {r['moe_block_ratio']:6.3f} "
              f"{r['decode_tokens_per_s']:13.1f} {r['decode_ratio']:6.3f} {r['prefill_tokens_per_s']:14.1f} "
              f"{r['prefill_ratio']:6.3f}")
    if a.block_shape:
        res["block_shape"] = {"shape": a.block_shape, "rows": block_at_shape(a.block_shape, rates)}
        print(f"\none MoE block of {a.block_shape} shapes, decode (1 token), zero slots chosen by the router")
        print(f"{'skip':>5} {'MoE block us':>13} {'ratio':>6}")
        for r in res["block_shape"]["rows"]:
            print(f"{100 * r['skip_rate']:4.0f}% {r['moe_block_decode_us']:13.1f} {r['moe_block_ratio']:6.3f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
