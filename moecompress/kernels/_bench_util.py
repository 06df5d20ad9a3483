"""Helpers of ``python -m moecompress.kernels.bench``: shapes, inputs, the traffic model, timing,
the torch bf16 grouped baseline. Pure torch (no triton): the CPU smoke run never needs a kernel."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Shape:
    """One MoE layer: E routed experts, top-k, hidden size H, expert intermediate size I."""

    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int
    renormalize: bool = True


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen3-30b-a3b", 128, 8, 2048, 768, True),
        Shape("mixtral-8x7b", 8, 2, 4096, 14336, True),
        Shape("deepseek-v2-lite", 64, 6, 2048, 1408, False),
        Shape("cpu-smoke", 8, 2, 256, 128, True),
    )
}
GPU_SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite")
GPU_TOKENS = (1, 16, 64, 256, 1024, 4096)
CPU_SHAPES = ("cpu-smoke",)
CPU_TOKENS = (1, 7, 33)
WDTYPES = ("bf16", "int8", "int4")


def parse_shapes(text: str) -> list[Shape]:
    """Comma-separated names of SHAPES, or custom ``E:K:H:I`` specs (experts, top-k, hidden, inter)."""
    out = []
    for item in _items(text, "--shapes"):
        if item in SHAPES:
            out.append(SHAPES[item])
            continue
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"unknown shape {item!r}: choose from {', '.join(SHAPES)} or give E:K:H:I")
        e, k, h, i = map(int, parts)
        if k > e or h % 32 or i % 32:
            raise UserError(f"shape {item!r}: need top-k <= experts and hidden/inter multiples of 32")
        out.append(Shape(item, e, k, h, i))
    return out


def parse_tokens(text: str) -> list[int]:
    out = []
    for item in _items(text, "--tokens"):
        if not item.lstrip("-").isdigit() or int(item) <= 0:
            raise UserError(f"--tokens: {item!r} is not a positive integer")
        out.append(int(item))
    return out


def parse_dtypes(text: str) -> list[str]:
    out = _items(text, "--dtypes")
    bad = [d for d in out if d not in WDTYPES]
    if bad:
        raise UserError(f"--dtypes: unknown weight dtype {bad[0]!r}; choose from {', '.join(WDTYPES)}")
    return sorted(set(out), key=WDTYPES.index)  # bf16 first: the int rows' speedup refers to it


def _items(text: str, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    return items


def group_for(group_size: int, k: int) -> int:
    """The group size used for input dimension k (``group_size == 0``: per-channel, one group of k)."""
    return k if group_size == 0 else group_size


def experts_hit(topk_ids: torch.Tensor, num_experts: int) -> int:
    """How many distinct real experts (ids in ``[0, num_experts)``) the routing sends any token to."""
    ids = topk_ids.reshape(-1)
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return int(torch.unique(ids).numel())


def moved_bytes(shape: Shape, tokens: int, n_hit: int, wdtype: str, group_size: int, asym: bool,
                act_bytes: int = 2, scale_bytes: int = 2) -> int:
    """Minimum HBM traffic of one MoE layer call: the weights of the experts hit (gate_up ``[2I, H]`` +
    down ``[H, I]`` each; quantized: packed codes + bf16 scales + uint8 zeros when asymmetric) plus the
    activations in and out ``[T, H]``. Kernel-internal scratch (the ``[T*k, I]`` / ``[T*k, H]`` buffers)
    and the routing tensors are not counted: this is what any implementation must move."""
    h, i = shape.hidden, shape.inter
    params = 3 * h * i
    if wdtype == "bf16":
        per_expert = params * 2
    else:
        bits = int(wdtype[3:])
        groups = 2 * i * (h // group_for(group_size, h)) + h * (i // group_for(group_size, i))
        per_expert = params * bits // 8 + groups * (scale_bytes + (1 if asym else 0))
    return n_hit * per_expert + 2 * tokens * h * act_bytes


def moe_flops(shape: Shape, tokens: int) -> int:
    """2 * T * k * (gate + up + down) * H * I."""
    return 2 * tokens * shape.top_k * 3 * shape.hidden * shape.inter


def make_weights(shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded bf16 ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, drawn on the device (a Mixtral layer's 1.4G
    parameters would take a CPU generator several seconds)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, generator=gen, device=device, dtype=torch.bfloat16).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, generator=gen, device=device, dtype=torch.bfloat16).mul_(i**-0.5)
    return w13, w2


def make_inputs(shape: Shape, tokens: int, seed: int, device: torch.device, zero_frac: float = 0.0):
    """Seeded ``(x bf16 [T, H], topk_weights fp32 [T, k], topk_ids int32 [T, k])``: random router logits,
    softmax top-k (kernels.routing.route_torch). Drawn on the CPU so every device sees the same routing.

    ``zero_frac`` s: the ``round(s * k)`` lowest-weight slots of every token go to the zero expert (id E,
    weight kept), as a zero-expert model routes them: the same x and real-expert choices as s = 0, minus
    the skipped slots."""
    from .routing import route_torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    x = torch.randn(tokens, shape.hidden, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, shape.experts, generator=gen)
    w, ids = route_torch(logits, shape.top_k, renormalize=shape.renormalize)
    n_zero = zero_slots(shape.top_k, zero_frac)
    if n_zero:  # route_torch sorts each token's slots by weight, best first
        ids[:, shape.top_k - n_zero:] = shape.experts
    return x.to(device), w.to(device), ids.to(device)


def zero_slots(top_k: int, zero_frac: float) -> int:
    """Slots per token on the zero expert at skip share ``zero_frac``."""
    return int(round(zero_frac * top_k))


def parse_zero_fracs(text: str) -> list[float]:
    out = []
    for item in _items(text, "--zero-frac"):
        try:
            v = float(item)
        except ValueError:
            v = -1.0
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--zero-frac: {item!r} is not a share in [0, 1]")
        out.append(v)
    return sorted(set(out))


class Timer:
    """Median time of a call in microseconds.

    CUDA: one pair of torch.cuda.Events around each call, with a write of ``flush_bytes`` (larger than
    L2) before each so that no call finds the weights of the previous one in cache. CPU:
    time.perf_counter, no flush.
    """

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device) if self.cuda else None

    def __call__(self, fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in ev:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) * 1e3 for start, end in ev)


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int) -> float:
    """Device-to-device ``Tensor.copy_`` bandwidth in GB/s, counting read + write bytes."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (us * 1e-6) / 1e9


def torch_grouped_moe(x, w13, w2, topk_weights, topk_ids, use_grouped_mm: bool) -> torch.Tensor:
    """bf16 MoE the plain-torch way: sort the slots by expert, gate_up GEMM per expert group, SiLU*up,
    down GEMM, weight and sum back per token (fp32 accumulation). ``use_grouped_mm``: both GEMMs are one
    ``torch._grouped_mm`` each; else a Python loop over the non-empty experts (one host sync)."""
    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    flat = topk_ids.reshape(-1).long()
    slot = torch.arange(flat.numel(), device=flat.device)
    real = flat < e
    if not bool(real.all()):  # zero-expert slots (ids >= E): no work, as in fused_moe
        slot, flat = slot[real], flat[real]
    order = flat.argsort(stable=True)
    slot = slot[order]
    tok = slot // k
    xs = x[tok]
    counts = torch.bincount(flat, minlength=e)
    if use_grouped_mm:
        offs = counts.cumsum(0).to(torch.int32)
        gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        act = torch.nn.functional.silu(gu[:, : two_i // 2]) * gu[:, two_i // 2:]
        y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    else:
        y = torch.empty(xs.shape[0], h, dtype=x.dtype, device=x.device)
        start = 0
        for ex, n in enumerate(counts.tolist()):
            if n:
                gu = xs[start:start + n] @ w13[ex].T
                act = torch.nn.functional.silu(gu[:, : two_i // 2]) * gu[:, two_i // 2:]
                y[start:start + n] = act @ w2[ex].T
                start += n
    y = y.float() * topk_weights.reshape(-1)[slot].float()[:, None]
    return torch.zeros(t, h, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (inf when actual has non-finite values)."""
    a, e = actual.float(), expected.float()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30) if e.numel() else 0.0


def pick_grouped(x, w13, w2, topk_weights, topk_ids) -> tuple[bool, str]:
    """Use torch._grouped_mm when this torch has it, it runs here, and it agrees with the loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "loop (no torch._grouped_mm)"
    try:
        got = torch_grouped_moe(x, w13, w2, topk_weights, topk_ids, True)
    except Exception as exc:  # unsupported device/arch/alignment in this torch build
        return False, f"loop (torch._grouped_mm failed: {type(exc).__name__})"
    err = rel_err(got, torch_grouped_moe(x, w13, w2, topk_weights, topk_ids, False))
    if err > 2e-2:
        return False, f"loop (torch._grouped_mm disagrees: rel err {err:.1e})"
    return True, "grouped_mm"
