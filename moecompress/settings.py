"""Typed, validated settings for one quantization run (from CLI flags or a YAML recipe).

Unknown keys are errors that name the key; every cross-field rule (act-order "group" exists only in
the GPTQ format, RTN needs no calibration...) is checked here, before any work starts.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError, set_apart_from, settings_error
from .units import SEED_MAX
from .quant import overrides as _overrides
from .quant.spec import SUPPORTED_BITS, QuantSpec

Method = Literal["gptq", "rtn", "awq", "awq+gptq"]
Format = Literal["compressed-tensors", "gptq", "awq"]


class NoBoolNumbers(BaseModel):
    """Refuses true/false for a number: pydantic would take YAML's ``true`` as 1 (``group_size: true``
    would quantize with groups of one)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool(cls, v, info):
        annotation = cls.model_fields[info.field_name].annotation
        kinds = get_args(annotation) or (annotation,)
        if isinstance(v, bool) and bool not in kinds and (int in kinds or float in kinds):
            raise ValueError(f"expected a number, got {str(v).lower()}")
        return v


class SchemeOverride(NoBoolNumbers):
    """Another bit width and/or group size for the linears whose ``layers.{i}.{module}`` name matches ``match``
    (``re.search``; the first matching override wins). Routed experts always take the base scheme."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str
    bits: int | None = None  # None: the base bits
    group_size: int | None = None  # None: the base group size; -1 or "channel": per-channel

    @field_validator("group_size", mode="before")
    @classmethod
    def _channel(cls, v):
        if v in ("channel", "per-channel"):
            return _overrides.CHANNEL
        if v == 0:
            raise ValueError("0 is not a group size; use -1 (or 'channel') for per-channel, or a power of two")
        return v

    @model_validator(mode="after")
    def _sound(self):
        try:
            _overrides.check(self.as_override())
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    def as_override(self) -> _overrides.Override:
        return _overrides.Override(self.match, self.bits, self.group_size)


class QuantizeConfig(NoBoolNumbers):
    """Everything `moecompress quantize` needs besides the model and output paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "gptq"
    bits: int = 4
    group_size: int | None = Field(128, description="power of two, or None / -1 for per-channel")
    symmetric: bool = True
    # GPTQ column order; default "weight" for GPTQ (what llm-compressor calls "static"), null for RTN
    act_order: Literal["weight", "group"] | None = "weight"
    format: Format = "compressed-tensors"
    # calibration
    calib: str = "builtin:stdlib"
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = Field(0, ge=0, le=SEED_MAX)
    batch_size: int = 8
    # execution
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    router_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # algorithm details
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = True
    refine_rounds: int = Field(1, ge=0, le=16)
    # block-output tuning after each layer is solved (quant.tune): signed-gradient steps on the codes
    # (each by at most one) and the group scales (by at most tune_scale_change) toward the float model's
    # hidden states; 0 turns it off. tune_lr: the first step's size (default 0.4 / tune_steps, 0.8 at <= 3
    # bits; past 200 steps, the 200-step size), decaying to 0
    tune_steps: int = Field(0, ge=0, le=100_000)
    tune_lr: float | None = Field(None, gt=0, le=1)
    tune_scale_change: float = Field(0.2, ge=0, lt=1)
    # a float model of the same architecture whose layers' outputs the tuning aims at instead of the source's
    # own (e.g. the original a ZEDA model was trained from: the quantized ZEDA model is pulled toward it)
    tune_reference: str | None = None
    true_sequential: bool = True
    weight_by_routing: bool = True
    starved_experts: Literal["all-tokens", "rtn"] = "all-tokens"
    min_expert_tokens: int = 16
    only_experts: bool = False
    # regular expressions (re.search) over "layers.{i}.{module}" -- e.g. "layers.0.self_attn.q_proj",
    # "layers.3.mlp.shared_experts.down_proj": matching linears stay in float. Routed experts are always quantized.
    ignore: list[str] = Field(default_factory=list)
    # other schemes for some linears, e.g. [{match: self_attn, bits: 8}] or the CLI's "self_attn=8"
    overrides: list[SchemeOverride] = Field(default_factory=list)
    # RTN needs no calibration data; with this on it still runs the data through the model to record
    # each linear's output error and the per-expert token counts (GPTQ always does)
    measure_errors: bool = True
    # lm_head stays in float unless asked (a tied head, which is the embedding matrix, is refused)
    quantize_lm_head: bool = False
    expert_chunk: int = 16
    # calibration batches are summed in this many fixed chunks, then the chunks in order: the statistics
    # (and the checkpoint) are byte-identical for any number of torchrun ranks up to it, which it also caps
    reduce_chunks: int = Field(8, ge=1, le=4096)
    # AWQ (method awq / awq+gptq): "pow2" restricts the scales of groups read by a float module (the
    # routers) to powers of two, so the fold is exact and routing bit-identical; "free" does not
    awq_scales: Literal["pow2", "free"] = "pow2"
    awq_grid: int = 20
    awq_duo_scaling: bool = True  # also try AutoAWQ's x^a / w^(1-a) beside x^a (False: x^a only)
    awq_search_tokens: int = 8192

    @field_validator("group_size", mode="before")
    @classmethod
    def _channel(cls, v):
        if isinstance(v, bool):
            return v  # True == 1 and False == 0: refused by NoBoolNumbers
        if v in (-1, "channel", "per-channel", None):
            return None
        if v == 0:  # not a synonym of per-channel: a 0 is more likely a slip than a choice
            raise ValueError("0 is not a group size; use -1 (or 'channel') for per-channel, "
                             "or a power of two such as 128")
        if isinstance(v, int) and (v < 0 or v & (v - 1)):  # (said here, in the words the user wrote it in)
            raise ValueError(f"{v} is not a power of two; use one such as 128, or -1 (or 'channel') for per-channel")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits={v} is not supported; choose one of {list(SUPPORTED_BITS)}")
        return v

    @field_validator("calib_samples", "seq_len", "batch_size", "block_size", "expert_chunk")
    @classmethod
    def _positive(cls, v, info):
        if v <= 0:
            raise ValueError(f"{info.field_name} must be positive, got {v}")
        return v

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, v):
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"ignore pattern {p!r} is not a regular expression ({e})") from None
        return v

    @field_validator("overrides", mode="before")
    @classmethod
    def _override_strings(cls, v):
        if isinstance(v, (list, tuple)):  # "REGEX=BITS[/GROUP]", the CLI's spelling, is accepted in recipes too
            out = []
            for x in v:
                if isinstance(x, str):
                    try:
                        o = _overrides.parse(x)
                    except UserError as e:
                        raise ValueError(str(e).removeprefix("--override ")) from None
                    x = {"match": o.match, "bits": o.bits, "group_size": o.group_size}
                out.append(x)
            return out
        return v

    @field_validator("awq_grid")
    @classmethod
    def _grid(cls, v):
        if v < 1:
            raise ValueError(f"the AWQ alpha grid needs at least one point, got {v}")
        return v

    @field_validator("awq_search_tokens")
    @classmethod
    def _search_tokens(cls, v):
        if v < 1:
            raise ValueError(f"awq_search_tokens must be positive, got {v}")
        return v

    @field_validator("min_expert_tokens")
    @classmethod
    def _nonneg(cls, v):
        if v < 0:
            raise ValueError(f"min_expert_tokens must be >= 0, got {v}")
        return v

    @field_validator("damp")
    @classmethod
    def _damp(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"damp must lie in (0, 1), got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _rtn_has_no_order(cls, data):
        if isinstance(data, dict) and data.get("method") in ("rtn", "awq") and "act_order" not in data:
            data = {**data, "act_order": None}  # the default order is GPTQ's; RTN (and AWQ's RTN codes) have none
        return data

    @model_validator(mode="after")
    def _cross(self):
        if self.act_order == "group" and self.format != "gptq":
            raise ValueError(
                "act_order 'group' (permuted groups with g_idx) exists only in the GPTQ format; "
                "use act_order 'weight' with compressed-tensors"
            )
        if self.act_order is not None and self.method not in ("gptq", "awq+gptq"):
            raise ValueError(f"act_order applies to GPTQ only (method {self.method} rounds to nearest: "
                             "use awq+gptq for an order)")
        if self.format == "awq" and self.bits != 4:
            raise ValueError(f"the AWQ format stores 4-bit weights only, not {self.bits}-bit; "
                             "use bits 4 or the compressed-tensors/GPTQ format")
        if self.format == "awq" and self.group_size is None:
            raise ValueError("the AWQ format is not written per-channel (vLLM's AWQ MoE kernels need a "
                             "group size); use a group size such as 128")
        if self.format == "awq" and self.overrides:
            raise ValueError("the AWQ format has one bit width and group size for the whole checkpoint; "
                             "write per-module schemes (overrides) with the compressed-tensors or GPTQ format")
        # named as set: tune_scale_change has no command-line flag
        unused = set_apart_from(self, ("tune_lr", "tune_reference", "tune_scale_change"), "block-output tuning")
        if not self.tune_steps and unused:
            raise ValueError(f"{unused}: set tune_steps too")
        if self.tune_steps and not self.needs_calibration:
            raise ValueError("tune_steps tunes on the calibration data, which method rtn with measure_errors "
                             "off does not run; turn measure_errors on, or set tune_steps 0")
        QuantSpec(bits=self.bits, group_size=self.group_size)  # group size rules
        return self

    def spec(self) -> QuantSpec:
        ratios = QuantSpec.__dataclass_fields__["clip_ratios"].default if self.clip_search else (1.0,)
        zero_min = 1 if self.format == "gptq" and not self.symmetric else 0
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.act_order, ratios, zero_min)

    def override_list(self) -> list[_overrides.Override]:
        return [o.as_override() for o in self.overrides]

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.measure_errors

    @property
    def awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def solver(self) -> str:
        """What solves the (scaled) weights: gptq, or round to nearest (rtn / awq's weighted clip search)."""
        return {"awq+gptq": "gptq"}.get(self.method, self.method)


# command-line spellings of the settings whose flag is not ``--`` + the key with dashes
CLI_FLAGS = {"symmetric": "--sym/--asym", "clip_search": "--no-clip-search", "true_sequential": "--no-true-sequential",
             "overrides": "--override"}


def build_config(spelling: Literal["recipe", "cli"] = "recipe", **values) -> QuantizeConfig:
    """QuantizeConfig from user values, with pydantic's errors turned into one UserError line, in the words the
    user wrote them in (``spelling``: recipe keys, or ``moecompress quantize`` options)."""
    try:
        return QuantizeConfig(**values)
    except ValidationError as e:
        raise settings_error(e, QuantizeConfig.model_fields, "invalid setting",
                             CLI_FLAGS if spelling == "cli" else None) from None
