"""Tune the fused MoE's tile configs on this device and write them where the launcher finds them.

    python -m moecompress.kernels.tune                                  # Qwen3-30B-A3B shape, int4/int8/bf16
    python -m moecompress.kernels.tune --shapes qwen3-30b-a3b,mixtral-8x7b --tokens 1,16,64,256
    python -m moecompress.kernels.tune --dry-run --json tuned.json      # measure, print, write nothing

For every (weight dtype, token bucket) it times each candidate of a grid of tile configs (median of
device-event timings with an L2 flush, as the benchmark does), checks the fastest against the torch
twin, and stores it in ``moecompress/kernels/configs/fused_moe.json`` under this device's name and the key the
launcher looks up (``<dense|int4|int8>:<token bucket>``), merged into what the file already holds.
Shapes that share a bucket key keep the config that is fastest summed over them, so the table
stays keyed as the launcher reads it. On CPU (TRITON_INTERPRET=1) it runs a two-candidate grid on the
smoke shape to test itself: the timings there mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from ..errors import UserError
from . import _bench_util as bu
from . import _common
from .tuning import CONFIG_DIR, token_bucket

FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def candidates(tokens: int, top_k: int, experts: int, quick: bool) -> list[dict]:
    """The grid for one token count: BLOCK_M no larger than the rows an expert can get (but >= 16)."""
    if quick:
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)]
    rows = max(16, _common.next_pow2(-(-tokens * top_k // max(1, min(experts, tokens * top_k)))))
    out = []
    for bm, bn, bk, gm, warps, stages in itertools.product(
            (16, 32, 64, 128), (32, 64, 128, 256), (64, 128, 256), (1, 8), (4, 8), (2, 3, 4)):
        if bm > max(16, rows * 2) or (bm >= 64 and bn >= 256 and bk >= 256):
            continue  # tiles no expert can fill; or too large for shared memory
        if warps == 8 and bm * bn < 64 * 128:
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages))
    if tokens <= 16:  # decode: few experts' serial K loops can leave the GPU idle; split them (fused_moe SPLIT_K)
        out += [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=stages, SPLIT_K=sk)
                for bn, bk, stages, sk in itertools.product((32, 64, 128, 256), (64, 128, 256), (2, 3), (2, 4))]
    return out


def _kind(wdtype: str) -> str:
    return "dense" if wdtype == "bf16" else wdtype


def tune(shapes, tokens, wdtypes, *, device: torch.device, group_size: int = 128, quick: bool = False,
         warmup: int = 3, iters: int = 20, log=print, timer=None) -> dict[str, dict]:
    """``{"<kind>:<bucket>": {"config": ..., "us": ..., "per_shape": ...}}``: the fastest config per key.

    ``timer(fn, warmup, iters) -> microseconds`` (default: the benchmark's device-event timer)."""
    from .bench import _quantized
    from .fused_moe import fused_moe, fused_moe_torch

    timer = timer or bu.Timer(device)
    runs: dict[str, list[dict[str, float]]] = {}  # key -> per (shape, tokens): config json -> microseconds
    per_shape: dict[str, dict] = {}
    for si, shape in enumerate(shapes):
        w13, w2 = bu.make_weights(shape, device, seed=si)
        for wdtype in wdtypes:
            a, b = (w13, w2) if wdtype == "bf16" else _quantized(w13, w2, wdtype, group_size, False)
            for t in tokens:
                key = f"{_kind(wdtype)}:{token_bucket(t)}"
                x, tw, ids = bu.make_inputs(shape, t, seed=si, device=device)
                out = torch.empty_like(x)
                results = {}
                for cfg in candidates(t, shape.top_k, shape.experts, quick):
                    try:
                        call = lambda: fused_moe(x, a, b, tw, ids, config=cfg, out=out)  # noqa: E731
                        call.config = cfg
                        us = timer(call, warmup, iters)
                    except Exception as e:  # out of shared memory, a tile the compiler rejects: skip it
                        log(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        continue
                    results[json.dumps(cfg, sort_keys=True)] = us
                if not results:
                    raise UserError(f"no candidate config ran for {shape.name} {wdtype} {t} tokens")
                best = min(results, key=results.get)
                err = bu.rel_err(fused_moe(x, a, b, tw, ids, config=json.loads(best)), fused_moe_torch(x, a, b, tw, ids))
                if not err < 2e-2:
                    raise RuntimeError(f"{shape.name} {wdtype} t={t}: tuned config {best} is wrong (rel err {err:.2e})")
                log(f"{shape.name:>18} {wdtype:>5} t={t:<5} {key:>10}: {results[best]:9.1f} us  {best}"
                    f"  ({len(results)} configs; rel err {err:.1e})")
                runs.setdefault(key, []).append(results)
                per_shape.setdefault(key, {})[f"{shape.name}:t{t}"] = {"config": json.loads(best), "us": results[best]}
        del w13, w2
    out = {}
    for key, results in runs.items():
        common = set.intersection(*(set(r) for r in results))  # configs that ran everywhere under this key
        if not common:
            raise UserError(f"{key}: no candidate config ran for every shape and token count")
        total = {c: sum(r[c] for r in results) for c in common}
        best = min(total, key=total.get)
        out[key] = {"config": json.loads(best), "us": total[best], "per_shape": per_shape[key]}
    return out


def write_configs(tuned: dict[str, dict], device_name: str, path: Path) -> dict:
    """Merge ``tuned`` into the config file at ``path`` under ``device_name`` (other entries kept)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault(device_name, {})
    for key, res in tuned.items():
        cfg = res["config"]
        entries[key] = {k: cfg[k] for k in FIELDS} | ({"SPLIT_K": cfg["SPLIT_K"]} if cfg.get("SPLIT_K", 1) > 1 else {})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(bu.SHAPES)} or E:K:H:I")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,16,64,256,1024,4096)")
    ap.add_argument("--dtypes", default=None, help="comma-separated weight dtypes (default int4,int8,bf16)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--config-file", type=Path, default=CONFIG_DIR / "fused_moe.json")
    ap.add_argument("--dry-run", action="store_true", help="measure and print; write no config")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    args = ap.parse_args(argv)
    try:
        cuda = torch.cuda.is_available() and not _common.interpreting()
        if not cuda and not _common.interpreting():
            raise UserError("tuning needs a CUDA device (or TRITON_INTERPRET=1 for the CPU self-test)")
        device = torch.device("cuda" if cuda else "cpu")
        shapes = bu.parse_shapes(args.shapes or ("qwen3-30b-a3b" if cuda else "cpu-smoke"))
        tokens = bu.parse_tokens(args.tokens or ("1,16,64,256,1024,4096" if cuda else "1,7,33"))
        dtypes = bu.parse_dtypes(args.dtypes or ("int4,int8,bf16" if cuda else "int4"))
        tuned = tune(shapes, tokens, dtypes, device=device, group_size=args.group_size,
                     quick=not cuda, iters=args.iters if cuda else 2, warmup=3 if cuda else 1)
        name = _common.device_name(device)
        if args.json:
            args.json.write_text(json.dumps({"device": name, "tuned": tuned}, indent=2) + "\n")
        if not args.dry_run:
            write_configs(tuned, name, args.config_file)
            print(f"wrote {len(tuned)} configs for '{name}' into {args.config_file}")
    except (UserError, OSError) as e:  # OSError: a config or --json path we cannot write
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
