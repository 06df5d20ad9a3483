"""The trained demo model: cache path rules (fast), and a quick build that loads and has learned (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecompress.demo_model import (
    RECIPE,
    build_demo_model,
    demo_model_path,
    expert_load,
    heldout_perplexity,
    heldout_windows,
    recipe,
    recipe_hash,
)
from moecompress.errors import UserError


def test_cache_path_follows_env_and_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    p = demo_model_path(build=False)
    assert p.parent == tmp_path / "cache" and p.name.startswith("demo-")
    assert p == demo_model_path(build=False)  # stable
    others = {demo_model_path(build=False, seed=1), demo_model_path(build=False, quick=True),
              demo_model_path(build=False, steps=7), demo_model_path(tmp_path / "x", build=False),
              demo_model_path(build=False, variant="wide")}
    assert p not in others and len(others) == 5
    assert demo_model_path(tmp_path / "x", build=False).parent == tmp_path / "x"
    assert not (tmp_path / "cache").exists()  # build=False never builds


def test_cached_model_is_reused_not_rebuilt(tmp_path):
    path = demo_model_path(tmp_path, build=False, quick=True)
    path.mkdir(parents=True)
    (path / "demo_model.json").write_text("{}")
    assert demo_model_path(tmp_path, quick=True) == path  # returns at once: nothing to train


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(UserError):
        build_demo_model(tmp_path, quick=True)
    with pytest.raises(UserError):
        recipe(steps=0)


def test_recipe_dims_fit_every_group_size():
    r = RECIPE
    for dim in (r["hidden_size"], r["num_attention_heads"] * r["head_dim"], r["moe_intermediate_size"]):
        assert dim % 128 == 0 and dim % 64 == 0
    assert 8 <= r["num_experts"] <= 16 and r["num_experts_per_tok"] == 2
    assert recipe_hash(recipe()) != recipe_hash(recipe(quick=True))


def test_wide_variant_has_production_expert_layout():
    wide = recipe(variant="wide")
    assert (wide["num_experts"], wide["num_experts_per_tok"]) == (64, 8)
    assert wide["moe_intermediate_size"] % 128 == 0
    assert recipe_hash(wide) != recipe_hash(recipe())
    assert "variant" not in recipe()  # the default keeps the cache key that earlier builds used
    with pytest.raises(UserError, match="unknown demo model variant"):
        recipe(variant="narrow")


@pytest.fixture(scope="module")
def quick_model(quick_demo_cache):
    return demo_model_path(quick_demo_cache, quick=True)  # built (by build_demo_model) once per session


@pytest.mark.slow
def test_quick_build_loads_and_has_learned(quick_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in quick_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "demo_model.json"} <= names, names
    assert not any(n.startswith(".") for n in quick_model.parent.iterdir() if n != quick_model)  # no temp left
    info = json.loads((quick_model / "demo_model.json").read_text())
    cfg = json.loads((quick_model / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["norm_topk_prob"] and cfg["num_experts_per_tok"] == 2

    model, loading = AutoModelForCausalLM.from_pretrained(quick_model, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"], loading
    tok = AutoTokenizer.from_pretrained(quick_model)
    assert len(tok) == cfg["vocab_size"] == RECIPE["vocab_size"]
    text = "def f(x):\n    return x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    uniform = math.log(cfg["vocab_size"])
    n = info["recipe"]["eval_windows"]
    ppl = heldout_perplexity(model, tok, "builtin:heldout-code", n=n)
    # clearly learned: at least 2 nats (7x in perplexity) better than a uniform guess
    assert math.log(ppl) < uniform - 2.0, (math.log(ppl), uniform)
    assert math.log(ppl) == pytest.approx(info["heldout"]["builtin:heldout-code"]["loss"], abs=1e-3)
    assert info["final_train_loss"] < uniform - 2.0, info["final_train_loss"]

    # every expert of every layer gets at least 1% of the routed held-out tokens
    ids = torch.cat([heldout_windows(tok, s, n=n) for s in ("builtin:heldout-code", "builtin:heldout-prose")])
    load = expert_load(model, ids)
    assert len(load) == cfg["num_hidden_layers"] and all(len(layer) == model.config.num_experts for layer in load)
    assert min(min(layer) for layer in load) >= 0.01, load
    assert info["min_expert_share"] >= 0.01
