"""The experts' down-projection inputs of one calibration pass, kept so that the feed does not recompute them.

True-sequential quantization computes every expert's ``act(gate(x)) * up(x)`` twice per layer with the
same (already quantized) gate/up weights: once while the down projections' Hessians are captured, and
again when the quantized layer feeds the next one. ``ExpertInputs`` keeps the first, per calibration
batch and expert, up to a byte budget (past it, nothing is kept and the feed computes as before);
``replay`` then has the experts module compute only its down projections from them. The first replayed
call is checked against the module's own forward, so a family whose experts compute differently falls
back to it (logged) instead of feeding the next layer something else.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .capture import pad_rows

log = logging.getLogger("moecompress")

# at most this many bytes of activations kept per layer (1 GiB). Fixed on purpose: a kept feed and a
# recomputed one differ by float rounding, so a budget that followed the memory free at run time would
# make the output bytes depend on the machine's state (determinism, and --resume's same bytes)
KEEP_BYTES = 1 << 30
# the replayed output's largest allowed relative (Frobenius) difference from the forward's: float rounding
# only (a different formula differs by order 1); half precision rounds ~2**-8 per product
_CHECK_REL = {torch.float32: 1e-4, torch.float64: 1e-6}
_CHECK_REL_HALF = 2e-2


class ExpertInputs:
    """Per calibration batch: the routing it was captured with and each expert's ``(slots, activations)``."""

    def __init__(self, budget: int | None = None):
        self.budget = KEEP_BYTES if budget is None else budget
        self.nbytes = 0
        self.full = False  # went over the budget: nothing is kept
        self.module: nn.Module | None = None
        self.batches: dict[int, tuple[torch.Tensor, dict]] = {}
        self._calls: list[tuple[torch.Tensor, dict]] = []

    def start_call(self, module: nn.Module, idx: torch.Tensor) -> dict | None:
        """A new experts call (routing ``idx``): the dict its experts' activations go in (None: not kept)."""
        if self.full:
            return None
        self.module = module
        entry = (idx.reshape(-1).clone(), {})
        self._calls.append(entry)
        self._count(entry[0])
        return entry[1]

    def add(self, call: dict | None, expert: int, slots: torch.Tensor, act: torch.Tensor) -> None:
        if call is None or self.full:
            return
        call[expert] = (slots, act)
        self._count(slots, act)

    def _count(self, *tensors: torch.Tensor) -> None:
        self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
        if self.nbytes > self.budget:
            self.full = True
            self.batches.clear()
            self._calls.clear()

    def assign(self, batches: list[int]) -> None:
        """The calls made since the last ``assign`` were those of ``batches``, in order."""
        calls, self._calls = self._calls, []
        if self.full:
            return
        if len(calls) != len(batches):
            raise RuntimeError(f"{len(calls)} experts calls were kept for {len(batches)} batches")
        self.batches.update(zip(batches, calls))

    def covers(self, batches) -> bool:
        return not self.full and self.module is not None and all(b in self.batches for b in batches)

    @contextlib.contextmanager
    def replay(self, batches: list[int]):
        """While inside, the experts module's calls are those of ``batches`` in order, each computed from the
        kept activations (the routing must be the one captured)."""
        module, order, state = self.module, iter(batches), {"checked": False, "own": False}
        own_forward, patched = module.forward, vars(module).get("forward")

        def forward(hidden_states, top_k_index, top_k_weights):
            idx, per_expert = self.batches.pop(next(order))
            if state["own"]:
                return own_forward(hidden_states, top_k_index, top_k_weights)
            if not torch.equal(idx, top_k_index.reshape(-1).to(idx.device)):
                raise RuntimeError("the routing of a replayed batch differs from the one captured")
            out = _down(module, hidden_states, top_k_index, top_k_weights, per_expert)
            if not state["checked"]:  # the first call: the module's own forward must agree
                state["checked"] = True
                ref = own_forward(hidden_states, top_k_index, top_k_weights)
                rel = float((out - ref).float().norm() / ref.float().norm().clamp_min(1e-30))
                if not rel <= _CHECK_REL.get(ref.dtype, _CHECK_REL_HALF):
                    log.info("the kept expert activations do not reproduce %s's forward (relative difference "
                             "%.2g): computing the feed with it", type(module).__name__, rel)
                    state["own"] = True
                    return ref
            return out

        module.forward = forward
        try:
            yield
        finally:
            if patched is None:
                del module.forward
            else:
                module.forward = patched
            self.batches.clear()


def _down(module: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, per_expert: dict):
    """``sum over slots of weight * down_e(activation)`` per token, as the eager experts forward adds them."""
    out = torch.zeros_like(hidden)
    k = idx.shape[-1]
    w = weights.reshape(-1)
    for e in sorted(per_expert):
        slots, act = per_expert[e]
        # the GEMM on a padded row count, as in the capture (calib.capture.pad_rows)
        y = nn.functional.linear(pad_rows(act), module.down_proj[e])[:act.shape[0]] * w[slots, None]
        out.index_add_(0, slots // k, y.to(out.dtype))
    return out
