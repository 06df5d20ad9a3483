"""The zero-expert format: what the config says, in one place.

Two layouts of the same model (``E`` real experts, ``Z`` zero experts, ``k`` routed slots):

* **native** -- the text config gains ``num_zero_experts: Z`` and ``zero_experts_layout: "native"``;
  the family's expert count stays ``E``; every MoE router's ``weight`` is ``[E+Z, H]`` (rows
  ``E..E+Z-1`` are the zero experts); sigmoid routers' ``e_score_correction_bias`` is ``[E+Z]``; a
  router may hold ``zero_expert_bias [Z]`` (fp32), added to the zero rows' logits before scoring
  (absent means 0). Compact: no expert tensors for the zero experts. Only moecompress reads it.
* **stock** -- the family's expert count is ``E+Z`` and the last ``Z`` experts have all-zero weights;
  the config also says ``num_zero_experts: Z`` and ``zero_experts_layout: "stock"`` (keys stock
  loaders ignore). Stock transformers and vLLM load it and compute the same outputs (a zero
  expert's SiLU-gated MLP of zero weights outputs exactly 0), but they run the zero experts as
  real ones: no speedup. Our tools read it as the native model (the zero experts' tensors are
  never read), so the runtime skips them.

Routing (both layouts, :mod:`.routing`): the family's scores over all ``E+Z`` rows, top-``k`` over
them; a zero slot keeps its weight in the top-k renormalization and contributes 0 -- exactly what
a real expert with zero weights gives, which is why the stock layout is equivalent. Group-limited
routing (DeepSeek-V2/V3, GLM ``n_group``/``topk_group``) groups the ``E`` real experts as before; the
zero experts belong to no group and are always eligible. The stock layout cannot express that
(stock loaders would group all ``E+Z``), nor a ``zero_expert_bias``, nor a routing rule; those
models are native only.

``zero_experts_rule`` (native only) is a training-free skipping rule applied after the top-k (see
:func:`.routing.apply_rule`): ``{"rule": "threshold", "value": beta}``, ``{"rule": "top-p", "value": p}``
or ``{"rule": "top-k", "value": k'}``; skipped slots become zero expert ``E``.
``zero_experts_topk_mode`` records how the zero experts were added (``same`` or ``plus-one``).

``zero_experts_weights`` (native only) says how the chosen slots are weighted:

* ``renormalized`` (the default, also when absent) -- as above: the family's weights over all ``E+Z``
  rows, a zero slot keeping its weight in the renormalization (so the real experts' share shrinks
  by the zero slots' weight; what a stock loader computes).
* ``original`` -- each real slot gets the weight the router gives that expert when the zero experts
  are left out (the family's routing over the ``E`` real rows alone, same ``k``); a zero slot weighs
  0. Zero experts then only decide how many of the lowest-ranked real slots a token drops, and the
  kept experts' weights are the original's -- exactly what the training-free rules do (a learned
  per-token top-k reduction). Stock loaders cannot express it.

``zero_experts_logits`` (native only) says what a zero row's logit is:

* ``linear`` (the default, also when absent) -- ``row . x + zero_expert_bias``, like any router row.
* ``relative`` -- that plus the token's largest real logit: a zero expert competes with the token's
  best real expert's logit rather than with an absolute level, so a zero row of zeros with bias
  ``log(beta)`` skips exactly the slots below ``beta x`` the top weight (softmax routers: the
  threshold rule), and training learns a token-dependent correction. Stock loaders cannot express it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

LAYOUTS = ("native", "stock")
RULES = ("threshold", "top-p", "top-k")
TOPK_MODES = ("same", "plus-one")
WEIGHTINGS = ("renormalized", "original")
ZERO_LOGITS = ("linear", "relative")
MAX_ZERO_EXPERTS = 4096

KEY_Z, KEY_LAYOUT, KEY_RULE, KEY_MODE, KEY_WEIGHTS, KEY_LOGITS = (
    "num_zero_experts", "zero_experts_layout", "zero_experts_rule", "zero_experts_topk_mode", "zero_experts_weights",
    "zero_experts_logits")


@dataclass(frozen=True)
class ZeroExperts:
    """The zero experts of a model: how many, which layout, and an optional skipping rule."""

    num_zero: int
    layout: str = "native"
    rule: tuple[str, float] | None = None
    topk_mode: str | None = None
    weights: str = "renormalized"
    logits: str = "linear"

    def __post_init__(self) -> None:
        if not 1 <= self.num_zero <= MAX_ZERO_EXPERTS:
            raise UserError(f"num_zero_experts={self.num_zero} must lie in [1, {MAX_ZERO_EXPERTS}]")
        if self.layout not in LAYOUTS:
            raise UserError(f"zero_experts_layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.rule is not None:
            check_rule(*self.rule)
        if self.weights not in WEIGHTINGS:
            raise UserError(f"zero_experts_weights must be one of {', '.join(WEIGHTINGS)}, not {self.weights!r}")
        if self.logits not in ZERO_LOGITS:
            raise UserError(f"zero_experts_logits must be one of {', '.join(ZERO_LOGITS)}, not {self.logits!r}")

    def config_fields(self) -> dict:
        out: dict = {KEY_Z: self.num_zero, KEY_LAYOUT: self.layout}
        if self.rule is not None:
            out[KEY_RULE] = {"rule": self.rule[0], "value": self.rule[1]}
        if self.topk_mode is not None:
            out[KEY_MODE] = self.topk_mode
        if self.weights != "renormalized":  # the default stays implicit: older checkpoints read the same
            out[KEY_WEIGHTS] = self.weights
        if self.logits != "linear":
            out[KEY_LOGITS] = self.logits
        return out


def check_rule(rule: str, value: float, top_k: int | None = None) -> None:
    if rule not in RULES:
        raise UserError(f"unknown skipping rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "threshold" and not 0.0 <= value <= 1.0:
        raise UserError(f"threshold beta={value} must lie in [0, 1]")
    if rule == "top-p" and not 0.0 < value <= 1.0:
        raise UserError(f"top-p p={value} must lie in (0, 1]")
    if rule == "top-k" and (value != int(value) or value < 0 or (top_k is not None and value > top_k)):
        raise UserError(f"top-k k'={value} must be an integer in [0, {top_k if top_k is not None else 'k'}]")


def text_config_dict(config: dict) -> dict:
    """The dict holding the text model's fields (composite configs nest it under ``text_config``)."""
    return config.get("text_config") or config


_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def set_expert_count(config: dict, attr: str, value: int) -> None:
    """Set the family's expert count in a raw config dict, under whichever spelling it uses (transformers
    versions alias them: qwen3_moe writes ``num_local_experts`` since 5.2x, ``num_experts`` before)."""
    text = text_config_dict(config)
    key = next((k for k in (attr,) + _EXPERT_COUNT_KEYS if k in text), attr)
    text[key] = value


def read_zero_experts(config: dict) -> ZeroExperts | None:
    """The zero experts a raw ``config.json`` dict declares (None: an ordinary model)."""
    text = text_config_dict(config)
    z = text.get(KEY_Z)
    if not z:
        return None
    if not isinstance(z, int):
        raise UserError(f"config.json: {KEY_Z} must be an integer, got {z!r}")
    rule = text.get(KEY_RULE)
    if rule is not None:
        if not isinstance(rule, dict) or set(rule) != {"rule", "value"}:
            raise UserError(f"config.json: {KEY_RULE} must be {{'rule': ..., 'value': ...}}, got {rule!r}")
        rule = (str(rule["rule"]), float(rule["value"]))
    return ZeroExperts(z, str(text.get(KEY_LAYOUT, "native")), rule, text.get(KEY_MODE),
                       str(text.get(KEY_WEIGHTS, "renormalized")), str(text.get(KEY_LOGITS, "linear")))


def write_zero_experts(config: dict, zero: ZeroExperts | None) -> dict:
    """A copy of ``config`` declaring ``zero`` (None: the zero-expert keys removed)."""
    out = dict(config)
    nested = "text_config" in out and isinstance(out["text_config"], dict)
    text = dict(out["text_config"]) if nested else out
    for k in (KEY_Z, KEY_LAYOUT, KEY_RULE, KEY_MODE, KEY_WEIGHTS, KEY_LOGITS):
        text.pop(k, None)
    if zero is not None:
        text.update(zero.config_fields())
    if nested:
        out["text_config"] = text
    return out
