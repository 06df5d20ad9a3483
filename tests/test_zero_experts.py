"""Zero experts (ZEDA's model kind): injection, layouts, baselines, and every tool reading them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEEPSEEK_V2_GROUPED, FAMILIES, quick_config, run_cli
from moecompress.checkpoint.load import load_model
from moecompress.arch.registry import FAMILIES as REGISTRY
from moecompress.errors import UserError
from moecompress.zero.convert import convert_layout
from moecompress.zero.inject import add_zero_experts

# stock layout needs routing the stock loaders can express: no group-limited top-k
UNGROUPED = dict(n_group=1, topk_group=1)
SIGMOID = {spec.family for spec in REGISTRY if spec.scoring == "sigmoid"}


def _ids(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(path, ids=None, dtype=torch.float32) -> torch.Tensor:
    _, model = load_model(path, dtype)
    return model(input_ids=_ids() if ids is None else ids).logits


def _edit_tensors(path: Path, fn) -> None:
    """Rewrite the single shard of ``path`` with ``fn(name, tensor) -> tensor``."""
    (shard,) = Path(path).glob("*.safetensors")
    sd = load_file(shard)
    save_file({k: fn(k, v) for k, v in sd.items()}, shard, metadata={"format": "pt"})


def mixed_zero_model(src, out, num_zero: int = 4, seed: int = 0) -> Path:
    """A zero-expert model whose zero experts are chosen for a good share of the slots: injection,
    then the offset removed (softmax: zero_expert_bias 0; sigmoid: zero rows' selection bias 0)."""
    add_zero_experts(src, out, num_zero, "same", seed=seed)
    e = json.loads((Path(out) / "config.json").read_text())
    e = e.get("text_config") or e

    def fn(name, t):
        if name.endswith("zero_expert_bias"):
            return torch.zeros_like(t)
        if name.endswith("e_score_correction_bias"):  # [E+Z], or ERNIE's [1, E+Z]
            t = t.clone()
            flat = t.view(-1)
            flat[-num_zero:] = flat[:-num_zero].max() + 0.05
        return t

    _edit_tensors(Path(out), fn)
    assert e["num_zero_experts"] == num_zero
    return Path(out)


def set_original_weights(path: Path, relative: bool = False) -> Path:
    """Declare ``zero_experts_weights: original`` (and relative zero logits) in ``path``'s config."""
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    (cfg.get("text_config") or cfg)["zero_experts_weights"] = "original"
    if relative:
        (cfg.get("text_config") or cfg)["zero_experts_logits"] = "relative"
    cfg_path.write_text(json.dumps(cfg))
    return Path(path)


def _router_ids(path, ids) -> dict[int, torch.Tensor]:
    from moecompress.zero.modules import zero_routers

    _, model = load_model(path)
    seen = {}
    hooks = [r.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[2])) for i, r in
             enumerate(zero_routers(model))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


# ---------------------------------------------------------------- injection


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_is_the_original_bit_for_bit(tiny_ckpt, tmp_path, family):
    src = tiny_ckpt(family)
    out = tmp_path / "z"
    add_zero_experts(src, out, 4, "same", seed=3)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    assert text["num_zero_experts"] == 4 and text["zero_experts_layout"] == "native"
    ids = _ids()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_logits(src, ids, dtype), _logits(out, ids, dtype)), f"{family} {dtype}"
    e = json.loads((out / "moecompress.json").read_text())["zero_experts"]
    assert e["layers"], "no MoE layer got zero experts"
    assert all((r >= 8).sum() == 0 for r in _router_ids(out, ids).values())


def test_deepseek_v2_group_limited_routing_with_zero_experts(tiny_ckpt, tmp_path):
    """Softmax routing limited to groups (scored by their best expert): the injected model is the original
    bit for bit, the zero experts stay out of the groups in transformers' modules and in the runtime (same
    greedy tokens), and the stock layout is refused (stock routers would group the zero experts too)."""
    from moecompress.runtime import Runtime

    src = tiny_ckpt("deepseek_v2", **DEEPSEEK_V2_GROUPED)
    out = tmp_path / "z"
    add_zero_experts(src, out, 4, "same", seed=3)
    ids = _ids()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_logits(src, ids, dtype), _logits(out, ids, dtype)), dtype
    native = mixed_zero_model(src, tmp_path / "mixed")
    routed = torch.cat([v.reshape(-1, 2) for v in _router_ids(native, ids).values()])
    assert 0 < int((routed >= 8).sum()) < routed.numel()
    for row in routed:
        real = row[row < 8]
        assert len(set((real // 2).tolist())) <= 2, f"real experts from more than topk_group groups: {row.tolist()}"
    prompt = _ids(1, batch=1, length=11)
    _, ref = load_model(native)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    assert Runtime.load(native).generate(prompt, 32, stop_ids=[]).tokens == want.tolist()
    with pytest.raises(UserError, match="group-limited"):
        convert_layout(native, tmp_path / "s", "stock")


def test_injection_is_seeded_and_rows_follow_the_real_rows(tiny_ckpt, tmp_path):
    src = tiny_ckpt("qwen3_moe")
    a, b, c = (add_zero_experts(src, tmp_path / n, 32, seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    wa, wb, wc = (load_file(next((tmp_path / n).glob("*.safetensors")))["model.layers.0.mlp.gate.weight"]
                  for n in "abc")
    assert torch.equal(wa, wb) and not torch.equal(wa[8:], wc[8:])
    real, new = wa[:8], wa[8:]
    assert abs(new.std() / real.std() - 1) < 0.25  # drawn at the real rows' scale
    assert (new.mean(0) - real.mean(0)).abs().mean() < 0.1


def test_plus_one_raises_top_k(tiny_ckpt, tmp_path):
    out = tmp_path / "p1"
    rec = add_zero_experts(tiny_ckpt("qwen3_moe"), out, 2, "plus-one")
    assert rec["zero_experts"]["top_k"] == {"before": 2, "after": 3}
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 3
    ids = _router_ids(out, _ids())
    assert all(r.shape[-1] == 3 and (r >= 8).sum() == 0 for r in ids.values())  # k+1 real experts at first


@pytest.mark.slow
def test_injected_eval_kl_zero_and_skip_zero(tiny_ckpt, tmp_path):
    from moecompress.evals.evaluate import evaluate

    src = tiny_ckpt("qwen3_moe")
    add_zero_experts(src, tmp_path / "z", 4)
    r = evaluate(tmp_path / "z", src, samples=4, seq_len=64)
    assert r["kl"] == 0.0 and r["top1_agreement"] == 1.0
    assert r["skip_rate"]["model_overall"] == 0.0 and r["skip_rate"]["reference"] == [None, None]
    assert r["active_experts"]["expert_flops_saved_overall"] == 0.0
    assert r["routing"]["topk_exact"] == 1.0


# ---------------------------------------------------------------- eval counts on rigged routers


def test_rigged_routers_give_exact_counts(tiny_ckpt, tmp_path):
    """Layer 0 sends every slot to a zero expert, layer 1 none: eval counts exactly that."""
    from moecompress.evals.evaluate import evaluate

    src = tiny_ckpt("qwen3_moe")
    out = tmp_path / "rig"
    add_zero_experts(src, out, 2)
    _edit_tensors(out, lambda n, t: torch.full_like(t, 1e4) if n == "model.layers.0.mlp.gate.zero_expert_bias" else t)
    r = evaluate(out, src, samples=2, seq_len=32, data=["builtin:heldout-code"])
    tokens = 2 * 32
    assert r["skip_rate"]["model"] == [1.0, 0.0]
    act = r["active_experts"]
    assert act["model_histogram"] == [[tokens, 0, 0], [0, 0, tokens]]
    assert act["model"] == [0.0, 2.0] and act["expert_flops_saved"] == [1.0, 0.0]
    assert r["expert_load"]["model"][0] == [0.0] * 8  # no real expert got a slot
    assert r["routing"]["per_layer"][0]["topk_exact"] == 0.0  # {} vs the reference's 2 experts


def test_rule_model_skips_exactly(tiny_ckpt, tmp_path):
    """A static top-k rule k'=1 on a top-2 model skips exactly half the slots of every layer."""
    from moecompress.evals.evaluate import evaluate

    src = tiny_ckpt("mixtral")
    out = tmp_path / "tk"
    add_zero_experts(src, out, 1, rule=("top-k", 1.0))
    r = evaluate(out, src, samples=2, seq_len=32, data=["builtin:heldout-code"])
    assert r["skip_rate"]["model"] == [0.5, 0.5]
    assert r["active_experts"]["model_histogram"] == [[0, 64, 0]] * 2
    assert 0 < r["kl"] < 1


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("family", FAMILIES)
def test_native_stock_round_trip_and_stock_transformers(tiny_ckpt, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from moecompress.runtime import Runtime

    over = UNGROUPED if family in SIGMOID else {}
    src = tiny_ckpt(family, **over)
    native = mixed_zero_model(src, tmp_path / "native")
    ids = _ids()
    skipped = sum(int((r >= r.new_tensor(0) + 8).sum()) for r in _router_ids(native, ids).values())
    assert skipped > 0, "the rigged model never routes to a zero expert"
    stock = tmp_path / "stock"
    convert_layout(native, stock, "stock")
    cfg = json.loads((stock / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    assert text["zero_experts_layout"] == "stock" and text["num_zero_experts"] == 4
    assert torch.equal(_logits(native, ids), _logits(stock, ids))
    back = tmp_path / "back"
    convert_layout(stock, back, "native")
    a, b = (load_file(next(p.glob("*.safetensors"))) for p in (native, back))
    assert set(a) - {k for k in a if k.endswith("zero_expert_bias")} == set(b)
    assert all(torch.equal(a[k], b[k]) for k in b)
    if family == "qwen3_5_moe":
        return  # its stock checkpoint is the VL model; the text model is what we compare below
    hf = AutoModelForCausalLM.from_pretrained(stock, dtype=torch.float32, experts_implementation="eager").eval()
    rt = Runtime.load(native)
    with torch.no_grad():
        ref = hf(input_ids=ids[:1]).logits[0, -1]
    ours = rt.generate(ids[:1], 1, stop_ids=[], keep_logits=True).logits[0][0]
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("family,why", [("qwen3_moe", "layer 0's zero experts have a logit bias"),
                                        ("deepseek_v3", "its routing is group-limited")])
def test_convert_refuses_what_stock_cannot_express(tiny_ckpt, tmp_path, monkeypatch, family, why):
    """Refused before anything is written (softmax: the zero rows' logit bias; deepseek tiny: n_group 2)."""
    from moecompress.zero import convert

    native = tmp_path / "n"
    add_zero_experts(tiny_ckpt(family), native, 2)
    monkeypatch.setattr(convert, "rewrite_checkpoint", lambda *a, **k: pytest.fail("started writing"))
    with pytest.raises(UserError, match=f"stock layout: {why}"):
        convert_layout(native, tmp_path / "s", "stock")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))


def test_convert_refuses_original_weights_and_relative_logits(tiny_ckpt, tmp_path):
    native = mixed_zero_model(tiny_ckpt("qwen3_moe"), tmp_path / "n")
    convert_layout(native, tmp_path / "ok", "stock")  # expressible with the default weighting
    set_original_weights(native)
    with pytest.raises(UserError, match="weighted 'original'"):
        convert_layout(native, tmp_path / "s", "stock")
    set_original_weights(native, relative=True)
    with pytest.raises(UserError, match="relative"):
        convert_layout(native, tmp_path / "s", "stock")
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("layout", ["native", "stock"])
def test_quantized_zero_expert_model_round_trips(tiny_ckpt, tmp_path, fmt, layout):
    from moecompress.pipeline import quantize

    native = mixed_zero_model(tiny_ckpt("qwen3_moe"), tmp_path / "native")
    src = native
    if layout == "stock":
        src = tmp_path / "stock"
        convert_layout(native, src, "stock")
    out = tmp_path / "q"
    quantize(src, out, quick_config(format=fmt))
    s, q = (load_file(next(p.glob("*.safetensors"))) for p in (src, out))
    for k, v in s.items():
        if ".mlp.gate." in k:
            assert torch.equal(q[k], v), f"router tensor {k} changed"
    assert json.loads((out / "config.json").read_text())["num_zero_experts"] == 4
    assert json.loads((out / "config.json").read_text())["zero_experts_layout"] == layout
    ids = _ids()
    ours = _logits(out, ids)
    assert ((ours - _logits(src, ids)).norm() / ours.norm()) < 0.4  # int4 g32 on a random tiny model
    r = _router_ids(out, ids)
    assert sum(int((x >= 8).sum()) for x in r.values()) > 0
    if layout == "stock" and fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
        assert ((ref - ours).norm() / ref.norm()) < 1e-4


def test_calibration_skips_zero_slots(tiny_ckpt, tmp_path):
    """Slots on zero experts feed no expert's statistics: token counts add up to the real slots."""
    from moecompress.pipeline import quantize

    native = tmp_path / "rig"
    add_zero_experts(tiny_ckpt("qwen3_moe"), native, 2)
    _edit_tensors(native, lambda n, t: torch.full_like(t, 1e4) if n == "model.layers.0.mlp.gate.zero_expert_bias" else t)
    summary = quantize(native, tmp_path / "q", quick_config(method="rtn", measure_errors=True))
    tokens = [r["expert_tokens"] for r in summary["layers"]]
    assert sum(tokens[0]) == 0 and sum(tokens[1]) == 8 * 64 * 2


# ---------------------------------------------------------------- baselines


def test_rule_calibration_hits_the_target():
    from moecompress.zero.baselines import calibrate_rule, skip_share

    g = torch.Generator().manual_seed(0)
    w = [torch.softmax(torch.randn(500, 8, generator=g) * 2, -1).sort(-1, descending=True).values for _ in range(3)]
    for kind in ("threshold", "top-p"):
        value, share = calibrate_rule(w, kind, 0.5, 8)
        assert abs(share - 0.5) < 0.02 and share == skip_share(w, (kind, value))
    assert calibrate_rule(w, "top-k", 0.5, 8) == (4.0, 0.5)
    with pytest.raises(UserError, match=r"closest reached: 0\.500"):
        calibrate_rule(w, "top-k", 0.3, 2)
    with pytest.raises(UserError, match="cannot reach"):
        calibrate_rule(w, "threshold", 0.95, 8)  # at most 7/8 of the slots


@pytest.mark.slow
def test_baseline_command_end_to_end(tiny_ckpt, tmp_path):
    from moecompress.evals.evaluate import evaluate
    from moecompress.zero.baselines import make_baseline

    src = tiny_ckpt("qwen3_moe")
    rec = make_baseline(src, tmp_path / "thr", "threshold", 0.3, samples=4, seq_len=64)
    b = rec["zero_experts"]["baseline"]
    assert abs(b["calibration_skip"] - 0.3) <= 0.02 and 0 < b["value"] < 1
    r = evaluate(tmp_path / "thr", src, samples=4, seq_len=64)
    assert 0.15 < r["skip_rate"]["model_overall"] < 0.45


# ---------------------------------------------------------------- bad input (CLI: one line, exit 2)


def _cli(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (as ``python -m moecompress`` runs it, minus the interpreter's start)."""
    capsys.readouterr()
    rc, lines = run_cli(capsys, *args)
    return rc, "\n".join(lines)


def _cli_process(*args) -> tuple[int, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "moecompress.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr.strip()


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(tiny_ckpt, tmp_path, capsys):
    src = tiny_ckpt("qwen3_moe")
    z = tmp_path / "z"
    add_zero_experts(src, z, 2)
    cases = [
        (("zero-experts", "add", src, "--out", tmp_path / "a", "--num-zero", 0), "--num-zero 0 must lie in"),
        (("zero-experts", "add", src, "--out", tmp_path / "a", "--num-zero", 100000), "must lie in [1, 32]"),
        (("zero-experts", "add", z, "--out", tmp_path / "a", "--num-zero", 2), "already has 2 zero experts"),
        (("zero-experts", "add", src, "--out", tmp_path / "a", "--num-zero", 2, "--topk-mode", "x"), "--topk-mode"),
        (("zero-experts", "convert", z, "--out", tmp_path / "a", "--layout", "x"), "--layout"),
        (("zero-experts", "convert", src, "--out", tmp_path / "a", "--layout", "stock"), "has no zero experts"),
        (("zero-experts", "convert", z, "--out", tmp_path / "a", "--layout", "native"), "already in the native"),
        (("zero-experts", "baseline", src, "--rule", "x", "--target-skip", 0.5, "--out", tmp_path / "a"), "--rule"),
        (("zero-experts", "baseline", src, "--rule", "top-k", "--target-skip", 1.5, "--out", tmp_path / "a"),
         "must lie in (0, 1)"),
        (("zero-experts", "baseline", src, "--rule", "top-k", "--target-skip", 0.3, "--out", tmp_path / "a",
          "--calib-samples", 2, "--seq-len", 32), "closest reached"),
    ]
    for i, (args, msg) in enumerate(cases):
        # the first through a real process (its exit status), the rest in this one (the same main())
        rc, err = _cli_process(*args) if i == 0 else _cli(capsys, *args)
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, (args, rc, err)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))
    bad = tmp_path / "badrule"
    add_zero_experts(src, bad, 1, rule=("threshold", 0.5))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["zero_experts_rule"]["value"] = 1.5
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = _cli(capsys, "inspect", bad)
    assert rc == 2 and "beta=1.5 must lie in [0, 1]" in err


@pytest.mark.slow
def test_speed_benchmark_runs_on_a_tiny_model(tiny_ckpt, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zero_experts_speed as bench

    res = bench.run(tiny_ckpt("qwen3_moe"), [0.0, 0.5], prompt_len=8, new_tokens=4, repeats=1, tmp=tmp_path)
    kinds = {(r["kind"], r["skip_rate"]) for r in res["rows"]}
    assert kinds == {("original", 0.0), ("router", 0.5), ("rule", 0.5)}
    assert all(r["decode_tokens_per_s"] > 0 and r["moe_block_decode_us"] > 0 for r in res["rows"])
    rows = bench.block_at_shape("tiny", [0.0, 0.5], rounds=1, calls=2)
    assert [r["skip_rate"] for r in rows] == [0.0, 0.5] and rows[0]["moe_block_ratio"] == 1.0


def test_inspect_refuses_the_eval_json_of_another_model(capsys, tiny_ckpt, tmp_path):
    from conftest import run_cli

    z = tmp_path / "z"
    add_zero_experts(tiny_ckpt("qwen3_moe"), z, 2)
    js = tmp_path / "ev.json"
    js.write_text(json.dumps({"model": "/elsewhere/other-model", "skip_rate": {"model_overall": 0.28}}))
    rc, err = run_cli(capsys, "inspect", z, "--eval", js)
    assert rc == 2 and err == [f"error: --eval {js} evaluated '/elsewhere/other-model', not z"]
    js.write_text(json.dumps({"model": "runs/z", "skip_rate": {"model_overall": 0.28}}))
    rc, err = run_cli(capsys, "inspect", z, "--eval", js)
    assert rc == 0, err  # the same folder name, recorded as given
    from moecompress.cli import main

    assert main(["inspect", str(z), "--eval", str(js)]) == 0
    assert "at the measured skip rate: 28%" in capsys.readouterr().out
    assert main(["inspect", str(z), "--skip-rate", "0.25"]) == 0
    assert "at skip rate: 25%" in capsys.readouterr().out  # given, not measured
