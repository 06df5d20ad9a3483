"""Model arguments naming a Hugging Face Hub repository: read from the Hub's cache (fetched there when online).

No test reaches the Hub: a cache laid out as huggingface_hub lays it out (``models--ORG--NAME/snapshots/<commit>``,
``refs/main``) stands in for a finished download, and ``HF_HUB_OFFLINE=1`` keeps every lookup in it -- the
path a user's second run takes, and the same ``snapshot_download`` call a first run makes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from moecompress.checkpoint.hub import is_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_ckpt, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-moe"
    shutil.copytree(tiny_ckpt("qwen3_moe"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # a repository with pickled weights only: its safetensors-only fetch finds no weights
    pickles = cache / "models--acme--pickled" / "snapshots" / COMMIT
    pickles.mkdir(parents=True)
    shutil.copy(repo / "snapshots" / COMMIT / "config.json", pickles)
    (cache / "models--acme--pickled" / "refs").mkdir()
    (cache / "models--acme--pickled" / "refs" / "main").write_text(COMMIT)
    return cache


def _cli(cache, *args, cwd=None):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "moecompress", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_repo_ids_and_paths(tmp_path, monkeypatch):
    assert is_repo_id("Qwen/Qwen3-30B-A3B") and is_repo_id("Qwen/Qwen3-30B-A3B@main")
    assert is_repo_id(f"acme/tiny-moe@{COMMIT}") and is_repo_id("deepseek-ai/DeepSeek-V3.2")
    for path in ("./Qwen/Qwen3", "/models/qwen3", "~/qwen3", "models/qwen/q3", "qwen3", "../a/b"):
        assert not is_repo_id(path), path
    (tmp_path / "acme" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("acme/local")  # a folder here wins over the Hub
    assert not is_repo_id("acme/typo")  # a mistyped path in a folder that exists: not looked up on the Hub


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """In this process: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, at import."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _main(capsys, *args):
    from moecompress.cli import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_the_environment_names_the_cache(hub_cache):
    """As a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment of a fresh process."""
    p = _cli(hub_cache, "inspect", "acme/tiny-moe")
    assert p.returncode == 0, p.stderr
    assert f"models--acme--tiny-moe/snapshots/{COMMIT}" in p.stdout and "qwen3_moe" in p.stdout
    assert "reading the Hugging Face Hub repository acme/tiny-moe" in p.stderr


def test_commands_read_a_cached_hub_model(offline, tmp_path, capsys):
    """plan (its config alone), quantize and eval take ``ORG/NAME`` (and ``@revision``) for a folder."""
    rc, out, err = _main(capsys, "plan", f"acme/tiny-moe@{COMMIT}", "--vram", "1GiB")
    assert rc == 0 and "ESTIMATE decode" in out, err
    q = tmp_path / "q"
    rc, out, err = _main(capsys, "quantize", "acme/tiny-moe", "--out", q, "--method", "rtn", "--group-size", "32")
    assert rc == 0 and (q / "model.safetensors").is_file(), err
    rc, out, err = _main(capsys, "eval", q, "--reference", "acme/tiny-moe", "--samples", "2", "--seq-len", "16",
                         "--json", tmp_path / "e.json")
    assert rc == 0 and (tmp_path / "e.json").is_file(), err
    from moecompress.run.inputs import reference_dir, resolve_model  # a recipe's model and tune_reference: the same

    snap = offline / "models--acme--tiny-moe" / "snapshots" / COMMIT
    assert resolve_model("acme/tiny-moe") == snap.resolve()
    assert reference_dir("acme/tiny-moe", tmp_path) == str(snap) and reference_dir("original", q) == str(q)


@pytest.mark.parametrize("arg, needle", [
    ("acme/absent", "acme/absent is not a folder here, and as a Hub repository it is not in the Hub cache and "
                    "cannot be fetched now"),
    ("acme/pickled", "the Hub repository acme/pickled has no safetensors weights (pickled weights are not read)"),
    ("", "the model path is empty; give a checkpoint folder or a Hub repository id"),  # (not the current folder)
])
def test_what_the_cache_cannot_give_is_one_line(offline, tmp_path, capsys, arg, needle):
    rc, _, err = _main(capsys, "quantize", arg, "--out", tmp_path / "q", "--group-size", "32")
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), err
    assert not (tmp_path / "q").exists()


def test_invalid_settings_are_refused_before_anything_is_fetched(offline, tmp_path, capsys):
    """A bad combination of options, or an --out that exists, fails first: a 60 GB fetch does not precede a
    one-line error about the options."""
    rc, _, err = _main(capsys, "quantize", "acme/absent", "--out", tmp_path / "q", "--format", "awq", "--bits", "3")
    assert rc == 2 and "the AWQ format stores 4-bit weights only" in err and "Hub repository" not in err, err
    (tmp_path / "done").mkdir()
    for argv in (["quantize", "acme/absent", "--group-size", "32"], ["zeda", "acme/absent"],
                 ["zero-experts", "add", "acme/absent", "--num-zero", "1"]):
        rc, _, err = _main(capsys, *argv, "--out", tmp_path / "done")
        assert rc == 2 and "already exists; pass --overwrite" in err and "Hub repository" not in err, (argv, err)
