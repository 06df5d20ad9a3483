"""`torchrun -m moecompress quantize` on 2 and 3 gloo ranks: the same bytes as one process, resume across
rank counts, and what a failing rank does. Every run uses one torch thread per process (torchrun's default)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import free_port
from test_quantize_resume import _crash_at, digest

pytestmark = pytest.mark.slow

ARGS = ["--bits", "4", "--group-size", "32", "--calib-samples", "12", "--seq-len", "64", "--batch-size", "2",
        "--threads", "1"]


def _here(*argv):
    """``moecompress ARGV`` in this process: the one-process side of every comparison (a subprocess would add
    seconds of imports; ``--threads 1`` puts it on one thread, as each torchrun rank is)."""
    from moecompress.cli import main

    assert main([str(a) for a in argv]) == 0, argv


def _single(src, out, *extra):
    _here("quantize", src, "--out", out, *ARGS, *extra)


def _torchrun(n, src, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "moecompress", "quantize", str(src), "--out", str(out), *ARGS,
            *extra]


def _run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.parametrize("family,method", [("qwen3_moe", "gptq"), ("deepseek_v3", "rtn")])
def test_two_and_three_ranks_write_the_bytes_of_one(tiny_ckpt, tmp_path, family, method):
    src = tiny_ckpt(family)
    _single(src, tmp_path / "one", "--method", method)
    ref = digest(tmp_path / "one")
    one = json.loads((tmp_path / "one" / "moecompress.json").read_text())["distributed"]
    for n in (2, 3):
        _run(_torchrun(n, src, tmp_path / f"n{n}", "--method", method))
        assert digest(tmp_path / f"n{n}") == ref, f"{n} ranks"
        info = json.loads((tmp_path / f"n{n}" / "moecompress.json").read_text())["distributed"]
        assert info["world_size"] == n and info["reduce_chunks"] == 6
        assert sorted(c for r in info["ranks"] for c in r["chunks"]) == list(range(6))  # each chunk run once
        assert all(r["comm_bytes_received"] > 0 for r in info["ranks"])
    assert one["world_size"] == 1


def test_expert_statistics_live_on_their_owner(tiny_ckpt, tmp_path):
    """64 experts = 4 blocks of 16: each block's per-expert sums are reduced to the rank that solves it, so a
    rank's statistics peak at about 1/N of one process's (plus the small replicated part); same bytes."""
    src = tiny_ckpt("qwen3_moe", num_experts=64)
    _single(src, tmp_path / "one")
    one = json.loads((tmp_path / "one" / "moecompress.json").read_text())["distributed"]["ranks"][0]
    for n, bound in ((2, 0.6), (3, 0.55)):  # 3 ranks: one of them owns two of the four blocks
        _run(_torchrun(n, src, tmp_path / f"n{n}"))
        assert digest(tmp_path / f"n{n}") == digest(tmp_path / "one")
        peaks = [r["peak_stats_bytes"] for r in json.loads((tmp_path / f"n{n}" / "moecompress.json").read_text())[
            "distributed"]["ranks"]]
        assert max(peaks) < bound * one["peak_stats_bytes"], (n, peaks, one["peak_stats_bytes"])


def _crash_on_one_thread(monkeypatch, src, out, cfg, layer: int) -> None:
    """A one-process run (one thread, as each torchrun rank has) of ``src`` into ``out`` that crashed in ``layer``."""
    import torch

    from moecompress import pipeline

    _crash_at(monkeypatch, layer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError):
            pipeline.quantize(src, out, cfg)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()


def test_resume_on_another_rank_count(tiny_ckpt, tmp_path, monkeypatch):
    """A run that crashed on one process resumes on two ranks (each loads its chunks' feed): same bytes."""
    from moecompress.settings import build_config

    src = tiny_ckpt("qwen3_moe")
    _single(src, tmp_path / "ref")
    _crash_on_one_thread(monkeypatch, src, tmp_path / "q", build_config(bits=4, group_size=32, calib_samples=12,
                                                                        seq_len=64, batch_size=2), 1)
    assert json.loads((tmp_path / ".q.partial" / "manifest.json").read_text())["layers_done"] == 1
    _run(_torchrun(2, src, tmp_path / "q", "--resume"))
    assert digest(tmp_path / "q") == digest(tmp_path / "ref")


def test_a_dying_rank_stops_the_run_and_leaves_it_resumable(tiny_ckpt, tmp_path):
    from moecompress.tiny import save_tiny

    src = save_tiny("qwen3_moe", tmp_path / "deep", num_hidden_layers=6)
    out = tmp_path / "q"
    proc = subprocess.Popen(_torchrun(2, src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    manifest = tmp_path / ".q.partial" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "moecompress" in " ".join(c.cmdline())]
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not out.exists()
    assert "rank" in err.lower() and ("1" in err)  # torchrun names the failed rank (and its signal)
    assert manifest.exists()  # the committed layers stay: resume on one process
    _single(src, out, "--resume")
    _single(src, tmp_path / "ref")
    assert digest(out) == digest(tmp_path / "ref")


@pytest.mark.parametrize("family,method", [("qwen3_moe", "awq"), ("mixtral", "awq+gptq")])
def test_awq_on_two_ranks_writes_the_bytes_of_one(tiny_ckpt, tmp_path, family, method):
    """AWQ's statistics are reduced like GPTQ's and its sampled residual rows gathered in chunk order: the
    scale search sees what one process sees, so the checkpoint is the same, byte for byte. 300 search tokens:
    the attention loss runs on batches 0, 2 and 4 of 6, held by both ranks."""
    src = tiny_ckpt(family)
    extra = ["--method", method, "--awq-grid", "4", "--awq-search-tokens", "300"]
    _single(src, tmp_path / "one", *extra)
    _run(_torchrun(2, src, tmp_path / "two", *extra))
    assert digest(tmp_path / "two") == digest(tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "moecompress.json").read_text()) for d in ("one", "two"))
    assert two["distributed"]["world_size"] == 2
    # the searches' records (losses, chosen alphas, the routing check on the sampled rows) match exactly
    searched = [r["awq"] for r in one["layers"]]
    assert any(g.get("float_readers_check") for a in searched for g in a)  # the block loss's sampled rows ran
    assert any(g.get("loss") == "attention" and "alpha" in g for a in searched for g in a)
    assert [r["awq"] for r in two["layers"]] == searched


def test_tuning_on_two_and_three_ranks_writes_the_bytes_of_one(tiny_ckpt, tmp_path):
    """`--tune-steps`: each step's batch is held by one rank, which broadcasts the step's signs; the losses over
    all batches are summed in batch order. Every rank moves the codes as one process would: the same bytes and
    the same tuning records."""
    from moecompress.tiny import save_tiny

    src = save_tiny("qwen3_moe", tmp_path / "m", num_hidden_layers=3)
    extra = ["--bits", "3", "--tune-steps", "12", "--tune-lr", "0.05"]
    _single(src, tmp_path / "one", *extra)
    one = json.loads((tmp_path / "one" / "moecompress.json").read_text())
    tunes = [r["tune"] for r in one["layers"]]
    assert all(t["codes_changed"] > 0 for t in tunes) and any(t["kept"] for t in tunes)
    for n in (2, 3):
        _run(_torchrun(n, src, tmp_path / f"n{n}", *extra))
        assert digest(tmp_path / f"n{n}") == digest(tmp_path / "one"), f"{n} ranks"
        info = json.loads((tmp_path / f"n{n}" / "moecompress.json").read_text())
        assert [r["tune"] for r in info["layers"]] == tunes
        assert info["distributed"]["world_size"] == n
    # toward another model's layers (each rank runs the reference's layer on its own batches)
    from test_tune import _perturbed_copy

    ref = ["--tune-reference", str(_perturbed_copy(src, tmp_path / "ref"))]
    _single(src, tmp_path / "one-ref", *extra, *ref)
    _run(_torchrun(2, src, tmp_path / "two-ref", *extra, *ref))
    assert digest(tmp_path / "two-ref") == digest(tmp_path / "one-ref") != digest(tmp_path / "one")


def test_a_tuned_run_resumes_on_another_rank_count(tmp_path, monkeypatch):
    """The float trajectory the tuning aims at is saved chunk by chunk with the feed: a tuned run that crashed
    in layer 2 on one process resumes on two ranks, each loading its chunks' targets, and writes the same bytes."""
    from moecompress.settings import build_config
    from moecompress.tiny import save_tiny

    src = save_tiny("qwen3_moe", tmp_path / "m", num_hidden_layers=3)
    extra = ["--bits", "3", "--tune-steps", "12", "--tune-lr", "0.05"]
    _single(src, tmp_path / "ref", *extra)
    _crash_on_one_thread(monkeypatch, src, tmp_path / "q", build_config(
        bits=3, group_size=32, calib_samples=12, seq_len=64, batch_size=2, tune_steps=12, tune_lr=0.05), 2)
    assert json.loads((tmp_path / ".q.partial" / "manifest.json").read_text())["layers_done"] == 2
    _run(_torchrun(2, src, tmp_path / "q", *extra, "--resume"))
    assert digest(tmp_path / "q") == digest(tmp_path / "ref")


def test_lm_head_on_two_ranks_writes_the_bytes_of_one(tiny_ckpt, tmp_path):
    """--quantize-lm-head: the head's Hessian is summed chunk by chunk across the ranks; same bytes as one."""
    from safetensors import safe_open

    src = tiny_ckpt("qwen3_moe")
    _single(src, tmp_path / "one", "--quantize-lm-head")
    _run(_torchrun(2, src, tmp_path / "two", "--quantize-lm-head"))
    assert digest(tmp_path / "two") == digest(tmp_path / "one")
    names = set()
    for f in (tmp_path / "two").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    assert "lm_head.weight_packed" in names and "lm_head.weight" not in names


def _numbers(x, prefix=""):
    """Every number of an eval JSON, flattened to {path: float} (timings, paths and settings left out)."""
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if k not in ("seconds", "settings", "model", "reference", "data", "reference_cache"):
                out.update(_numbers(v, f"{prefix}.{k}"))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(_numbers(v, f"{prefix}[{i}]"))
        return out
    return {prefix: float(x)} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


@pytest.mark.parametrize("low_memory", [False, True])
def test_eval_on_two_ranks_gives_one_process_numbers(tiny_ckpt, tmp_path, low_memory):
    """torchrun eval: each rank takes every 2nd batch, the sums are added: the same JSON numbers to relative
    1e-9 (only the order of float64 sums differs)."""
    src = tiny_ckpt("qwen3_moe")
    _single(src, tmp_path / "q", "--method", "rtn")
    base = ["eval", str(tmp_path / "q"), "--reference", str(src), "--samples", "6", "--seq-len", "32", "--batch-size",
            "2", "--threads", "1"] + (["--low-memory"] if low_memory else [])
    _here(*base, "--json", tmp_path / "one.json")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(free_port()), "-m", "moecompress", *base, "--json", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["settings"]["ranks"] == 2 and one["settings"]["ranks"] == 1
    a, b = _numbers(one), _numbers(two)
    assert a.keys() == b.keys() and len(a) > 40
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > 1e-9 * max(abs(a[k]), 1e-12)}
    assert not bad, bad


def test_run_recipe_on_two_ranks(tiny_ckpt, tmp_path):
    """torchrun -m moecompress run: the quantize variants (AWQ too) split over the ranks, evals split; the same checkpoints as one process, the same eval numbers to relative 1e-9, one report."""
    src = tiny_ckpt("qwen3_moe")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {src}
threads: 1
calibration: {{data: builtin:stdlib, samples: 12, seq_len: 64, seed: 0}}
eval: {{data: [builtin:heldout-code], samples: 4, seq_len: 32, batch_size: 2}}
variants:
  - {{name: rtn, method: rtn, bits: 4, group_size: 32, batch_size: 2}}
  - {{name: gptq, method: gptq, bits: 4, group_size: 32, batch_size: 2}}
  - {{name: awq, method: awq, bits: 4, group_size: 32, batch_size: 2, awq_grid: 3}}
""")
    _here("run", recipe, "--out", tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(free_port()), "-m", "moecompress", "run", str(recipe), "--out", str(tmp_path / "two")])
    for v in ("rtn", "gptq", "awq"):
        assert digest(tmp_path / "one" / "variants" / v) == digest(tmp_path / "two" / "variants" / v), v
    for name in ("reference", "rtn", "gptq", "awq"):
        a, b = (_numbers(json.loads((tmp_path / d / "eval" / f"{name}.json").read_text())) for d in ("one", "two"))
        bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > 1e-9 * max(abs(a[k]), 1e-12)}
        assert a.keys() == b.keys() and not bad, (name, bad)
    assert (tmp_path / "two" / "report.md").is_file()
    built = json.loads((tmp_path / "two" / "variants" / "gptq" / "moecompress.json").read_text())
    assert built["distributed"]["world_size"] == 2
    assert json.loads((tmp_path / "two" / "variants" / "awq" / "moecompress.json").read_text())[
        "distributed"]["world_size"] == 2


def test_run_recipe_with_zeda_on_two_ranks(tiny_ckpt, tmp_path):
    """A `zeda:` step under torchrun trains on every rank (DDP in the run's process group, which it must
    not tear down) and gives one process's model to float tolerance; the later steps still run."""
    import yaml

    quick = dict(prompts=8, prompt_len=16, gen_len=12, batch=4, stage1_steps=8, stage2_steps=4, log_every=2, lr=2e-2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_ckpt("qwen3_moe")), "threads": 1, "calibration": {"samples": 4, "seq_len": 32},
        "eval": {"samples": 2, "seq_len": 32, "data": ["builtin:heldout-code"]}, "zeda": quick,
        "variants": [{"name": "zeda", "from": "zeda"},
                     {"name": "zeda-rtn-w4", "from": "zeda", "method": "rtn", "bits": 4, "group_size": 32}]}))
    _here("run", recipe, "--out", tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(free_port()), "-m", "moecompress", "run", str(recipe), "--out", str(tmp_path / "two")])
    z1, z2 = (json.loads((tmp_path / d / "zeda" / "moecompress.json").read_text()) for d in ("one", "two"))
    assert z1["ranks"] == 1 and z2["ranks"] == 2
    e1, e2 = (json.loads((tmp_path / d / "eval" / "zeda-rtn-w4.json").read_text()) for d in ("one", "two"))
    assert e2["skip_rate"]["model_overall"] == pytest.approx(e1["skip_rate"]["model_overall"], abs=0.02)
    assert e2["kl"] == pytest.approx(e1["kl"], rel=0.05)
    assert (tmp_path / "two" / "report.md").is_file()
