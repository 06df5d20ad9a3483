"""ZEDA: the losses, one copy of the weights (teacher == original), a short training run, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ZEDA_QUICK as QUICK
from moecompress.checkpoint.load import load_model
from moecompress.errors import UserError
from moecompress.zeda.config import build_zeda_config
from moecompress.zeda.losses import balance_surrogate, forward_kl, group_balance, reverse_kl, zero_mass
from moecompress.zeda.student import build_student, teacher_mode, warm_start


def test_losses_against_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    assert forward_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    pt, ps = t.softmax(-1), s.softmax(-1)
    want = (pt * (pt.log() - ps.log())).sum(-1)
    assert forward_kl(t, s).item() == pytest.approx(want.mean().item(), rel=1e-5)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert forward_kl(t, s, mask).item() == pytest.approx(want[mask].mean().item(), rel=1e-5)
    back = (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert reverse_kl(s, t).item() == pytest.approx(back.item(), rel=1e-5)
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])  # E = 1 real expert, 2 zero experts
    assert zero_mass(probs, 1).item() == pytest.approx(0.7)
    assert group_balance([torch.tensor(0.7), torch.tensor(0.5)], 0.5).item() == pytest.approx(0.2 ** 2 / 2)
    # over the model: only the mean share (0.6) is steered
    assert group_balance([torch.tensor(0.7), torch.tensor(0.5)], 0.5, "model").item() == pytest.approx(0.1 ** 2)


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_balance_surrogate_has_the_balance_gradient(scope):
    """Two ranks' surrogates, averaged, have the gradient of the balance of the ranks' mean shares."""
    torch.manual_seed(0)
    a = torch.rand(4, requires_grad=True)  # rank 0's per-layer shares
    b = torch.rand(4, requires_grad=True)
    exact = group_balance(list((a + b) / 2), 0.5, scope)
    ga, gb = torch.autograd.grad(exact, (a, b))
    glob = ((a + b) / 2).detach()
    sur = (balance_surrogate(glob, a, 0.5, scope) + balance_surrogate(glob, b, 0.5, scope)) / 2
    sa, sb = torch.autograd.grad(sur, (a, b))
    torch.testing.assert_close((sa, sb), (ga, gb))
    assert balance_surrogate(glob, a, 0.5, scope).item() != 0.0


@pytest.mark.parametrize("family,mode", [("qwen3_moe", "same"), ("qwen3_moe", "plus-one"), ("deepseek_v3", "same"),
                                         ("minimax_m2", "same"), ("deepseek_v32", "same"),
                                         ("glm_moe_dsa", "same")])
def test_teacher_is_the_original_in_one_copy(tiny_ckpt, family, mode):
    src = tiny_ckpt(family)
    st = build_student(src, 2, mode, 0, "routers", "cpu", torch.float32)
    _, orig = load_model(src)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = orig(input_ids=ids).logits
        with teacher_mode(st):
            teacher = st.model(input_ids=ids).logits
        student = st.model(input_ids=ids).logits
    assert torch.equal(teacher, want)
    if mode == "same":
        assert torch.equal(student, want)  # injection changes nothing
    warm_start(st, ids)
    with torch.no_grad():
        with teacher_mode(st):
            assert torch.equal(st.model(input_ids=ids).logits, want)  # whatever the zero rows hold
    trainable = {n for n, p in st.model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.gate." in n for n in trainable)
    assert len(st.params) == len(trainable)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "minimax_m2"])
def test_original_weights_training_forward_is_the_hard_one_and_the_kl_reaches_the_zero_rows(tiny_ckpt, family):
    """--zero-weights original: a zero slot weighs 0, so only the discrete choice depends on the zero rows.
    Training computes every real expert of the original top-k with a straight-through keep: the same
    logits as the hard routing (to rounding), and the distillation loss alone moves the zero rows."""
    from moecompress.zeda.losses import forward_kl
    from moecompress.zeda.student import tracking

    src = tiny_ckpt(family)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    grads = {}
    for weights in ("original", "renormalized"):
        st = build_student(src, 2, "same", 0, "routers", "cpu", torch.float32, weights)
        for r in st.routers.values():  # zero experts take a good share of the slots
            e = r.num_experts
            if r.rs.scoring == "softmax":
                r.zero_expert_bias.data.fill_(0.0)
            else:
                bias = r.selection_bias()  # MiniMax-M2: the block's, which it passes to the router
                bias[e:] = bias[:e].max() + 0.05
        with torch.no_grad():
            hard = st.model(input_ids=ids).logits
            with teacher_mode(st):
                teacher = st.model(input_ids=ids).logits
        with tracking(st):
            soft = st.model(input_ids=ids).logits
            skip = [float((r.aux["ids"] >= r.num_experts).float().mean()) for r in st.routers.values()]
        assert 0.05 < sum(skip) / len(skip) < 0.95, skip
        torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-5)
        forward_kl(teacher, soft).backward()
        grads[weights] = [r.weight.grad[r.num_experts:].abs().sum().item() for r in st.routers.values()]
    assert all(g > 0 for g in grads["original"]), grads  # through the straight-through keep
    assert all(g > 0 for g in grads["renormalized"]), grads  # through the zero slots' weights


@pytest.mark.slow
def test_short_run_moves_skipping_toward_the_target_and_writes_a_zero_expert_model(tiny_ckpt, tmp_path):
    from moecompress.evals.evaluate import evaluate
    from moecompress.zeda.train import run_zeda

    src = tiny_ckpt("qwen3_moe")
    out = tmp_path / "z"
    rec = run_zeda(src, out, build_zeda_config(target_skip=0.5, lr=2e-2, **QUICK))
    hist = json.loads((out / "zeda_log.json").read_text())["history"]
    assert [h["stage"] for h in hist][0] == 1 and hist[-1]["stage"] == 2
    first, last = hist[0]["balance"], hist[-1]["balance"]
    assert last < first, "the balancing loss did not fall"
    assert (out / "zeda_curve.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_zero_experts"] == 1 and cfg["zero_experts_layout"] == "native"  # default k - 1
    assert cfg["zero_experts_weights"] == "original"  # the default weighting, which every reader honours
    a, b = load_file(next(src.glob("*.safetensors"))), load_file(next(out.glob("*.safetensors")))
    for k, v in a.items():
        if ".mlp.gate." not in k:
            assert torch.equal(b[k], v), f"{k} changed"
    assert b["model.layers.0.mlp.gate.weight"].shape[0] == 9
    assert not torch.equal(b["model.layers.0.mlp.gate.weight"][:8], a["model.layers.0.mlp.gate.weight"])
    r = evaluate(out, src, samples=2, seq_len=32, data=["builtin:heldout-code"])
    assert r["skip_rate"]["model_overall"] > 0.1
    assert rec["zero_experts"]["final"]["mean_skip"] > 0.1


@pytest.mark.slow
def test_zero_rows_only_keeps_the_real_router_rows_bit_for_bit(tiny_ckpt, tmp_path):
    """--trainable zero-rows: the zero rows learn (skipping starts), the real rows stay the original's."""
    from moecompress.zeda.train import run_zeda

    src = tiny_ckpt("qwen3_moe")
    out = tmp_path / "z"
    rec = run_zeda(src, out, build_zeda_config(target_skip=0.5, lr=2e-2, trainable="zero-rows", **QUICK))
    a, b = load_file(next(src.glob("*.safetensors"))), load_file(next(out.glob("*.safetensors")))
    routers = [k for k in a if k.endswith(".mlp.gate.weight")]
    assert routers
    for k in routers:
        e = a[k].shape[0]
        assert torch.equal(b[k][:e], a[k]), f"{k}: the real rows moved"
    assert rec["zero_experts"]["final"]["mean_skip"] > 0.1


@pytest.mark.parametrize("kw,msg", [
    (dict(target_skip=1.0), "must lie in (0, 1)"),
    (dict(target_skip=0.0), "must lie in (0, 1)"),
    (dict(num_zero=0), "num_zero"),
    (dict(batch=0), "batch"),
    (dict(epochs=3), "epochs"),
])
def test_bad_settings_are_one_line(kw, msg):
    with pytest.raises(UserError, match="zeda setting") as e:
        build_zeda_config(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_bad_runs_are_refused_before_any_work(tiny_ckpt, tmp_path):
    from moecompress.zeda.train import run_zeda
    from moecompress.zero.inject import add_zero_experts

    src = tiny_ckpt("qwen3_moe")
    z = tmp_path / "has-zero"
    add_zero_experts(src, z, 2)
    with pytest.raises(UserError, match="already has 2 zero experts"):
        run_zeda(z, tmp_path / "a", build_zeda_config(**QUICK))
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *a, **k):  # a machine without peft
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    builtins.__import__ = no_peft
    try:
        with pytest.raises(UserError, match=r"needs peft .*pip install 'moecompress\[lora\]'"):
            run_zeda(src, tmp_path / "a", build_zeda_config(trainable="lora", **QUICK))
    finally:
        builtins.__import__ = real_import
    with pytest.raises(UserError, match="--num-zero 100 must lie in"):
        run_zeda(src, tmp_path / "a", build_zeda_config(num_zero=100, **QUICK))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="--data"):
        run_zeda(src, tmp_path / "a", build_zeda_config(data=str(empty), **QUICK))
    from moecompress import memory
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.evals.sizes import resident_bytes

    fp32 = resident_bytes(CheckpointReader.open(src), torch.float32, packed=False)
    real = memory.available_bytes
    memory.available_bytes = lambda device: fp32 - 1  # a machine one byte short of the fp32 student
    try:
        with pytest.raises(UserError, match=r"ZEDA holds the model in fp32, 0\.0 GiB before activations, and cpu"):
            run_zeda(src, tmp_path / "a", build_zeda_config(**QUICK))
    finally:
        memory.available_bytes = real
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("trainable", ["routers", "routers+norms", "lora"])
def test_teacher_stays_the_original_while_the_student_trains(tiny_ckpt, trainable):
    src = tiny_ckpt("qwen3_moe")
    st = build_student(src, 1, "same", 0, trainable, "cpu", torch.float32)
    _, orig = load_model(src)
    with torch.no_grad():
        for r in st.routers.values():
            r.weight.add_(0.5)  # what training does to the real rows, exaggerated
        for p in st.params:
            if p.dim() == 1 and p.shape[0] == r.rs.hidden:  # the norms, when they train
                p.mul_(1.5)
        for p in st.lora:  # the experts' adapters, when they train (B starts at 0: give both a value)
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        student = st.model(input_ids=ids).logits
        with teacher_mode(st):
            assert torch.equal(st.model(input_ids=ids).logits, orig(input_ids=ids).logits)
        assert torch.equal(st.model(input_ids=ids).logits, student)  # the trained norms are back
    if trainable == "routers+norms":
        assert st.originals and not torch.equal(student, orig(input_ids=ids).logits)
    if trainable == "lora":
        assert st.lora and not st.originals
        assert all(p.requires_grad for p in st.params), "the routers must train beside the adapters"
        with torch.no_grad():  # the routers' real rows back to the original's
            for r in st.routers.values():
                r.weight.sub_(0.5)
        with torch.no_grad(), _lora_only(st):  # the original routing, adapters on: they alone change the output
            assert (st.model(input_ids=ids).logits - orig(input_ids=ids).logits).abs().max() > 1e-3


def _lora_only(st):
    """Within: the routers masked (the original routing) but the adapters on."""
    from moecompress.zeda.student import _router_flag

    return _router_flag(st, "mask_zero")


@pytest.mark.slow
@pytest.mark.parametrize("family,fused", [("qwen3_moe", False), ("mixtral", True)])
def test_lora_run_exports_merged_experts_that_transformers_reads_as_the_student(tiny_ckpt, tmp_path, family, fused):
    """--trainable lora: the adapters train, the output holds W + B A in the checkpoint's own expert layout
    (per expert, or fused), and transformers' forward of it equals the trained student's."""
    from moecompress.zeda import train as T
    from moecompress.zeda.train import run_zeda

    src = tiny_ckpt(family, original_format=not fused)
    out = tmp_path / "z"
    kept = {}
    real_export = T.export

    def spy(student, *a, **k):  # the trained student, as it is when written
        kept["student"] = student
        return real_export(student, *a, **k)

    T.export = spy
    try:
        run_zeda(src, out, build_zeda_config(target_skip=0.5, lr=2e-2, trainable="lora", lora_rank=4, lora_lr=2e-2,
                                             **QUICK))
    finally:
        T.export = real_export
    st = kept["student"]
    from moecompress.arch.handle import ModelHandle

    name = ModelHandle.open(src).output_name  # we write the family's original spellings, in the source's layout
    a = {name(k): v for k, v in load_file(next(src.glob("*.safetensors"))).items()}
    b = load_file(next(out.glob("*.safetensors")))
    assert set(a) | {k for k in b if k.endswith("zero_expert_bias")} == set(b)
    assert any(k.endswith("experts.gate_up_proj") for k in a) == fused
    experts = [k for k in a if ".experts." in k]
    assert experts and all(b[k].dtype == a[k].dtype for k in experts)
    assert any(not torch.equal(a[k], b[k]) for k in experts), "the merged adapters changed no expert"
    routers = [k for k in a if k.endswith(".gate.weight") and ".experts." not in k]
    assert routers and all(not torch.equal(a[k], b[k][: a[k].shape[0]]) for k in routers), "the routers did not train"
    assert all(torch.equal(a[k], b[k]) for k in a if ".experts." not in k and ".gate." not in k
               and "router" not in k)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    _, model = load_model(out)
    with torch.no_grad():
        ours = st.model(input_ids=ids).logits
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_recipe_runs_zeda_then_quantizes_it_and_reports_all_four(tiny_ckpt, tmp_path):
    import yaml

    from moecompress.report import write_report
    from moecompress.run.runner import run_recipe

    recipe = {"model": str(tiny_ckpt("qwen3_moe")), "output_dir": str(tmp_path / "run"),
              "calibration": {"samples": 4, "seq_len": 32}, "eval": {"samples": 2, "seq_len": 32,
                                                                      "data": ["builtin:heldout-code"]},
              "zeda": dict(QUICK, lr=2e-2),
              "variants": [{"name": "rtn-w4", "method": "rtn", "bits": 4, "group_size": 32},
                           {"name": "zeda", "from": "zeda"},
                           {"name": "zeda-rtn-w4", "from": "zeda", "method": "rtn", "bits": 4, "group_size": 32}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(path, report=False)
    data = write_report(run_dir)
    rows = {r["name"]: r for r in data["variants"]}
    assert rows["zeda"]["method"] == "zeda" and rows["zeda-rtn-w4"]["method"] == "zeda+rtn"
    assert rows["zeda"]["skip_rate"] > 0 and rows["zeda-rtn-w4"]["skip_rate"] > 0 and rows["rtn-w4"]["skip_rate"] == 0
    q = json.loads((run_dir / "variants" / "zeda-rtn-w4" / "moecompress.json").read_text())
    assert q["source"] == str((run_dir / "zeda").resolve())
    # up to date (how often it logs and saves its state changed: not what it trains): nothing trained or built again
    recipe["zeda"].update(log_every=3, checkpoint_every=5)
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, report=False)
    info = json.loads((run_dir / "run.json").read_text())
    assert {d["action"] for d in info["decisions"] if d["step"] in ("zeda", "build")} == {"skipped"}
    # ZEDA trained again (new settings): what was quantized from it is built again, the rest is not
    recipe["zeda"]["target_skip"] = 0.3
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, report=False)
    info = json.loads((run_dir / "run.json").read_text())
    acted = {d["variant"]: d["action"] for d in info["decisions"] if d["step"] in ("zeda", "build")}
    assert acted["zeda"] == "trained" and acted["zeda-rtn-w4"] != "skipped" and acted["rtn-w4"] == "skipped", acted
    reason = next(d["reason"] for d in info["decisions"] if d["step"] == "zeda")
    assert reason == "settings changed: target_skip: 0.5 -> 0.3", reason


def test_recipe_zeda_errors_are_one_line():
    from moecompress.run.recipe import parse_recipe

    base = {"model": "x", "variants": [{"name": "z", "from": "zeda"}]}
    with pytest.raises(UserError, match="needs a top-level 'zeda:' section"):
        parse_recipe(base)
    with pytest.raises(UserError, match="zeda: zeda setting 'target_skip'"):
        parse_recipe({**base, "zeda": {"target_skip": 2}})
    with pytest.raises(UserError, match="'from' must be"):
        parse_recipe({**base, "variants": [{"name": "z", "from": "elsewhere"}]})
    assert parse_recipe({**base, "zeda": {"target_skip": 0.4}}).zeda_config().target_skip == 0.4


@pytest.mark.slow
def test_bf16_autocast_keeps_the_router_in_fp32_and_trains(tiny_ckpt, tmp_path):
    """--precision bf16 (the default on a GPU; forced here on the CPU): the forwards run under bf16 autocast but
    every router computes its logits in fp32, bit for bit as without autocast; a short run trains and writes."""
    from moecompress.zeda.train import run_zeda

    src = tiny_ckpt("qwen3_moe")
    st = build_student(src, 1, "same", 0, "routers", "cpu", torch.float32)
    r = next(iter(st.routers.values()))
    h = torch.randn(2, 5, r.rs.hidden, generator=torch.Generator().manual_seed(4))
    ref = r.logits(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r.logits(h)
        assert torch.nn.functional.linear(h, r.weight).dtype == torch.bfloat16  # autocast is on
    assert all(g.dtype == torch.float32 and torch.equal(g, x) for g, x in zip(got, ref))
    out = tmp_path / "z"
    rec = run_zeda(src, out, build_zeda_config(precision="bf16", target_skip=0.5, lr=2e-2, **QUICK))
    assert rec["zero_experts"]["final"]["mean_skip"] > 0.05
    assert json.loads((out / "zeda_log.json").read_text())["settings"]["precision"] == "bf16"


def test_a_loss_that_becomes_nan_stops_and_a_resume_at_a_lower_rate_goes_on(tiny_ckpt, tmp_path):
    """An absurd rate makes the loss NaN within a few steps: one line naming the step, no model, the last
    checkpoint kept; resuming from it with a lower --lr (the advice given) is allowed and finishes."""
    from moecompress.zeda.train import run_zeda

    src, out = tiny_ckpt("qwen3_moe"), tmp_path / "z"
    kw = dict(QUICK, checkpoint_every=2, stage2_steps=0)
    with pytest.raises(UserError, match=r"ZEDA loss became nan at step \d+ \(stage 1\).*last good checkpoint "
                                        r"\(step \d+\).*lower --lr \(a resume may change it\)") as e:
        run_zeda(src, out, build_zeda_config(lr=1e37, **kw))
    assert "\n" not in str(e.value) and not out.exists()
    assert (tmp_path / ".z.zeda-resume" / "state.pt").is_file()
    from moecompress.zeda.resume import ResumeState

    strict = ResumeState(out, build_zeda_config(lr=1e-3, **kw).model_dump(), "x", rates_may_change=False)
    strict.source = torch.load(strict.file, weights_only=True)["source"]
    with pytest.raises(UserError, match="setting 'lr' was 1e\\+37, now 0.001"):  # a recipe's automatic resume
        strict.check()
    run_zeda(src, out, build_zeda_config(lr=1e-3, **kw), resume=True)
    assert (out / "config.json").is_file() and not (tmp_path / ".z.zeda-resume").exists()
    changes = json.loads((out / "moecompress.json").read_text())["rate_changes"]
    assert changes and changes[0]["setting"] == "lr" and changes[0]["from"] == 1e37 and changes[0]["to"] == 1e-3


def test_layout_stock_writes_what_stock_transformers_runs_or_says_why_not(tiny_ckpt, tmp_path):
    """--layout stock: refused up front, naming the setting, where stock loaders could not compute the model
    (the defaults: original weights, relative logits; softmax routers' logit bias); otherwise the trained model
    is written in the stock layout and stock transformers computes what our loader does."""
    from transformers import AutoModelForCausalLM

    from moecompress.zeda.train import run_zeda

    with pytest.raises(UserError, match="--layout stock: --zero-weights original"):
        run_zeda(tiny_ckpt("minimax_m2"), tmp_path / "a", build_zeda_config(layout="stock", **QUICK))
    with pytest.raises(UserError, match="softmax router gives the zero experts a trained logit bias"):
        run_zeda(tiny_ckpt("qwen3_moe"), tmp_path / "a", build_zeda_config(
            layout="stock", zero_weights="renormalized", zero_logits="linear", **QUICK))
    assert not (tmp_path / "a").exists()
    out = tmp_path / "s"
    run_zeda(tiny_ckpt("minimax_m2"), out, build_zeda_config(layout="stock", zero_weights="renormalized",
                                                             zero_logits="linear", **QUICK))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_zero_experts"] == 1 and cfg["zero_experts_layout"] == "stock" and cfg["num_local_experts"] == 9
    assert json.loads((out / "moecompress.json").read_text())["layout"] == "stock"
    assert (out / "zeda_log.json").is_file() and not list(tmp_path.glob(".s*"))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    _, ours = load_model(out)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_rank_wider_than_the_experts_and_seeds_out_of_range_are_one_line(capsys, tiny_ckpt, tmp_path):
    """An adapter rank above the experts' smaller side would allocate a full-rank update at LoRA's price (the
    process was killed for memory); a seed past 32 bits overflowed the generators (a traceback)."""
    pytest.importorskip("peft")
    from conftest import run_cli

    src = tiny_ckpt("qwen3_moe")  # experts 64 x 128
    rc, err = run_cli(capsys, "zeda", src, "--out", tmp_path / "z", "--trainable", "lora", "--lora-rank", 100000,
                      "--prompts", 8, "--prompt-len", 16, "--gen-len", 8, "--batch", 4, "--stage1-steps", 2,
                      "--stage2-steps", 0)
    assert rc == 2 and err == ["error: --lora-rank 100000 exceeds the experts' smaller dimension (64); use at most 64"]
    # an adapter setting without adapters would be ignored: refused, in the flags typed
    rc, err = run_cli(capsys, "zeda", src, "--out", tmp_path / "z", "--lora-rank", 4)
    assert rc == 2 and err == ["error: invalid options: --lora-rank applies to trainable lora "
                               "(trainable is routers)"], err
    for argv in (["zeda", src, "--out", tmp_path / "z"], ["zero-experts", "add", src, "--out", tmp_path / "z",
                                                          "--num-zero", 2], ["quantize", src, "--out", tmp_path / "z"]):
        rc, err = run_cli(capsys, *argv, "--seed", 99999999999999999)
        assert rc == 2 and len(err) == 1 and "--seed" in err[0], err
    assert not (tmp_path / "z").exists()
