"""ModelHandle: a checkpoint directory + its family's ArchSpec, with every name mapping in one place.

The handle answers three questions for the rest of the toolkit:

* which family is this, and what are its MoE dimensions (``ModelHandle.open`` rejects anything
  unsupported with one clear line);
* how to build an empty (meta-device) transformers model of it and fill one decoder layer at a
  time from the shards (``skeleton``, ``load_layer``);
* which on-disk names a tensor has: read in whichever spelling the shards use -- per-expert
  (``experts.{e}.gate_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1``) or transformers 5's
  fused 3D (``mlp.experts.gate_up_proj``), under ``model.`` or, for vision-language wrappers,
  ``model.language_model.`` -- and written in the family's original spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.fp8_source import Fp8SourceReader
from ..checkpoint.reader import CheckpointReader
from ..errors import UserError, one_line
from ..memory import gc_paused
from ..zero.layout import ZeroExperts, read_zero_experts
from .registry import BY_MODEL_TYPE, ArchSpec, router_rule, supported_families

FUSED_GATE_UP = "experts.gate_up_proj"
FUSED_DOWN = "experts.down_proj"
ZERO_BIAS = "gate.zero_expert_bias"
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _unsupported(config: dict) -> UserError:
    mt = config.get("model_type", "<missing model_type>")
    text = config.get("text_config") or {}
    is_moe = any(config.get(k) or text.get(k) for k in _MOE_KEYS)
    fams = ", ".join(supported_families())
    if is_moe:
        return UserError(f"MoE family '{mt}' is not supported yet; supported families: {fams}")
    return UserError(f"'{mt}' is not a Mixture-of-Experts model; moecompress supports the MoE families {fams}")


@dataclass
class ModelHandle:
    reader: CheckpointReader
    spec: ArchSpec
    config: object  # transformers PretrainedConfig (the full one)
    text_config: object  # the config of the causal LM we build
    disk_prefix: str  # "model" or "model.language_model"
    zero: ZeroExperts | None = None  # zero experts (ZEDA), in either layout

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, dequantize: bool = False) -> "ModelHandle":
        """Open a checkpoint; with ``dequantize`` a quantized one reads as float (see checkpoint.load)."""
        with gc_paused():  # imports transformers
            return cls._open(path, dequantize)

    @classmethod
    def _open(cls, path: str | Path, dequantize: bool) -> "ModelHandle":
        reader = Fp8SourceReader.wrap(CheckpointReader.open(path))  # an FP8 release reads as its float model
        if dequantize:
            from ..checkpoint.dequant_reader import DequantizingReader

            reader = DequantizingReader.wrap(reader)
        spec = BY_MODEL_TYPE.get(reader.config.get("model_type"))
        if spec is None:
            raise _unsupported(reader.config)
        config = read_hf_config(reader.path)
        if isinstance(reader, Fp8SourceReader):  # the skeleton is the float model
            config.__dict__.pop("quantization_config", None)
        text_config = getattr(config, spec.text_config_attr) if spec.text_config_attr else config
        prefix = next(
            (p for p in spec.disk_model_prefixes if f"{p}.embed_tokens.weight" in reader or any(
                n.startswith(f"{p}.layers.") for n in reader.names())),
            None,
        )
        if prefix is None:
            raise UserError(f"{reader.path}: no decoder layers found under {list(spec.disk_model_prefixes)} in the shards")
        h = cls(reader, spec, config, text_config, prefix, read_zero_experts(reader.config))
        if h.num_experts <= 0:
            raise _unsupported(reader.config)
        shared = [i for i, t in enumerate(getattr(text_config, "indexer_types", None) or []) if t == "shared"]
        if shared:  # the selection travels from layer to layer: our layer-at-a-time passes do not carry it yet
            raise UserError(f"{reader.path}: layers {shared[:4]}{'...' if len(shared) > 4 else ''} reuse an earlier "
                            "layer's sparse-attention key selection (indexer_types 'shared'); not supported yet")
        check_routing_fields(text_config, spec, h.num_experts + h.num_zero, reader.path)
        h._check_zero_experts()
        h._check_layers_present()
        h._check_router_rows()
        return h

    def check_context(self, seq_len: int, option: str = "--seq-len") -> None:
        """A window longer than the model's ``max_position_embeddings`` measures positions it never saw."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if limit and seq_len > int(limit):
            raise UserError(f"{option} {seq_len} is longer than the model's context (max_position_embeddings "
                            f"{limit})")

    def _check_zero_experts(self) -> None:
        z = self.zero
        if z is None:
            return
        if z.layout == "stock" and router_rule(self.spec, self.text_config).n_group is not None:
            raise UserError(f"{self.reader.path}: a stock-layout zero-expert model cannot use group-limited routing "
                            f"(n_group={self.text_config.n_group}): stock loaders would group the zero experts too")
        if self.num_experts < 1:
            raise UserError(f"{self.reader.path}: {z.num_zero} zero experts leave no real expert")
        if z.rule is not None:
            from ..zero.layout import check_rule

            check_rule(*z.rule, self.top_k)

    def _check_router_rows(self) -> None:
        """The first router's rows are the experts config.json counts (plus native zero experts): a config
        that misses its experts field gets transformers' default, which the weights then contradict."""
        expected = self.num_experts + self.num_zero
        for i in range(self.num_layers):
            for name in self._spellings(self.spec.routers[0] + ".weight"):
                info = self.reader.tensors.get(f"{self.layer_prefix(i)}{name}")
                if info is not None:
                    if info.shape[0] != expected:
                        # the key config.json spells it with (ERNIE: num_experts is moe_num_experts there)
                        key = getattr(self.text_config, "attribute_map", {}).get(self.spec.num_experts_attr,
                                                                                 self.spec.num_experts_attr)
                        raise UserError(f"{self.reader.path}: config.json gives {expected} router rows (experts"
                                        f"{' + zero experts' if self.num_zero else ''}) but "
                                        f"{self.layer_prefix(i)}{name} has {info.shape[0]}; is "
                                        f"'{key}' missing or wrong in config.json?")
                    return

    def _check_layers_present(self) -> None:
        last = f"{self.disk_prefix}.layers.{self.num_layers - 1}."
        if not any(n.startswith(last) for n in self.reader.names()):
            raise UserError(f"{self.reader.path}: config has {self.num_layers} layers but the shards hold no '{last}*' tensors")

    # ---------------------------------------------------------------- dimensions
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_experts(self) -> int:
        """Real experts E (a stock zero-expert checkpoint's config counts its Z zero experts too)."""
        n = int(getattr(self.text_config, self.spec.num_experts_attr, 0) or 0)
        return n - self.zero.num_zero if self.zero is not None and self.zero.layout == "stock" else n

    @property
    def num_zero(self) -> int:
        """Zero experts Z (router rows E..E+Z-1); 0 for an ordinary model."""
        return self.zero.num_zero if self.zero is not None else 0

    @property
    def top_k(self) -> int:
        return int(getattr(self.text_config, self.spec.top_k_attr))

    @property
    def float_dtype(self) -> torch.dtype:
        """The checkpoint's float dtype (of its embedding), used for scales and dense outputs."""
        info = self.reader.tensors.get(f"{self.disk_prefix}.embed_tokens.weight")
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
            info.dtype if info else "BF16", torch.bfloat16
        )

    # ---------------------------------------------------------------- building
    def skeleton(self, experts_implementation: str = "eager") -> nn.Module:
        """The causal LM of the text model on the meta device: structure only, no memory."""
        from transformers import AutoModelForCausalLM

        config = self.text_config
        if self.zero is not None and self.zero.layout == "stock":  # build E real experts; the zero ones are never read
            import copy

            config = copy.deepcopy(config)
            setattr(config, self.spec.num_experts_attr, self.num_experts)
        with torch.device("meta"), gc_paused():  # imports the family's modeling code
            model = AutoModelForCausalLM.from_config(
                config, experts_implementation=experts_implementation, trust_remote_code=False
            )
        if self.zero is not None:
            from ..zero.modules import RouterSpec, install_zero_experts

            install_zero_experts(model, RouterSpec.of(self.spec, config, self.num_experts, self.zero))
        return model

    def layer_prefix(self, i: int) -> str:
        return f"{self.disk_prefix}.layers.{i}."

    def layer_tensor_names(self, i: int) -> list[str]:
        pre = self.layer_prefix(i)
        return [n for n in self.reader.names() if n.startswith(pre)]

    def whole_load_filter(self):
        """A predicate on checkpoint tensor names: True for what a whole load of this model reads -- the
        embedding, final norm and head, the first ``num_layers`` decoder layers and, in them, the first
        ``num_experts`` experts -- False for the rest (MTP layers, vision towers, a stock layout's zero experts).
        Quantized parts (``weight_packed``, ``qweight``, ...) go by their module's name."""
        base = f"{self.disk_prefix}.layers."
        outer = (f"{self.disk_prefix}.embed_tokens.", f"{self.disk_prefix}.norm.", "lm_head.")
        expert = re.compile(r"\.experts\.(\d+)\.")
        layers, experts = self.num_layers, self.num_experts

        def keep(name: str) -> bool:
            if not name.startswith(base):
                return name.startswith(outer)
            i = name[len(base):].split(".", 1)[0]
            if not i.isdigit() or int(i) >= layers:
                return False
            m = expert.search(name)
            return m is None or int(m.group(1)) < experts

        return keep

    def non_layer_tensor_names(self) -> list[str]:
        """Everything outside the decoder layers we process (embeddings, norm, lm_head, vision, MTP...)."""
        pat = re.compile(rf"^{re.escape(self.disk_prefix)}\.layers\.(\d+)\.")
        out = []
        for n in self.reader.names():
            m = pat.match(n)
            if m is None or int(m.group(1)) >= self.num_layers:
                out.append(n)
        return out

    def undeclared_layers(self) -> list[int]:
        """Layers the shards hold past ``num_hidden_layers`` that config.json does not declare as MTP layers
        (``num_nextn_predict_layers``, DeepSeek-V3/GLM): kept unchanged like an MTP layer, but more likely a
        ``num_hidden_layers`` that is wrong."""
        pat = re.compile(rf"^{re.escape(self.disk_prefix)}\.layers\.(\d+)\.")
        mtp = int(getattr(self.text_config, "num_nextn_predict_layers", 0) or 0)
        found = {int(m.group(1)) for n in self.reader.names() if (m := pat.match(n))}
        return sorted(i for i in found if i >= self.num_layers + mtp)

    # ---------------------------------------------------------------- names
    # Reading accepts every layout a real checkpoint has: the family's original names (what
    # ``save_pretrained`` writes by default: per-expert tensors, Mixtral's ``block_sparse_moe`` and
    # ``w1/w3/w2``) and transformers 5's in-memory names (``save_pretrained(save_original_format=False)``,
    # official Qwen3.5 shards: ``mlp.`` and fused ``experts.gate_up_proj``). Which spelling a tensor
    # has is looked up in the shard index, tensor by tensor. Writing always uses the original names
    # (``disk_local``, ``expert_disk_names``, ``output_name``) so every loader of the family reads our output.

    def disk_local(self, mem_local: str) -> str:
        """Original (written) spelling of a layer-local in-memory name (Mixtral: mlp. -> block_sparse_moe.)."""
        renamed = dict(self.spec.disk_renames).get(mem_local)
        if renamed is not None:
            return renamed
        if mem_local.startswith("mlp.") and self.spec.disk_moe_name != "mlp":
            return self.spec.disk_moe_name + mem_local[3:]
        return mem_local

    def _spellings(self, mem_local: str) -> tuple[str, ...]:
        """Every layer-local spelling a checkpoint may store ``mem_local`` under, original first."""
        return tuple(dict.fromkeys((self.disk_local(mem_local), mem_local)))

    def output_name(self, stored: str) -> str:
        """The name we write for a layer tensor stored as ``stored`` (in either spelling)."""
        layers = self.disk_prefix + ".layers."
        if stored.startswith(layers):
            i, _, local = stored[len(layers):].partition(".")
            return f"{layers}{i}.{self.disk_local(local)}"
        return stored

    def source_name(self, i: int, mem_local: str) -> str | None:
        """The shard name of layer i's in-memory tensor ``mem_local`` as this checkpoint spells it (None: absent)."""
        pre = self.layer_prefix(i)
        return next((pre + loc for loc in self._spellings(mem_local) if pre + loc in self.reader), None)

    def fused_source(self, i: int, key: str) -> str | None:
        """The shard name of a fused 3D expert tensor (``mlp.experts.gate_up_proj``), None if stored per expert."""
        return next((n for n in (self.source_name(i, key), self.source_name(i, key + ".weight")) if n), None)

    def expert_disk_names(self, i: int, e: int) -> tuple[str, str, str]:
        """Full original module names (no suffix) of expert e's gate, up and down projections: what we write."""
        base = f"{self.layer_prefix(i)}{self.spec.disk_moe_name}.experts.{e}."
        return tuple(base + n for n in self.spec.disk_expert_names)  # type: ignore[return-value]

    def expert_source_names(self, i: int, e: int) -> tuple[str, str, str]:
        """Module names of expert e's projections as the shards spell them (the original ones if absent)."""
        for block in self._spellings("mlp."):
            base = f"{self.layer_prefix(i)}{block}experts.{e}."
            names = tuple(base + n for n in self.spec.disk_expert_names)
            if names[0] + ".weight" in self.reader:
                return names  # type: ignore[return-value]
        return self.expert_disk_names(i, e)

    def load_layer_state(self, i: int, module: nn.Module, dtype: torch.dtype,
                         skip_experts: bool = False, fp32: re.Pattern | None = None) -> dict[str, torch.Tensor]:
        """The in-memory state dict of decoder layer i, read from the shards (experts fused to 3D; left out
        with ``skip_experts``); tensors whose full name ``fp32`` finds stay fp32 (:func:`kept_in_fp32`)."""
        r = self.reader
        wanted = module.state_dict(keep_vars=True)
        out: dict[str, torch.Tensor] = {}
        for key, ref in wanted.items():
            if key.endswith(FUSED_GATE_UP) or key.endswith(FUSED_DOWN):
                if skip_experts:
                    continue
                t = self._read_experts(i, key)
            else:
                name = self.source_name(i, key)
                if name is None and key.endswith(ZERO_BIAS) and self.zero is not None:
                    out[key] = torch.zeros(ref.shape, dtype=dtype)  # absent: no offset
                    continue
                if name is None:
                    raise UserError(f"{r.path}: tensor '{self.layer_prefix(i)}{self.disk_local(key)}' is missing from the shards")
                t = r.get(name)
            if tuple(t.shape) != tuple(ref.shape):
                raise UserError(f"{r.path}: tensor for layer {i} '{key}' has shape {tuple(t.shape)}, the config implies {tuple(ref.shape)}")
            if t.is_floating_point() and ref.is_floating_point():
                keep = fp32 is not None and fp32.search(f"model.layers.{i}.{key}") is not None
                t = t.to(torch.float32 if keep else dtype)
            out[key] = t
        return out

    def missing_tensors(self, i: int, module: nn.Module) -> list[str]:
        """The checkpoint names decoder layer i (``module``, e.g. a skeleton's) needs that the shards lack."""
        missing = []
        for key in module.state_dict(keep_vars=True):
            if key.endswith(FUSED_GATE_UP) or key.endswith(FUSED_DOWN):
                if self.fused_source(i, key) is not None:
                    continue
                for e in range(self.num_experts):
                    g, u, d = self.expert_source_names(i, e)
                    missing += [n + ".weight" for n in ((g, u) if key.endswith(FUSED_GATE_UP) else (d,))
                                if n + ".weight" not in self.reader]
            elif self.source_name(i, key) is None and not (key.endswith(ZERO_BIAS) and self.zero is not None):
                missing.append(f"{self.layer_prefix(i)}{self.disk_local(key)}")
        return missing

    def _read_experts(self, i: int, key: str) -> torch.Tensor:
        """Fused [E, 2I, H] / [E, H, I] expert tensors from fused or per-expert storage."""
        r = self.reader
        fused = self.fused_source(i, key)
        if fused is not None:
            t = r.get(fused)
            return t[: self.num_experts] if self.zero is not None and t.shape[0] > self.num_experts else t
        names = [self.expert_source_names(i, e) for e in range(self.num_experts)]
        parts = [(g, u) for g, u, _ in names] if key.endswith(FUSED_GATE_UP) else [(d,) for _, _, d in names]
        out = None
        try:
            # filled in place: a list of per-expert tensors and a stack would hold the layer's experts twice
            for e, members in enumerate(parts):
                row = 0
                for name in members:
                    t = r.get(name + ".weight")
                    if out is None:
                        out = torch.empty((len(parts), t.shape[0] * len(members), t.shape[1]), dtype=t.dtype)
                    out[e, row:row + t.shape[0]] = t
                    row += t.shape[0]
        except KeyError as e:
            raise UserError(f"{r.path}: expert tensor {e.args[0]} is missing from the shards") from None
        return out

    def load_layer(self, model: nn.Module, i: int, device: torch.device, dtype: torch.dtype,
                   skip_experts: bool = False) -> nn.Module:
        """Materialize decoder layer i of a skeleton in place, with its checkpoint weights.

        ``skip_experts``: the fused routed-expert tensors are neither read nor dequantized and stay on the
        meta device, for a caller that replaces them (e.g. with the packed weights the runtime reads itself:
        a float copy of a Qwen3-30B-A3B layer's experts is 2.4 GB and most of its load time)."""
        layer = decoder_layers(model)[i]
        state = self.load_layer_state(i, layer, dtype, skip_experts, kept_in_fp32(model, dtype))
        layer.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=not skip_experts, assign=True)
        _check_materialized(layer, f"layer {i}", (FUSED_GATE_UP, FUSED_DOWN) if skip_experts else ())
        return layer

    def load_module(self, model: nn.Module, mem_name: str, device, dtype) -> nn.Module:
        """Materialize a non-layer module (``model.embed_tokens``, ``model.norm``, ``lm_head``)."""
        module = model.get_submodule(mem_name)
        fp32 = kept_in_fp32(model, dtype)
        state = {}
        for key, want in module.state_dict().items():
            disk = self.non_layer_disk_name(f"{mem_name}.{key}")
            if disk is None:
                raise UserError(f"{self.reader.path}: tensor for '{mem_name}.{key}' is missing from the shards")
            t = self.reader.get(disk)
            if tuple(t.shape) != tuple(want.shape):
                raise UserError(f"{self.reader.path}: {disk} has shape {tuple(t.shape)}, the config says "
                                f"{tuple(want.shape)}")
            if t.is_floating_point():
                t = t.to(torch.float32 if fp32 is not None and fp32.search(f"{mem_name}.{key}") else dtype)
            state[key] = t.to(device)
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def non_layer_disk_name(self, mem_full: str) -> str | None:
        """Disk name of an in-memory non-layer tensor (tied lm_head falls back to the embedding)."""
        if mem_full.startswith("model."):
            cand = self.disk_prefix + mem_full[len("model"):]
        else:
            cand = mem_full
        if cand in self.reader:
            return cand
        if mem_full == "lm_head.weight":
            emb = f"{self.disk_prefix}.embed_tokens.weight"
            return emb if emb in self.reader else None
        return None


def check_routing_fields(text_config, spec, rows: int, where) -> None:
    """config.json's experts per token within the router's ``rows``, and a MoE layer spacing of at least one (the
    modeling code would fail on them mid-command: an index out of range, a division by zero)."""
    k = getattr(text_config, spec.top_k_attr, None)
    if not isinstance(k, int) or not 1 <= k <= rows:
        raise UserError(f"{where}: config.json's {spec.top_k_attr} is {k!r}; it must be an integer in [1, {rows}] "
                        "(the experts of each router)")
    step = getattr(text_config, "decoder_sparse_step", None)
    if step is not None and (not isinstance(step, int) or step < 1):
        raise UserError(f"{where}: config.json's decoder_sparse_step is {step!r}; it must be an integer >= 1 (1: "
                        "every layer is a MoE layer)")


def read_hf_config(path: str | Path):
    """transformers' config of checkpoint folder ``path`` (never remote code); a malformed one is a UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a malformed config
        raise UserError(f"{Path(path) / 'config.json'} cannot be read by transformers: {one_line(e)}") from None


def kept_in_fp32(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """What transformers keeps in fp32 when it loads ``model`` in ``dtype`` (its dtype plan): the class's
    ``_keep_in_fp32_modules_strict`` in fp16 and bf16 (DeepSeek/GLM routers: ``gate.weight``,
    ``e_score_correction_bias``), ``_keep_in_fp32_modules`` in fp16 too; unanchored patterns searched in the
    full parameter name, as transformers does. None when nothing is kept."""
    patterns = []
    if dtype in (torch.float16, torch.bfloat16):
        # and our own: the zero experts' logit bias, stored fp32 (the runtime reads it so)
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) + [ZERO_BIAS]
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return re.compile("|".join(p.replace("*", ".*") for p in patterns)) if patterns else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _check_materialized(module: nn.Module, what: str, unless: tuple[str, ...] = ()) -> None:
    """Every parameter and buffer of ``module`` holds data, except names ending with one of ``unless``."""
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta and not (unless and n.endswith(unless)):
            raise RuntimeError(f"{what}: '{n}' was not loaded (still on the meta device)")


def preload_modeling(path: str | Path) -> None:
    """Import the configuration and modeling code a checkpoint's family will need (and transformers' tokenizer
    entry point; the family's tokenizer class still loads with the tokenizer), building nothing
    (best effort: any problem is left for the real load to report). For the command line's start-up region, where
    imports happen before any model exists (``memory.gc_paused(freeze=True)``)."""
    try:
        import json

        from transformers import AutoTokenizer  # noqa: F401
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cls = CONFIG_MAPPING[json.loads((Path(path) / "config.json").read_text())["model_type"]]
        MODEL_FOR_CAUSAL_LM_MAPPING[cls]
    except Exception:  # noqa: BLE001 -- a preload only
        pass
