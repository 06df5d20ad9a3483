"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from moecompress.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if "it/s]" not in l and not l.startswith(("Writing", "layers"))]
    return rc, err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture()
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


CASES = {
    "missing dir": (lambda p, t: t / "nope", [], "does not exist"),
    "no safetensors": (lambda p, t: _strip(p, t, "*.safetensors"), [], "no *.safetensors"),
    "pickle only": (lambda p, t: _pickle_only(p, t), [], "pickle"),
    "truncated safetensors": (lambda p, t: _truncate(p, t), [], "truncated"),
    "broken config": (lambda p, t: _broken_config(p, t), [], "not valid JSON"),
    "non-MoE model": (lambda p, t: _dense(t), [], "not a Mixture-of-Experts"),
    "unknown family": (lambda p, t: _family(p, t, "jetmoe"), [], "not supported yet"),
    "bits 5": (lambda p, t: p, ["--bits", "5"], "bits=5"),
    "group size does not divide": (lambda p, t: p, ["--group-size", "256"], "does not divide"),
    "empty calibration file": (lambda p, t: p, ["--calib", "EMPTY"], "empty"),
    "binary calibration file": (lambda p, t: p, ["--calib", "BINARY"], "binary"),
    "negative sample count": (lambda p, t: p, ["--calib-samples", "-3"], "calib_samples"),
    "unknown method": (lambda p, t: p, ["--method", "magic"], "magic"),
    "unknown format": (lambda p, t: p, ["--format", "gguf"], "gguf"),
    "zero threads": (lambda p, t: p, ["--threads", "0"], "threads"),
    "act-order group with compressed-tensors": (lambda p, t: p, ["--act-order", "group"], "GPTQ format"),
}


def _strip(p, t, pattern):
    d = _copy(p, t / "m")
    for f in d.glob(pattern):
        f.unlink()
    return d


def _pickle_only(p, t):
    d = _strip(p, t, "*.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return d


def _truncate(p, t):
    d = _copy(p, t / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return d


def _broken_config(p, t):
    d = _copy(p, t / "m")
    (d / "config.json").write_text('{"model_type": "qwen3_moe", ')
    return d


def _family(p, t, mt):
    d = _copy(p, t / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = mt
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _dense(t):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    m.save_pretrained(t / "llama")
    return t / "llama"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2(capsys, tmp_path, qwen, case):
    make, extra, needle = CASES[case]
    model = make(qwen, tmp_path)
    (tmp_path / "EMPTY.txt").write_text("")
    (tmp_path / "BINARY.bin").write_bytes(bytes(range(256)) * 4)
    extra = [{"EMPTY": str(tmp_path / "EMPTY.txt"), "BINARY": str(tmp_path / "BINARY.bin")}.get(a, a) for a in extra]
    out = tmp_path / "out"
    rc, err = _run(capsys, "quantize", str(model), "--out", str(out), "--group-size", "32",
                   "--calib-samples", "4", "--seq-len", "32", *extra)
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and needle.lower() in err[0].lower(), err
    assert "Traceback" not in err[0]
    _assert_clean(tmp_path, out)


def test_out_inside_source_refused(capsys, tmp_path, qwen):
    src = _copy(qwen, tmp_path / "m")
    rc, err = _run(capsys, "quantize", str(src), "--out", str(src / "q"), "--group-size", "32")
    assert rc == 2 and len(err) == 1 and "inside the source" in err[0]
    assert not (src / "q").exists()


def test_existing_out_needs_overwrite(capsys, tmp_path, qwen):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run(capsys, "quantize", str(qwen), "--out", str(out), "--method", "rtn", "--group-size", "32")
    assert rc == 2 and "--overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    rc, err = _run(capsys, "quantize", str(qwen), "--out", str(out), "--method", "rtn", "--group-size", "32",
                   "--overwrite", "--threads", "1")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_missing_tokenizer_is_a_user_error(capsys, tmp_path, qwen):
    d = _strip(qwen, tmp_path, "tokenizer*")
    rc, err = _run(capsys, "quantize", str(d), "--out", str(tmp_path / "o"), "--group-size", "32")
    assert rc == 2 and len(err) == 1 and "tokenizer" in err[0]


def test_inspect_reports_family_and_sizes(capsys, tiny_ckpt):
    rc = main(["inspect", str(tiny_ckpt("deepseek_v3"))])
    out = capsys.readouterr().out
    assert rc == 0
    assert "deepseek_v3" in out and "dense: [0]" in out and "8 routed, top-2" in out
    assert "mlp.gate" in out and "int4" in out
