"""The YAML recipe of `moecompress run`: one model, several quantized variants, how to evaluate and report them.

```yaml
model: builtin:demo              # a checkpoint folder, or builtin:demo / builtin:demo-quick / builtin:demo-wide
output_dir: runs/demo            # the run folder (--out overrides it)
calibration: {data: builtin:stdlib, samples: 128, seq_len: 256, seed: 0, batch_size: 8}
defaults: {device: cpu}          # QuantizeConfig settings shared by every variant (optional)
eval: {data: [builtin:heldout-code, builtin:heldout-prose], samples: 32, seq_len: 256}
variants:
  - {name: rtn-w4g128, method: rtn, bits: 4, group_size: 128}
  - {name: gptq-w3g64, method: gptq, bits: 3, group_size: 64, act_order: weight, seed: 1}
  - {name: thr-50, skip: {rule: threshold, target: 0.5}}   # a zero-expert skipping baseline
  - {name: zeda, from: zeda}                               # the ZEDA model (needs the zeda: section)
  - {name: zeda-gptq-w4, from: zeda, method: gptq, bits: 4} # ZEDA, then GPTQ
zeda: {target_skip: 0.5, stage1_steps: 120}              # optional: run ZEDA first (moecompress zeda settings)
bench: {device: cuda, prompt_len: 128, new_tokens: 64, batch: 1}   # optional, needs the runtime
report: {title: My run, formats: [md, html]}
```

Relative paths (``model``, ``output_dir``, calibration and evaluation data) are relative to the
current working directory, like command-line arguments, not to the recipe file: the same recipe
then works wherever it lives (a shipped recipe is inside the installed package).

A variant's keys other than ``name`` are :class:`moecompress.settings.QuantizeConfig` fields; they
override ``defaults``, which override ``calibration``. The source model is always evaluated too,
as the variant named ``reference``. Every mistake is one :class:`UserError` line naming the key and
where it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from ..errors import UserError
from ..units import SEED_MAX
from ..settings import NoBoolNumbers, QuantizeConfig

REFERENCE = "reference"
MAX_NAME = 100  # a variant's name names its folder and files (eval/<name>.json, variants/.<name>.source-stamp)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Strict):
    data: str = "builtin:stdlib"
    samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    batch_size: int = Field(8, gt=0)


class EvalSettings(_Strict):
    data: list[str] = Field(default_factory=lambda: ["builtin:heldout-code", "builtin:heldout-prose"], min_length=1)
    samples: int = Field(32, gt=0)
    seq_len: int = Field(256, gt=1)
    batch_size: int = Field(8, gt=0)
    seed: int = Field(1234, ge=0, le=SEED_MAX)
    low_memory: bool = False
    device: str = "cpu"
    tasks: list[str] | None = None


class BenchSettings(_Strict):
    """Arguments of the runtime's ``benchmark`` (moecompress.runtime.bench)."""

    device: str = "cuda"
    prompt_len: int = Field(128, gt=0)
    new_tokens: int = Field(64, gt=1)
    batch: int = Field(1, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    repeats: int = Field(3, gt=0)


class ReportSettings(_Strict):
    title: str | None = None  # default: "moecompress report: <run folder name>"
    formats: list[Literal["md", "html"]] = Field(default_factory=lambda: ["md", "html"])
    # "the model is sensitive to this quantization" when RTN raises perplexity by at least this much
    sensitivity_pct: float = Field(3.0, ge=0)


class SkipBaseline(_Strict):
    """A training-free skipping baseline variant (``zero-experts baseline``): ``skip: {rule, target}``.
    It is calibrated on the recipe's calibration data (``samples`` windows of ``seq_len``)."""

    rule: Literal["threshold", "top-p", "top-k"]
    target: float = Field(gt=0, lt=1)
    samples: int = Field(32, gt=0)
    seq_len: int = Field(256, gt=1)


class Variant(_Strict):
    name: str
    config: QuantizeConfig | SkipBaseline | None  # None: the recipe's ZEDA model itself
    source: Literal["original", "zeda"] = "original"  # what a quantize variant starts from


class Recipe(_Strict):
    model: str
    output_dir: str = "runs/run"
    threads: int | None = Field(None, gt=0, description="torch CPU threads for the whole run (default: torch's)")
    calibration: Calibration = Field(default_factory=Calibration)
    defaults: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    variants: list[dict[str, Any]] = Field(min_length=1)
    bench: BenchSettings | None = None
    report: ReportSettings = Field(default_factory=ReportSettings)
    # ZEDA first (moecompress.zeda.config.ZedaConfig fields); variants with ``from: zeda`` build on it
    zeda: dict[str, Any] | None = None

    def zeda_config(self):
        """The validated ZEDA settings, or None without a ``zeda:`` section."""
        if self.zeda is None:
            return None
        from ..zeda.config import build_zeda_config

        try:
            return build_zeda_config(**self.zeda)
        except UserError as e:
            raise UserError(f"zeda: {e}") from None

    @field_validator("defaults")
    @classmethod
    def _no_name(cls, v):
        if "name" in v:
            raise ValueError("'name' belongs to each variant, not to defaults")
        return v

    def built_variants(self) -> list[Variant]:
        """Each variant's name and full, validated QuantizeConfig (calibration < defaults < variant)."""
        cal = self.calibration
        base = dict(calib=cal.data, calib_samples=cal.samples, seq_len=cal.seq_len, seed=cal.seed,
                    batch_size=cal.batch_size)
        try:
            QuantizeConfig(**{**base, **self.defaults})
        except ValidationError as e:
            raise UserError(_describe(e, "defaults")) from None
        out, seen = [], set()
        for i, v in enumerate(self.variants):
            where = f"variants[{i}]"
            name = v.get("name")
            if name is None or name == "":
                raise UserError(f"{where}: every variant needs a 'name'")
            if not isinstance(name, str):
                raise UserError(f"{where}: 'name' is a {type(name).__name__} ({name!r}), not text: quote it "
                                f"(name: \"{name}\")")
            where += f" ({name})"
            if not _NAME.match(name):
                raise UserError(f"{where}: name must be letters, digits, '.', '_' or '-' (it names a folder)")
            if len(name) > MAX_NAME:
                raise UserError(f"{where}: the name is {len(name)} characters long; at most {MAX_NAME} (it names "
                                "folders and files)")
            # (case-insensitive file systems: 'A' and 'a' would share a folder, 'Reference' the source's evaluation)
            if name.lower() == REFERENCE:
                raise UserError(f"{where}: the name '{name}' is taken by the source model (always evaluated)")
            if name.lower() in seen:
                raise UserError(f"{where}: duplicate variant name '{name}' (names are compared ignoring case: they "
                                "name folders)")
            seen.add(name.lower())
            fields = {k: val for k, val in v.items() if k != "name"}
            source = fields.pop("from", "original")
            if source not in ("original", "zeda"):
                raise UserError(f"{where}: 'from' must be 'original' or 'zeda', not {source!r}")
            if source == "zeda":
                if self.zeda is None:
                    raise UserError(f"{where}: 'from: zeda' needs a top-level 'zeda:' section")
                if "skip" in fields:
                    raise UserError(f"{where}: a skipping baseline starts from the original model, not 'from: zeda'")
                if not fields:  # the ZEDA model itself
                    out.append(Variant(name=name, config=None, source="zeda"))
                    continue
            if "skip" in fields:
                if set(fields) != {"skip"} or not isinstance(fields["skip"], dict):
                    raise UserError(f"{where}: a skipping baseline takes only 'name' and 'skip: {{rule, target}}'")
                try:
                    out.append(Variant(name=name, config=SkipBaseline(**fields["skip"])))
                except ValidationError as e:
                    raise UserError(_describe(e, where + ".skip")) from None
                continue
            try:
                cfg = QuantizeConfig(**{**base, **self.defaults, **fields})
            except ValidationError as e:
                raise UserError(_describe(e, where)) from None
            out.append(Variant(name=name, config=cfg, source=source))
        return out


def _describe(e: ValidationError, where: str) -> str:
    """One line: where the first error is, which key, what is wrong (unknown keys first: a
    misspelt key is also the cause of a "missing" one)."""
    errors = e.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = [str(x) for x in err["loc"]]
    keyed = err["type"] in ("extra_forbidden", "missing")
    path = where
    for part in loc[:-1] if keyed else loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    if keyed:
        what = "unknown key" if err["type"] == "extra_forbidden" else "missing key"
        return f"{what} '{loc[-1]}'" + (f" in {path}" if path else " at the top level")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path or 'recipe'}: {msg}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate already-loaded YAML data; errors are one line starting with ``source``."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a mapping of keys (model, variants, ...), got {type(data).__name__}")
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        raise UserError(f"{source}: {_describe(e, '')}") from None
    try:
        recipe.built_variants()
        recipe.zeda_config()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty")
    return parse_recipe(data, str(path))


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently: a pasted
    block's ``bits: 8`` overriding the ``bits: 4`` above it, or a second ``variants:`` list dropping the first)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def eval_settings_dict(recipe: Recipe) -> dict[str, Any]:
    """The evaluation settings that decide whether a saved evaluation is still valid."""
    return recipe.eval.model_dump()
