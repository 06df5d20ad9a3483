"""One-token decode attention on the CPU: transformers' standard attention in about fifteen tensor ops.

A decode step of a small model on a CPU is bound by the number of tensor ops, not by arithmetic, and
transformers' attention spends about fifty on one token (three projections, per-head norms, rotary
through ``rotate_half``, the sdpa wrapper's checks, reshapes). For the standard attention -- q/k/v/o
projections, grouped-query heads, optional q/k RMSNorm per head (Qwen3) or over the whole projection
(OLMoE), optional ``clip_qkv``, rotate-half rotary over the full head -- :class:`DecodeAttention` runs a
decode token (one per batch row) as:

* q, k and v in one GEMM against a row-major ``[H, (nq + 2 nk) d]`` matrix (the CPU BLAS's faster layout
  for a row vector); the three projections' weights become views of it, so nothing is stored twice;
* both q/k norms in one ``rms_norm`` and one multiply (per-head weights stacked);
* rotary on q and k together as one batched GEMM with the step's rotary matrix (:class:`RotaryMatrix`,
  made once per step and shared by every layer);
* the new key/value written into the runtime's cache, sdpa over it (grouped heads in the kernel), and
  ``o_proj`` against its row-major transpose.

Everything else -- prefill, a mask (sliding windows, CUDA-graph steps), no cache, non-fp32 weights or
packed projections -- goes to the wrapped module unchanged. Whether a layer qualifies is checked once, on
the layer itself (:func:`wrap_decode_attention`): its decode output on a probe must match transformers'
to rounding, so a family whose attention differs (partial rotary, gated or latent attention) keeps its own.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .cpu_packed import CpuQuantLinear, kernel_call
from .norms import FusedRMSNorm

log = logging.getLogger("moecompress")


class _NotStandard(Exception):
    """The attention module is not the standard one this fast path computes."""


class RotaryMatrix:
    """The step's rotary embedding as one ``[B, d, d]`` matrix per batch row, made once per step and shared by
    every layer: ``x @ M = x cos + rotate_half(x) sin`` for row vectors ``x`` (``M = diag(cos) + P diag(sin)``,
    ``P`` the signed half swap of ``rotate_half``), so a layer rotates its q and k heads in one batched GEMM.
    Each output is a sum of two products (the others are exact zeros): the same numbers as
    ``rotate_half``'s to rounding."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._basis: tuple[torch.Tensor, torch.Tensor] | None = None  # (identity, P)

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``cos``/``sin`` ``[B, 1, d]`` (one position) -> ``M [B, d, d]`` (two ops: ``I cos + P sin``)."""
        if self._last is None or self._last[0] is not sin:
            d = sin.shape[-1]
            basis = self._basis
            if basis is None or basis[0].shape[0] != d or basis[0].device != sin.device or basis[0].dtype != sin.dtype:
                h = d // 2
                p = torch.zeros(d, d, dtype=sin.dtype, device=sin.device)
                idx = torch.arange(h, device=sin.device)
                p[idx + h, idx] = -1.0  # rotate_half(x)[k] = -x[k + h] for k < h
                p[idx, idx + h] = 1.0  # and x[k - h] for k >= h
                self._basis = (torch.eye(d, dtype=sin.dtype, device=sin.device), p)
            eye, p = self._basis
            self._last = (sin, torch.addcmul(eye * cos, p, sin))  # [B, 1, d] broadcast over the rows j
        return self._last[1]


class DecodeAttention(nn.Module):
    """Standard attention with a fast one-token path (module docstring); the wrapped module does the rest."""

    def __init__(self, inner: nn.Module, rotary: RotaryMatrix) -> None:
        super().__init__()
        q, k, v, o = (getattr(inner, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not (all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in (q, k, v, o))
                or all(isinstance(m, CpuQuantLinear) for m in (q, k, v, o))):
            raise _NotStandard("projections are neither fp32 nn.Linear nor packed CPU linears")
        d = int(inner.head_dim)
        nq, nk = q.out_features // d, k.out_features // d
        if q.out_features != nq * d or k.out_features != nk * d or v.out_features != nk * d or nq % nk:
            raise _NotStandard("head counts")
        self.norm, eps, stacked = _norm_kind(inner, d, nq, nk)
        self.inner = inner
        self.d, self.nq, self.nk = d, nq, nk
        self.hidden = q.in_features
        self.scaling = float(inner.scaling)
        self.layer_idx = inner.layer_idx
        self.clip = getattr(inner.config, "clip_qkv", None)
        self.eps = eps
        self.rotary = rotary
        self.register_buffer("qk_weight", stacked)
        if type(q) is nn.Linear:
            self.qkv, self.o = _RowMajor(q, k, v), _RowMajor(o)
        else:
            self.qkv, self.o = _PackedQKV(q, k, v), _PackedO(o)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (hidden_states.shape[1] != 1 or attention_mask is not None or not isinstance(cache, KVCache)
                or cache._kv_len is None):
            return self.inner(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                              **kwargs)
        return self.decode(hidden_states, position_embeddings, cache), None

    def decode(self, x: torch.Tensor, position_embeddings, cache: KVCache) -> torch.Tensor:
        """``x [B, 1, H]`` -> attention output ``[B, 1, H]``, its key/value written into ``cache``."""
        b, d, nq, nk = x.shape[0], self.d, self.nq, self.nk
        qkv = self.qkv(x.view(b, -1))
        qk, v = qkv[:, : (nq + nk) * d], qkv[:, (nq + nk) * d:]
        if self.norm == "head":
            qk = F.rms_norm(qk.view(b, nq + nk, d), (d,), None, self.eps).mul_(self.qk_weight)
        elif self.norm == "full":
            qn, kn = self.inner.q_norm, self.inner.k_norm
            qk = torch.cat([qn(qk[:, : nq * d]), kn(qk[:, nq * d:])], dim=1).view(b, nq + nk, d)
        else:
            qk = qk.reshape(b, nq + nk, d)
        if self.clip is not None:
            qk = qk.clamp(-self.clip, self.clip)
            v = v.clamp(-self.clip, self.clip)
        rot = torch.bmm(qk, self.rotary(*position_embeddings))  # [B, nq + nk, d]
        keys, values = cache.update(rot[:, nq:].unsqueeze(2), v.reshape(b, nk, 1, d), self.layer_idx)
        out = F.scaled_dot_product_attention(rot[:, :nq].unsqueeze(2), keys, values, scale=self.scaling,
                                             enable_gqa=nq != nk).view(b, nq * d)
        return self.o(out).view(b, 1, -1)


class _RowMajor(nn.Module):
    """fp32 ``nn.Linear`` projections of one input (q/k/v, or o alone) as one GEMM against a row-major
    ``[in, sum of outs]`` matrix; the projections' weights become views of it (one copy of the weights)."""

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        biases = [m.bias for m in linears]
        if any(b is None for b in biases) != all(b is None for b in biases):
            raise _NotStandard("some projections have a bias, some not")
        w = torch.cat([m.weight.detach() for m in linears]).t().contiguous()
        start = 0
        for m in linears:
            m.weight = nn.Parameter(w[:, start:start + m.out_features].t(), requires_grad=False)
            start += m.out_features
        self.register_buffer("w", w)
        self.register_buffer("b", None if biases[0] is None else torch.cat([b.detach() for b in biases]))

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.mm(x2, self.w) if self.b is None else torch.addmm(self.b, x2, self.w)


class _PackedQKV(nn.Module):
    """q, k and v of packed CPU linears: one kernel call on rows concatenated across the three when they
    share a torch kernel, group size and no act-order permutation or bias (the projections' packed rows
    become views of the concatenation; their small scale tensors stay as they are); else three calls."""

    def __init__(self, q: CpuQuantLinear, k: CpuQuantLinear, v: CpuQuantLinear) -> None:
        super().__init__()
        mods = (q, k, v)
        self.parts = nn.ModuleList(mods)
        # torch's CPU int4 packing lays rows out in blocks of up to 64: concatenated rows keep each part's
        # layout only when every part is a whole number of blocks
        self.fused = (len({m.kind for m in mods}) == 1 and q.kind in ("int4pack", "int8pack", "int8group")
                      and len({m.group_size for m in mods}) == 1
                      and all(m.perm is None and m.bias is None for m in mods)
                      and len({m.zq is None for m in mods}) == 1
                      and (q.kind != "int4pack" or all(m.out_features % 64 == 0 for m in mods)))
        if self.fused:
            rows = 1 if q.kind == "int8group" else 0  # int8group: [G, N, group] codes and [G, N] scales
            packed = torch.cat([m.packed for m in mods], dim=rows)
            start = 0
            for m in mods:
                n = m.packed.shape[rows]
                m.packed = packed.narrow(rows, start, n)
                start += n
            self.register_buffer("packed", packed)
            self.register_buffer("sz", torch.cat([m.sz for m in mods], dim=1 if q.kind != "int8pack" else 0))
            self.register_buffer("zd", None if q.zd is None else torch.cat([m.zd for m in mods], dim=1))
            self.kind, self.group_size = q.kind, q.group_size

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return torch.cat([m(x2) for m in self.parts], dim=-1)
        fn, args = kernel_call(self.kind, self.packed, self.group_size, self.sz, self.zd)
        return fn(x2.to(torch.bfloat16), *args).to(x2.dtype)  # x2: a view of the contiguous [B, H] input


class _PackedO(nn.Module):
    """``o_proj`` as a packed CPU linear: its torch kernel called directly where it has one (no act-order
    permutation or bias), else the module."""

    def __init__(self, o: CpuQuantLinear) -> None:
        super().__init__()
        self.o = o
        self.direct = o.kind in ("int4pack", "int8pack", "int8group") and o.perm is None and o.bias is None

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_call", None)  # the kernel's arguments before .to()
        return super()._apply(fn, recurse)

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.direct:
            return self.o(x2)
        call = self.__dict__.get("_call") or self.__dict__.setdefault("_call", self.o._kernel_call())
        return call[0](x2.to(torch.bfloat16), *call[1]).to(x2.dtype)


def _norm_kind(inner: nn.Module, d: int, nq: int, nk: int) -> tuple[str | None, float, torch.Tensor | None]:
    """(kind, eps, stacked per-head weights): ``"head"`` (RMSNorm over each head, Qwen3), ``"full"`` (over the
    whole q / k projection, OLMoE) or None (no q/k norm)."""
    qn, kn = getattr(inner, "q_norm", None), getattr(inner, "k_norm", None)
    if qn is None and kn is None:
        return None, 0.0, None
    if not (isinstance(qn, FusedRMSNorm) and isinstance(kn, FusedRMSNorm) and qn.eps == kn.eps
            and qn.weight.dtype == torch.float32):
        raise _NotStandard("q/k norms are not plain RMSNorms")
    if qn.weight.shape[0] == d and kn.weight.shape[0] == d:
        stacked = torch.cat([qn.weight.detach().expand(nq, d), kn.weight.detach().expand(nk, d)])
        return "head", qn.eps, stacked
    if qn.weight.shape[0] == nq * d and kn.weight.shape[0] == nk * d:
        return "full", qn.eps, None
    raise _NotStandard("q/k norm widths")


@torch.no_grad()
def wrap_decode_attention(model: nn.Module, layers: list[nn.Module]) -> int:
    """Give every decoder layer whose attention is the standard one the fast decode path (module
    docstring); returns how many. Each candidate is probed: a decode step after a 3-token prefill, ours
    against transformers' on the same cache contents, in the layer's run dtype, must agree to rounding.
    The wrapped weights are laid out once, here: moving the model afterwards (``.to()``) keeps the numbers
    but stores the fused and the projections' weights apart, and in-place edits of the q/k norm weights or
    the q/k/v biases do not reach decode steps (their stacked copies are made here)."""
    rotary = model.model.rotary_emb
    matrix = RotaryMatrix()
    wrapped = 0
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or isinstance(attn, DecodeAttention):
            continue
        try:
            fast = DecodeAttention(attn, matrix)
        except (_NotStandard, AttributeError, TypeError) as why:
            log.debug("runtime: layer attention keeps transformers' forward (%s)", why)
            continue
        if _probe(fast, rotary, _run_dtype(layer)):
            layer.self_attn = fast
            wrapped += 1
    return wrapped


def _run_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer's hidden states run in (its input norm's)."""
    w = getattr(getattr(layer, "input_layernorm", None), "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal to rounding: 1e-5 relative in fp32, 3e-2 in a half dtype (a wrong computation is off by O(1))."""
    tol = 1e-5 if ref.dtype == torch.float32 else 3e-2
    return bool(ours.shape == ref.shape and (ours.float() - ref.float()).norm() <= tol * ref.float().norm() + 1e-6)


def _probe(fast: DecodeAttention, rotary: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``fast.decode`` gives the wrapped module's output on a random decode step (in the run dtype)."""
    inner = fast.inner
    h = fast.hidden
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, h, generator=gen).to(dtype)
    pos = torch.arange(4, device=x.device)
    try:
        cos, sin = rotary(x, pos[None])
        if cos.shape[-1] != fast.d:  # partial rotary
            return False
        name = cache_name(inner)
        outs = []
        for use_fast in (False, True):
            cache = KVCache(fast.layer_idx + 1, 1, 8)
            cache.prepare(pos[:3], 3)
            inner(x[:, :3], position_embeddings=(cos[:, :3], sin[:, :3]), attention_mask=None, **{name: cache})
            cache.prepare(pos[3:], 4)
            pe = (cos[:, 3:], sin[:, 3:])
            outs.append(fast.decode(x[:, 3:], pe, cache) if use_fast else
                        inner(x[:, 3:], position_embeddings=pe, attention_mask=None, **{name: cache})[0])
        ref, ours = outs
        return _close(ours, ref)
    except (RuntimeError, ValueError, TypeError, IndexError) as why:
        log.debug("runtime: fast decode attention probe failed (%s)", why)
        return False


def decode_layer(layer: nn.Module, rotary: nn.Module):
    """``fast(hidden [B, 1, H], rope, cache) -> hidden`` for a decoder layer that is the plain pre-norm residual
    block (``h += attn(norm1(h)); h += mlp(norm2(h))``) around a :class:`DecodeAttention`, skipping the
    layer's own forward and module calls; None for any other layer, or where a decode step through it gives
    other numbers than the layer's forward."""
    attn = getattr(layer, "self_attn", None)
    norm1, norm2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    mlp = getattr(layer, "mlp", None)
    if not (isinstance(attn, DecodeAttention) and isinstance(norm1, FusedRMSNorm) and isinstance(norm2, FusedRMSNorm)
            and mlp is not None):
        return None
    n1, n2, attend = norm1.forward, norm2.forward, attn.decode
    one_token = getattr(mlp, "one_token", None)  # a MoE block's one-token closure: no module call at batch 1

    def fast(h: torch.Tensor, rope, cache: KVCache) -> torch.Tensor:
        h = h + attend(n1(h), rope, cache)
        x = n2(h)
        if one_token is not None and x.shape[0] == 1:
            one = one_token()
            if one is not None:
                return h + one(x.view(1, -1)).view_as(h)
        return h + mlp(x)

    def step(fn, x, pos, rope, cache):
        cache.prepare(pos, int(pos[-1]) + 1)
        if fn is None:
            return layer(x, attention_mask=None, position_ids=pos[None], position_embeddings=rope,
                         **{cache_name(layer): cache})
        return fn(x, rope, cache)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, attn.hidden, generator=gen).to(_run_dtype(layer))
    pos = torch.arange(4, device=x.device)
    try:
        with torch.no_grad():
            cos, sin = rotary(x, pos[None])
            outs = []
            for fn in (None, fast):
                cache = KVCache(attn.layer_idx + 1, 1, 8)
                step(None, x[:, :3], pos[:3], (cos[:, :3], sin[:, :3]), cache)
                outs.append(step(fn, x[:, 3:], pos[3:], (cos[:, 3:], sin[:, 3:]), cache))
        ref, ours = (o[0] if isinstance(o, tuple) else o for o in outs)
        if _close(ours, ref):
            return fast
    except (RuntimeError, ValueError, TypeError, IndexError) as why:
        log.debug("runtime: fast decode layer probe failed (%s)", why)
    return None


def cache_name(module: nn.Module) -> str:
    """The name ``module``'s forward takes the cache by: ``cache`` in transformers >= 5.25, else
    ``past_key_values`` (which 5.25 still accepts, with a warning)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
