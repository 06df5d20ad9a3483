"""Who owns ``--out`` while quantize writes it, and how a killed run's output is finished or cleared.

One writer at a time (the lock beside ``--out``); a run killed once its output was complete, or between its
renames, is put in place or cleaned up by the next run; ``moecompress run`` gets past a killed build; an
``--out`` that would destroy an input is refused. The partial folder itself: test_quantize_resume.py.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import quick_config
from moecompress import pipeline
from moecompress.errors import UserError
from moecompress.pipeline import quantize
from test_quantize_resume import SHARD, _crash_at, _left_by_a_crash, deep, digest, reference  # noqa: F401


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(deep, tmp_path):
    """A scheduler's retry while the first run still writes: refused with one line (the lock is an flock, held
    by the running process and released by the kernel when it dies), and the first run's folder is untouched."""
    from moecompress.checkpoint.partial import PartialRun

    out = tmp_path / "q"
    first = PartialRun(out, {}, "x")
    first.lock()
    try:
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(UserError, match=rf"another moecompress run \(pid {os.getpid()}\) is writing"):
                quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, **kw)
    finally:
        first.unlock()
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)  # free again
    assert not list(tmp_path.glob(".q.*"))  # no lock file, partial folder or marker left


def test_a_run_killed_before_its_last_rename_is_finished_by_resume(deep, reference, tmp_path, monkeypatch):
    """Killed once the output is complete but before it is renamed into place: --resume puts it in place (no
    layer recomputed), and without --resume the message says so."""
    from moecompress.checkpoint import partial as partial_mod

    out = tmp_path / "q"

    def killed(self, overwrite):
        raise KeyboardInterrupt

    monkeypatch.setattr(partial_mod.PartialRun, "_rename_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".q.finished").is_file() and (tmp_path / ".q.partial").is_dir()
    with pytest.raises(UserError, match="finished output of a run killed before its last step: pass --resume"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    monkeypatch.setattr(pipeline, "_quantize_layer", lambda *a, **k: pytest.fail("a layer was recomputed"))
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert digest(out) == digest(reference) and not list(tmp_path.glob(".q.*"))
    monkeypatch.undo()
    with pytest.raises(UserError, match="already complete: nothing to resume"):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)


def test_out_may_not_hold_an_input_nor_be_too_long_for_its_siblings(deep, tmp_path):
    """--overwrite replaces the folder: one holding the calibration text would lose it. A name long enough to
    be valid but not with the hidden siblings' suffixes is refused in one line rather than by the OS."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("def f(x):\n    return x\n" * 400)
    with pytest.raises(UserError, match="an input of this run"):
        quantize(deep, data, quick_config(bits=4, calib=str(data / "calib.txt")), overwrite=True)
    assert (data / "calib.txt").is_file()
    with pytest.raises(UserError, match="folder name is 250 bytes long"):
        quantize(deep, tmp_path / ("q" * 250), quick_config(bits=4))
    assert not list(tmp_path.glob(".q*"))


def test_every_spelling_of_an_input_inside_out_is_refused(deep, tmp_path, monkeypatch):
    """The data spec as a user or a recipe writes it -- ``PATH#COLUMN``, ``~/...``, data RTN never reads -- and
    the other commands that replace a folder (zero-experts baseline, zeda): --overwrite must not delete it."""
    from moecompress.zeda.config import build_zeda_config
    from moecompress.zeda.train import run_zeda
    from moecompress.zero.baselines import make_baseline

    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("def f(x):\n    return x\n" * 400)
    (data / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(50)))
    monkeypatch.setenv("HOME", str(tmp_path))
    for spec, method in ((f"{data}/rows.jsonl#text", "gptq"), ("~/data/calib.txt", "gptq"),
                         (str(data / "calib.txt"), "rtn")):
        with pytest.raises(UserError, match="an input of this run"):
            quantize(deep, data, quick_config(bits=4, calib=spec, method=method), overwrite=True)
    with pytest.raises(UserError, match="an input of this run"):
        make_baseline(deep, data, "top-p", 0.3, calib=f"{data}/rows.jsonl#text", samples=2, seq_len=16,
                      overwrite=True)
    with pytest.raises(UserError, match="an input of this run"):
        run_zeda(deep, data, build_zeda_config(data="~/data/calib.txt"), overwrite=True)
    assert sorted(p.name for p in data.iterdir()) == ["calib.txt", "rows.jsonl"]


def test_what_killed_runs_leave_is_settled_by_resume_and_overwrite(deep, reference, tmp_path, monkeypatch):
    """A kill between the finished marker and the cleanup: --resume puts the output in place without the resume
    state in it. A finished run of other settings: --overwrite discards it. A damaged partial run:
    --resume --overwrite starts over."""
    from moecompress.checkpoint import partial as partial_mod

    out = tmp_path / "q"
    monkeypatch.setattr(partial_mod.PartialRun, "_drop_state", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    monkeypatch.undo()
    assert (tmp_path / ".q.finished").is_file() and (tmp_path / ".q.partial" / "manifest.json").is_file()
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD, resume=True)
    assert digest(out) == digest(reference) and not list(tmp_path.glob(".q.*"))

    out2 = tmp_path / "r"
    monkeypatch.setattr(partial_mod.PartialRun, "_rename_into_place",
                        lambda self, o: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        quantize(deep, out2, quick_config(bits=4), max_shard_bytes=SHARD)
    monkeypatch.undo()
    with pytest.raises(UserError, match="finished run of other settings"):
        quantize(deep, out2, quick_config(bits=3), max_shard_bytes=SHARD, resume=True)
    s = quantize(deep, out2, quick_config(bits=3), max_shard_bytes=SHARD, resume=True, overwrite=True)
    assert s["recipe"]["bits"] == 3 and not list(tmp_path.glob(".r.*"))

    out3, part = tmp_path / "t", tmp_path / ".t.partial"
    _left_by_a_crash(deep, out3, monkeypatch, max_shard_bytes=SHARD)
    feed = next(part.glob("feed-*.safetensors"))
    feed.write_bytes(feed.read_bytes()[:100])
    s = quantize(deep, out3, quick_config(bits=4), max_shard_bytes=SHARD, resume=True, overwrite=True)
    assert "resumed_at" not in s and digest(out3) == digest(reference) and not part.exists()


def test_a_recipe_goes_past_a_killed_build_whatever_changed(deep, tmp_path, monkeypatch):
    """`run` has no --resume/--overwrite: a killed build resumes when it still matches, and is built afresh when
    the variant's settings changed meanwhile (or under --force)."""
    import yaml

    from moecompress.run.runner import run_recipe

    recipe = {"model": str(deep), "output_dir": str(tmp_path / "run"), "calibration": {"samples": 8, "seq_len": 64},
              "eval": {"samples": 2, "seq_len": 32, "data": ["builtin:heldout-code"]},
              "variants": [{"name": "g", "method": "gptq", "bits": 4, "group_size": 32}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _crash_at(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        run_recipe(path, report=False)
    monkeypatch.undo()
    assert (tmp_path / "run" / "variants" / ".g.partial" / "manifest.json").is_file()
    recipe["variants"][0]["bits"] = 3
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(path, report=False)
    q = json.loads((run_dir / "variants" / "g" / "moecompress.json").read_text())
    assert q["recipe"]["bits"] == 3 and "resumed_at" not in q
    # nothing of the killed build is left (the run's own record of what the build read stays)
    assert sorted(p.name for p in (run_dir / "variants").glob(".g.*")) == [".g.source-stamp", ".g.text-stamp"]


def test_an_output_moved_aside_by_a_killed_overwrite_is_cleaned_up(deep, tmp_path):
    """Killed between moving the old --out aside and renaming the new one in: the old copy (a whole model) does
    not stay behind forever; the next run that puts an output in place removes it."""
    out = tmp_path / "q"
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    aside = tmp_path / ".q.old-99999"
    out.rename(aside)  # as the killed run left it
    quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    assert out.is_dir() and not aside.exists() and not list(tmp_path.glob(".q.*"))


def test_resume_with_nothing_to_resume_says_so_only_when_asked_alone(tmp_path, caplog):
    """`--resume` alone on a fresh --out logs that it starts from the first layer; `--resume --overwrite` (what
    `moecompress run` passes for every build: go on where there is something) keeps that out of the log."""
    import logging

    from moecompress.checkpoint.partial import PartialRun, check_stale

    run = PartialRun(tmp_path / "q", {}, "x")
    with caplog.at_level(logging.INFO, logger="moecompress"):
        assert check_stale(run, resume=True, overwrite=True) is None
        assert "no partial run" not in caplog.text
        assert check_stale(run, resume=True, overwrite=False) is None
        assert "--resume: no partial run at" in caplog.text


def test_the_recorded_size_is_the_shards_on_disk(deep, tmp_path):
    """moecompress.json's size_bytes (what `quantize` and `run` print) counts the shards with their headers,
    as eval and the report do; it had counted the tensor bytes only (0.59 against 0.61 MB on a tiny model)."""
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.evals.sizes import checkpoint_bytes

    out = tmp_path / "q"
    summary = quantize(deep, out, quick_config(bits=4), max_shard_bytes=SHARD)
    shards = sorted(out.glob("model*.safetensors"))
    assert len(shards) > 1
    assert summary["size_bytes"] == sum(f.stat().st_size for f in shards) == checkpoint_bytes(CheckpointReader.open(out))
    assert json.loads((out / "moecompress.json").read_text())["size_bytes"] == summary["size_bytes"]
