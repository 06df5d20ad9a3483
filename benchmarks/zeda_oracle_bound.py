"""How low can skipping alone take the KL? Training-free rules against an output-aware oracle, same skip rate.

    python benchmarks/zeda_oracle_bound.py [--model wide] [--skip 0.5] [--samples 32] [--seq-len 256] [--threads 2]

Issue 10 asks ZEDA for half the KL of the best training-free rule (top-p, threshold, top-k reduction) at the same
share of skipped slots. ZEDA's zero experts, with the original weights kept (its default), only choose which of a
token's top-k slots contribute nothing; its LoRA adapters then change the experts. This script measures what the
choosing part alone can reach: each MoE block is replaced by one that computes every top-k slot's output ``w_j E_j(x)``
and drops slots by a rule (the kept slots keep their weights, as in ZEDA and the baselines):

* ``top-p``: keep a token's slots, by decreasing weight, until their weights sum to ``p``;
* ``threshold``: keep a slot whose weight is at least ``beta`` x the token's top weight;
* ``oracle``: keep a slot whose *output* norm ``||w_j E_j(x)||`` is at least ``beta`` x the token's largest one. It
  reads the expert outputs it then saves (no router can), per layer and greedily (not the best subset for the final
  logits): a reference for how much an output-aware choice of slots can buy, not a strict lower bound;
* ``oracle-error``: drop a token's slots of smallest output norm, in that order, while the sum of what is dropped
  stays within ``beta`` x the norm of the block's full output.

Each rule's one parameter is bisected on the held-out windows themselves so that the skipped share of slots (over
all MoE layers and tokens) is ``--skip``; KL(original || rule) is the mean over every position, as ``moecompress
eval`` computes it, on its windows (``builtin:heldout-code`` + ``builtin:heldout-prose``, its default seed 1234).
The reference logits come from the model's own blocks, before the rule blocks replace them; the rule blocks,
dropping nothing, must reproduce them (checked at the start).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class RuleMoE(torch.nn.Module):
    """A transformers Qwen3-MoE sparse block with a slot-dropping rule: ``rule(weights [T, k], outputs [T, k, H])
    -> keep [T, k]``; counts the slots it drops."""

    def __init__(self, block):
        super().__init__()
        self.block, self.rule = block, None
        self.dropped = self.slots = 0

    def forward(self, hidden):
        b, s, h = hidden.shape
        x = hidden.reshape(-1, h)
        _, w, ids = self.block.gate(x)
        ex = self.block.experts
        t, k = ids.shape
        y = torch.zeros(t, k, h, dtype=x.dtype)
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            gate, up = F.linear(x[tok], ex.gate_up_proj[e]).chunk(2, dim=-1)
            y[tok, slot] = F.linear(ex.act_fn(gate) * up, ex.down_proj[e])
        y = y * w[..., None].to(y.dtype)
        keep = torch.ones(t, k, dtype=torch.bool) if self.rule is None else self.rule(w, y)
        self.dropped += int((~keep).sum())
        self.slots += keep.numel()
        return (y * keep[..., None]).sum(1).reshape(b, s, h)


def top_p(p):
    def rule(w, y):
        order = w.argsort(-1, descending=True)
        ws = w.gather(-1, order)
        before = ws.cumsum(-1) - ws  # weight of the higher slots
        keep_sorted = before < p * w.sum(-1, keepdim=True)
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return rule


def threshold(beta):
    return lambda w, y: w >= beta * w.max(-1, keepdim=True).values


def oracle(beta):
    def rule(w, y):
        n = y.norm(dim=-1)
        return n >= beta * n.max(-1, keepdim=True).values
    return rule


def oracle_error(beta):
    """Per token, drop the slots of smallest output norm, in that order, as long as what is dropped, summed, stays
    within ``beta`` x the norm of the block's full output (cancellations between slots counted)."""
    def rule(w, y):
        total = y.sum(1).norm(dim=-1, keepdim=True)  # [T, 1]
        order = y.norm(dim=-1).argsort(-1)  # ascending
        dropped = y.gather(1, order[..., None].expand_as(y)).cumsum(1).norm(dim=-1)  # [T, k]: first j+1 dropped
        ok = (dropped <= beta * total).cumprod(-1).bool()  # a prefix of the ascending order
        return torch.ones_like(ok).scatter(-1, order, ~ok)
    return rule


def run(model, blocks, windows, rule, batch: int = 8):
    """(KL(original || model) over all predicted positions, skipped share) with ``rule`` in every block."""
    for bl in blocks:
        bl.rule, bl.dropped, bl.slots = rule, 0, 0
    kl_sum, n = 0.0, 0
    for ids, ref in windows:
        for i in range(0, ids.shape[0], batch):
            logp = F.log_softmax(model(ids[i:i + batch]).logits.float(), -1)  # every position, as eval counts
            r = ref[i // batch]
            kl_sum += float(F.kl_div(logp, r, log_target=True, reduction="none").sum(-1).double().sum())
            n += logp.shape[0] * logp.shape[1]
    return kl_sum / n, sum(b.dropped for b in blocks) / sum(b.slots for b in blocks)


def calibrate(model, blocks, windows, make, lo, hi, target, increasing: bool, steps: int = 12):
    """Bisect the rule's parameter for a skipped share of ``target`` (``increasing``: the share grows with it)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        kl, skip = run(model, blocks, windows, make(mid))
        if best is None or abs(skip - target) < abs(best[2] - target):
            best = (mid, kl, skip)
        if (skip < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zeda_oracle_bound.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wide", help="a Qwen3-MoE folder, or a demo variant name (wide, demo)")
    ap.add_argument("--skip", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="bisection steps per rule")
    ap.add_argument("--seed", type=int, default=1234, help="window seed (moecompress eval's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from moecompress.evals.data import DEFAULT_DATA, build_windows, load_tokenizer

    path = Path(args.model)
    if not path.is_dir():
        from moecompress.demo_model import demo_model_path

        path = demo_model_path(variant=args.model)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = load_tokenizer(path, required=True)
    wins, _ = build_windows(list(DEFAULT_DATA), tok, args.samples, args.seq_len, args.seed, model.config.vocab_size)
    t0 = time.perf_counter()
    windows = []
    with torch.no_grad():
        for w in wins.values():  # the reference: the model's own blocks
            ids = w.input_ids
            ref = [F.log_softmax(model(ids[i:i + 8]).logits.float(), -1) for i in range(0, ids.shape[0], 8)]
            windows.append((ids, ref))
        blocks = []
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp = RuleMoE(layer.mlp)
                blocks.append(layer.mlp)
        kl0, skip0 = run(model, blocks, windows, None)
        # the replacement, dropping nothing, computes what the model's blocks did (to float rounding)
        if not (skip0 == 0 and kl0 < 1e-6):
            raise SystemExit(f"the rule blocks do not reproduce {type(blocks[0].block).__name__}: KL {kl0:.3g}")
        rows = {}
        for name, make, lo, hi, inc in (("top-p", top_p, 0.0, 1.0, False), ("threshold", threshold, 0.0, 1.0, True),
                                        ("oracle", oracle, 0.0, 1.0, True), ("oracle-error", oracle_error, 0.0, 2.0, True)):
            param, kl, skip = calibrate(model, blocks, windows, make, lo, hi, args.skip, inc, args.steps)
            rows[name] = {"param": param, "kl": kl, "skip": skip}
            print(f"{name:>9}: parameter {param:.4f} -> skipped {100 * skip:.1f}% of slots, mean KL {kl:.5f}", flush=True)
    best_rule = min(("top-p", "threshold"), key=lambda r: rows[r]["kl"])
    best_oracle = min(("oracle", "oracle-error"), key=lambda r: rows[r]["kl"])
    ratio = rows[best_oracle]["kl"] / rows[best_rule]["kl"]
    print(f"best oracle ({best_oracle}) / best rule ({best_rule}): {ratio:.3f} at ~{100 * args.skip:.0f}% skipped "
          f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "skip": args.skip, "rows": rows,
                                         "oracle_over_best_rule": ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
