"""`moecompress plan`: expert placement on a small GPU from routing statistics, and its decode estimate."""

from __future__ import annotations

import json

import pytest

from moecompress.errors import UserError
from moecompress.runtime.plan import ModelParts, Part, estimate, gpu_read_share, model_parts, plan, render

MB = 1 << 20


def _parts():
    # 2 MoE layers x 4 experts of 10 MiB, top-1; 20 MiB of dense weights per layer, 30 MiB outside the layers
    dense = [Part("embed+head", 30 * MB)] + [Part(f"l{i}", 20 * MB, i) for i in range(2)]
    return ModelParts("toy", dense, {0: [10 * MB] * 4, 1: [10 * MB] * 4}, top_k=1, kv_bytes_per_token=1024, hidden=64)


def test_the_most_used_experts_go_to_the_gpu():
    load = {0: [0.7, 0.1, 0.1, 0.1], 1: [0.25, 0.25, 0.25, 0.25]}
    parts = _parts()
    need = 70 * MB + 1024 * 100 + (1 << 20)
    pl = plan(parts, need + 20 * MB, context=100, load=load, reserve_bytes=1 << 20)
    # room for 2 experts: layer 0's hot one (P = 0.7), then one of layer 1's (P = 0.25), not layer 0's 0.1s
    assert pl.on_gpu == {0: [0], 1: [0]}
    assert pl.gpu_bytes == need - (1 << 20) + 20 * MB and pl.cpu_bytes == 60 * MB
    # the estimate by hand: lm_head etc. on the GPU, then per layer dense + max(GPU experts, CPU experts) + a hop
    g, c, pcie = 300e9, 40e9, 16e9
    hop = 2 * 64 * 2 / pcie + 20e-6
    t0 = 20 * MB / g + max(0.7 * 10 * MB / g, 0.3 * 10 * MB / c) + hop
    t1 = 20 * MB / g + max(0.25 * 10 * MB / g, 0.75 * 10 * MB / c) + hop
    assert pl.decode_tokens_per_s == pytest.approx(1 / (30 * MB / g + t0 + t1))
    assert pl.all_on_gpu_tokens_per_s > pl.decode_tokens_per_s
    assert [r["gpu_hit_share"] for r in pl.per_layer] == pytest.approx([0.7, 0.25])
    # the same figure for a placement given by hand (what benchmarks/offload_decode.py sets beside a measurement)
    assert estimate(parts, {0: [0], 1: [0]}, load=load)[0] == pytest.approx(pl.decode_tokens_per_s)
    assert estimate(parts, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})[0] == pytest.approx(pl.all_on_gpu_tokens_per_s)
    everything_far = 1 / (30 * MB / g + 2 * (20 * MB / g + 4 * 0.25 * 10 * MB / c + hop))  # uniform, top-1: P = 1/4
    assert estimate(parts, {})[0] == pytest.approx(everything_far)


def test_uniform_load_and_a_vram_floor():
    parts = _parts()
    pl = plan(parts, 200 * MB, context=100, reserve_bytes=0)
    assert sum(len(v) for v in pl.on_gpu.values()) == 8 and pl.cpu_bytes == 0 and pl.load_source == "uniform"
    with pytest.raises(UserError, match=r"--vram 50.00 MiB is below what the non-expert part needs: 70.10 MiB"
                                        r" .*; give at least that$"):  # the KV cache is too small to matter
        plan(parts, 50 * MB, context=100, reserve_bytes=0)
    # a size just below the floor prints below it (2-decimal GiB once printed 0.50 below 0.50)
    with pytest.raises(UserError, match=r"--vram 70.00 MiB is below .* 70.10 MiB"):
        plan(parts, 70 * MB, context=100, reserve_bytes=0)
    with pytest.raises(UserError, match=r"or a shorter --context$"):  # here a shorter context is what fits it
        plan(parts, 80 * MB, context=20_000, reserve_bytes=0)
    with pytest.raises(UserError, match="--ram"):
        plan(parts, 80 * MB, context=100, reserve_bytes=0, ram_bytes=10 * MB)


def test_the_gpu_share_counts_moe_layers_only():
    """A dense layer (DeepSeek's first layers) reads no experts: the overall share of expert reads on the GPU is
    over the MoE layers, so every expert on the GPU reads as 100%, not diluted by the dense layer."""
    dense = [Part("embed+head", 30 * MB)] + [Part(f"l{i}", 20 * MB, i) for i in range(3)]
    parts = ModelParts("toy", dense, {1: [10 * MB] * 4, 2: [10 * MB] * 4}, top_k=1, kv_bytes_per_token=1024,
                       hidden=64)
    pl = plan(parts, 500 * MB, context=100, reserve_bytes=0)
    assert sum(len(v) for v in pl.on_gpu.values()) == 8 and gpu_read_share(pl) == 1.0
    assert "share of expert reads served by the GPU: 100%" in render(pl, parts, 500 * MB)
    # layer 1 all on the GPU, layer 2 none: half the reads, whatever the dense layer
    half = estimate(parts, {1: [0, 1, 2, 3]})[1]
    assert [r["gpu_hit_share"] for r in half] == [0.0, 1.0, 0.0]
    pl.per_layer = half
    assert gpu_read_share(pl) == pytest.approx(0.5)


def test_config_only_shapes_match_a_real_checkpoint(tiny_ckpt, tmp_path):
    """Sizes from the config alone equal what `quantize` writes (expert and dense parts)."""
    from conftest import quick_config

    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", bits=4, group_size=32))
    from safetensors import safe_open

    parts = model_parts(q)  # quantized: its own settings (4 bits, group 32, symmetric)
    size = 0
    for f in q.glob("*.safetensors"):  # the tensors' bytes (the headers of a tiny model are a large share)
        with safe_open(str(f), "pt") as fh:
            size += sum(fh.get_tensor(n).numel() * fh.get_tensor(n).element_size()
                        for n in fh.keys() if not n.endswith("weight_shape"))
    planned = sum(p.nbytes for p in parts.dense) + sum(sum(s) for s in parts.experts.values())
    assert abs(planned - size) / size < 0.01, (planned, size)


def _qwen36_config(path):
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig

    text = dict(hidden_size=2048, num_hidden_layers=40, vocab_size=248320, num_attention_heads=16,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                linear_key_head_dim=128, linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8,
                moe_intermediate_size=512, shared_expert_intermediate_size=512, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=2048)
    Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False).save_pretrained(path)
    return path


def test_qwen36_35b_a3b_int4_on_a_6gb_gpu(tmp_path, capsys):
    """The issue's case, from the published shapes (no download): a placement and an estimate."""
    from moecompress.cli import main

    cfg = _qwen36_config(tmp_path / "q36")
    assert main(["plan", str(cfg), "--vram", "6GiB", "--ram", "32GiB"]) == 0
    out = capsys.readouterr().out
    assert "40 MoE layers x 256 experts (top-8)" in out and "ESTIMATE decode at batch 1" in out
    total = model_parts(cfg)
    gib = (sum(p.nbytes for p in total.dense) + sum(sum(s) for s in total.experts.values())) / 2**30
    assert 17 < gib < 20  # ~35B parameters at ~4.5 bits
    assert main(["plan", str(cfg), "--vram", "2GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is below what the non-expert part needs" in err[0]
    assert main(["plan", str(cfg), "--vram", "6GiB", "--context", "100000000"]) == 2
    assert "--context 100000000 is longer than the model's context" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--vram", "6"]) == 2  # a unit left out, not 6 bytes
    assert capsys.readouterr().err.strip() == "error: --vram 6 reads as 6 bytes: give a unit, e.g. 6GiB"


def test_load_from_an_eval_json(tmp_path, capsys):
    from moecompress.cli import main

    cfg = _qwen36_config(tmp_path / "q36")
    rows = [[1.0 if e == 0 else 0.001 for e in range(256)] for _ in range(40)]
    (tmp_path / "e.json").write_text(json.dumps({"expert_load": {"layers": list(range(40)), "model": rows}}))
    assert main(["plan", str(cfg), "--vram", "4GiB", "--load", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "expert load: measured" in out
    assert main(["plan", str(cfg), "--vram", "4GiB", "--load", str(tmp_path / "nope.json")]) == 2


def test_offload_flags_are_checked(tiny_ckpt, capsys):
    from moecompress.cli import main

    path = str(tiny_ckpt("qwen3_moe"))
    for args, msg in ((["--offload-experts", "2"], "needs --device cuda"),):
        assert main(["generate", path, "--prompt", "hi", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_offload_placement_by_count_and_load(tiny_ckpt, tmp_path):
    from moecompress.runtime.cli import offload_placement

    path = str(tiny_ckpt("qwen3_moe"))
    rows = [[0.0, 5.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0]] * 2
    (tmp_path / "e.json").write_text(json.dumps({"expert_load": {"layers": [0, 1], "model": rows}}))
    assert offload_placement(path, "2", None, str(tmp_path / "e.json"), "cuda") == {0: [1, 5], 1: [1, 5]}
    assert offload_placement(path, "3", None, None, "cuda") == {0: [0, 1, 2], 1: [0, 1, 2]}
    with pytest.raises(UserError, match="needs --vram"):
        offload_placement(path, "auto", None, None, "cuda")
    for spec in ("many", "²"):  # (a digit str.isdigit() takes and int() does not)
        with pytest.raises(UserError, match="'auto' or a number"):
            offload_placement(path, spec, None, None, "cuda")
    with pytest.raises(UserError, match="--vram only applies with --offload-experts auto"):
        offload_placement(path, "2", "6GiB", None, "cuda")


def test_offload_plans_a_float_checkpoint_as_it_runs_and_kept_linears_in_float(tiny_ckpt, tmp_path):
    """--offload-experts auto on a float checkpoint: its experts at their stored bytes (not at 4 bits: a 4x
    overfilled GPU); a quantized one's linears left in float (--only-experts) at float size; the estimate reads
    one embedding row per token, not the matrix."""
    from moecompress.pipeline import quantize
    from conftest import quick_config
    from moecompress.runtime.plan import _estimate, _shares

    src = tiny_ckpt("qwen3_moe")  # fp32
    cfg = json.loads((src / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    stored = model_parts(src, stored=True)
    assert all(size == 3 * h * i * 4 for sizes in stored.experts.values() for size in sizes)
    assert all(size < 3 * h * i for sizes in model_parts(src).experts.values() for size in sizes)  # ~4 bits
    q = tmp_path / "q"
    quantize(src, q, quick_config(method="rtn", bits=4, only_experts=True))
    parts = model_parts(q)
    attn = [p for p in parts.dense if p.name.endswith("self_attn.q_proj.weight")]
    assert attn and all(p.nbytes == cfg["num_attention_heads"] * cfg["head_dim"] * h * 4 for p in attn)
    big = dict(vars(parts), dense=[p if "embed_tokens" not in p.name else Part(p.name, p.nbytes * 1000, None)
                                  for p in parts.dense])
    same = _estimate(type(parts)(**big), _shares(parts, None), {}, 300.0, 40.0, 16.0)[0]
    assert same == _estimate(parts, _shares(parts, None), {}, 300.0, 40.0, 16.0)[0]


def test_plan_per_channel_group(tmp_path, capsys):
    """``--group-size -1`` plans per-channel scales, as quantize takes it: fewer scale bytes than g128."""
    from moecompress.cli import main

    cfg = _qwen36_config(tmp_path / "q36")
    assert main(["plan", str(cfg), "--vram", "6GiB", "--group-size", "-1"]) == 0
    capsys.readouterr()
    per_channel, grouped = model_parts(cfg, 4, None), model_parts(cfg, 4, 128)
    assert sum(sum(s) for s in per_channel.experts.values()) < sum(sum(s) for s in grouped.experts.values())
    assert main(["plan", str(cfg), "--vram", "6GiB", "--group-size", "100"]) == 2
    assert "-1 for per channel" in capsys.readouterr().err


def test_sparse_attention_caches_its_indexer_keys(tiny_ckpt):
    """DeepSeek-V3.2 caches V3's latent and rope key per layer and token, and its indexer's key besides."""
    from moecompress.tiny import TINY_CONFIGS

    v32, v3 = model_parts(tiny_ckpt("deepseek_v32")), model_parts(tiny_ckpt("deepseek_v3"))
    cfg = TINY_CONFIGS["deepseek_v32"]
    assert v3.kv_bytes_per_token == cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    assert v32.kv_bytes_per_token - v3.kv_bytes_per_token == cfg["num_hidden_layers"] * cfg["index_head_dim"] * 4
