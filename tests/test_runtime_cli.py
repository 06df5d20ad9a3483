"""`moecompress generate` and the runtime benchmark: happy paths and bad input (one line, exit code 2)."""

from __future__ import annotations

import shutil

import pytest
import torch

from moecompress.cli import main
from moecompress.runtime import Runtime, benchmark


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    err = [line for line in err.strip().splitlines() if "it/s]" not in line and not line.startswith("Writing")]
    return rc, out, err


def test_generate_prints_the_greedy_continuation_and_speeds(tiny_ckpt, capsys):
    from transformers import AutoTokenizer

    path = tiny_ckpt("qwen3_moe")
    rc, out, err = _run(capsys, "generate", path, "--prompt", "Hello, world", "--max-new-tokens", "12", "--greedy")
    assert rc == 0, err
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Hello, world", return_tensors="pt").input_ids
    expected = tok.decode(Runtime.load(path).generate(ids, 12).tokens[0], skip_special_tokens=True)
    assert out == expected + "\n"
    assert len(err) == 1 and "prefill" in err[0] and "decode" in err[0] and "tokens/s" in err[0], err


def test_generate_runs_a_quantized_hybrid_checkpoint(tiny_ckpt, tmp_path, capsys):
    """Qwen3.5-MoE (Gated DeltaNet + full attention), quantized by `moecompress quantize`, then generated
    from the command line: the continuation the runtime gives in-process."""
    from transformers import AutoTokenizer

    q = tmp_path / "q"
    rc, _, err = _run(capsys, "quantize", tiny_ckpt("qwen3_5_moe"), "--out", q, "--method", "rtn", "--group-size", "32",
                      "--calib-samples", "8", "--seq-len", "64", "--batch-size", "4")
    assert rc == 0, err
    rc, out, err = _run(capsys, "generate", q, "--prompt", "Hello, world", "--max-new-tokens", "12", "--greedy")
    assert rc == 0, err
    rt = Runtime.load(q)
    assert rt.family == "qwen3_5_moe" and rt.report.quant_format == "compressed-tensors"
    tok = AutoTokenizer.from_pretrained(q)
    ids = tok("Hello, world", return_tensors="pt").input_ids
    assert out == tok.decode(rt.generate(ids, 12).tokens[0], skip_special_tokens=True) + "\n"
    # transformers may add one-time notes that its torch reference of the linear attention runs
    err = [line for line in err if not line.startswith("[transformers]")]
    assert len(err) == 1 and "prefill" in err[0] and "decode" in err[0], err


def test_generate_samples_reproducibly(tiny_ckpt, capsys):
    path = tiny_ckpt("mixtral")
    args = ("generate", path, "--prompt", "abc", "--max-new-tokens", "16", "--temperature", "0.8", "--top-p", "0.9")
    first = _run(capsys, *args, "--seed", "3")
    assert first[0] == 0 and first[1].strip()
    assert _run(capsys, *args, "--seed", "3")[1] == first[1]


def test_temperature_zero_is_greedy(tiny_ckpt, capsys):
    """vLLM's spelling: --temperature 0 takes the most likely token, as --greedy does (it was refused)."""
    path = tiny_ckpt("mixtral")
    args = ("generate", path, "--prompt", "abc", "--max-new-tokens", "12")
    zero = _run(capsys, *args, "--temperature", "0", "--seed", "5")
    assert zero[0] == 0 and zero[1].strip()
    assert _run(capsys, *args, "--greedy")[1] == zero[1]


def _no_tokenizer(src, tmp_path):
    d = shutil.copytree(src, tmp_path / "m")
    for f in list(d.glob("tokenizer*")) + list(d.glob("special_tokens*")):
        f.unlink()
    return d


CASES = {
    "missing dir": (lambda p, t: t / "nope", ["--prompt", "x"], "does not exist"),
    "no tokenizer": (_no_tokenizer, ["--prompt", "x"], "tokenizer"),
    "empty prompt": (lambda p, t: p, ["--prompt", ""], "prompt is empty"),
    "zero new tokens": (lambda p, t: p, ["--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    "negative new tokens": (lambda p, t: p, ["--prompt", "x", "--max-new-tokens", "-4"], "max-new-tokens"),
    "negative temperature": (lambda p, t: p, ["--prompt", "x", "--temperature", "-0.5"], "0, or --greedy"),
    "top-p above one": (lambda p, t: p, ["--prompt", "x", "--top-p", "1.5"], "top-p"),
    "unknown device": (lambda p, t: p, ["--prompt", "x", "--device", "tpu"], "device"),
    "missing prompt": (lambda p, t: p, [], "--prompt"),
    "longer than the model": (lambda p, t: p, ["--prompt", "x", "--max-new-tokens", "100000"],
                              "max_position_embeddings"),
}


def _lm_head_rows(src, tmp_path, rows=200):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(src, tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = sd["lm_head.weight"][:rows].contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


CASES["lm_head of another shape"] = (_lm_head_rows, ["--prompt", "x"], "lm_head.weight has shape (200, 128)")


@pytest.mark.parametrize("case", list(CASES))
def test_generate_bad_input(tiny_ckpt, tmp_path, capsys, case):
    make, args, needle = CASES[case]
    rc, out, err = _run(capsys, "generate", make(tiny_ckpt("qwen3_moe"), tmp_path), *args)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error:") and needle in err[0], err
    assert "Traceback" not in "".join(err) and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_generate_cuda_without_cuda(tiny_ckpt, capsys):
    rc, _, err = _run(capsys, "generate", tiny_ckpt("qwen3_moe"), "--prompt", "x", "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "CUDA is not available" in err[0], err


def test_benchmark_reports_the_agreed_keys(tiny_ckpt):
    res = benchmark(tiny_ckpt("olmoe"), device="cpu", prompt_len=8, new_tokens=4, batch=2, repeats=1)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "device", "dtype", "batch", "prompt_len", "new_tokens"):
        assert key in res, key
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0
    assert (res["device"], res["dtype"], res["batch"], res["prompt_len"], res["new_tokens"]) == ("cpu", "float32", 2, 8, 4)


def test_a_request_at_the_position_limit_is_served(tiny_ckpt):
    """prompt + new tokens == max_position_embeddings: legal (the warm-up's two tokens went one past it)."""
    from moecompress.runtime import Runtime

    rt = Runtime.load(tiny_ckpt("qwen3_moe"))
    limit = rt.model.max_positions
    prompt = torch.randint(0, 256, (1, limit - 1), generator=torch.Generator().manual_seed(0))
    rt.warmup(1, limit - 1, limit)
    assert len(rt.generate(prompt, 1, stop_ids=[]).tokens[0]) == 1


def test_a_tensor_missing_from_the_shards_is_one_line_in_the_size_count(tiny_ckpt, tmp_path):
    """--cpu-weights dequantized counts each packed linear's size first: a shard deleted gave a KeyError."""
    from conftest import quick_config
    from moecompress.checkpoint.reader import CheckpointReader
    from moecompress.errors import UserError
    from moecompress.evals.sizes import _dense_count
    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", bits=4))
    reader = CheckpointReader.open(q)
    assert _dense_count(reader, "compressed-tensors", 4, "model.layers.0.self_attn.q_proj") > 0
    with pytest.raises(UserError, match=r"tensor model.layers.0.gone.weight_shape is missing from the shards"):
        _dense_count(reader, "compressed-tensors", 4, "model.layers.0.gone")
