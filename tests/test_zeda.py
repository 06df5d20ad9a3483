"""ZEDA: the losses, one copy of the weights (teacher == original), a short training run, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moecompress.checkpoint.load import load_model
from moecompress.errors import UserError
from moecompress.zeda.config import build_zeda_config
from moecompress.zeda.losses import forward_kl, group_balance, reverse_kl, zero_mass
from moecompress.zeda.student import build_student, teacher_mode, warm_start

QUICK = dict(prompts=8, prompt_len=16, gen_len=12, batch=4, stage1_steps=8, stage2_steps=4, log_every=2)


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


@pytest.mark.parametrize("family,mode", [("qwen3_moe", "same"), ("qwen3_moe", "plus-one"), ("deepseek_v3", "same")])
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


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
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
                r.e_score_correction_bias[e:] = r.e_score_correction_bias[:e].max() + 0.05
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
    assert not (tmp_path / "a").exists()


def _zeda_cli(src, out, *extra) -> list[str]:
    import sys

    return [sys.executable, "-m", "moecompress.cli", "zeda", str(src), "--out", str(out), "--prompts", "8",
            "--prompt-len", "16", "--gen-len", "8", "--batch", "4", "--stage1-steps", "8", "--stage2-steps", "6",
            "--checkpoint-every", "2", *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bits(tiny_ckpt, tmp_path):
    import signal
    import subprocess
    import time

    src = tiny_ckpt("qwen3_moe")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert subprocess.run(_zeda_cli(src, full), capture_output=True).returncode == 0
    state = tmp_path / ".cut.zeda-resume" / "state.pt"
    proc = subprocess.Popen(_zeda_cli(src, cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # somewhere after the first checkpoint: mid-step or mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not cut.exists(), "the kill came too late to test anything"
    p = subprocess.run(_zeda_cli(src, cut), capture_output=True, text=True)
    assert p.returncode == 2 and "--resume" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(_zeda_cli(src, cut, "--lr", "0.01", "--resume"), capture_output=True, text=True)
    assert p.returncode == 2 and "setting 'lr' was 0.005, now 0.01" in p.stderr
    assert subprocess.run(_zeda_cli(src, cut, "--resume"), capture_output=True).returncode == 0
    a, b = (load_file(next(d.glob("*.safetensors"))) for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert not state.parent.exists(), "the resume state outlived the finished run"
    ha = json.loads((full / "zeda_log.json").read_text())["history"]
    hb = json.loads((cut / "zeda_log.json").read_text())["history"]
    assert ha == hb


@pytest.mark.slow
@pytest.mark.parametrize("shard,trainable", [("ddp", "routers"), ("fsdp", "routers"), ("ddp", "lora")])
def test_two_gloo_ranks_train_the_same_routers_as_one(tiny_ckpt, tmp_path, shard, trainable):
    """torchrun, 2 gloo ranks, each on half of every global batch, vs one process on the whole batch.

    Tolerance: relative (Frobenius) error of each trained tensor below 2e-3. The two runs compute the
    same gradient up to the order of floating-point sums (DDP averages two half-batch gradients;
    the balancing loss enters as its exact first-order surrogate), and Adam turns 1e-7-relative
    noise in near-zero gradient entries into differences of up to its step size: after 14 steps the
    measured error is ~6e-4 at most; the logged losses agree to 1e-3 relative (1e-2 for the tiny KL).
    ``--shard fsdp`` (FSDP2: every parameter sharded over the 2 ranks, gathered per layer) computes the same, and so
    does DDP with LoRA adapters on the experts (their merged weights under the same tolerance)."""
    import subprocess
    import sys

    src = tiny_ckpt("qwen3_moe")
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: ["zeda", str(src), "--out", str(out), "--prompts", "8", "--prompt-len", "16", "--gen-len", "8",
                        "--batch", "4", "--stage1-steps", "8", "--stage2-steps", "6", "--trainable", trainable]
    p = subprocess.run([sys.executable, "-m", "moecompress.cli", *args(one)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), "-m", "moecompress.cli", *args(two), "--shard", shard],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_file(next(d.glob("*.safetensors"))) for d in (one, two))
    assert a.keys() == b.keys()
    src_t = load_file(next(src.glob("*.safetensors")))
    deltas = []
    for k in a:
        if ".mlp.gate." in k:
            err = float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12))
            assert err < 2e-3, f"{k}: relative error {err:.2e}"
        elif ".experts." in k and trainable == "lora":  # merged adapters: compare what training added
            d1, d2 = (a[k].float() - src_t[k].float()), (b[k].float() - src_t[k].float())
            deltas.append(float((d1 - d2).norm() / d1.norm().clamp_min(1e-12)))
        else:
            assert torch.equal(a[k], b[k]), f"{k} changed"
    if deltas:
        # measured: median 1.2%, and one expert of layer 1 at 52%: it sees a few tokens, and a near-tie in the
        # routing that flips between the two runs changes its small gradient; the adapters' Adam steps are
        # sign-like, so such noise shows. Gradients that were not averaged would differ everywhere.
        assert sorted(deltas)[len(deltas) // 2] < 0.05, f"merged expert updates differ: {sorted(deltas)}"
    assert json.loads((two / "moecompress.json").read_text())["ranks"] == 2
    h1, h2 = (json.loads((d / "zeda_log.json").read_text())["history"] for d in (one, two))
    for x, y in zip(h1, h2):
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-2, abs=1e-6)
        assert x["balance"] == pytest.approx(y["balance"], rel=1e-3)


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
    run_recipe(path, report=False)  # up to date: nothing trained or built again
    info = json.loads((run_dir / "run.json").read_text())
    assert {d["action"] for d in info["decisions"] if d["step"] in ("zeda", "build")} == {"skipped"}


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


def _torchrun(args: list[str], ranks: int = 2) -> list[str]:
    import socket
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "moecompress.cli", *args]


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_equals_an_uninterrupted_one(tiny_ckpt, tmp_path):
    """--shard fsdp under torchrun (2 gloo ranks): the checkpoint gathers the sharded routers and Adam's moments,
    a resumed run lays them out again, and the result is bit for bit an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time

    src = tiny_ckpt("qwen3_moe")
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = lambda out, *extra: [*_zeda_cli(src, out, "--shard", "fsdp", *extra)[3:]]
    p = subprocess.run(_torchrun(args(full)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = tmp_path / ".cut.zeda-resume" / "state.pt"
    proc = subprocess.Popen(_torchrun(args(cut)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks (torchrun starts them in sessions of their own)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert state.exists() and not cut.exists(), "the kill came too late to test anything"
    p = subprocess.run(_torchrun(args(cut, "--resume")), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_file(next(d.glob("*.safetensors"))) for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert json.loads((full / "zeda_log.json").read_text()) == json.loads((cut / "zeda_log.json").read_text())


def test_fsdp_refuses_what_it_cannot_shard_yet(tiny_ckpt, tmp_path):
    from moecompress.zeda.train import run_zeda

    for trainable in ("routers+norms", "lora", "zero-rows"):
        with pytest.raises(UserError, match="--shard fsdp trains the routers only"):
            run_zeda(tiny_ckpt("qwen3_moe"), tmp_path / "a", build_zeda_config(shard="fsdp", trainable=trainable, **QUICK))
    assert not (tmp_path / "a").exists()


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


def test_resume_state_of_another_build_is_refused(tmp_path, monkeypatch):
    """A training checkpoint records the build that wrote it; another build (or none recorded) is refused."""
    from moecompress import build_id
    from moecompress.zeda.resume import ResumeState

    st = ResumeState(tmp_path / "out", {"lr": 0.005, "log_every": 10}, "src")
    st.path.mkdir()
    torch.save({"source": "src", "settings": json.dumps({"lr": 0.005}), "build": json.dumps(build_id.build_id())},
               st.file)
    st.check()  # the same build, settings and source
    monkeypatch.setattr(build_id, "code_hash", lambda: "f" * 16)
    with pytest.raises(UserError, match=r"started by moecompress .*, and this is moecompress .*, code f{16}"):
        st.check()
    monkeypatch.undo()
    torch.save({"source": "src", "settings": json.dumps({"lr": 0.005})}, st.file)
    with pytest.raises(UserError, match="an older build that did not record itself"):
        st.check()
