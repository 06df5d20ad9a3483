"""Calibration statistics captured with hooks: Hessians ``X^T X`` per linear and per expert.

``HessianCapture`` is a context manager (hooks cannot leak past it) that watches chosen targets
of one decoder layer while the layer runs on calibration batches:

* an ``nn.Linear`` target accumulates the Gram matrix of its inputs;
* the fused experts module (transformers 5: called as ``experts(hidden, top_k_index, top_k_weights)``)
  accumulates, per expert, the Gram matrix of the tokens routed to it, for ``gate_up_proj`` (the
  token itself) or ``down_proj`` (the expert's intermediate activation, from its current weights),
  counts the tokens each expert got, and optionally weights each token by its squared routing weight
  (an expert's output enters the layer output multiplied by that weight, so its squared error by the
  square).
  Router indices ``>= num_experts`` (zero experts, a later extension) are skipped.

For experts named in ``all_token_experts`` (starved ones under the all-tokens policy) the
statistics are taken over every token of the layer instead of the routed ones.
Linear targets called on the very same input tensor (q/k/v reading one normed input) share one
accumulation: the first to see a batch adds it, the others get a copy of its statistics at the end
(``shared``: each follower's leader), so the sums are equal to the bit and a tokens' Gram is built once.
The result is ``2/n * sum x x^T`` (GPTQ's H) with n the number of tokens that contributed.
Beside it, ``extra["abs_sums"]`` holds ``sum |x|`` per input channel (unweighted; [K] or [E, K]):
AWQ's activation statistic, ``abs_sums / counts`` (only with ``abs_sums=True``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class GramStats:
    """Running ``sum x x^T`` and token count, for one linear ([K, K]) or all experts ([E, K, K])."""

    sums: torch.Tensor | dict[int, torch.Tensor]  # or, across processes, the owned blocks {first expert: [n, K, K]}
    counts: torch.Tensor  # [] or [E], int64
    extra: dict = field(default_factory=dict)

    def hessian(self) -> torch.Tensor | dict[int, torch.Tensor]:
        if isinstance(self.sums, dict):
            return {s: _hessian(b, self.counts[s:s + b.shape[0]]) for s, b in self.sums.items()}
        return _hessian(self.sums, self.counts)


def _hessian(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # counts live on the CPU (small, updated per expert); the sums on the calibration device
    n = counts.to(sums.device).clamp(min=1).to(sums.dtype)
    n = n.view(*n.shape, 1, 1) if n.dim() else n
    return 2.0 * sums / n


@dataclass(frozen=True)
class ExpertTarget:
    """Per-expert statistics of the experts module's ``gate_up_proj`` (proj='gate_up') or ``down_proj``."""

    proj: str
    all_token_experts: frozenset[int] = frozenset()
    weight_by_routing: bool = False


def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals[0], vals[1], vals[2]


class HessianCapture:
    """Hooks that fill ``self.stats[name]`` for each target while the layer runs."""

    def __init__(self, layer: nn.Module, targets: dict[str, ExpertTarget | None], stats_dtype=torch.float32,
                 skip_expert_outputs: bool = False, abs_sums: bool = True, keep=None):
        """``skip_expert_outputs``: the watched experts modules compute nothing and return zeros (for
        passes whose layer output is discarded: their statistics need only the experts' inputs).
        ``abs_sums``: also sum ``|x|`` per channel (AWQ's statistic; GPTQ and RTN do not read it).
        ``keep`` (an ``expert_inputs.ExpertInputs``): where a down-projection target puts the activations
        it computes, for the feed to reuse."""
        self.layer = layer
        self.targets = targets
        self.dtype = stats_dtype
        self.skip = skip_expert_outputs
        self.abs = abs_sums
        self.keep = keep
        self.stats: dict[str, GramStats] = {}
        self.shared: dict[str, str] = {}  # linear target -> the target whose accumulation it shares
        self._last: dict[str, tuple[torch.Tensor, int]] = {}  # leader -> (its latest input, its version)
        self._handles: list = []
        self._patched: list[nn.Module] = []

    def __enter__(self) -> "HessianCapture":
        experts_hooks: dict[nn.Module, list] = {}
        for name, target in self.targets.items():
            module = self.layer.get_submodule(name.rsplit(".", 1)[0] if target is not None else name)
            if target is None:
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            else:
                experts_hooks.setdefault(module, []).append(self._experts_hook(name, module, target))
        for module, hooks in experts_hooks.items():
            if self.skip:
                module.forward = self._zero_forward(module, hooks)
                self._patched.append(module)
            else:
                for hook in hooks:
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last.clear()
        for follower, leader in self.shared.items():
            if leader in self.stats:
                self.stats[follower] = copy.deepcopy(self.stats[leader])
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._patched.clear()

    @staticmethod
    def _zero_forward(module: nn.Module, hooks: list):
        def forward(*args, **kwargs):
            for hook in hooks:
                hook(module, args, kwargs)
            hidden = _experts_args(args, kwargs)[0]
            return torch.zeros_like(hidden)

        return forward

    def _same_input(self, name: str, x: torch.Tensor) -> bool:
        """Whether ``name`` shares its leader's accumulation for input ``x`` (decided at its first call)."""
        leader = self.shared.get(name)
        if leader is None and name not in self.stats:  # first call: another target's current input?
            leader = next((n for n, (t, v) in self._last.items() if t is x and v == x._version), None)
            if leader is not None:
                self.shared[name] = leader
        if leader is None:
            return False
        t, v = self._last[leader]
        if t is not x or v != x._version:
            raise RuntimeError(f"{name} read the same input as {leader} in an earlier call but not in this one")
        return True

    def _linear_hook(self, name: str):
        def hook(module, args):
            if self._same_input(name, args[0]):
                return
            self._last[name] = (args[0], args[0]._version)
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.dtype)
            st = self.stats.get(name)
            if st is None:
                k = x.shape[-1]
                st = self.stats[name] = GramStats(x.new_zeros(k, k), torch.zeros((), dtype=torch.long),
                                                  {"abs_sums": x.new_zeros(k)} if self.abs else {})
            st.sums.addmm_(x.T, x)
            if self.abs:
                st.extra["abs_sums"] += x.abs().sum(0)
            st.counts += x.shape[0]

        return hook

    def _experts_hook(self, name: str, experts: nn.Module, target: ExpertTarget):
        def hook(module, args, kwargs):
            hidden, idx, weights = _experts_args(args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            idx = idx.reshape(hidden.shape[0], -1)
            weights = weights.reshape(idx.shape).to(self.dtype)
            n_exp = experts.gate_up_proj.shape[0]
            k = hidden.shape[-1] if target.proj == "gate_up" else experts.down_proj.shape[-1]
            st = self.stats.get(name)
            if st is None:
                extra = {"routed_tokens": torch.zeros(n_exp, dtype=torch.long),
                         "all_sums": hidden.new_zeros(k, k, dtype=self.dtype), "all_count": 0}
                if self.abs:
                    extra.update(abs_sums=hidden.new_zeros(n_exp, k, dtype=self.dtype),
                                 all_abs_sums=hidden.new_zeros(k, dtype=self.dtype))
                st = self.stats[name] = GramStats(hidden.new_zeros(n_exp, k, k, dtype=self.dtype),
                                                  torch.zeros(n_exp, dtype=torch.long), extra)
            if target.proj == "gate_up":  # the whole layer's input: what a starved expert falls back to
                hx = hidden.to(self.dtype)
                st.extra["all_sums"].addmm_(hx.T, hx)
                if self.abs:
                    st.extra["all_abs_sums"] += hx.abs().sum(0)
                st.extra["all_count"] += hx.shape[0]
            valid = idx < n_exp  # zero experts (ids >= E) contribute nothing
            flat_e = torch.where(valid, idx, n_exp).reshape(-1)
            routed = torch.bincount(flat_e, minlength=n_exp + 1)[:n_exp].cpu()
            st.extra["routed_tokens"] += routed
            # kept for the feed: the routed tokens' activations (not all tokens' for a starved expert)
            keep = self.keep if target.proj == "down" and not target.all_token_experts else None
            call = keep.start_call(experts, idx) if keep is not None else None
            order = torch.argsort(flat_e, stable=True)
            bounds = torch.cumsum(torch.bincount(flat_e, minlength=n_exp + 1), 0).tolist()
            start = 0
            for e in range(n_exp):
                end = bounds[e]
                if e in target.all_token_experts:
                    x, w, m = hidden, None, hidden.shape[0]
                elif end > start:
                    slots, m = order[start:end], end - start
                    # the routed rows, on a CPU zero rows appended up to a multiple of ROW_BLOCK: they add
                    # nothing to the sums, and the GEMMs below see a few shapes, not a new one per expert and batch
                    x = gather_rows(hidden, slots // idx.shape[1])
                    w = gather_rows(weights.reshape(-1), slots) if target.weight_by_routing else None
                else:
                    start = end
                    continue
                start = end
                x = x.to(experts.gate_up_proj.dtype)
                if target.proj == "down":
                    gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                    x = experts.act_fn(gate) * up  # padded rows stay 0: act(0) * 0
                    if call is not None:  # the routed rows only (the feed's memory budget counts them)
                        keep.add(call, e, slots, x if x.shape[0] == m else x[:m].clone())
                x = x.to(self.dtype)
                if self.abs:
                    st.extra["abs_sums"][e] += x.abs().sum(0)
                xw = x if w is None else x * w.unsqueeze(-1)
                st.sums[e].addmm_(xw.T, xw)
                st.counts[e] += m

        return hook


# on a CPU, the rows of a per-expert GEMM are padded to a multiple of this: its GEMM library prepares (and
# caches) a kernel per shape, which costs about as much as a small GEMM itself when every expert and batch
# brings a new row count (a GPU's does not: no padding there)
ROW_BLOCK = 64


def _padded_count(x: torch.Tensor, m: int, block: int) -> int:
    return -(-m // block) * block if x.device.type == "cpu" else m


def gather_rows(x: torch.Tensor, index: torch.Tensor, block: int = ROW_BLOCK) -> torch.Tensor:
    """``x[index]`` (no gradient), on a CPU with zero rows appended up to a multiple of ``block`` rows."""
    m = index.shape[0]
    out = x.new_zeros(_padded_count(x, m, block), *x.shape[1:])
    torch.index_select(x.detach(), 0, index, out=out[:m])  # statistics: no gradient
    return out


def pad_rows(x: torch.Tensor, block: int = ROW_BLOCK) -> torch.Tensor:
    """``x`` on a CPU with zero rows appended up to a multiple of ``block`` rows (``x`` itself if none are)."""
    m = x.shape[0]
    rows = _padded_count(x, m, block)
    if rows == m:
        return x
    out = x.new_zeros(rows, *x.shape[1:])
    out[:m] = x
    return out


# ---------------------------------------------------------------------------------------------- chunk sums
# Calibration statistics are summed per fixed chunk of batches, then the chunks are added in chunk order
# (moecompress.distributed): the same float operations whether one process or N computed the chunks.


def add_stats(total: dict[str, GramStats], part: dict[str, GramStats]) -> dict[str, GramStats]:
    """``total += part``, field by field (in place; returns ``total``)."""
    for name, p in part.items():
        t = total[name]
        t.sums += p.sums.to(t.sums.device)
        t.counts += p.counts.to(t.counts.device)
        for k, v in p.extra.items():
            if torch.is_tensor(v):
                t.extra[k] += v.to(t.extra[k].device)
            else:
                t.extra[k] += v
    return total


def stats_bytes(stats: dict[str, GramStats]) -> int:
    """Bytes of every tensor the statistics hold (owned blocks included)."""
    def size(v) -> int:
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return v.numel() * v.element_size() if torch.is_tensor(v) else 0

    return sum(size(st.sums) + size(st.counts) + size(st.extra) for st in stats.values())


def stats_layout(stats: dict[str, GramStats]) -> list[tuple]:
    """``(name, field, shape, dtype, device type)`` of every value, in packing order (fields "sums",
    "counts", then the extras by key); a Python int extra is recorded with dtype None."""
    out = []
    for name in sorted(stats):
        st = stats[name]
        fields = [("sums", st.sums), ("counts", st.counts)] + sorted(st.extra.items())
        for f, v in fields:
            if torch.is_tensor(v):
                out.append((name, f, tuple(v.shape), str(v.dtype).removeprefix("torch."), v.device.type))
            else:
                out.append((name, f, (), None, "cpu"))
    return out


def pack_stats(stats: dict[str, GramStats] | None, layout: list[tuple]) -> dict[str, torch.Tensor]:
    """One flat tensor per dtype (``float32``, ``int64``...; ints as int64), zeros for ``stats=None``."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, f, shape, dtype, dev in layout:
        key = dtype or "int64"
        if stats is None:
            v = torch.zeros(shape, dtype=getattr(torch, key))
        else:
            st = stats[name]
            v = st.sums if f == "sums" else st.counts if f == "counts" else st.extra[f]
            v = torch.tensor(int(v), dtype=torch.int64) if dtype is None else v
        groups.setdefault(key, []).append(v.detach().reshape(-1).to("cpu" if stats is None else v.device))
    ref = next((t for ts in groups.values() for t in ts if t.device.type != "cpu"), None)
    dev = ref.device if ref is not None else torch.device("cpu")
    return {k: torch.cat([t.to(dev) for t in ts]) for k, ts in groups.items()}


def unpack_stats(flats: dict[str, torch.Tensor], layout: list[tuple], device: torch.device) -> dict[str, GramStats]:
    """The inverse of :func:`pack_stats`; what lived on an accelerator goes to ``device`` (this rank's)."""
    offsets = {k: 0 for k in flats}
    values: dict[str, dict] = {}
    for name, f, shape, dtype, dev in layout:
        key = dtype or "int64"
        n = 1
        for d in shape:
            n *= d
        v = flats[key][offsets[key]:offsets[key] + n].reshape(shape)
        offsets[key] += n
        v = int(v) if dtype is None else v.to("cpu" if dev == "cpu" else device).clone()
        values.setdefault(name, {})[f] = v
    out = {}
    for name, fields in values.items():
        sums, counts = fields.pop("sums"), fields.pop("counts")
        out[name] = GramStats(sums, counts, fields)
    return out
