"""Where the user points us cannot take what we write (permissions, a read-only mount, a full disk): one line,
exit 2, no traceback; and ``eval --json`` is tried before the evaluation, not after it."""

from __future__ import annotations

import errno

import pytest

from conftest import run_cli


@pytest.mark.parametrize("code,words", [(errno.EACCES, "permission denied (choose a place you can write to)"),
                                        (errno.EROFS, "read-only file system (choose a place"),
                                        (errno.ENOSPC, "no space left on device")])
def test_an_unwritable_place_is_one_line(capsys, tmp_path, monkeypatch, code, words):
    import os

    import moecompress.tiny as tiny

    def refuse(family, out, **kw):
        raise OSError(code, os.strerror(code), str(out / "model.safetensors"))

    monkeypatch.setattr(tiny, "save_tiny", refuse)
    rc, err = run_cli(capsys, "make-tiny", tmp_path / "t")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0].lower(), err
    assert "model.safetensors" in err[0] and not (tmp_path / "t").exists()


def test_other_os_errors_are_still_raised(tmp_path, monkeypatch):
    """A missing file mid-command is a bug to trace, not a place to fix."""
    import moecompress.tiny as tiny
    from moecompress.cli import main

    def lose(family, out, **kw):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "gone")

    monkeypatch.setattr(tiny, "save_tiny", lose)
    with pytest.raises(FileNotFoundError):
        main(["make-tiny", str(tmp_path / "t")])


def test_eval_json_that_cannot_be_written_fails_before_evaluating(capsys, tmp_path, tiny_ckpt, monkeypatch):
    import tempfile

    import moecompress.evals.evaluate as evaluate

    def refuse(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    def never(*a, **kw):
        raise AssertionError("evaluated before the --json check")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(evaluate, "evaluate", never)
    model = tiny_ckpt("qwen3_moe")
    rc, err = run_cli(capsys, "eval", model, "--reference", model, "--json", tmp_path / "new" / "e.json",
                      "--samples", "2", "--seq-len", "32")
    assert rc == 2 and err == [f"error: --json {tmp_path / 'new' / 'e.json'}: cannot write in {tmp_path} "
                               "(permission denied)"], err


def test_plan_refuses_routing_fields_the_model_cannot_run(capsys, tmp_path, tiny_ckpt):
    import json
    import shutil

    d = shutil.copytree(tiny_ckpt("qwen3_moe"), tmp_path / "m")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                               "num_experts_per_tok": 9}))
    rc, err = run_cli(capsys, "plan", d, "--vram", "6GiB")
    assert rc == 2 and len(err) == 1 and "num_experts_per_tok is 9; it must be an integer in [1, 8]" in err[0], err
