"""`moecompress eval` from the command line: a normal run, and bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from moecompress.cli import main

ARGS = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    err = [l for l in cap.err.strip().splitlines() if l.startswith("error") or "Traceback" in l]
    return rc, cap.out, err


@pytest.fixture(scope="module")
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


def test_eval_writes_json_and_summary(qwen, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    rc, stdout, err = _run(capsys, "eval", qwen, "--reference", qwen, "--json", out, *ARGS)
    assert rc == 0 and not err
    r = json.loads(out.read_text())
    assert r["kl"] == 0.0 and r["top1_agreement"] == 1.0 and list(r["ppl"]) == ["heldout-code", "heldout-prose"]
    assert "top-k exact 100.00%" in stdout and f"wrote {out}" in stdout
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left


def test_a_quantized_reference_of_a_float_model_warns_of_a_swap(qwen, tmp_path, capsys, caplog):
    """MODEL and --reference given the wrong way round: the numbers are still computed (a quantized reference is
    legitimate), with one warning; the right way round, none."""
    import logging

    q = tmp_path / "q"
    assert main(["quantize", str(qwen), "--out", str(q), "--method", "rtn", "--group-size", "32"]) == 0
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        rc, _, err = _run(capsys, "eval", qwen, "--reference", q, "--json", tmp_path / "e.json", *ARGS)
        assert rc == 0 and not err
        assert "were MODEL and --reference swapped?" in caplog.text
        caplog.clear()
        rc, _, err = _run(capsys, "eval", q, "--reference", qwen, "--json", tmp_path / "f.json", *ARGS)
        assert rc == 0 and "swapped" not in caplog.text


def test_eval_custom_data_names_the_dataset(qwen, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("Mixture-of-experts models route every token to a few experts. " * 20)
    out = tmp_path / "e.json"
    rc, _, err = _run(capsys, "eval", qwen, "--reference", qwen, "--data", text, "--json", out, *ARGS)
    assert rc == 0 and not err
    r = json.loads(out.read_text())
    assert list(r["data"]) == ["notes"] and r["data"]["notes"]["spec"] == str(text)


def _no_tokenizer(src, dst):
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    return dst


def _other_tokenizer(src, dst):
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(dst))
    return dst


CASES = {
    "missing reference": (lambda q, t: (q, t / "nope"), [], "does not exist"),
    "missing model": (lambda q, t: (t / "nope", q), [], "does not exist"),
    "reference without tokenizer": (lambda q, t: (q, _no_tokenizer(q, t / "r")), [], "no tokenizer"),
    "tokenizer mismatch": (lambda q, t: (_other_tokenizer(q, t / "m"), q), [], "tokenizer mismatch"),
    "empty data file": (lambda q, t: (q, q), ["--data", "EMPTY"], "no text"),
    "missing data file": (lambda q, t: (q, q), ["--data", "MISSING"], "evaluation text path does not exist"),
    "zero samples": (lambda q, t: (q, q), ["--samples", "0"], "'--samples': 0 is not in the range x>=1"),
    "zero batch": (lambda q, t: (q, q), ["--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    "json is a directory": (lambda q, t: (q, q), ["--json", "DIR"], "is a directory"),
    # a copy: were the check missing, the checkpoint's own config.json would be replaced
    "json inside the model": (lambda q, t: (shutil.copytree(q, t / "c"), q), ["--json", "IN_COPY"],
                              "lies inside the model folder"),
    "reference cache inside the reference": (lambda q, t: (q, shutil.copytree(q, t / "c")),
                                             ["--reference-cache", "CACHE_IN_COPY"], "lies inside the model folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, qwen, tmp_path, capsys):
    make, extra, needle = CASES[case]
    model, ref = make(qwen, tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "adir").mkdir()
    subst = {"EMPTY": tmp_path / "empty.txt", "MISSING": tmp_path / "missing.txt", "DIR": tmp_path / "adir",
             "IN_COPY": tmp_path / "c" / "config.json", "CACHE_IN_COPY": tmp_path / "c" / "cache"}
    extra = [subst.get(a, a) for a in extra]
    out = tmp_path / "out.json"
    json_args = [] if "--json" in extra else ["--json", out]
    rc, _, err = _run(capsys, "eval", model, "--reference", ref, *json_args, *ARGS, *extra)
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.json.tmp-*"))
    if (tmp_path / "c").is_dir():  # the copied checkpoint is untouched
        assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "qwen3_moe"
        assert not (tmp_path / "c" / "cache").exists()


def test_vocab_size_mismatch(qwen, tiny_ckpt, tmp_path, capsys):
    other = tiny_ckpt("qwen3_moe", vocab_size=300)
    out = tmp_path / "out.json"
    rc, _, err = _run(capsys, "eval", other, "--reference", qwen, "--json", out, *ARGS)
    assert rc == 2 and len(err) == 1 and "vocabulary mismatch" in err[0]
    assert not out.exists()


def test_tasks_without_lm_eval(qwen, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    out = tmp_path / "out.json"
    rc, _, err = _run(capsys, "eval", qwen, "--reference", qwen, "--json", out, "--tasks", "hellaswag", *ARGS)
    assert rc == 2 and len(err) == 1 and "lm-eval is not installed" in err[0]
    assert not out.exists()


def test_unknown_lm_eval_task(qwen, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    out = tmp_path / "out.json"
    rc, _, err = _run(capsys, "eval", qwen, "--reference", qwen, "--json", out, "--tasks", "no_such_task_xyz",
                      "--tasks-path", tasks, *ARGS)
    assert rc == 2 and len(err) == 1 and "unknown lm-eval task" in err[0] and "no_such_task_xyz" in err[0]
    assert not out.exists()
