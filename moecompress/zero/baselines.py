"""Training-free skipping baselines, calibrated to a target skip rate (``zero-experts baseline``).

Three rules (:func:`.routing.apply_rule`) turn some of a token's k slots into zero slots:
threshold (beta x the token's top weight, NAEE's dynamic skipping), top-p (cumulative weight
share) and static top-k reduction. The rule's value is calibrated offline, as NAEE does: the
original model runs (one decoder layer at a time) on calibration windows, every MoE router's
chosen weights are recorded, and the value whose skip share over all recorded slots is closest
to the target is found by bisection (threshold, top-p; monotone in the value) or directly
(top-k). Skipping changes later layers' inputs, so the share measured end to end by ``eval``
differs a little from the calibrated one; both are recorded.

The output is the original model with one zero expert per router (never chosen by the router
itself, see :mod:`.inject`) and the rule in its config: native layout, run by our runtime,
``eval`` and ``quantize``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError
from .layout import RULES, check_rule
from .routing import apply_rule

log = logging.getLogger("moecompress")
TOLERANCE = 0.02


def skip_share(weights: list[torch.Tensor], rule: tuple[str, float]) -> float:
    """Share of all slots of ``weights`` (per layer ``[n, k]``, real slots only) the rule skips."""
    dropped = total = 0
    for w in weights:
        ids = torch.arange(w.shape[1]).expand(w.shape[0], -1)
        out = apply_rule(w, ids, rule, w.shape[1])
        dropped += int((out >= w.shape[1]).sum())
        total += out.numel()
    return dropped / max(total, 1)


def calibrate_rule(weights: list[torch.Tensor], kind: str, target: float, top_k: int,
                   tolerance: float = TOLERANCE) -> tuple[float, float]:
    """``(value, skip share)`` of rule ``kind`` closest to ``target`` on the recorded weights; a UserError
    (naming the closest share reached) when none lies within ``tolerance``."""
    if kind not in RULES:
        raise UserError(f"unknown skipping rule {kind!r}; choose one of {', '.join(RULES)}")
    if not 0.0 < target < 1.0:
        raise UserError(f"--target-skip {target} must lie in (0, 1)")
    if kind == "top-k":
        cands = [(float(kp), (top_k - kp) / top_k) for kp in range(top_k + 1)]
        value, share = min(cands, key=lambda c: abs(c[1] - target))
    else:
        # threshold: more skipped as beta grows; top-p: fewer as p grows
        lo, hi = 0.0, 1.0
        increasing = kind == "threshold"
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            share = skip_share(weights, (kind, mid))
            if best is None or abs(share - target) < abs(best[1] - target):
                best = (mid, share)
            if (share < target) == increasing:
                lo = mid
            else:
                hi = mid
        value, share = best
        for end in ((1.0,) if increasing else (1e-6,)):  # the far end: the most this rule can skip
            s = skip_share(weights, (kind, end))
            if abs(s - target) < abs(share - target):
                value, share = end, s
    if abs(share - target) > tolerance:
        raise UserError(f"the {kind} rule cannot reach a skip rate of {target:.3f} on this model "
                        f"(closest reached: {share:.3f} at {kind} = {value:g}; top-k is {top_k})")
    check_rule(kind, value, top_k)
    return value, share


def record_router_weights(model_dir: str | Path, windows: torch.Tensor, device, dtype,
                          batch_size: int = 8) -> list[torch.Tensor]:
    """The chosen routing weights ``[tokens, k]`` of every MoE layer on ``windows``, streamed layer by layer."""
    from ..evals.collect import StreamedModel

    sm = StreamedModel(model_dir, device, dtype)
    sm.embed([windows[b:b + batch_size] for b in range(0, windows.shape[0], batch_size)])
    out = []
    try:
        for i in range(sm.num_layers):
            calls = sm.run_layer(i)
            if calls:
                out.append(torch.cat([c.weights.cpu() for c in calls]))
                if not bool(torch.isfinite(out[-1]).all()):
                    raise UserError(f"{model_dir}: NaN/Inf routing weights in layer {i} on the calibration windows "
                                    f"(NaN/Inf weights in the checkpoint, or an overflow in "
                                    f"{str(dtype).replace('torch.', '')})")
    finally:
        sm.release()
    return out


def make_baseline(model_dir: str | Path, out_dir: str | Path, kind: str, target: float, calib: str = "builtin:stdlib",
                  samples: int = 32, seq_len: int = 256, seed: int = 0, device: str = "cpu",
                  overwrite: bool = False, command: list[str] | None = None, recipe: dict | None = None) -> dict:
    """Calibrate rule ``kind`` to ``target`` on ``model_dir`` and write the rule model to ``out_dir``
    (``recipe``: the settings a ``moecompress run`` records to know when to rebuild)."""
    from ..calib.chat import chat_renderer
    from ..calib.data import load_texts, make_calibration_windows
    from ..calib.specs import load_tokenizer, spec_paths
    from ..checkpoint.writer import check_output_path
    from .inject import add_zero_experts, open_float_original

    if kind not in RULES:
        raise UserError(f"unknown skipping rule {kind!r}; choose one of {', '.join(RULES)}")
    if not 0.0 < target < 1.0:
        raise UserError(f"--target-skip {target} must lie in (0, 1)")
    from ..devices import resolve_device

    resolve_device(device)
    handle = open_float_original(model_dir, "calibrate a skipping rule on")
    if handle.zero is not None:
        raise UserError(f"{model_dir} already has zero experts; calibrate baselines on the original model")
    handle.check_context(seq_len)
    check_output_path(handle.reader.path, Path(out_dir), overwrite, inputs=spec_paths(calib))
    tok = load_tokenizer(handle.reader.path)
    windows = make_calibration_windows(load_texts(calib, chat=chat_renderer(tok)), tok, samples, seq_len, seed)
    weights = record_router_weights(model_dir, windows.input_ids, device, torch.float32)
    value, share = calibrate_rule(weights, kind, target, handle.top_k)
    if kind == "top-k" and value < 1:
        raise UserError(f"top-k would keep no expert to skip {100 * target:.0f}% of the slots (top-k is "
                        f"{handle.top_k}); choose a lower --target-skip")
    log.info("%s rule: %s = %g skips %.1f%% of the calibration slots (target %.1f%%)", kind, kind, value,
             100 * share, 100 * target)
    record = add_zero_experts(model_dir, out_dir, 1, "same", seed=seed, overwrite=overwrite, command=command,
                              rule=(kind, value),
                              extra={"baseline": {"rule": kind, "value": value, "target_skip": target,
                                                  "calibration_skip": share, "calibration": windows.metadata}},
                              recipe=recipe)
    return record
