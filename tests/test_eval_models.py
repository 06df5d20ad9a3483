"""`evaluate` on tiny checkpoints: known answers, an independent check against transformers' own
forward, low-memory == default, quantized checkpoints and the report's schema."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.evals.data import DEFAULT_DATA
from moecompress.evals.evaluate import evaluate

SMALL = dict(samples=4, seq_len=32, batch_size=3, seed=7)  # 4 windows -> batches of 3 and 1


def _edit(src, dst, fn):
    """Copy checkpoint ``src`` to ``dst`` and apply ``fn(state_dict)`` to its (single) shard."""
    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")
    sd = load_file(shard)
    fn(sd)
    save_file(sd, shard, metadata={"format": "pt"})
    return dst


def _noise(pattern: str, scale: float, seed: int = 0):
    def fn(sd):
        g = torch.Generator().manual_seed(seed)
        for k in [k for k in sd if pattern in k]:
            w = sd[k]
            sd[k] = w + scale * w.float().std() * torch.randn(w.shape, generator=g).to(w.dtype)
    return fn


@pytest.fixture(scope="module")
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


@pytest.fixture(scope="module")
def qwen_perturbed(qwen, tmp_path_factory):
    # layer 0's attention output moves every router's input: routing drifts from layer 0 on
    return _edit(qwen, tmp_path_factory.mktemp("pert") / "m", _noise("layers.0.self_attn.o_proj.weight", 0.5))


@pytest.fixture(scope="module")
def qwen_eval(qwen_perturbed, qwen):
    return evaluate(qwen_perturbed, qwen, **SMALL)


def _leaves(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield prefix, x


def _windows(ref_dir):
    from transformers import AutoTokenizer

    from moecompress.calib.data import load_texts, make_calibration_windows

    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    return [make_calibration_windows(load_texts(s), tok, SMALL["samples"], SMALL["seq_len"], SMALL["seed"]).input_ids
            for s in DEFAULT_DATA]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, experts_implementation="eager").eval()


@torch.no_grad()
def _hf_run(model, ids):
    out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    return out.logits.float(), [r.float() for r in out.router_logits]


# ------------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe_lite"])
def test_identical_models_agree_perfectly(tiny_ckpt, family, tmp_path):
    p = tiny_ckpt(family)
    copy = shutil.copytree(p, tmp_path / "copy")  # a second folder: both models are loaded and run
    r = evaluate(copy, p, **SMALL)
    assert abs(r["kl"]) < 1e-9 and r["top1_agreement"] == 1.0
    assert r["routing"]["topk_exact"] == 1.0 and r["routing"]["jaccard"] == 1.0 and r["routing"]["router_kl"] < 1e-9
    for row in r["routing"]["per_layer"]:
        assert row["topk_exact"] == 1.0 and row["jaccard"] == 1.0 and row["router_kl"] < 1e-9
    assert r["ppl"] == r["ppl_reference"]
    assert r["expert_load"]["model"] == r["expert_load"]["reference"]
    assert r["size_bytes"] == r["reference_size_bytes"] and r["bits_per_weight"] is None and r["quantization"] is None
    same = evaluate(p, p, low_memory=True, **SMALL)  # the same folder: run once, compared with itself
    assert same["kl"] == 0.0 and same["routing"]["router_kl"] == 0.0 and same["ppl"] == pytest.approx(r["ppl_reference"], rel=1e-6)
    # DeepSeek-V3's and GLM-4.7-Flash's first layer is dense: routing is reported for the MoE layers only
    assert r["expert_load"]["layers"] == ([1, 2] if family in ("deepseek_v3", "glm4_moe_lite") else [0, 1])


def test_swapped_router_rows_give_the_derived_mismatch(qwen, tmp_path):
    a, b = 1, 5

    def swap(sd):
        w = sd["model.layers.0.mlp.gate.weight"]
        w[[a, b]] = w[[b, a]]

    swapped = _edit(qwen, tmp_path / "swapped", swap)
    r = evaluate(swapped, qwen, **SMALL)
    # derived from the reference alone: layer 0 sees the same hidden states in both models, and the
    # swapped model's layer-0 scores are the reference's with columns a and b exchanged
    ref = _hf(qwen)
    k = ref.config.num_experts_per_tok
    exact = jac = kl = n = 0.0
    for ids in _windows(qwen):
        for s in range(0, ids.shape[0], SMALL["batch_size"]):
            _, routers = _hf_run(ref, ids[s:s + SMALL["batch_size"]])
            p = torch.softmax(routers[0].double(), -1)
            perm = list(range(p.shape[-1]))
            perm[a], perm[b] = b, a
            kl += float((p * (p.log() - p[:, perm].log())).sum())
            hits = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, -1).indices, True)[:, [a, b]].sum(-1)
            exact += float((hits != 1).sum())  # the set is unchanged iff it holds both or neither
            jac += float((hits == 1).sum()) * (k - 1) / (k + 1) + float((hits != 1).sum())
            n += p.shape[0]
    row = r["routing"]["per_layer"][0]
    assert row["layer"] == 0
    assert 0 < exact / n < 1  # the case is not degenerate
    assert row["topk_exact"] == pytest.approx(exact / n, abs=1e-12)
    assert row["jaccard"] == pytest.approx(jac / n, abs=1e-9)
    assert row["router_kl"] == pytest.approx(kl / n, rel=1e-4, abs=1e-7)


def test_independent_check_against_transformers_forward(qwen_eval, qwen_perturbed, qwen):
    """KL, top-1 and per-layer routing agreement recomputed from transformers' own forward."""
    model, ref = _hf(qwen_perturbed), _hf(qwen)
    k = ref.config.num_experts_per_tok
    kl = agree = pos = 0.0
    n_layers = ref.config.num_hidden_layers
    exact, jac, toks = [0.0] * n_layers, [0.0] * n_layers, 0
    for ids in _windows(qwen):
        lm, rm = _hf_run(model, ids)
        lr, rr = _hf_run(ref, ids)
        logp, logq = torch.log_softmax(lr.double(), -1), torch.log_softmax(lm.double(), -1)
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += float((lr.argmax(-1) == lm.argmax(-1)).sum())
        pos += lr.shape[0] * lr.shape[1]
        for i in range(n_layers):
            top_m = torch.softmax(rm[i], -1).topk(k, -1).indices.tolist()
            top_r = torch.softmax(rr[i], -1).topk(k, -1).indices.tolist()
            for x, y in zip(top_m, top_r):
                exact[i] += set(x) == set(y)
                jac[i] += len(set(x) & set(y)) / len(set(x) | set(y))
        toks += lr.shape[0] * lr.shape[1]
    r = qwen_eval
    assert r["kl"] == pytest.approx(kl / pos, rel=1e-4)
    assert r["top1_agreement"] == pytest.approx(agree / pos, abs=1e-12)
    assert 0 < r["kl"] and r["routing"]["topk_exact"] < 1  # the perturbation shows
    for i, row in enumerate(r["routing"]["per_layer"]):
        assert row["layer"] == i
        assert row["topk_exact"] == pytest.approx(exact[i] / toks, abs=1e-12)
        assert row["jaccard"] == pytest.approx(jac[i] / toks, abs=1e-9)


# ------------------------------------------------------------------------------------ modes, schema


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe_lite"])
def test_low_memory_matches_default(tiny_ckpt, tmp_path, family):
    ref = tiny_ckpt(family)
    model = _edit(ref, tmp_path / "m", _noise("layers.0.self_attn.o_proj.weight", 0.5))
    a = evaluate(model, ref, **SMALL)
    b = evaluate(model, ref, low_memory=True, **SMALL)
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    la.pop(".seconds"), lb.pop(".seconds")
    assert la.keys() == lb.keys()
    for key in la:
        assert lb[key] == pytest.approx(la[key], rel=1e-5, abs=1e-6), key
    assert a["routing"]["topk_exact"] < 1  # not a trivial comparison
    assert b["settings"]["low_memory"] is True


SCHEMA = {"model", "reference", "family", "data", "ppl", "ppl_reference", "kl", "top1_agreement", "kl_per_dataset",
          "top1_per_dataset", "routing", "expert_load", "skip_rate", "size_bytes", "reference_size_bytes",
          "bits_per_weight", "quantization", "settings", "seconds", "lm_eval", "reference_cache", "active_experts"}


def test_schema(qwen_eval):
    r = qwen_eval
    assert set(r) == SCHEMA
    json.dumps(r, allow_nan=False)
    names = ["heldout-code", "heldout-prose"]
    assert list(r["data"]) == names
    for name in names:
        assert set(r["data"][name]) == {"spec", "windows", "seq_len", "text_sha256", "token_count", "windows_overlap"}
        assert r["data"][name]["windows_overlap"] is False and r["data"][name]["token_count"] >= SMALL["seq_len"]
        assert r["data"][name]["windows"] == SMALL["samples"] and r["data"][name]["seq_len"] == SMALL["seq_len"]
        assert len(r["data"][name]["text_sha256"]) == 64
    for key in ("ppl", "ppl_reference", "kl_per_dataset", "top1_per_dataset"):
        assert list(r[key]) == names and all(isinstance(v, float) and math.isfinite(v) for v in r[key].values())
    assert set(r["routing"]) == {"topk_exact", "jaccard", "router_kl", "per_layer"}
    assert all(set(row) == {"layer", "topk_exact", "jaccard", "router_kl"} for row in r["routing"]["per_layer"])
    load = r["expert_load"]
    assert set(load) == {"layers", "model", "reference", "entropy", "max_over_mean"}
    assert set(load["entropy"]) == set(load["max_over_mean"]) == {"model", "reference"}
    for side in ("model", "reference"):
        assert len(load[side]) == len(load["layers"]) and all(len(row) == 8 for row in load[side])
        assert all(sum(row) == pytest.approx(1.0) for row in load[side])
        assert all(0 < e <= math.log(8) + 1e-9 for e in load["entropy"][side])
        assert all(m >= 1.0 for m in load["max_over_mean"][side])
    assert r["skip_rate"] is None and r["lm_eval"] is None and r["reference_cache"] is None
    act = r["active_experts"]  # no zero experts: every token runs its k experts, nothing saved
    assert act["model"] == act["reference"] == [2.0] * len(act["layers"]) and act["expert_flops_saved_overall"] == 0
    assert r["family"] == "qwen3_moe" and isinstance(r["size_bytes"], int) and r["seconds"] > 0


# ------------------------------------------------------------------------------------ quantized models


@pytest.fixture(scope="module")
def bf16_qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe", dtype=torch.bfloat16)


def _quantize(src, out, **kw):
    from conftest import quick_config

    from moecompress.pipeline import quantize

    quantize(src, out, quick_config(method="rtn", bits=4, group_size=32, only_experts=True, **kw))
    return out


def test_compressed_tensors_w4_g32_sym(bf16_qwen, tmp_path):
    q = _quantize(bf16_qwen, tmp_path / "ct", format="compressed-tensors")
    r = evaluate(q, bf16_qwen, **SMALL)
    assert r["bits_per_weight"] == pytest.approx(4 + 16 / 32)  # codes + one bf16 scale per 32 weights
    assert r["quantization"] == {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "act_order": None,
                                 "format": "compressed-tensors"}
    assert 0 < r["kl"] < 0.5 and r["routing"]["topk_exact"] > 0.5
    assert r["size_bytes"] < r["reference_size_bytes"]


def test_gptq_w4_g32_sym(bf16_qwen, tmp_path):
    q = _quantize(bf16_qwen, tmp_path / "gptq", format="gptq")
    r = evaluate(q, bf16_qwen, low_memory=True, **SMALL)
    # per expert: gate/up [64, 128] and down [128, 64]; fp16 scales and 4-bit zero points per 32
    # weights, plus an int32 g_idx entry per input column (128 + 128 + 64 of them)
    dense = 3 * 64 * 128
    assert r["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32 + 32 * (128 + 128 + 64) / dense)
    assert r["quantization"]["format"] == "gptq" and r["quantization"]["bits"] == 4
    assert 0 < r["kl"] < 0.5


@pytest.mark.parametrize("fmt,kw", [("compressed-tensors", {"symmetric": False}),
                                    ("gptq", {"method": "gptq", "act_order": "group"}),
                                    ("compressed-tensors", {"bits": 8})])
def test_packed_whole_model_gives_the_dequantized_numbers(bf16_qwen, tmp_path, fmt, kw):
    """The default (whole-model) eval keeps a quantized checkpoint packed on the CPU and dequantizes each
    linear and expert when used: bit for bit the numbers of the dequantized (low-memory) path, in a
    fraction of the float weights' memory."""
    from conftest import quick_config

    from moecompress.evals.collect import WholeModel
    from moecompress.pipeline import quantize
    from moecompress.runtime.cpu_packed import CpuQuantLinear, LazyExpertWeights, packed_bytes

    q = tmp_path / "q"
    quantize(bf16_qwen, q, quick_config(**{"method": "rtn", "bits": 4, "group_size": 32, "format": fmt, **kw}))
    a = evaluate(q, bf16_qwen, **SMALL)
    b = evaluate(q, bf16_qwen, low_memory=True, **SMALL)
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    for key in la.keys() - {".seconds", ".settings.low_memory"}:
        assert la[key] == lb[key], key
    whole = WholeModel(q, "cpu", torch.float32)
    mods = list(whole.model.modules())
    assert sum(isinstance(m, LazyExpertWeights) for m in mods) == 2 * len(whole.moe_layers)
    assert sum(isinstance(m, CpuQuantLinear) for m in mods) >= 4 * whole.handle.num_layers
    layers = whole.model.model.layers
    held = packed_bytes(layers)  # every tensor the layers hold (norms and routers too)
    dense = sum(int(torch.tensor(m.shape).prod()) * 4 for m in mods if isinstance(m, LazyExpertWeights)) + sum(
        m.in_features * m.out_features * 4 for m in mods if isinstance(m, CpuQuantLinear))
    assert held < (0.3 if kw.get("bits", 4) == 4 else 0.45) * dense, (held, dense)


# ------------------------------------------------------------------------------------ memory: whole or streamed


def test_resident_bytes_counts_what_a_whole_load_holds(bf16_qwen, tmp_path):
    """The estimate behind the automatic streaming, against what the whole-model loads really hold: the bf16
    source in fp32, and its W4 checkpoint kept packed (CPU) or dequantized."""
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.evals.collect import WholeModel
    from moecompress.evals.sizes import resident_bytes
    from moecompress.runtime.cpu_packed import packed_bytes

    q = _quantize(bf16_qwen, tmp_path / "q", format="compressed-tensors")
    src, qr = CheckpointReader.open(bf16_qwen), CheckpointReader.open(q)
    float_model = WholeModel(bf16_qwen, "cpu", torch.float32).model
    held = sum(p.numel() * p.element_size() for p in float_model.parameters())
    assert resident_bytes(src, torch.float32, packed=False) == held
    assert resident_bytes(qr, torch.float32, packed=False) == held  # dequantized: the float model's size
    packed = packed_bytes(WholeModel(q, "cpu", torch.float32).model)
    assert resident_bytes(qr, torch.float32, packed=True) == pytest.approx(packed, rel=0.05)
    assert packed < 0.6 * held


def test_eval_streams_by_itself_when_the_models_do_not_fit(bf16_qwen, tmp_path, monkeypatch, caplog):
    from moecompress.evals import evaluate as ev

    q = _quantize(bf16_qwen, tmp_path / "q", format="compressed-tensors")
    monkeypatch.setattr(ev.memory, "available_bytes", lambda device: 10**15)
    whole = evaluate(q, bf16_qwen, **SMALL)
    assert whole["settings"]["low_memory"] is False and whole["settings"]["low_memory_auto"] is False
    from moecompress.arch.handle import ModelHandle

    q_h, ref_h = ModelHandle.open(q, dequantize=True), ModelHandle.open(bf16_qwen, dequantize=True)
    need = ev.whole_fits(q_h, ref_h, torch.device("cpu"), torch.float32)[1]
    monkeypatch.setattr(ev.memory, "available_bytes", lambda device: need - 1)
    with caplog.at_level("WARNING", logger="moecompress"):
        auto = evaluate(q, bf16_qwen, **SMALL)
    assert auto["settings"]["low_memory"] is True and auto["settings"]["low_memory_auto"] is True
    assert "streaming one layer at a time" in caplog.text
    la, lb = dict(_leaves(whole)), dict(_leaves(auto))
    for key in la.keys() - {".seconds", ".settings.low_memory", ".settings.low_memory_auto"}:
        assert la[key] == lb[key], key
    monkeypatch.setattr(ev.memory, "available_bytes", lambda device: need + 1)
    assert ev.whole_fits(q_h, ref_h, torch.device("cpu"), torch.float32, 2)[0] is False  # two torchrun processes
    assert ev.whole_fits(q_h, ref_h, torch.device("cpu"), torch.float32, 1)[0] is True


def test_resident_bytes_leaves_out_what_no_load_reads(tiny_ckpt, tmp_path):
    """MTP layers beyond num_hidden_layers, other towers and a stock layout's zero experts are in the shards but
    never loaded: with the handle's filter the estimate is still exactly what a whole float load holds."""
    from moecompress.arch.handle import ModelHandle
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.evals.collect import WholeModel
    from moecompress.evals.sizes import resident_bytes
    from moecompress.zero.convert import convert_layout
    from moecompress.zero.inject import add_zero_experts

    src = tiny_ckpt("qwen3_moe")
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    shards = sorted(extra.glob("*.safetensors"))
    state = load_file(shards[0])
    layers = json.loads((extra / "config.json").read_text())["num_hidden_layers"]
    state[f"model.layers.{layers}.mlp.experts.0.gate_proj.weight"] = torch.zeros(64, 64)  # an MTP layer
    state["mtp.norm.weight"] = torch.zeros(4096)
    state["model.visual.blocks.0.weight"] = torch.zeros(4096)
    save_file(state, str(shards[0]), metadata={"format": "pt"})
    stock = tmp_path / "stock"
    native = tmp_path / "native"
    add_zero_experts(src, native, 2)
    for shard in native.glob("*.safetensors"):  # no logit offset: the stock layout can express it
        t = load_file(shard)
        save_file({k: torch.zeros_like(v) if k.endswith("zero_expert_bias") else v for k, v in t.items()}, str(shard),
                  metadata={"format": "pt"})
    convert_layout(native, stock, "stock")
    for path in (extra, stock):
        held = sum(p.numel() * p.element_size() for p in WholeModel(path, "cpu", torch.float32).model.parameters())
        reader, keep = CheckpointReader.open(path), ModelHandle.open(path, dequantize=True).whole_load_filter()
        # (stock: the load adds each router's zero_expert_bias, Z zeros the shards need not hold)
        assert resident_bytes(reader, torch.float32, packed=False, keep=keep) == pytest.approx(held, rel=1e-4), path.name
        assert resident_bytes(reader, torch.float32, packed=False) > held  # without the filter: counted
