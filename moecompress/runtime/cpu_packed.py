"""Quantized linears that stay packed on the CPU: memory about the checkpoint's size, and faster decode.

On a CPU the runtime used to dequantize every quantized weight to fp32 at load (4x an int4 checkpoint
plus scales, in RAM). Here each quantized linear keeps its codes and runs one of these ways, chosen
once at load from what the checkpoint holds (``cpu_linear``):

* ``int4pack``: 4-bit, a group of 32/64/128/256 (per-channel too: its scale repeated over groups of 256 or
  less) and N a multiple of 16 -- torch's CPU weight-only kernel
  (``_convert_weight_to_int4pack_for_cpu`` once, ``_weight_int4pack_mm_for_cpu`` per call). It computes
  ``(q - 8) * scale + zero`` with a float ``zero``; ours is ``scale * (q - z)``, so ``zero = (8 - z) *
  scale`` (0 for symmetric weights). Activations, scales and zeros go in as bf16, the products are
  accumulated in fp32 and the output is bf16: the result matches the dequantized fp32 layer to bf16
  precision (~3e-3 relative), not bit for bit. An act-order group index is applied as a column
  permutation of the activations (the weights are stored with their groups contiguous).
* ``int8pack``: 8-bit, symmetric, per-channel -- ``_weight_int8pack_mm`` (bf16 activations and scales).
* ``int8group``: 8-bit in groups (``--bits 8 --group-size 128``, or ``--override ...=8`` beside int4 experts),
  or asymmetric -- the same kernel once per group of columns (the kernel takes one scale per row), the groups'
  bf16 partial products summed in fp32 (zero points: the groups' inputs centred, their means' part one small
  GEMM): ~100x faster than ``codes`` at a 4096 x 2048 decode step, about 2x the per-channel kernel's time.

* ``codes``: anything else (3/2 bits, odd shapes, a torch without the
  kernels), or on request (``exact``): codes (two per byte up to 4 bits) + fp32 scales and uint8 zeros,
  dequantized on every call with the dequantizing reader's own operations and multiplied like
  ``nn.Linear`` -- bit for bit the fp32 path's numbers, at 1/8 (int4) to 1/4 (int8) of its weight memory.

``LazyExpertWeights`` does the same for a transformers experts module (the evaluator's whole-model path):
it replaces the fused ``gate_up_proj``/``down_proj`` parameters, and the eager experts forward dequantizes
only the experts a batch reaches.

The two kernels work row by row; from ``runtime.cpu_gemm.DEQUANT_ROWS`` rows on (a prompt, an expert many
tokens reach) a call instead expands the weight to bf16 and runs one GEMM, where the CPU multiplies bf16 natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gemm

INT4_GROUPS = (32, 64, 128, 256)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return False


HAS_INT4 = _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")
HAS_INT8 = _has_op("_weight_int8pack_mm")


def cpu_kind(bits: int, n: int, k: int, group: int, symmetric: bool) -> str:
    """Which way a ``[n, k]`` weight runs (see the module docstring)."""
    return _kind_and_why(bits, n, k, group, symmetric)[0]


def kernel_group(k: int) -> int | None:
    """The int4 kernel's group for a per-channel weight of ``k`` columns: the largest of INT4_GROUPS dividing
    ``k`` (its one scale and zero repeated over the groups give the same numbers), or None."""
    return next((g for g in sorted(INT4_GROUPS, reverse=True) if k % g == 0), None)


def _kind_and_why(bits: int, n: int, k: int, group: int, symmetric: bool) -> tuple[str, str | None]:
    """(kind, why a weight that could have used a kernel does not)."""
    if bits == 4:
        if not HAS_INT4:
            return "codes", "this torch has no CPU int4 kernel"
        if n % 16:
            return "codes", f"{n} output rows: the int4 kernel needs a multiple of 16"
        if k % group or (group not in INT4_GROUPS and not (group == k and kernel_group(k))):
            return "codes", f"group {group}: the int4 kernel takes 32/64/128/256 (or per-channel)"
        return "int4pack", None
    if bits == 8:
        if not HAS_INT8:
            return "codes", "this torch has no CPU int8 kernel"
        if k % group or group % 16:  # the kernel gives wrong numbers (or crashes) for a K not a multiple of 16
            return "codes", f"group {group} of {k} columns: the int8 kernel needs a multiple of 16 columns"
        return ("int8pack" if group == k and symmetric else "int8group"), None
    return "codes", f"{bits}-bit: no CPU kernel"


class CpuQuantLinear(nn.Module):
    """``y = x @ W^T (+ b)`` with ``W = scale * (q - z)`` kept packed; ``x`` and ``y`` in the caller's dtype."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None, symmetric: bool = False,
                 exact: bool = False):
        """``exact``: always the ``codes`` way (fp32 math: the dequantized path's numbers, slower)."""
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features, self.bits, self.group_size = k, n, bits, group_size
        self.kind, self.why = ("codes", None) if exact else _kind_and_why(bits, n, k, group_size, symmetric)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("perm", None)
        # int8group with zero points, fp32: zq = z - 128 ([G, N] integers); zd [2G, N] = scale * sum over the group
        # of (q - z), then (128 - z) * the kernel's bf16 scale (see int8group_mm)
        self.register_buffer("zq", None)
        self.register_buffer("zd", None)
        if g_idx is not None:  # act-order: put every group's columns together, permute x to match
            order = torch.argsort(g_idx.long(), stable=True)
            if torch.equal(order, torch.arange(k)):
                g_idx = None
            elif torch.equal(g_idx.long()[order], torch.arange(k) // group_size):
                self.perm, q, g_idx = order, q[:, order], None
        self.register_buffer("g_idx", None if g_idx is None else g_idx.long())
        if self.kind == "codes" and self.perm is not None:  # exact: the natural column order, no permutation
            q = torch.empty_like(q).index_copy_(1, self.perm, q)
            self.g_idx, self.perm = g_idx_of(self.perm, group_size), None
        if self.kind == "int4pack" and g_idx is None:
            if group_size not in INT4_GROUPS:  # per-channel: the row's scale and zero repeated per kernel group
                self.group_size = group_size = kernel_group(k)
                scales, zeros = (t.repeat_interleave(k // group_size, dim=1) for t in (scales, zeros))
            z = zeros.float()
            sz = torch.stack([scales.float().t(), ((8.0 - z) * scales.float()).t()], dim=-1)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            self.register_buffer("sz", sz.to(torch.bfloat16).contiguous())
        elif self.kind == "int8pack" and g_idx is None:
            self.register_buffer("packed", (q.to(torch.int16) - 128).to(torch.int8).contiguous())
            self.register_buffer("sz", scales.reshape(n).to(torch.bfloat16).contiguous())
        elif self.kind == "int8group" and g_idx is None:  # [G, N, group] and [G, N]: one kernel call per group
            g = k // group_size
            codes = (q.to(torch.int16) - 128).to(torch.int8).reshape(n, g, group_size)
            self.register_buffer("packed", codes.permute(1, 0, 2).contiguous())
            self.register_buffer("sz", scales.t().to(torch.bfloat16).contiguous())
            if not symmetric:  # W = s (q - z): see int8group_mm
                zf = zeros.float()
                self.register_buffer("zq", (zf - 128.0).t().contiguous())
                sums = (q.float().reshape(n, g, group_size).sum(-1) - group_size * zf) * scales.float()
                shift = (128.0 - zf) * scales.to(torch.bfloat16).float()
                self.register_buffer("zd", torch.cat([sums.t(), shift.t()]).contiguous())
        else:
            if self.kind != "codes" and self.why is None:  # a kernel kind, but the columns do not group evenly
                self.why = "act-order group index with groups of unequal size: no kernel layout"
            self.kind = "codes"
            self.register_buffer("packed", pack_codes(q, bits))
            self.register_buffer("scales", scales.float().contiguous())
            self.register_buffer("zeros", zeros.to(torch.uint8).contiguous())

        # many rows at once: dequantize to bf16 and one GEMM (runtime.cpu_gemm), where this CPU allows it
        self._dequant_ok = cpu_gemm.dequant_rows_ok(self.kind, n, k)

    def weight(self) -> torch.Tensor:
        """The dequantized fp32 ``[N, K]`` (natural column order): the reference these kernels approximate."""
        if self.kind == "codes":
            w = self._dequant_codes()
        else:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            w = self._packed_mm(eye).float().t()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    def _dequant_codes(self) -> torch.Tensor:
        return dequant(unpack_codes(self.packed, self.bits, self.in_features), self.scales, self.zeros, self.g_idx,
                       self.group_size)

    def _packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        fn, args = self._kernel_call()
        return fn(x2, *args)

    def _kernel_call(self) -> tuple:
        """``(fn, args)``: ``fn(x2, *args)`` is this linear's torch kernel on bf16 ``x2 [M, K]``."""
        return kernel_call(self.kind, self.packed, self.group_size, self.sz, self.zd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if self.kind == "codes":  # what nn.Linear computes on the dequantized weight, bit for bit
            return F.linear(x, self._dequant_codes().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x2.to(torch.bfloat16).contiguous()
        if x2.shape[0] >= cpu_gemm.DEQUANT_ROWS and self._dequant_ok \
                and not (x2.requires_grad and torch.is_grad_enabled()):  # inference only (out= GEMMs)
            y = cpu_gemm.dequant_mm(self.kind, x2, self.packed, self.group_size, self.sz, self.zq).to(x.dtype)
        else:
            y = self._packed_mm(x2).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"kind={self.kind}" + (", act-order" if self.perm is not None or self.g_idx is not None else ""))


def kernel_call(kind: str, packed: torch.Tensor, group_size: int, sz: torch.Tensor,
                zd: torch.Tensor | None = None) -> tuple:
    """``(fn, args)``: ``fn(x2, *args)`` runs torch's CPU weight-only kernel of ``kind`` ("int4pack", "int8pack"
    or "int8group", with ``zd`` its zero points' part) on bf16 ``x2 [M, K]``."""
    if kind == "int4pack":
        return torch.ops.aten._weight_int4pack_mm_for_cpu, (packed, group_size, sz)
    if kind == "int8group":
        return int8group_mm, (packed, sz, zd)
    return torch.ops.aten._weight_int8pack_mm, (packed, sz)


def int8group_mm(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor,
                 zd: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` for group-wise int8 ``packed [G, N, group]`` (``c = q - 128``) with scales ``sz [G, N]``:
    the per-channel kernel on each group's columns, the bf16 partial products summed in fp32; out in ``x2``'s dtype.

    With zero points (``W = s (q - z)``; ``zd [2G, N]`` fp32: ``s * sum_group (q - z)``, then ``(128 - z) * s``) the
    kernel takes each group's inputs minus their mean ``m``, rounded to bf16 (``x'``, summing to ``r``, near 0):
    ``(x' + m) . (q - z) s = x' . c s + r (128 - z) s + m sum(q - z) s``, the last two one small GEMM. Without the
    centring, a group's partial product would carry ``(z - 128) sum(x)`` -- large for activations with a mean --
    and lose the result in its bf16 rounding; without the ``r`` term, the rounding of the centred inputs (whose
    errors need not cancel) would be multiplied by ``(128 - z) s`` -- up to 1e-2 relative at decode."""
    g, _, group = packed.shape
    xs, coef = x2, None
    if zd is not None:
        x3 = x2.float().reshape(x2.shape[0], g, group)
        mean = x3.mean(-1)
        xs = (x3 - mean.unsqueeze(-1)).reshape(x2.shape).to(x2.dtype)
        coef = torch.cat([mean, xs.float().reshape(x2.shape[0], g, group).sum(-1)], dim=-1)
    y = None
    for j in range(g):
        part = torch.ops.aten._weight_int8pack_mm(xs[:, j * group:(j + 1) * group].contiguous(), packed[j], sz[j])
        y = part.float() if y is None else y.add_(part)
    if coef is not None:
        y.add_(coef @ zd.float())
    return y.to(x2.dtype)


def g_idx_of(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """The group index of each natural column when ``perm`` lists the columns group by group."""
    g = torch.empty_like(perm)
    g[perm] = torch.arange(perm.numel()) // group_size
    return g


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., K]``, two per byte (low nibble first) when they fit in 4 bits and K is even."""
    q = q.to(torch.uint8)
    if bits <= 4 and q.shape[-1] % 2 == 0:
        return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    return q.contiguous()


def unpack_codes(p: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    if p.shape[-1] == k:
        return p
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(*p.shape[:-1], k)


def dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
            group_size: int) -> torch.Tensor:
    """``W = scale * (q - z)`` in fp32 -- the very operations of ``QuantizedWeight.dequantize``, so the
    result is bit-identical to the weights the dequantizing reader gives."""
    gi = g_idx if g_idx is not None else torch.arange(q.shape[-1]) // group_size
    return scales.float()[..., gi] * (q.float() - zeros.float()[..., gi])


class LazyExpertWeights(nn.Module):
    """Stands in for a fused experts parameter (``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) of a
    transformers experts module: packed codes, and ``self[e]`` dequantizes expert ``e`` when the eager
    experts forward asks for it -- the same fp32 values as the dequantized checkpoint, so the model's
    numbers do not change, at about the packed checkpoint's memory. ``parts``: row blocks (gate, up)
    stacked over the experts, each ``(codes [E, n, K], scales [E, n, G], zeros [E, n, G], g_idx [E, K] | None)``."""

    def __init__(self, parts: list[tuple], bits: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.k = parts[0][0].shape[-1]
        self.n_parts = len(parts)
        for j, (q, s, z, g) in enumerate(parts):
            self.register_buffer(f"q{j}", pack_codes(q, bits))
            self.register_buffer(f"s{j}", s.float().contiguous())
            self.register_buffer(f"z{j}", z.to(torch.uint8).contiguous())
            self.register_buffer(f"g{j}", None if g is None else g.long())
        self.shape = torch.Size([parts[0][0].shape[0], sum(p[0].shape[1] for p in parts), self.k])

    def __getitem__(self, e) -> torch.Tensor:
        e = int(e)
        rows = [dequant(unpack_codes(getattr(self, f"q{j}")[e], self.bits, self.k), getattr(self, f"s{j}")[e],
                        getattr(self, f"z{j}")[e], None if getattr(self, f"g{j}") is None else getattr(self, f"g{j}")[e],
                        self.group_size) for j in range(self.n_parts)]
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, bits={self.bits}, group={self.group_size}, parts={self.n_parts}"


class CpuExperts(nn.Module):
    """Routed experts as packed linears: ``gate_up[e]`` (``[2I, H]``) and ``down[e]`` (``[H, I]``)."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.use_kernels = False

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_lists", None)  # kernel arguments of the tensors before .to()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over each token's experts of ``weight * expert(x)``; ids >= E (zero experts) touch nothing."""
        t, k = ids.shape
        e = self.num_experts
        if t == 1:
            return self.forward_one(x, ids[0].tolist(), weights[0].tolist())
        out = torch.zeros_like(x)
        from .moe import expert_groups

        flat_w = weights.reshape(-1)
        for ex, slots, tok in expert_groups(ids, e):
            gate, up = self.gate_up[ex](x[tok]).chunk(2, dim=-1)
            y = self.down[ex](F.silu(gate) * up) * flat_w[slots, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out

    def forward_one(self, x: torch.Tensor, ids: list[int], weights: list[float]) -> torch.Tensor:
        """One token, its routing as lists (``MoEBlock``'s decode fast path). When every expert runs a
        torch kernel (int4pack/int8pack, no act-order permutation, no bias), the token goes to bf16 once and
        each expert costs six small ops: its two kernel calls, the SiLU gate in bf16 (what the down kernel
        takes anyway) and the weighted add into the fp32 output -- at decode on a CPU the per-op cost, not
        the weight reads, is what small experts spend their time on."""
        out = torch.zeros_like(x)
        lists = self.__dict__.get("_lists")
        if lists is None:
            kernels = all(isinstance(m, CpuQuantLinear) and m.kind != "codes" and m.perm is None and m.bias is None
                          for m in (*self.gate_up, *self.down))
            # per expert, each kernel call's function and arguments, read off the modules once (their
            # buffer lookups would cost about as much as the kernels at this size); ``.to()`` drops them
            calls = [(m._kernel_call(), n._kernel_call()) for m, n in zip(self.gate_up, self.down)] if kernels else None
            lists = self.__dict__["_lists"] = (list(self.gate_up), list(self.down), calls)
        gate_up, down, calls = lists
        if calls is not None:
            xb = x.reshape(1, -1).to(torch.bfloat16)
            for ex, wj in zip(ids, weights):
                if ex < self.num_experts:
                    (f13, a13), (f2, a2) = calls[ex]
                    gate, up = f13(xb, *a13).chunk(2, dim=-1)
                    out.add_(f2(F.silu(gate).mul_(up), *a2), alpha=wj)  # both [1, H]
            return out
        for ex, wj in zip(ids, weights):
            if ex < self.num_experts:
                gate, up = gate_up[ex](x).chunk(2, dim=-1)
                out.add_(down[ex](F.silu(gate) * up), alpha=wj)
        return out


def packed_bytes(module: nn.Module) -> int:
    """Bytes of every buffer and parameter under ``module`` (what the packed model holds)."""
    return sum(t.numel() * t.element_size() for t in list(module.buffers()) + list(module.parameters()))
