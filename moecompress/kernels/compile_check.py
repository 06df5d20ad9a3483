"""Compile the kernels ahead of time for a CUDA arch on a machine without a GPU.

The CPU interpreter checks what a kernel computes, not whether it compiles: a construct the
interpreter accepts can still fail in triton's code generator or in ptxas. This builds each kernel
variant through the full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with triton's bundled
ptxas), specialized the way a real launch is (pointers and 16-divisible ints carry
tt.divisibility=16, ints equal to 1 become constants) so that vectorization/pipelining decisions
match.

    python -m moecompress.kernels.compile_check            # representative subset (~1 min)
    python -m moecompress.kernels.compile_check --all      # every variant (several minutes)

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled); exits non-zero on
the first failure, naming the variant.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_BF16, _FP16, _FP32, _U8, _I32, _I64 = "bf16", "fp16", "fp32", "u8", "i32", "i64"


def _variants(full: bool):
    """(kernel module attr, args, num_warps, num_stages) tuples; args map param name -> pointer
    dtype string ("*bf16"), example int/float, or constexpr value."""
    from . import fused_moe as fm, quant_matmul as qm, rmsnorm as rn, routing as rt

    pick = (lambda xs: xs) if full else (lambda xs: xs[:1])
    adts = [_BF16, _FP16, _FP32]
    moe = []
    for adt, bits, has_zp, gate_up, tiles, partial in itertools.product(
        adts, [0, 4, 8], [False, True], [True, False], [(16, 64, 256), (64, 128, 64)], [False, True]
    ):
        if (bits == 0 and has_zp) or (partial and tiles[0] != 16):
            continue  # split-K is for decode tiles
        bm, bn, bk = tiles
        chunk = bk if bits == 0 else (128 if bk >= 128 else 32)
        moe.append((fm._moe_gemm_kernel, dict(
            a_ptr="*" + adt, stride_am=1024, stride_ak=1,
            w_ptr="*" + (_U8 if bits else adt), stride_we=1 << 20, stride_wn=512, stride_wk=1,
            s_ptr="*" + adt, stride_se=4096, stride_sn=16, stride_sg=1,
            z_ptr="*" + _U8, stride_ze=4096, stride_zn=16, stride_zg=1,
            c_ptr="*" + (_FP32 if partial else adt), stride_cm=512, stride_cn=1, stride_cs=4096 if partial else 0,
            rw_ptr="*" + _FP32, sorted_ids_ptr="*" + _I32, expert_ids_ptr="*" + _I32, n_post_ptr="*" + _I32,
            num_slots=7, N=7, K=1024, k_per_split=256 if partial else 1024, group_size=128, num_pid_m=7,
            A_ROW_DIV=8 if gate_up else 1, GATE_UP=gate_up, MUL_ROUTING_WEIGHT=not gate_up, PARTIAL=partial,
            BITS=bits, HAS_ZP=has_zp, CHUNK=chunk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            FP32_IEEE=adt == _FP32, UPCAST_DOT=False,
        ), 4, 4 if bm == 16 else 3))
    if not full:  # bf16 activations: dense, int4 sym/asym, int8, both GEMMs, decode and prefill tiles
        moe = [v for v in moe if v[1]["a_ptr"] == "*bf16" and (v[1]["BITS"] != 8 or not v[1]["HAS_ZP"])]
        moe = [v for v in moe if (v[1]["BLOCK_M"] == 16 or v[1]["BITS"] == 4)
               and (not v[1]["PARTIAL"] or (v[1]["BITS"] == 4 and not v[1]["HAS_ZP"]))]
    out = list(moe)
    for gate_up, odt in pick(list(itertools.product([True, False], [_BF16, _FP32]))):
        out.append((fm._split_sum_kernel, dict(
            p_ptr="*fp32", stride_ps=4096, stride_pm=512, c_ptr="*" + odt, stride_cm=512, stride_cn=1,
            rw_ptr="*fp32", N=7, split=4, GATE_UP=gate_up, MUL_ROUTING_WEIGHT=not gate_up, BLOCK=512,
        ), 4, 3))
    for ident, idt in pick(list(itertools.product([True, False], [_I64, _I32]))):
        out.append((fm._moe_sum_kernel, dict(
            y_ptr="*bf16", stride_ym=512, ids_ptr="*" + idt, stride_it=8, stride_ij=1, out_ptr="*bf16",
            stride_ot=512, x_ptr="*bf16", stride_xm=512, stride_xk=1, rw_ptr="*fp32", H=512, num_experts=7,
            TOP_K=8, BLOCK_H=512, IDENTITY_ZERO=ident,
        ), 4, 3))
    for adt, bits, has_zp, split in (
        list(itertools.product(adts, [4, 8], [False, True], [False, True])) if full
        else [(_BF16, 4, True, True), (_BF16, 8, False, False)]
    ):
        out.append((qm._quant_linear_kernel, dict(
            x_ptr="*" + adt, stride_xm=1024, stride_xk=1, w_ptr="*u8", stride_wn=512, stride_wk=1,
            s_ptr="*" + adt, stride_sn=16, stride_sg=1, z_ptr="*u8", stride_zn=16, stride_zg=1,
            y_ptr="*" + (_FP32 if split else adt), stride_ym=512, stride_yn=1, stride_ysplit=4096 if split else 0,
            M=7, N=7, K_PER_SPLIT=256, K=1024, group_size=128, num_pid_m=7,
            BITS=bits, HAS_ZP=has_zp, CHUNK=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1,
            FP32_IEEE=adt == _FP32, UPCAST_DOT=False,
        ), 4, 4))
    # (sigmoid, bias, (n_group, G_PAD, topk_group), (top_k, K_PAD), group by best expert)
    route_grid = [(s, b, g, k, gm) for s, b, g, k in itertools.product([False, True], [False, True], [(1, 1, 1), (8, 8, 4)],
                                                                        [(1, 2), (8, 8)])
                  for gm in ([False, True] if g[0] > 1 else [False])]
    for sig, bias, groups, (k, kpad), gmax in (route_grid if full else [(False, False, (1, 1, 1), (2, 2), False),
                                                                         (True, True, (8, 8, 4), (8, 8), False),
                                                                         (False, False, (8, 8, 4), (8, 8), True)]):
        ng, gpad, tg = groups
        out.append((rt._route_kernel, dict(
            logits_ptr="*fp32", stride_lt=256, stride_le=1, bias_ptr="*fp32", w_ptr="*fp32", ids_ptr="*i32",
            T=7, E=7, E_REAL=7, GROUP_E=32, scaling=2.5, TOP_K=k, K_PAD=kpad, BLOCK_T=16, BLOCK_E=256,
            SIGMOID=sig, HAS_BIAS=bias, RENORM=True, N_GROUP=ng, G_PAD=gpad, TOPK_GROUP=tg, GROUP_MAX=gmax,
        ), 4, 3))
    for dt, res in (list(itertools.product(adts, [False, True])) if full else [(_BF16, True)]):
        out.append((rn._rmsnorm_kernel, dict(
            x_ptr="*" + dt, stride_x=4096, r_ptr="*" + dt, stride_r=4096, w_ptr="*" + dt, out_ptr="*" + dt,
            stride_o=4096, rout_ptr="*" + dt, stride_ro=4096, H=4096, eps=1e-6, HAS_RESIDUAL=res, BLOCK_H=4096,
        ), 8, 3))
    return out


def _compile(kernel, args: dict, num_warps: int, num_stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = args[p.name]
        if p.is_constexpr or (type(v) is int and v == 1):
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, str) and v.startswith("*"):
            sig[p.name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif type(v) is int:
            sig[p.name] = "i32"
            if v % 16 == 0 and v:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {p.name}={v!r}")
    src = ASTSource(kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every variant, not the representative subset")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90 = H100/H200)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    t0 = time.time()
    variants = _variants(args.all)
    for n, (kernel, kargs, warps, stages) in enumerate(variants, 1):
        consts = {p.name: kargs[p.name] for p in kernel.params if p.is_constexpr}
        try:
            _compile(kernel, kargs, warps, stages, args.arch)
        except Exception as exc:  # report which variant, then fail
            print(f"compile_check: FAILED {kernel.__name__} {consts}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(f"compile_check: compiled {len(variants)} kernel variants for sm_{args.arch} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
