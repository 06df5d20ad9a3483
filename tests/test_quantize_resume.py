"""Crash-safety of `quantize`: determinism, the resumable partial folder, and kill -9 + --resume.

Each check compares the bytes of every output file (moecompress.json aside, which records timings)
with an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import quick_config
from moecompress import pipeline
from moecompress.checkpoint.writer import ShardedWriter
from moecompress.errors import UserError
from moecompress.pipeline import quantize

SHARD = 40_000  # bytes: the tiny models' outputs span several shards, so shards roll over mid-layer


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file but moecompress.json (timings); a partial-run leftover would show up here."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(folder).iterdir())
            if f.name != "moecompress.json"}


def records(folder: Path) -> list[dict]:
    """The per-layer records of moecompress.json without their timings."""
    layers = json.loads((Path(folder) / "moecompress.json").read_text())["layers"]
    return [{k: v for k, v in r.items() if k not in ("seconds", "timings_s")} for r in layers]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from moecompress.tiny import save_tiny

    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("deep") / "m", num_hidden_layers=5)


@pytest.fixture(scope="module")
def reference(deep, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "q"
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    return out


def test_same_settings_same_bytes(deep, reference, tmp_path):
    quantize(deep, tmp_path / "again", quick_config(bits=4), max_shard_bytes=SHARD)
    assert len([f for f in digest(reference) if f.endswith(".safetensors")]) > 2  # several shards
    assert digest(tmp_path / "again") == digest(reference)
    assert not list(tmp_path.glob(".*"))  # no partial folder left


def _crash_at(monkeypatch, layer: int):
    real = pipeline._quantize_layer

    def crashing(layer_mod, i, *a, **kw):
        if i == layer:
            raise RuntimeError(f"simulated crash in layer {i}")
        return real(layer_mod, i, *a, **kw)

    monkeypatch.setattr(pipeline, "_quantize_layer", crashing)


def _left_by_a_crash(src, out, monkeypatch, cfg=None, layer: int = 2, **kw) -> None:
    """A run of ``src`` into ``out`` that crashed in ``layer``: its partial folder, the crash undone."""
    _crash_at(monkeypatch, layer)
    with pytest.raises(RuntimeError):
        quantize(src, out, cfg or quick_config(bits=4), **kw)
    monkeypatch.undo()


@pytest.mark.parametrize("crash_layer", [1, 4])
def test_crash_then_resume_gives_the_same_bytes(deep, reference, tmp_path, monkeypatch, crash_layer):
    out = tmp_path / "q"
    _crash_at(monkeypatch, crash_layer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    partial = tmp_path / ".q.partial"
    assert not out.exists() and (partial / "manifest.json").is_file()
    manifest = json.loads((partial / "manifest.json").read_text())
    assert manifest["layers_done"] == crash_layer and manifest["feed"]
    monkeypatch.undo()
    with pytest.raises(UserError, match=rf"partial run .*{crash_layer} of 5 layers done.*--resume.*--overwrite"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    summary = quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert summary["resumed_at"] == [crash_layer]
    assert digest(out) == digest(reference)
    assert records(out) == records(reference)
    assert not partial.exists()


@pytest.mark.parametrize("where", ["side files", "finalize"])
def test_crash_after_the_shards_are_named_then_resume(deep, reference, tmp_path, monkeypatch, where):
    """Killed after the last layer, once the shards have their final names (and the manifest still names the
    state of the last layer): resume finishes with the same bytes, and no spill is left in the output."""
    from moecompress.checkpoint import partial as partial_mod

    def crash(*a, **kw):
        raise RuntimeError(f"simulated crash at {where}")

    if where == "side files":
        monkeypatch.setattr(pipeline, "copy_side_files", crash)
    else:
        monkeypatch.setattr(partial_mod.PartialRun, "finalize", crash)
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    partial = tmp_path / ".q.partial"
    assert list(partial.glob("model-*.safetensors"))  # the kill came after close() named the shards
    monkeypatch.undo()
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert digest(out) == digest(reference)
    assert not partial.exists()


def test_resume_refuses_other_settings_and_overwrite_discards(deep, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _left_by_a_crash(deep, out, monkeypatch, max_shard_bytes=SHARD)
    with pytest.raises(UserError, match="setting 'bits' was 4, now 3"):
        quantize(deep, out, quick_config(bits=3), max_shard_bytes=SHARD, resume=True)
    with pytest.raises(UserError, match="setting 'max_shard_bytes'"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=2 * SHARD, resume=True)
    assert (tmp_path / ".q.partial" / "manifest.json").is_file()  # a refused resume keeps it
    s = quantize(deep, out, quick_config(bits=3), max_shard_bytes=SHARD, overwrite=True)
    assert "resumed_at" not in s and s["recipe"]["bits"] == 3 and not (tmp_path / ".q.partial").exists()


def test_resume_refuses_a_partial_run_of_another_build(deep, tmp_path, monkeypatch):
    """The finished layers of another build's run would not match what this build writes: refused, one line,
    the partial folder kept; a manifest without a build record (older builds) likewise."""
    from moecompress import build_id

    out, manifest = tmp_path / "q", tmp_path / ".q.partial" / "manifest.json"
    _left_by_a_crash(deep, out, monkeypatch, max_shard_bytes=SHARD)
    assert json.loads(manifest.read_text())["build"] == build_id.build_id()
    monkeypatch.setattr(build_id, "code_hash", lambda: "0123456789abcdef")
    with pytest.raises(UserError, match=r"started by moecompress .*, code [0-9a-f]{16}, and this is moecompress "
                                        r".*, code 0123456789abcdef.*--overwrite") as e:
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert "\n" not in str(e.value) and manifest.is_file()
    monkeypatch.undo()
    m = json.loads(manifest.read_text())
    del m["build"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(UserError, match="started by an older build that did not record itself"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)


def test_code_hash_follows_the_sources(tmp_path, monkeypatch):
    from moecompress import build_id

    h = build_id.code_hash()
    assert len(h) == 16 and h == build_id.code_hash()
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "build_id.py").write_text("x = 1\n")
    (pkg / "sub" / "a.py").write_text("y = 2\n")
    monkeypatch.setattr(build_id, "__file__", str(pkg / "build_id.py"))
    hashes = []
    for edit in (None, "y = 3\n", "y = 2\n"):
        if edit:
            (pkg / "sub" / "a.py").write_text(edit)
        build_id.code_hash.cache_clear()
        hashes.append(build_id.code_hash())
    build_id.code_hash.cache_clear()
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2] and h not in hashes


def test_resume_refuses_another_source(deep, tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(deep, src)
    out = tmp_path / "q"
    _left_by_a_crash(src, out, monkeypatch)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="source checkpoint differs"):
        quantize(src, out, quick_config(bits=4), resume=True)


def test_bad_input_midway_leaves_nothing(deep, tmp_path, monkeypatch):
    """A UserError (the same settings would fail again) removes the partial folder, even after layers."""
    real = pipeline._quantize_layer

    def bad(layer_mod, i, *a, **kw):
        if i == 3:
            raise UserError("simulated bad input")
        return real(layer_mod, i, *a, **kw)

    monkeypatch.setattr(pipeline, "_quantize_layer", bad)
    with pytest.raises(UserError):
        quantize(deep, tmp_path / "q", quick_config(bits=4))
    assert not list(tmp_path.iterdir())


def test_writer_restores_from_any_commit(tmp_path):
    """ShardedWriter: lose everything written after a commit (also mid-shard and across shard ends), go
    on from the commit's state, and get the files of a writer that never stopped."""
    gen = torch.Generator().manual_seed(0)
    tensors = [(f"t{i}", torch.randn(int(torch.randint(10, 400, (1,), generator=gen)), generator=gen))
               for i in range(30)]

    def write(folder, items, writer=None):
        w = writer or ShardedWriter(folder, 3000)
        for n, t in items:
            w.add(n, t)
        return w

    ref = tmp_path / "ref"
    ref.mkdir()
    write(ref, tensors).close()
    for commit_at in (3, 7, 12, 20):
        for crash_at in (commit_at, commit_at + 1, commit_at + 5):
            d = tmp_path / f"c{commit_at}-{crash_at}"
            d.mkdir()
            w = write(d, tensors[:commit_at])
            state = json.loads(json.dumps(w.commit()))
            w.drop_finished_spills()
            write(d, tensors[commit_at:crash_at], w)  # then the process dies: w is abandoned
            if w._current is not None:
                w._current._spill.flush()
            w2 = ShardedWriter(d, 3000, resume=state)
            write(d, tensors[commit_at:], w2).close()
            w2.drop_finished_spills()  # what PartialRun.finalize does once the saved state is gone
            assert digest(d) == digest(ref), (commit_at, crash_at)

    # killed in close(), after some or all shards got their final names: the state still resumes
    for commit_at in (7, 20, 29):
        for renamed in (1, 3, 99):
            d = tmp_path / f"close-{commit_at}-{renamed}"
            d.mkdir()
            w = write(d, tensors[:commit_at])
            state = json.loads(json.dumps(w.commit()))
            w.drop_finished_spills()
            write(d, tensors[commit_at:], w)
            real_replace, calls = os.replace, []

            def dying_replace(a, b):
                if len(calls) == renamed:
                    raise KeyboardInterrupt  # the kill, between two renames
                calls.append(a)
                real_replace(a, b)

            os.replace = dying_replace
            try:
                with pytest.raises(KeyboardInterrupt):
                    w.close()
                    raise KeyboardInterrupt  # close finished: killed before the folder moved into place
            finally:
                os.replace = real_replace
            w2 = ShardedWriter(d, 3000, resume=state)
            write(d, tensors[commit_at:], w2).close()
            w2.drop_finished_spills()
            assert digest(d) == digest(ref), (commit_at, renamed)


def _cli(src, out, *extra):
    return [sys.executable, "-m", "moecompress", "quantize", str(src), "--out", str(out), "--bits", "4",
            "--group-size", "32", "--calib-samples", "8", "--seq-len", "64", "--batch-size", "4", "--threads", "1",
            "--max-shard-size", str(SHARD), *extra]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(deep, reference, tmp_path):
    """kill -9 at 10 seeded random moments of the layer loop (writes included), resume each: same bytes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # how long the layer loop and the final writes last: from the partial folder's appearance to the output's
    out = tmp_path / "timing"
    proc = subprocess.Popen(_cli(deep, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".timing.partial"
    while not partial.exists() and proc.poll() is None:
        time.sleep(0.002)
    t0 = time.perf_counter()
    while not out.exists() and proc.poll() is None:
        time.sleep(0.002)
    span = time.perf_counter() - t0
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert digest(out) == digest(reference)

    rng = random.Random(1234)
    delays = [rng.uniform(0, span) for _ in range(10)]

    def kill_and_resume(k: int):
        """Run k: killed ``delays[k]`` s into its layer loop, resumed; its state at the kill (after the checks)."""
        out = tmp_path / f"k{k}"
        partial = tmp_path / f".k{k}.partial"
        proc = subprocess.Popen(_cli(deep, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not partial.exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delays[k])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the run finished before the kill: nothing to resume
            assert digest(out) == digest(reference) and not partial.exists()
            return "finished"
        m = partial / "manifest.json"
        state = json.loads(m.read_text())["layers_done"] if m.exists() else "no commit"
        p = subprocess.run(_cli(deep, out, "--resume"), env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert digest(out) == digest(reference), (k, state)
        assert not partial.exists()
        return state

    # two runs at a time: each is one thread (--threads 1), so on two cores a pair takes about one run's time
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        killed_states = list(pool.map(kill_and_resume, range(10)))
    print("states at the kills:", killed_states)
    assert sum(isinstance(s, int) for s in killed_states) >= 5, killed_states  # most kills hit the layer loop


def test_resume_refuses_new_weights_of_the_same_shapes(deep, tmp_path, monkeypatch):
    """Another seed (or a fine-tune) has the same config and shard headers: its shards' modification time
    gives it away."""
    import shutil

    from moecompress.tiny import save_tiny

    src = tmp_path / "src"
    shutil.copytree(deep, src)
    out = tmp_path / "q"
    _left_by_a_crash(src, out, monkeypatch)
    other = save_tiny("qwen3_moe", tmp_path / "other", seed=1, num_hidden_layers=5)
    assert (other / "config.json").read_bytes() == (src / "config.json").read_bytes()
    shutil.copyfile(other / "model.safetensors", src / "model.safetensors")
    with pytest.raises(UserError, match="source checkpoint differs"):
        quantize(src, out, quick_config(bits=4), resume=True)


def test_resume_refuses_another_thread_count(deep, tmp_path, monkeypatch):
    """CPU GEMMs split their sums by thread: another thread count can change the bytes, so it is part of what
    a resume must match (the torch build and the deterministic mode too)."""
    out = tmp_path / "q"
    _left_by_a_crash(deep, out, monkeypatch, max_shard_bytes=SHARD)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(UserError, match="setting 'arithmetic' was .*'threads': " + str(threads)):
            quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    finally:
        torch.set_num_threads(threads)


def test_a_damaged_partial_run_is_refused_in_one_line_and_kept(deep, tmp_path, monkeypatch):
    out, part = tmp_path / "q", tmp_path / ".q.partial"
    _left_by_a_crash(deep, out, monkeypatch, max_shard_bytes=SHARD)
    feed = next(part.glob("feed-*.safetensors"))
    feed.write_bytes(feed.read_bytes()[:100])
    with pytest.raises(UserError, match=r"cannot resume .*is damaged.*--overwrite") as e:
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert "\n" not in str(e.value) and (part / "manifest.json").is_file()  # kept, as the message implies
    s = quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, overwrite=True)
    assert out.is_dir() and "resumed_at" not in s and not part.exists()


def test_resume_with_overwrite_starts_over_when_the_partial_run_does_not_match(deep, tmp_path, monkeypatch):
    """--resume --overwrite (a scheduler's standing flags): resume a matching partial run, else start over."""
    out = tmp_path / "q"
    _left_by_a_crash(deep, out, monkeypatch, max_shard_bytes=SHARD)
    s = quantize(deep, out, quick_config(bits=3), max_shard_bytes=SHARD, resume=True, overwrite=True)
    assert "resumed_at" not in s and s["recipe"]["bits"] == 3


def test_resume_refuses_calibration_text_that_changed(deep, tmp_path, monkeypatch):
    """The saved feed came from the text the run started with: a resume on edited text would write a record
    crediting the new text for the old numbers."""
    import inspect

    import moecompress.calib.data as calib_data

    text = tmp_path / "calib.txt"
    text.write_text(inspect.getsource(calib_data) * 4)
    out = tmp_path / "q"
    _crash_at(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        quantize(deep, out, quick_config(bits=4, calib=str(text)), max_shard_bytes=SHARD)
    monkeypatch.undo()
    text.write_text(inspect.getsource(calib_data) * 4 + "\n# one more line\n")
    with pytest.raises(UserError, match="calibration text changed since the run started"):
        quantize(deep, out, quick_config(bits=4, calib=str(text)), max_shard_bytes=SHARD, resume=True)
    assert (tmp_path / ".q.partial" / "manifest.json").is_file()
