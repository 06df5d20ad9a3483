"""The supported MoE families, each described as data (no per-family code paths).

Everything the rest of the toolkit needs to know about a family lives in one ``ArchSpec`` row:
how its config names the expert counts, which modules are routers (never quantized), and how its
checkpoints name expert tensors on disk. In-memory module names are always transformers 5's
(``mlp.gate``, ``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``); the
on-disk names here are what transformers' own ``save_pretrained`` writes for the family by default
(what we write; reading also accepts the in-memory names, see ``handle.ModelHandle``).
Which layers are dense (``first_k_dense_replace``, ``mlp_only_layers``, ``decoder_sparse_step``) is
left to the transformers model built from the config: the toolkit finds experts by module structure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BalanceGroup:
    """An AWQ balance group: ``source``'s output absorbs a per-channel scale that its readers take.

    ``source``: a norm (its weight divides by ``s``), a Linear (its output rows and bias divide), or
    ``mlp.experts.gate_up_proj#up`` (the up half of every expert's fused gate/up rows, per expert).
    ``readers``: layer-local modules (or fused expert parameters) reading that output; those absent
    from a layer are skipped, and a group with no quantized reader in a layer is skipped there.
    Readers that are not quantized (routers, kept modules) get their columns multiplied exactly.
    ``loss``: "outputs" -- the readers' output error, from their Hessians; "block" -- the output
    of ``mlp`` with the original routing held fixed (routed tokens by their routing weights, plus
    the shared expert); "attention" -- the output of the attention block (the whole of it, softmax
    and o_proj included, o_proj in float) on a few whole calibration batches, as AutoAWQ scores its
    ``module2inspect``: the readers' output errors weighted by what attention makes of them.
    ``per_expert``: one scale vector per expert (the experts' up -> down).
    """

    source: str
    readers: tuple[str, ...]
    loss: str = "outputs"
    per_expert: bool = False


_QKV = BalanceGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), loss="attention")
# v -> o: o's input columns are v's output rows, repeated per query head under grouped-query attention.
# Its Hessian loss is already the attention output's error (o_proj is the block's last op); scoring it by
# the attention block measured the same (KL 0.01370 vs 0.01363 on the demo model, W4 g128)
_VO = BalanceGroup("self_attn.v_proj", ("self_attn.o_proj",))
# DeepSeek/GLM multi-head latent attention: the low-rank projections and their own norms. Its values
# come out of kv_b_proj mixed with the keys' non-rotary part, so there is no v -> o group.
_MLA = (
    BalanceGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
                 loss="attention"),
    BalanceGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), loss="attention"),
    BalanceGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), loss="attention"),
)
# Qwen3.5/3.6 gated delta-net layers (their out_proj reads a gated norm: no v -> o there)
_LINEAR_ATTN = BalanceGroup("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                                                "linear_attn.in_proj_a", "linear_attn.in_proj_b",
                                                "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
                             loss="attention")
_MLP = (
    BalanceGroup("post_attention_layernorm", (
        "mlp.experts.gate_up_proj", "mlp.gate", "mlp.shared_expert_gate",
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
        "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
        "mlp.gate_proj", "mlp.up_proj"), loss="block"),
    BalanceGroup("mlp.experts.gate_up_proj#up", ("mlp.experts.down_proj",), per_expert=True),
    BalanceGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),
    BalanceGroup("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",)),
    BalanceGroup("mlp.up_proj", ("mlp.down_proj",)),
)
STANDARD_GROUPS = (_QKV, _VO) + _MLP
MLA_GROUPS = _MLA + _MLP
# DeepSeek-V3.2's sparse attention (DSA): the indexer reads the layer's normed input (wk, weights_proj) and
# the query LoRA's normed output (wq_b); it stays in float and takes the scales into its columns
_DSA = (
    BalanceGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa",
                                     "self_attn.indexer.wk", "self_attn.indexer.weights_proj"), loss="attention"),
    BalanceGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj", "self_attn.indexer.wq_b"), loss="attention"),
    BalanceGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), loss="attention"),
)
DSA_INDEXER = ("self_attn.indexer.wq_b", "self_attn.indexer.wk", "self_attn.indexer.weights_proj")
# what DeepSeek-V3.2 and GLM-5 share: V3's routing and shared experts, the DSA indexer kept in float
_DSA_FAMILY = dict(num_experts_attr="n_routed_experts", shared_expert="mlp.shared_experts", scoring="sigmoid",
                   keep_float=DSA_INDEXER, awq_groups=_DSA + _MLP)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    # config attribute names (looked up on the text config)
    num_experts_attr: str
    top_k_attr: str = "num_experts_per_tok"
    # on disk, the MoE block is called ``mlp`` (Mixtral: ``block_sparse_moe``)
    disk_moe_name: str = "mlp"
    # per-expert on-disk projection names: (gate, up, down)
    disk_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # layer-local tensors the family's original checkpoints spell otherwise: (in-memory name, on-disk name)
    disk_renames: tuple[tuple[str, str], ...] = ()
    # modules inside a decoder layer that route (kept bit-exact in the source dtype, never quantized)
    routers: tuple[str, ...] = ("mlp.gate",)
    # shared-expert module (an ordinary MLP, quantized unless --only-experts), if any
    shared_expert: str | None = None
    # Linear modules inside a decoder layer that stay in float for a reason of the family's own
    keep_float: tuple[str, ...] = ()
    # router scoring: "softmax" or "sigmoid" (with e_score_correction_bias, group-limited top-k)
    scoring: str = "softmax"
    # group-limited top-k (config n_group/topk_group): a group's score is the sum of its two best scores
    # ("top2", DeepSeek-V3/GLM) or its best one ("max", DeepSeek-V2's group_limited_greedy); ``group_when``
    # = (config attribute, value) turns the groups on only when the config says so (DeepSeek-V2's topk_method)
    group_score: str = "top2"
    group_when: tuple[str, str] | None = None
    # the router renormalizes its top-k weights: None = the config's norm_topk_prob (default True);
    # False for a router that never does, whatever the config says (DeepSeek-V2)
    renormalize: bool | None = None
    # router logits in fp32 whatever the activations' dtype; None: as the scoring implies (sigmoid routers
    # compute them in fp32, softmax ones in the activations' dtype). MiniMax-M2's sigmoid router: False
    fp32_logits: bool | None = None
    # the selection bias a router adds to its scores before the top-k (sigmoid families; ERNIE's softmax),
    # a layer-local in-memory name; None: a router without one
    correction_bias: str | None = None
    # on-disk prefixes of the text model, in the order they are probed
    disk_model_prefixes: tuple[str, ...] = ("model",)
    # the config holding the text model (composite vision-language configs nest it)
    text_config_attr: str | None = None
    # the dtype the family's router returns its top-k weights in: "logits" (cast back to the logits' dtype;
    # sigmoid routers compute logits in fp32, softmax routers in the activations'), "input" (the router's
    # input dtype: ERNIE's fp32 logits), None (as computed: Mixtral, DeepSeek-V2 keep fp32)
    router_weights_dtype: str | None = "logits"
    # the norm whose output every MoE router reads (its weight bounds the router logits, see zero.inject)
    router_input_norm: str = "post_attention_layernorm"
    # AWQ balance groups (see BalanceGroup), in the order they are searched within a layer
    awq_groups: tuple[BalanceGroup, ...] = STANDARD_GROUPS
    # the family's RMSNorm multiplies by ``offset + weight`` (Qwen3.5/3.6: 1, zero-centered weights)
    norm_weight_offset: float = 0.0

    @property
    def router_logits_fp32(self) -> bool:
        return self.scoring == "sigmoid" if self.fp32_logits is None else self.fp32_logits

    @property
    def bias_name(self) -> str | None:
        """The layer-local in-memory name of the router's selection bias, if it has one."""
        if self.correction_bias is not None:
            return self.correction_bias
        return "mlp.gate.e_score_correction_bias" if self.scoring == "sigmoid" else None

    @property
    def bias_path(self) -> str | None:
        """:attr:`bias_name` relative to the router module (``e_score_correction_bias``, ERNIE's
        ``moe_statics.e_score_correction_bias``); None where the router holds none (see :attr:`bias_passed`)."""
        name = self.bias_name
        if name is None or self.bias_passed:
            return None
        return name.removeprefix(self.routers[0] + ".")

    @property
    def bias_passed(self) -> bool:
        """The MoE block holds the selection bias and passes it to its router, ``gate(hidden, bias)``
        (MiniMax-M2: ``mlp.e_score_correction_bias``)."""
        name = self.bias_name
        return name is not None and not name.startswith(self.routers[0] + ".")


@dataclass(frozen=True)
class RouterRule:
    """How a family's router turns scores into top-k weights, read from its ArchSpec and text config."""

    scoring: str
    renormalize: bool
    n_group: int | None = None  # None: no group-limited top-k
    topk_group: int | None = None
    group_score: str = "top2"
    scaling: float = 1.0


def router_rule(spec: ArchSpec, text_config) -> RouterRule:
    grouped = (getattr(text_config, "n_group", None) or 1) > 1
    if spec.group_when is not None:
        attr, value = spec.group_when
        grouped = grouped and getattr(text_config, attr, None) == value
    # Mixtral has no norm_topk_prob and always renormalizes; every other family says so in its config
    renormalize = spec.renormalize if spec.renormalize is not None else bool(getattr(text_config, "norm_topk_prob",
                                                                                     True))
    return RouterRule(
        scoring=spec.scoring, renormalize=renormalize,
        n_group=int(text_config.n_group) if grouped else None,
        topk_group=int(text_config.topk_group) if grouped else None,
        group_score=spec.group_score,
        scaling=float(getattr(text_config, "routed_scaling_factor", None) or 1.0),
    )


FAMILIES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="qwen3_moe",
        model_types=("qwen3_moe",),
        num_experts_attr="num_experts",
    ),
    ArchSpec(
        family="qwen2_moe",
        model_types=("qwen2_moe",),
        num_experts_attr="num_experts",
        routers=("mlp.gate", "mlp.shared_expert_gate"),
        shared_expert="mlp.shared_expert",
    ),
    ArchSpec(
        family="mixtral",
        model_types=("mixtral",),
        num_experts_attr="num_local_experts",
        disk_moe_name="block_sparse_moe",
        disk_expert_names=("w1", "w3", "w2"),
        router_weights_dtype=None,
    ),
    ArchSpec(
        family="olmoe",
        model_types=("olmoe",),
        num_experts_attr="num_experts",
    ),
    ArchSpec(
        family="deepseek_v3",
        model_types=("deepseek_v3",),
        num_experts_attr="n_routed_experts",
        shared_expert="mlp.shared_experts",
        scoring="sigmoid",
        awq_groups=MLA_GROUPS,
    ),
    ArchSpec(
        # DeepSeek-V2 / V2-Lite: MLA (V2-Lite: no q LoRA), softmax routing in fp32, no renormalization,
        # group-limited top-k by each group's best score when topk_method says so
        family="deepseek_v2",
        model_types=("deepseek_v2",),
        num_experts_attr="n_routed_experts",
        shared_expert="mlp.shared_experts",
        group_score="max",
        group_when=("topk_method", "group_limited_greedy"),
        renormalize=False,
        fp32_logits=True,
        router_weights_dtype=None,
        awq_groups=MLA_GROUPS,
    ),
    ArchSpec(
        # dots.llm1 (rednote): DeepSeek-V3's routing and shared experts with GQA attention
        family="dots1",
        model_types=("dots1",),
        num_experts_attr="n_routed_experts",
        shared_expert="mlp.shared_experts",
        scoring="sigmoid",
    ),
    ArchSpec(
        # K-EXAONE (LG): DeepSeek-V3's routing and shared experts, sliding-window GQA attention
        family="exaone_moe",
        model_types=("exaone_moe",),
        num_experts_attr="num_experts",
        shared_expert="mlp.shared_experts",
        scoring="sigmoid",
        disk_renames=(("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"),),
    ),
    ArchSpec(
        # ERNIE-4.5-MoE (21B-A3B, 300B-A47B): softmax routing in fp32 whose top-k adds a selection bias
        # (``moe_statics``) to the probabilities; dense layers by moe_layer_start_index / interval
        family="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        num_experts_attr="num_experts",
        shared_expert="mlp.shared_experts",
        fp32_logits=True,
        correction_bias="mlp.gate.moe_statics.e_score_correction_bias",
        router_weights_dtype="input",
        disk_renames=(("mlp.gate.moe_statics.e_score_correction_bias", "mlp.moe_statics.e_score_correction_bias"),),
    ),
    ArchSpec(
        # MiniMax-M2 / M2.1 / M2.5 (230B-A10B): sigmoid routing with a selection bias the MoE block holds and
        # passes to its router, logits in the router's dtype, always renormalized; Mixtral's on-disk names
        family="minimax_m2",
        model_types=("minimax_m2",),
        num_experts_attr="num_local_experts",
        disk_moe_name="block_sparse_moe",
        disk_expert_names=("w1", "w3", "w2"),
        scoring="sigmoid",
        correction_bias="mlp.e_score_correction_bias",
        fp32_logits=False,
        router_weights_dtype=None,
    ),
    ArchSpec(
        # DeepSeek-V3.2 (-Exp, -Speciale): DeepSeek-V3 with sparse attention (DSA) -- an indexer picks each
        # query's index_topk keys; at or below index_topk tokens it picks them all, i.e. V3's dense MLA
        family="deepseek_v32",
        model_types=("deepseek_v32",),
        **_DSA_FAMILY,
    ),
    ArchSpec(
        # GLM-5 (744B-A40B): GLM's MoE with DeepSeek-V3.2's MLA and sparse attention (DSA); configs whose layers
        # share an earlier layer's key selection (indexer_types "shared") are refused (ModelHandle)
        family="glm_moe_dsa",
        model_types=("glm_moe_dsa",),
        **_DSA_FAMILY,
    ),
    ArchSpec(
        family="glm4_moe",
        model_types=("glm4_moe",),
        num_experts_attr="n_routed_experts",
        shared_expert="mlp.shared_experts",
        scoring="sigmoid",
    ),
    ArchSpec(
        family="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        num_experts_attr="num_experts",
        routers=("mlp.gate", "mlp.shared_expert_gate"),
        shared_expert="mlp.shared_expert",
        # the gated-delta-net's a/b projections output one value per head: tiny, and serving
        # engines fuse them with each other, not with the quantized qkv/z projections
        keep_float=("linear_attn.in_proj_a", "linear_attn.in_proj_b"),
        disk_model_prefixes=("model.language_model", "model"),
        text_config_attr="text_config",
        awq_groups=(_QKV, _VO, _LINEAR_ATTN) + _MLP,
        norm_weight_offset=1.0,
    ),
    ArchSpec(
        # Qwen3-Next (80B-A3B): Qwen3.5's hybrid text model before it, with the delta-net projections stored
        # fused (in_proj_qkvz, in_proj_ba) and a text-only config
        family="qwen3_next",
        model_types=("qwen3_next",),
        num_experts_attr="num_experts",
        routers=("mlp.gate", "mlp.shared_expert_gate"),
        shared_expert="mlp.shared_expert",
        keep_float=("linear_attn.in_proj_ba",),
        awq_groups=(_QKV, _VO, _LINEAR_ATTN) + _MLP,
        norm_weight_offset=1.0,
    ),
    ArchSpec(
        # GLM-4.7-Flash: DeepSeek-V3's MLA attention with GLM-4.5's MoE (dense layers: mlp_layer_types)
        family="glm4_moe_lite",
        model_types=("glm4_moe_lite",),
        num_experts_attr="n_routed_experts",
        shared_expert="mlp.shared_experts",
        scoring="sigmoid",
        awq_groups=MLA_GROUPS,
    ),
)

BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: spec for spec in FAMILIES for mt in spec.model_types}


def supported_families() -> list[str]:
    return [spec.family for spec in FAMILIES]
