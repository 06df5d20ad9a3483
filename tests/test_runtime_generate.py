"""The runtime against transformers on the same weights (fp32, CPU), and its generation loop's contracts."""

from __future__ import annotations

import pytest
import torch

from conftest import DEEPSEEK_V2_GROUPED, FAMILIES, quick_config
from moecompress.checkpoint.dequant import write_dequantized
from moecompress.errors import UserError
from moecompress.pipeline import quantize
from moecompress.runtime import Runtime

RUNTIME_FAMILIES = FAMILIES
NEW_TOKENS = 40


def _prompt(seed: int, length: int = 13, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(path, **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                                                 **overrides).eval()
    model.generation_config.eos_token_id = None
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check_against_transformers(rt: Runtime, hf, prompt: torch.Tensor, what: str) -> None:
    """Same greedy tokens for NEW_TOKENS steps, and every step's logits within 1e-4 relative error."""
    ours = rt.generate(prompt, NEW_TOKENS, stop_ids=[], keep_logits=True)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        last = hf(prompt).logits[:, -1]
    assert _rel(ours.logits[0], last) < 1e-4, f"{what}: prefill logits differ, rel {_rel(ours.logits[0], last):.2e}"
    ref_tokens = ref.sequences[:, prompt.shape[1]:].tolist()
    for step, (a, b) in enumerate(zip(ours.logits, ref.logits)):
        assert _rel(a, b) < 1e-4, f"{what}: logits of step {step} differ, rel {_rel(a, b):.2e}"
    assert ours.tokens == ref_tokens, f"{what}: greedy tokens differ\n ours {ours.tokens}\n hf   {ref_tokens}"
    assert len(ours.tokens[0]) == NEW_TOKENS


def _greedy_matches_transformers(path, family):
    rt = Runtime.load(path)
    assert rt.family == family and not rt.cuda_graph and not rt.use_kernels
    assert sum(type(layer.mlp).__name__ == "MoEBlock" for layer in rt.model.layers) >= 1
    _check_against_transformers(rt, _hf(path), _prompt(0), family)


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_greedy_matches_transformers(tiny_ckpt, family):
    _greedy_matches_transformers(tiny_ckpt(family), family)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "glm4_moe_lite"])
def test_in_memory_layout_matches_transformers(tiny_ckpt, family):
    # save_pretrained(save_original_format=False): ``mlp.`` (Mixtral too), fused experts, router read by name
    _greedy_matches_transformers(tiny_ckpt(family, original_format=False), family)


def test_deepseek_v2_group_limited_routing_matches_transformers(tiny_ckpt):
    path = tiny_ckpt("deepseek_v2", **DEEPSEEK_V2_GROUPED)
    _greedy_matches_transformers(path, "deepseek_v2")
    rt = Runtime.load(path)
    moe = next(layer.mlp for layer in rt.model.layers if type(layer.mlp).__name__ == "MoEBlock")
    assert (moe.routing.n_group, moe.routing.group_score, moe.routing.scaling, moe.routing.renormalize) == \
        (4, "max", 2.0, False)
    from moecompress.kernels import _common

    if _common.interpreting():  # the Triton routing kernel's group-by-best-expert mode, same tokens and logits
        kern = Runtime.load(path, kernels=True)
        a = kern.generate(_prompt(3, length=5), 4, stop_ids=[], keep_logits=True)
        b = rt.generate(_prompt(3, length=5), 4, stop_ids=[], keep_logits=True)
        assert a.tokens == b.tokens and max(_rel(x, y) for x, y in zip(a.logits, b.logits)) < 1e-4


def test_official_qwen3_5_layout_matches_transformers(tiny_ckpt):
    # official Qwen3.5/3.6 checkpoints store experts fused (3D) on disk, under model.language_model
    _greedy_matches_transformers(tiny_ckpt("qwen3_5_moe", fused_experts=True), "qwen3_5_moe")


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", dict(mlp_only_layers=[0])),
                                              ("qwen2_moe", dict(decoder_sparse_step=2))])
def test_dense_layers_match_transformers(tiny_ckpt, family, overrides):
    rt = Runtime.load(tiny_ckpt(family, **overrides))
    assert [type(layer.mlp).__name__ == "MoEBlock" for layer in rt.model.layers] == [False, True]
    _check_against_transformers(rt, _hf(tiny_ckpt(family, **overrides)), _prompt(0), f"{family} {overrides}")


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    """(quantized checkpoint, its dequantized float twin) per (family, format), cached for the module."""
    cache: dict = {}

    def make(family: str, fmt: str, **settings):
        key = (family, fmt, *sorted(settings.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"q-{family}-{fmt}")
            q = root / "q"
            quantize(tiny_ckpt(family), q, quick_config(**{"bits": 4, "format": fmt, "method": "rtn", **settings}))
            cache[key] = q, write_dequantized(q, root / "deq")
        return cache[key]

    return make


# every family once, both formats, int4 and int8, symmetric and asymmetric, GPTQ with and without act-order
QUANTIZED_CASES = [
    ("qwen3_moe", "compressed-tensors", {}),
    ("mixtral", "compressed-tensors", {}),
    ("qwen3_moe", "gptq", {}),
    ("glm4_moe", "gptq", {"symmetric": False}),
    ("deepseek_v3", "compressed-tensors", {"bits": 8}),
    ("deepseek_v3", "gptq", {"method": "gptq", "act_order": "group"}),
    ("olmoe", "compressed-tensors", {"symmetric": False, "group_size": 64}),
    ("qwen2_moe", "gptq", {"bits": 8}),
    ("qwen3_5_moe", "compressed-tensors", {}),  # hybrid: quantized Gated DeltaNet projections and attention
    ("glm4_moe_lite", "compressed-tensors", {"symmetric": False}),  # MLA + sigmoid group-limited routing
    ("glm4_moe_lite", "gptq", {}),
    ("qwen3_next", "gptq", {"symmetric": False}),  # Qwen3-Next: fused delta-net projections, gated attention
    ("deepseek_v2", "compressed-tensors", {"group_size": 32}),  # MLA without q LoRA, unnormalized softmax routing
    # per-module schemes (--override): int8 attention and shared expert beside int4 experts
    ("qwen2_moe", "compressed-tensors", {"overrides": ("self_attn|shared_expert=8",)}),
    ("deepseek_v3", "gptq", {"overrides": ("self_attn=8/16", "layers[.]0[.]mlp=8")}),
    ("olmoe", "compressed-tensors", {"bits": 8, "symmetric": False, "group_size": 32}),  # int8 with zero points
]


@pytest.mark.parametrize("family,fmt,settings", QUANTIZED_CASES,
                         ids=[f"{f}-{fmt}-" + ("-".join(f"{k}={v}" for k, v in s.items()) or "w4")
                              for f, fmt, s in QUANTIZED_CASES])
def test_quantized_checkpoint_matches_transformers_on_dequantized_twin(quantized, family, fmt, settings):
    """Packed on the CPU with fp32 math ("exact": codes dequantized per call) and dequantized at load: both
    give transformers' numbers on the dequantized twin."""
    q, twin = quantized(family, fmt, **settings)
    hf = _hf(twin)
    for mode in ("exact", "dequantized"):
        rt = Runtime.load(q, cpu_weights=mode)
        assert rt.report.quant_format == fmt
        assert (rt.report.packed_linears > 0) == (mode == "exact")
        assert set(rt.report.cpu_kinds) <= {"codes"}
        _check_against_transformers(rt, hf, _prompt(1), f"{family}/{fmt}/{settings}/{mode}")


@pytest.mark.parametrize("family,fmt,settings", QUANTIZED_CASES,
                         ids=[f"{f}-{fmt}-" + ("-".join(f"{k}={v}" for k, v in s.items()) or "w4")
                              for f, fmt, s in QUANTIZED_CASES])
def test_packed_cpu_kernels_match_the_exact_path(quantized, family, fmt, settings):
    """The default CPU mode: torch's int4/int8 weight-only kernels where the layout fits (bf16 activations,
    fp32 accumulation). Every packed linear is within 1e-2 of its exact twin (bf16 rounding of the inputs,
    scales and zeros); end to end, on the exact path's tokens, the logits are within 6e-2: these random tiny
    models have near-tied routers, so bf16-sized input changes flip some experts (up to 4e-2 seen, on
    deepseek_v3 with act-order)."""
    from moecompress.runtime.cpu_packed import CpuQuantLinear

    q, _ = quantized(family, fmt, **settings)
    exact, fast = Runtime.load(q, cpu_weights="exact"), Runtime.load(q)
    twins = dict(exact.model.lm.named_modules())
    gen = torch.Generator().manual_seed(0)
    for name, mod in fast.model.lm.named_modules():
        if isinstance(mod, CpuQuantLinear):
            x = torch.randn(3, mod.in_features, generator=gen)
            assert _rel(mod(x), twins[name](x)) < 1e-2, f"{name} ({mod.kind})"
    ref = exact.generate(_prompt(1), NEW_TOKENS, stop_ids=[], keep_logits=True)
    seq = torch.cat([_prompt(1), torch.tensor(ref.tokens)], dim=1)
    got, want = fast.logits(seq), exact.logits(seq)
    assert _rel(got, want) < 6e-2, f"{family}/{fmt}/{settings}: rel {_rel(got, want):.2e}"
    bits = settings.get("bits", 4)
    if bits == 4:
        assert fast.report.cpu_kinds.get("int4pack", 0) > 0, fast.report.cpu_kinds
    if bits == 8 and not settings.get("symmetric", True) or settings.get("overrides"):  # int8 in groups / zero points
        assert fast.report.cpu_kinds.get("int8group", 0) > 0, fast.report.cpu_kinds
    assert fast.report.packed_linears > 0 and fast.report.packed_expert_layers > 0


@pytest.mark.parametrize("family,overrides,windows", [
    ("mixtral", dict(sliding_window=6), [6, 6]),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), [6, None]),
])
def test_sliding_window_matches_transformers(tiny_ckpt, family, overrides, windows):
    # windows shorter than the prompt: the runtime's explicit window masks against transformers' own
    path = tiny_ckpt(family, **overrides)
    rt = Runtime.load(path)
    assert rt.model.windows == windows
    _check_against_transformers(rt, _hf(path), _prompt(2), f"{family}, windows {windows}")


def test_kv_cache_decode_equals_full_forward(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("deepseek_v3"))  # MLA: cached latents of two different widths
    prompt = _prompt(3)
    res = rt.generate(prompt, 24, stop_ids=[], keep_logits=True)
    full_seq = torch.cat([prompt, torch.tensor([res.tokens[0][:-1]])], dim=1)
    full = rt.logits(full_seq)
    length = prompt.shape[1]
    for step, step_logits in enumerate(res.logits):
        rel = _rel(step_logits[0], full[0, length - 1 + step])
        assert rel < 1e-5, f"decode step {step}: cached logits vs full re-forward, rel {rel:.2e}"


def test_batch_rows_equal_single_runs(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("qwen2_moe"))
    prompts = _prompt(4, batch=3)
    together = rt.generate(prompts, 16, stop_ids=[], keep_logits=True)
    for b in range(3):
        alone = rt.generate(prompts[b], 16, stop_ids=[], keep_logits=True)
        assert together.tokens[b] == alone.tokens[0]
        assert max(_rel(t[b], a[0]) for t, a in zip(together.logits, alone.logits)) < 1e-5


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("olmoe"))
    prompt = _prompt(5)

    def sampled(seed, **kw):
        return rt.generate(prompt, 32, greedy=False, temperature=1.0, seed=seed, stop_ids=[], **kw).tokens

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    greedy = rt.generate(prompt, 32, stop_ids=[]).tokens
    assert sampled(7) != greedy
    assert sampled(7, top_p=1e-6) == greedy
    assert sampled(9, top_p=1e-6) == greedy


def test_stop_tokens_end_each_sequence(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("qwen3_moe"))
    prompts = _prompt(6, batch=2)
    free = rt.generate(prompts, 24, stop_ids=[]).tokens
    stop = free[0][5]
    cut = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    res = rt.generate(prompts, 24, stop_ids=[stop])
    assert res.tokens == cut
    if all(stop in row for row in free):  # every row stopped: the loop ended early
        assert res.decode_steps == max(len(row) for row in cut) - 1


def test_default_stop_ids_follow_the_checkpoint(tiny_ckpt, tmp_path):
    import json
    import shutil

    path = shutil.copytree(tiny_ckpt("mixtral"), tmp_path / "m")
    assert Runtime.load(path).stop_ids == []  # generation_config.json without eos: like transformers
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[3, 7])))
    assert Runtime.load(path).stop_ids == [3, 7]
    (path / "generation_config.json").unlink()
    assert Runtime.load(path).stop_ids == [2]  # config.json's eos_token_id


def test_generate_rejects_bad_arguments(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("qwen3_moe"))
    for kw in (dict(max_new_tokens=0), dict(greedy=False, temperature=0.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            rt.generate(_prompt(0), **{"max_new_tokens": 4, **kw})
    with pytest.raises(UserError, match="token ids"):
        rt.generate(torch.tensor([[1, 10_000]]), 4)


def test_unsupported_family_is_a_user_error(tiny_ckpt, tmp_path, monkeypatch):
    import json
    import shutil

    from moecompress.runtime import convert

    path = shutil.copytree(tiny_ckpt("qwen3_moe"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="flex_olmo")))  # an MoE family we lack
    with pytest.raises(UserError, match="'flex_olmo' is not supported"):
        Runtime.load(path)
    # a family the toolkit reads but the runtime would not run: refused in one line, before any weight
    monkeypatch.setattr(convert, "RUNTIME_FAMILIES", ("mixtral",))
    with pytest.raises(UserError, match="does not support the 'qwen3_moe' family"):
        Runtime.load(tiny_ckpt("qwen3_moe"))


def test_hybrid_linear_attention_short_prompts_and_reuse(tiny_ckpt):
    """Qwen3.5-MoE: Gated DeltaNet layers (conv + recurrent state in our cache) beside full attention,
    against transformers' vision-language class (how the real checkpoints load); prompts shorter
    than the conv kernel, one Runtime (so one cache) reused across generations."""
    from transformers import AutoModelForImageTextToText

    path = tiny_ckpt("qwen3_5_moe")
    rt = Runtime.load(path)
    assert True in rt.model.linear_attention and False in rt.model.linear_attention
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                     experts_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    kernel = hf.config.text_config.linear_conv_kernel_dim
    for length in (1, kernel - 1):
        _check_against_transformers(rt, hf, _prompt(10 + length, length=length), f"qwen3_5_moe, prompt {length}")


def test_linear_attention_state_in_graph_mode_steps(tiny_ckpt):
    """The decode step a CUDA graph captures (static buffer, positions on the device), run eagerly on the
    CPU: after warm-up steps (which advance the recurrent state) are undone by snapshot/restore, it gives
    the eager decode's logits."""
    rt = Runtime.load(tiny_ckpt("qwen3_5_moe"))
    prompt = _prompt(11)
    length, steps = prompt.shape[1], 12
    ref = rt.generate(prompt, steps, stop_ids=[], keep_logits=True)
    cache = rt._cache_for(1, length + steps)
    logits = rt.model.forward(prompt, rt._positions(0, length), cache, length)
    tok = logits.argmax(-1, keepdim=True)
    saved = cache.snapshot_states()
    assert saved, "no linear-attention state was cached"
    for _ in range(2):  # what DecodeGraph's warm-up does
        rt.model.forward(tok, rt._positions(length, length + 1), cache, None)
    cache.restore_states(saved)
    for step in range(1, steps):
        logits = rt.model.forward(tok, rt._positions(length + step - 1, length + step), cache, None)
        rel = _rel(logits, ref.logits[step])
        assert rel < 1e-5, f"graph-mode step {step}: rel {rel:.2e} against the eager decode"
        tok = logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_past_index_topk_and_graph_mode_steps(tiny_ckpt, family):
    """DeepSeek-V3.2's and GLM-5's indexer (tiny index_topk 16) ranks keys the runtime's mask allows and reads its
    keys from our cache: a prompt past index_topk matches transformers, sparsity changes the logits (the test can
    see it), and the decode step a CUDA graph captures (whole static buffer), run eagerly, gives the eager
    decode's logits."""
    path = tiny_ckpt(family)
    rt = Runtime.load(path)
    prompt = _prompt(12, length=29)
    _check_against_transformers(rt, _hf(path), prompt, f"{family}, prompt past index_topk")
    dense = _hf(path, index_topk=4096)  # every key: DeepSeek-V3's dense MLA
    with torch.no_grad():
        assert _rel(dense(prompt).logits[:, -1], _hf(path)(prompt).logits[:, -1]) > 1e-3
    length, steps = prompt.shape[1], 8
    ref = rt.generate(prompt, steps, stop_ids=[], keep_logits=True)
    cache = rt._cache_for(1, length + steps)
    tok = rt.model.forward(prompt, rt._positions(0, length), cache, length).argmax(-1, keepdim=True)
    for step in range(1, steps):
        logits = rt.model.forward(tok, rt._positions(length + step - 1, length + step), cache, None)
        rel = _rel(logits, ref.logits[step])
        assert rel < 1e-5, f"graph-mode step {step}: rel {rel:.2e} against the eager decode"
        tok = logits.argmax(-1, keepdim=True)
    assert all(k is not None for k in cache.index_keys[:3])


def test_layers_sharing_a_key_selection_are_refused(tmp_path):
    """GLM-5 configs whose layers reuse an earlier layer's selection: one line, not a wrong model."""
    from moecompress.arch.handle import ModelHandle
    from moecompress.tiny import save_tiny

    path = save_tiny("glm_moe_dsa", tmp_path / "m", index_topk_pattern="FSF")
    with pytest.raises(UserError, match=r"layers \[1\] reuse an earlier layer's sparse-attention key selection"):
        ModelHandle.open(path)


@pytest.mark.parametrize("family,fmt,settings", [
    ("qwen3_moe", "compressed-tensors", {}),
    ("glm4_moe", "gptq", {"symmetric": False}),  # sigmoid routing, group-limited top-k, int4 with zero points
    ("deepseek_v3", "compressed-tensors", {"bits": 8}),
    ("qwen3_5_moe", "compressed-tensors", {}),  # packed Gated DeltaNet projections, float conv
    ("glm4_moe_lite", "gptq", {}),  # packed MLA projections (q/kv LoRA ranks), sigmoid group-limited routing
    ("qwen2_moe", "compressed-tensors", {"overrides": ("self_attn|shared_expert=8",)}),  # int8 beside int4
    ("qwen3_next", "compressed-tensors", {}),
    ("deepseek_v2", "gptq", {"symmetric": False}),
], ids=["qwen3_moe-ct-w4", "glm4_moe-gptq-w4-asym", "deepseek_v3-ct-w8", "qwen3_5_moe-ct-w4", "glm4_moe_lite-gptq-w4",
        "qwen2_moe-ct-w4-attn-w8", "qwen3_next-ct-w4", "deepseek_v2-gptq-w4-asym"])
def test_kernel_path_matches_cpu_path_under_the_interpreter(quantized, family, fmt, settings):
    """The CUDA code path (packed int4/int8 linears and experts, Triton routing and fused MoE), run by
    Triton's interpreter: same tokens and logits as the dequantized CPU path."""
    from moecompress.kernels import _common

    if not _common.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    q, _ = quantized(family, fmt, **settings)
    kern = Runtime.load(q, kernels=True)
    moe_layers = sum(type(layer.mlp).__name__ == "MoEBlock" for layer in kern.model.layers)
    assert kern.report.packed_linears > 0 and kern.report.packed_expert_layers == moe_layers >= 1
    cpu = Runtime.load(q, cpu_weights="dequantized")
    prompt = _prompt(7, length=5)
    a = kern.generate(prompt, 4, stop_ids=[], keep_logits=True)
    b = cpu.generate(prompt, 4, stop_ids=[], keep_logits=True)
    assert a.tokens == b.tokens
    assert max(_rel(x, y) for x, y in zip(a.logits, b.logits)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,fmt", [("qwen3_moe", "compressed-tensors"), ("deepseek_v3", None),
                                        ("qwen3_5_moe", "compressed-tensors"), ("glm4_moe_lite", "gptq"),
                                        ("qwen3_next", "compressed-tensors")])
def test_cuda_graph_decode_matches_eager_and_cpu(quantized, tiny_ckpt, family, fmt):
    path = quantized(family, fmt)[0] if fmt else tiny_ckpt(family)
    graph = Runtime.load(path, device="cuda", dtype="float32")
    eager = Runtime.load(path, device="cuda", dtype="float32", cuda_graph=False)
    cpu = Runtime.load(path)
    prompt = _prompt(8)
    runs = [rt.generate(prompt, 24, stop_ids=[], keep_logits=True) for rt in (graph, eager, cpu)]
    assert runs[0].cuda_graph and not runs[1].cuda_graph
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    for other in runs[1:]:
        assert max(_rel(a.cpu(), b.cpu()) for a, b in zip(runs[0].logits, other.logits)) < 1e-4
    again = graph.generate(_prompt(9, length=7), 24, stop_ids=[])  # the captured graph, reused at new positions
    assert again.tokens == cpu.generate(_prompt(9, length=7), 24, stop_ids=[]).tokens


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # deepseek_v3: a dense first layer, float there
def test_packed_loads_never_read_the_experts_as_floats(quantized, family, monkeypatch):
    """Where the routed experts are quantized, the CPU packed/exact loads read them packed only: the float
    copy ``load_layer`` would make (2.4 GB a layer at Qwen3-30B-A3B's shapes) is skipped, and the outputs
    are the usual ones (the tests above)."""
    from moecompress.arch.handle import ModelHandle
    from moecompress.checkpoint.load import load_model

    q, _ = quantized(family, "compressed-tensors")
    reads = []
    real = ModelHandle._read_experts
    monkeypatch.setattr(ModelHandle, "_read_experts", lambda self, i, key: reads.append((i, key)) or real(self, i, key))
    for mode in ("packed", "exact"):
        rt = Runtime.load(q, cpu_weights=mode)
        assert rt.report.packed_expert_layers > 0 and reads == [], (mode, reads)
    handle, model = load_model(q, packed=True)
    assert reads == []
    assert not any(t.is_meta for t in model.parameters())
    Runtime.load(q, cpu_weights="dequantized")  # the float reference still reads them
    assert reads


def test_a_model_that_cannot_fit_is_refused_in_one_line_before_loading(quantized, monkeypatch):
    from moecompress import memory
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.errors import UserError
    from moecompress.evals.sizes import resident_bytes

    q, twin = quantized("qwen3_moe", "compressed-tensors")
    floor = resident_bytes(CheckpointReader.open(q), torch.float32, packed=True, floor=True)
    assert floor < resident_bytes(CheckpointReader.open(q), torch.float32, packed=False, floor=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: floor - 1)
    with pytest.raises(UserError, match=r"its weights need at least .* GiB and cpu has .* GiB free; a quantized"):
        Runtime.load(q)
    with pytest.raises(UserError):
        Runtime.load(twin)  # the float twin needs more still
    monkeypatch.setattr(memory, "available_bytes", lambda device: floor)
    Runtime.load(q)  # packed, it fits


def test_inspect_states_each_familys_routing_rule(tiny_ckpt):
    from moecompress.inspect import describe

    assert describe(tiny_ckpt("deepseek_v2", **DEEPSEEK_V2_GROUPED))["router"] == \
        "softmax, best 2 of 4 groups (best expert), not renormalized, x2"
    assert describe(tiny_ckpt("deepseek_v2"))["router"] == "softmax, not renormalized"
    assert describe(tiny_ckpt("deepseek_v3"))["router"] == "sigmoid + bias, best 1 of 2 groups (two best), renormalized, x2.5"
    assert describe(tiny_ckpt("mixtral"))["router"] == "softmax, renormalized"
