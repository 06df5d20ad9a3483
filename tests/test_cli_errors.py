"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from moecompress.cli import main


_run = run_cli  # (exit code, stderr lines that are not progress bars or blank)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture()
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")
                or p.name == f".{out.name}.partial"]


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
    "negative sample count": (lambda p, t: p, ["--calib-samples", "-3"], "--calib-samples must be positive"),
    "unknown method": (lambda p, t: p, ["--method", "magic"], "magic"),
    "unknown format": (lambda p, t: p, ["--format", "gguf"], "gguf"),
    "zero threads": (lambda p, t: p, ["--threads", "0"], "threads"),
    "group size 0": (lambda p, t: p, ["--group-size", "0"], "-1 (or 'channel') for per-channel"),
    "group size not a power of two": (lambda p, t: p, ["--group-size", "48"],
                                      "invalid option --group-size: 48 is not a power of two"),
    "blank-line jsonl calibration file": (lambda p, t: p, ["--calib", "BLANKJSONL"], "empty (0 rows)"),
    "out below a file": (lambda p, t: p, ["--out", "FILE/sub/out"], "is a file"),
    "act-order group with compressed-tensors": (lambda p, t: p, ["--act-order", "group"], "GPTQ format"),
    "windows longer than the context": (lambda p, t: p, ["--seq-len", "1024"], "max_position_embeddings 512"),
    "config without its experts field": (lambda p, t: _drop_key(p, t, "num_experts|num_local_experts"), [], "router rows"),
    "malformed jsonl calibration file": (lambda p, t: p, ["--calib", "BADJSONL"], "JSON parse error"),
    # config.json fields the modeling code would fail on mid-run (an index out of range, a division by zero)
    "more experts per token than experts": (lambda p, t: _set_key(p, t, num_experts_per_tok=20), [],
                                            "num_experts_per_tok is 20; it must be an integer in [1, 8]"),
    "no experts per token": (lambda p, t: _set_key(p, t, num_experts_per_tok=0), [], "num_experts_per_tok is 0"),
    "MoE layer spacing 0": (lambda p, t: _set_key(p, t, decoder_sparse_step=0), [], "decoder_sparse_step is 0"),
    # named as typed: only the flags given (tune_scale_change has no flag), and --override, not the key overrides
    "tuning reference without tuning steps": (lambda p, t: p, ["--tune-reference", "REF"],
                                              "--tune-reference applies to block-output tuning: set --tune-steps too"),
    "override to 5 bits": (lambda p, t: p, ["--override", "self_attn=5"], "invalid option --override: "),
}


def _drop_key(p, t, key):
    d = _copy(p, t / "m")
    cfg = json.loads((d / "config.json").read_text())
    for k in key.split("|"):
        cfg.pop(k, None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _set_key(p, t, **kw):
    d = _copy(p, t / "m")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **kw}))
    return d


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
    (tmp_path / "BLANK.jsonl").write_text("\n\n")
    (tmp_path / "BAD.jsonl").write_text('{"text": "a" "b"}\n')
    (tmp_path / "FILE").write_text("not a folder")
    extra = [{"EMPTY": str(tmp_path / "EMPTY.txt"), "BINARY": str(tmp_path / "BINARY.bin"),
              "BLANKJSONL": str(tmp_path / "BLANK.jsonl"), "BADJSONL": str(tmp_path / "BAD.jsonl")}.get(a, a.replace("FILE", str(tmp_path / "FILE")))
             for a in extra]
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
    # --overwrite replaces a model folder, not a folder of other files (which it would delete)
    args = ("quantize", str(qwen), "--out", str(out), "--method", "rtn", "--group-size", "32", "--overwrite",
            "--threads", "1")
    rc, err = _run(capsys, *args)
    assert rc == 2 and len(err) == 1 and "holds files but no config.json: it is not a model folder" in err[0], err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / ".ssh").mkdir()  # dot-files do (a server's home folder holds nothing else)
    rc, err = _run(capsys, *args)
    assert rc == 2 and "not a model folder" in err[0] and (out / ".ssh").is_dir(), err
    (out / ".ssh").rmdir()
    (out / ".DS_Store").write_text("")  # a file browser's litter alone does not make it someone's folder
    rc, err = _run(capsys, *args)
    assert rc == 0, err
    (out / "config.json").write_text("{}")  # an earlier output (or an empty folder): replaced
    (out / "old.safetensors").write_text("x")
    rc, err = _run(capsys, *args)
    assert rc == 0, err
    assert not (out / "old.safetensors").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("command", [["quantize", "--group-size", "32"],
                                     ["zero-experts", "baseline", "--rule", "top-p", "--target-skip", "0.3"],
                                     ["zeda"]], ids=["quantize", "baseline", "zeda"])
def test_missing_tokenizer_is_a_user_error(capsys, tmp_path, qwen, command):
    """transformers 5 would build an empty tokenizer from a folder without one (the text then gives 0 tokens)."""
    d = _strip(qwen, tmp_path, "tokenizer*")
    rc, err = _run(capsys, *command[:2 if command[0] == "zero-experts" else 1], str(d), "--out", str(tmp_path / "o"),
                   *command[2 if command[0] == "zero-experts" else 1:])
    assert rc == 2 and len(err) == 1 and "has no tokenizer files" in err[0], err
    _assert_clean(tmp_path, tmp_path / "o")


def _poison(src, dst, name, index):
    """A copy of checkpoint ``src`` whose tensor ``name`` holds a NaN at ``index``."""
    from safetensors.torch import load_file, save_file

    d = _copy(src, dst)
    tensors = load_file(d / "model.safetensors")
    tensors[name][index] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_nan_weight_is_named_and_leaves_nothing(capsys, tmp_path, qwen, method):
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    model = _poison(qwen, tmp_path / "m", name, (5, 7))
    out = tmp_path / "nest" / "a" / "b" / "out"
    rc, err = _run(capsys, "quantize", str(model), "--out", str(out), "--method", method, "--group-size", "32",
                   "--calib-samples", "4", "--seq-len", "32", "--threads", "1")
    assert rc == 2, err
    assert err == [f"error: {name} has NaN/Inf values"]
    assert not (tmp_path / "nest").exists()  # the parent folders the run made are gone too


def test_nan_in_a_norm_is_named(capsys, tmp_path, qwen):
    name = "model.layers.1.post_attention_layernorm.weight"
    model = _poison(qwen, tmp_path / "m", name, 3)
    rc, err = _run(capsys, "quantize", str(model), "--out", str(tmp_path / "out"), "--method", "rtn",
                   "--group-size", "32", "--threads", "1")
    assert rc == 2 and err == [f"error: {name} has NaN/Inf values"], err
    _assert_clean(tmp_path, tmp_path / "out")


def test_nan_in_fused_experts_names_the_expert(capsys, tmp_path, tiny_ckpt):
    src = tiny_ckpt("qwen3_5_moe", fused_experts=True)
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    model = _poison(src, tmp_path / "m", name, (5, 40, 3))
    rc, err = _run(capsys, "quantize", str(model), "--out", str(tmp_path / "out"), "--method", "rtn",
                   "--group-size", "32", "--threads", "1")
    assert rc == 2 and err == [f"error: {name} (expert 5) has NaN/Inf values"], err


def test_failed_run_removes_only_the_parents_it_made(capsys, tmp_path, qwen, monkeypatch):
    from moecompress import pipeline
    from moecompress.errors import UserError

    def boom(*a, **k):
        raise UserError("boom in the middle of the run")

    monkeypatch.setattr(pipeline, "_quantize_layer", boom)
    mine = tmp_path / "mine"
    mine.mkdir()
    out = mine / "new" / "deeper" / "out"
    rc, err = _run(capsys, "quantize", str(qwen), "--out", str(out), "--method", "rtn", "--group-size", "32")
    assert rc == 2 and err == ["error: boom in the middle of the run"], err
    assert mine.is_dir() and not list(mine.iterdir())  # ours removed, the user's folder kept


def test_quantize_creates_missing_parents_on_success(capsys, tmp_path, qwen):
    out = tmp_path / "x" / "y" / "out"
    rc, err = _run(capsys, "quantize", str(qwen), "--out", str(out), "--method", "rtn", "--group-size", "32",
                   "--threads", "1")
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()


def test_calibration_jsonl_prints_no_datasets_progress(capsys, tmp_path):
    import datasets.utils.logging as ds_logging

    from moecompress.calib.data import load_texts

    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "hello world"}\n{"text": "more text"}\n')
    was = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    assert load_texts(str(f)).n_documents == 2
    assert "Generating" not in capsys.readouterr().err
    assert (ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()) == was  # state restored


# the other commands (found by an audit of every command's bad input)
OTHER = {
    "plan with zero bandwidth": (["plan", "QWEN", "--vram", "6GiB", "--gpu-gbps", "0"], "gpu-gbps"),
    "plan with negative bandwidth": (["plan", "QWEN", "--vram", "6GiB", "--cpu-gbps", "-1"], "cpu-gbps"),
    "baseline on an unknown device": (["zero-experts", "baseline", "QWEN", "--rule", "top-p", "--target-skip", "0.3",
                                       "--out", "OUT", "--device", "gpu"], "unknown device 'gpu'"),
    "baseline that keeps no expert": (["zero-experts", "baseline", "QWEN", "--rule", "top-k", "--target-skip", "0.99",
                                       "--out", "OUT", "--calib-samples", "2", "--seq-len", "32"], "keep no expert"),
    "baseline with no samples": (["zero-experts", "baseline", "QWEN", "--rule", "top-p", "--target-skip", "0.3",
                                  "--out", "OUT", "--calib-samples", "0"], "calib-samples"),
    "report of a file": (["report", "FILE"], "is not a folder"),
    "report of an eval that is not an object": (["report", "LISTEVAL"], "holds a json list"),
    "make-tiny over a file": (["make-tiny", "FILE", "--overwrite"], "is not a directory"),
    "inspect --skip-rate without zero experts": (["inspect", "QWEN", "--skip-rate", "0.5"], "no zero experts"),
    "inspect --eval of a missing file": (["inspect", "QWEN", "--eval", "OUT/nope.json"], "does not exist"),
    "inspect --eval of a folder": (["inspect", "QWEN", "--eval", "LISTEVAL"], "is a folder, not an `eval --json` file"),
    "inspect --eval and --skip-rate": (["inspect", "QWEN", "--eval", "OUT/e.json", "--skip-rate", "0.3"],
                                       "give --skip-rate or --eval"),
    "generate --vram without --offload-experts": (["generate", "QWEN", "--prompt", "x", "--vram", "6GiB"],
                                                  "only applies with --offload-experts"),
    "eval --tasks-limit without --tasks": (["eval", "QWEN", "--reference", "QWEN", "--tasks-limit", "3", "--json",
                                            "OUT/e.json"], "--tasks-limit only apply with --tasks"),
    "eval with an empty task list": (["eval", "QWEN", "--reference", "QWEN", "--tasks", ",", "--json", "OUT/e.json"],
                                     "names no lm-eval task"),
    "eval beyond the context": (["eval", "QWEN", "--reference", "QWEN", "--seq-len", "1024", "--json", "OUT/e.json"],
                                "max_position_embeddings"),
    "zeda with no steps": (["zeda", "QWEN", "--out", "OUT", "--stage1-steps", "0", "--stage2-steps", "0"],
                           "nothing would be trained"),
    "quantize --out empty": (["quantize", "QWEN", "--out", ""], "--out is empty"),
    "zero-experts add --out empty": (["zero-experts", "add", "QWEN", "--out", " ", "--num-zero", "1"], "--out is empty"),
    "zeda --out empty": (["zeda", "QWEN", "--out", ""], "--out is empty"),
    "run --out empty": (["run", "FILE", "--out", ""], "--out is empty"),
    "eval --json empty": (["eval", "QWEN", "--reference", "QWEN", "--json", ""], "--json is empty"),
}


@pytest.mark.parametrize("case", list(OTHER))
def test_other_commands_bad_input(capsys, tmp_path, qwen, case):
    argv, needle = OTHER[case]
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "reference.json").write_text("[1]")
    subs = {"QWEN": str(qwen), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "FILE"),
            "LISTEVAL": str(tmp_path / "run")}
    argv = [subs.get(a, a.replace("OUT", str(tmp_path / "out"))) for a in argv]
    rc, err = _run(capsys, *argv)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and needle.lower() in err[0].lower(), err
    assert not (tmp_path / "out").exists()


def test_make_tiny_refuses_to_overwrite_the_current_directory(capsys, tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    rc, err = _run(capsys, "make-tiny", ".", "--overwrite")
    assert rc == 2 and "current directory" in err[0], err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_lm_eval_dataset_that_cannot_be_loaded_is_one_line(monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    from moecompress.errors import UserError
    from moecompress.evals.lm_eval_adapter import load_tasks

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", offline)
    with pytest.raises(UserError, match="hellaswag: a dataset could not be loaded"):
        load_tasks(["hellaswag"], None)


# found by an audit of the command line (session 16): each was a traceback, a wrong exit code or output left behind
AUDIT = {
    "plan of a weights file": (["plan", "QWEN/model.safetensors", "--vram", "8GiB"], "is not a directory"),
    "plan of a broken config": (["plan", "BADJSON", "--vram", "8GiB"], "not valid JSON"),
    "plan of a config with a string field": (["plan", "STRTYPE", "--vram", "8GiB"], "expected int, got str"),
    "plan with another model's load": (["plan", "QWEN", "--vram", "8GiB", "--load", "LOAD16"], "not this model's"),
    "generate --offload-experts with another model's load": (
        ["generate", "QWEN", "--prompt", "x", "--device", "cuda", "--offload-experts", "2", "--load", "LOAD16"],
        "not this model's"),
    "generate of a folder without config": (["generate", "OUT0", "--prompt", "x"], "no config.json"),
    "eval of a string quantization_config": (["eval", "QSTR", "--reference", "QWEN", "--json", "OUT/e.json"],
                                             "quantization_config must be an object"),
    "zero-experts add without a router": (["zero-experts", "add", "NOROUTER", "--out", "OUT", "--num-zero", "1"],
                                          "model.layers.1.mlp.gate.weight' is missing"),
    "zero-experts add with NaN weights": (["zero-experts", "add", "NAN", "--out", "OUT", "--num-zero", "1"],
                                          "has NaN/Inf values"),
    "zeda beyond the context": (["zeda", "QWEN", "--out", "OUT", "--prompt-len", "500", "--gen-len", "64"],
                                "max_position_embeddings"),
    "run into a folder of other files": (["run", "RECIPE", "--out", "OTHERS"], "no run.json"),
    "eval against a reference with other experts": (["eval", "QWEN", "--reference", "QWEN16", "--json", "OUT/e.json"],
                                                    "not the same MoE"),
    "baseline with NaN weights": (["zero-experts", "baseline", "NAN", "--rule", "top-p", "--target-skip", "0.3",
                                   "--out", "OUT", "--calib-samples", "2", "--seq-len", "32"], "NaN/Inf routing weights"),
    "zeda with NaN weights": (["zeda", "NAN", "--out", "OUT"], "has NaN/Inf values"),
    "generate with NaN weights": (["generate", "NAN", "--prompt", "x", "--max-new-tokens", "2"], "NaN/Inf logits"),
    "eval of a model with NaN weights": (["eval", "NAN", "--reference", "QWEN", "--samples", "2", "--seq-len", "32",
                                          "--json", "OUT/e.json"], "NaN/Inf logits"),
}


def _edit_config(src, dst, **changes):
    d = _copy(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _without(src, dst, name):
    from safetensors.torch import load_file, save_file

    d = _copy(src, dst)
    tensors = load_file(d / "model.safetensors")
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("case", list(AUDIT))
def test_audited_bad_input(capsys, tmp_path, qwen, tiny_ckpt, case):
    argv, needle = AUDIT[case]
    qwen16 = tiny_ckpt("qwen3_moe", num_experts=16)
    load16 = tmp_path / "load16.json"
    load16.write_text(json.dumps({"expert_load": {"layers": [0, 1], "model": [[1.0] * 16, [1.0] * 16]}}))
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {qwen}\nvariants:\n  - name: w4\n    method: rtn\n    bits: 4\n    group_size: 32\n")
    (tmp_path / "out0").mkdir()
    subs = {"QWEN": str(qwen), "QWEN16": str(qwen16), "OUT": str(tmp_path / "out"), "LOAD16": str(load16),
            "OTHERS": str(others), "RECIPE": str(recipe), "OUT0": str(tmp_path / "out0")}
    lazy = {"BADJSON": lambda: _broken_config(qwen, tmp_path),
            "STRTYPE": lambda: _edit_config(qwen, tmp_path / "strtype", num_hidden_layers="2"),
            "QSTR": lambda: _edit_config(qwen, tmp_path / "qstr", quantization_config="gptq"),
            "NOROUTER": lambda: _without(qwen, tmp_path / "norouter", "model.layers.1.mlp.gate.weight"),
            "NAN": lambda: _poison(qwen, tmp_path / "nan", "model.layers.0.self_attn.v_proj.weight", (1, 2))}

    def sub(arg: str) -> str:
        head, sep, rest = arg.partition("/")
        if head in lazy:
            head = str(lazy[head]())
        return subs.get(head, head) + sep + rest

    argv = [sub(a) for a in argv]
    rc, err = _run(capsys, *argv)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and needle.lower() in err[0].lower(), err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out" / "e.json").exists()


def test_a_bare_command_group_prints_its_help(capsys):
    assert main(["zero-experts"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Usage: ") and "add" in captured.out and not captured.err


@pytest.mark.parametrize("args,words", [
    (["--act-order", "group", "--format", "compressed-tensors"], ["invalid options: --act-order 'group'",
                                                                  "use --act-order 'weight'"]),
    (["--method", "rtn", "--act-order", "weight"], ["invalid options: --act-order applies to GPTQ only"]),
    (["--damp", "5"], ["invalid option --damp:"]),
], ids=["act-order-format", "act-order-rtn", "damp"])
def test_quantize_settings_errors_speak_in_options(capsys, tmp_path, tiny_ckpt, args, words):
    """From the command line, a settings error names the options the user typed, not the recipe's keys."""
    out = tmp_path / "q"
    rc, err = _run(capsys, "quantize", str(tiny_ckpt("qwen3_moe")), "--out", str(out), "--group-size", "32", *args)
    assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert "act_order" not in err[0] and "'recipe'" not in err[0] and not out.exists()


def test_zeda_settings_errors_speak_in_options(capsys, tmp_path, tiny_ckpt):
    out = tmp_path / "z"
    rc, err = _run(capsys, "zeda", str(tiny_ckpt("qwen3_moe")), "--out", str(out), "--target-skip", "2")
    assert rc == 2 and len(err) == 1 and "invalid option --target-skip: --target-skip 2.0 must lie in (0, 1)" in err[0]
    assert not out.exists()
