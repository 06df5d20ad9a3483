"""Per-module schemes: which linears get another bit width or group size than ``--bits``/``--group-size``.

A common MoE recipe keeps the routed experts (almost all of the parameters) at 4 bits and gives the small,
sensitive rest -- attention, shared experts, dense layers -- 8 bits. An override is a regular expression
(``re.search``) over the ``layers.{i}.{module}`` names that ``--ignore`` matches too, with the bits and/or
the group size it sets; the first override that matches a linear decides. Routed experts always take the
base scheme (every loader reads one scheme for a layer's experts, and transformers one for all of them),
and linears a serving engine fuses (q/k/v, gate/up) must share one (vLLM loads them as one layer).
Pure functions, no I/O: the pipeline asks :func:`assign` once, before any work.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..errors import UserError
from .spec import SUPPORTED_BITS, QuantSpec

CHANNEL = -1  # an override's group size meaning "per-channel" (None means "keep the base group size")


@dataclass(frozen=True)
class Override:
    match: str
    bits: int | None = None
    group_size: int | None = None  # None: the base one; CHANNEL: per-channel

    def apply(self, base: QuantSpec) -> QuantSpec:
        gs = base.group_size if self.group_size is None else (None if self.group_size == CHANNEL else self.group_size)
        return dataclasses.replace(base, bits=self.bits or base.bits, group_size=gs)


def parse(text: str) -> Override:
    """``REGEX=BITS``, ``REGEX=BITS/GROUP`` or ``REGEX=/GROUP`` (GROUP a power of two, or -1 / channel)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise UserError(f"--override {text!r}: expected REGEX=BITS[/GROUP], e.g. 'self_attn=8' or "
                        "'shared_expert=8/64'")
    bits_s, _, group_s = value.partition("/")
    try:
        bits = int(bits_s) if bits_s else None
        group = None if not group_s else (CHANNEL if group_s in ("-1", "channel") else int(group_s))
    except ValueError:
        raise UserError(f"--override {text!r}: BITS and GROUP must be integers (GROUP may be -1 or "
                        "'channel')") from None
    return check(Override(pattern, bits, group))


def check(o: Override) -> Override:
    """The override itself is sound: a regular expression, supported bits, a valid group size, some change."""
    try:
        re.compile(o.match)
    except re.error as e:
        raise UserError(f"override pattern {o.match!r} is not a regular expression ({e})") from None
    if o.bits is None and o.group_size is None:
        raise UserError(f"override {o.match!r} sets neither bits nor a group size")
    if o.bits is not None and o.bits not in SUPPORTED_BITS:
        raise UserError(f"override {o.match!r}: bits={o.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
    if o.group_size is not None and o.group_size != CHANNEL:
        try:
            QuantSpec(group_size=o.group_size)  # the power-of-two rule
        except UserError as e:
            raise UserError(f"override {o.match!r}: {e}") from None
    return o


# linears a serving engine loads as one (vLLM: qkv_proj, gate_up_proj, fused_qkv_a_proj, in_proj_qkvz, in_proj_ba):
# quantized together with one scheme, or kept in float together. The second item is vLLM's name of the fused layer.
FUSED = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"),
         (("q_a_proj", "kv_a_proj_with_mqa"), "fused_qkv_a_proj"), (("in_proj_qkv", "in_proj_z"), "in_proj_qkvz"),
         (("in_proj_b", "in_proj_a"), "in_proj_ba"))


def fused_siblings(leaf: str) -> tuple[str, ...]:
    return next((g for g, _ in FUSED if leaf in g), ())


def assign(all_targets: list[list], overrides: list[Override], base: QuantSpec,
           others: tuple[str, ...] = ()) -> dict[str, QuantSpec]:
    """``{"layers.{i}.{name}": spec}`` for every target an override changes (the others use ``base``).

    ``all_targets``: per layer, the targets left after ``--ignore`` (``quant.targets.Target``); ``others``: names
    of quantized linears outside the layers (``lm_head``), matched as they are. A pattern that matches no linear,
    matches routed experts, or splits a fused group between two schemes is a UserError."""
    if not overrides:
        return {}
    compiled = [re.compile(o.match) for o in overrides]
    used = [False] * len(overrides)
    out: dict[str, QuantSpec] = {}

    def match(name: str, routed: bool = False) -> None:
        j = next((j for j, c in enumerate(compiled) if c.search(name)), None)
        if j is None:
            return
        if routed:
            raise UserError(f"override {overrides[j].match!r} matches the routed experts {name}: they take "
                            "--bits/--group-size (loaders read one scheme for all of them); anchor the pattern, "
                            "e.g. 'self_attn' or 'shared_expert'")
        used[j] = True
        spec = overrides[j].apply(base)
        if spec != base:
            out[name] = spec

    for name in others:
        match(name)
    for i, targets in enumerate(all_targets):
        for t in targets:
            match(f"layers.{i}.{t.name}", routed=t.expert_proj is not None)
    unused = [o.match for o, u in zip(overrides, used) if not u]
    if unused and "lm_head" in unused[0] and "lm_head" not in others:
        raise UserError(f"override {unused[0]!r}: lm_head stays in float unless --quantize-lm-head is given "
                        "(quantize_lm_head: true in a recipe)")
    if unused:
        example = next((f"layers.{i}.{t.name}" for i, ts in enumerate(all_targets) for t in ts
                        if t.expert_proj is None), "layers.0.self_attn.q_proj")
        raise UserError(f"override {unused[0]!r} matches no quantized linear (names look like '{example}'; "
                        "linears kept by --ignore do not count)")
    _check_fused(all_targets, out, base)
    return out


def _check_fused(all_targets: list[list], specs: dict[str, QuantSpec], base: QuantSpec) -> None:
    names = {f"layers.{i}.{t.name}" for i, ts in enumerate(all_targets) for t in ts}
    for name in specs.keys() & names:
        parent, _, leaf = name.rpartition(".")
        others = [f"{parent}.{x}" for x in fused_siblings(leaf) if f"{parent}.{x}" in names]
        differ = [o for o in others if specs.get(o, base) != specs[name]]
        if differ:
            members = "|".join(o.rpartition(".")[2] for o in others)
            raise UserError(f"the overrides give {name} another scheme than {differ[0].rpartition('.')[2]}: serving "
                            f"engines load them as one fused layer with one scheme; match all of them, e.g. "
                            f"'{re.escape(parent)}\\.({members})$'")


def check_shapes(layers: list, all_targets: list[list], specs: dict[str, QuantSpec], base: QuantSpec,
                 weight_of, fmt: str = "compressed-tensors") -> None:
    """Every target's group size divides its input dimension (``weight_of(layer, target)``), and the format can
    pack its shape (GPTQ v1: K and N times the bits in whole words; AWQ: N by eight): fail before any work."""
    from .formats import awq as awq_format, gptq as gptq_format

    for i, targets in enumerate(all_targets):
        for t in targets:
            name = f"layers.{i}.{t.name}"
            spec = specs.get(name, base)
            shape = weight_of(layers[i], t).shape
            spec.check_shape(shape[-1], f"layer {i} {t.name}")
            n, k = shape[-2] // (2 if t.expert_proj == "gate_up" else 1), shape[-1]  # gate_up: written as two halves
            try:
                if fmt == "gptq":
                    gptq_format.check_dims(n, k, spec.bits)
                elif fmt == "awq":
                    awq_format.check_dims(n, k, t.name)
            except UserError as e:
                hint = ("routed experts are always quantized: use --format compressed-tensors" if t.expert_proj
                        else f"use --format compressed-tensors, or keep it in float (--ignore '{re.escape(t.name)}$')")
                raise UserError(f"layer {i} {t.name}: {str(e).split(';')[0]}; {hint}") from None


def describe(specs: dict[str, QuantSpec]) -> list[dict]:
    """moecompress.json's record: one entry per distinct overriding scheme, with the linears it covers."""
    by: dict[QuantSpec, list[str]] = {}
    for name, s in specs.items():
        by.setdefault(s, []).append(name)
    return [{"bits": s.bits, "group_size": s.group_size, "linears": len(ns), "examples": ns[:4]} for s, ns in by.items()]
