"""The reference cache: a second evaluation replays the reference (never loads its decoder layers)
with bit-identical numbers; the key changes with data, seq_len, weights and settings; the size cap."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.arch.handle import ModelHandle
from moecompress.cli import main
from moecompress.errors import UserError
from moecompress.evals.evaluate import evaluate
from moecompress.evals.output import numeric_fields
from moecompress.evals.ref_cache import cache_key, key_hash

SMALL = dict(samples=4, seq_len=32, batch_size=3, seed=7)  # 4 windows -> batches of 3 and 1


def _perturb(src, dst, scale=1.3):
    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")
    sd = load_file(shard)
    for k in [k for k in sd if "layers.0.self_attn.o_proj.weight" in k]:
        sd[k] = sd[k] * scale
    save_file(sd, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


@pytest.fixture(scope="module")
def perturbed(qwen, tmp_path_factory):
    return _perturb(qwen, tmp_path_factory.mktemp("pert") / "m")


@pytest.fixture
def layer_loads(monkeypatch):
    """Folders whose decoder layers get loaded (whole and low-memory models both go through load_layer)."""
    loaded = []
    original = ModelHandle.load_layer

    def spy(self, *a, **kw):
        loaded.append(os.path.realpath(self.reader.path))
        return original(self, *a, **kw)

    monkeypatch.setattr(ModelHandle, "load_layer", spy)
    return loaded


@pytest.mark.parametrize("low_memory", [False, True], ids=["whole", "low_memory"])
def test_second_evaluation_replays_the_reference_with_identicalnumeric_fields(qwen, perturbed, tmp_path, low_memory,
                                                                         layer_loads, caplog):
    plain = evaluate(perturbed, qwen, low_memory=low_memory, **SMALL)
    assert plain["reference_cache"] is None and plain["kl"] > 0 and plain["routing"]["topk_exact"] < 1
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="moecompress"):
        first = evaluate(perturbed, qwen, low_memory=low_memory, reference_cache=cache, **SMALL)
    assert first["reference_cache"]["status"] == "written" and "reference cache: wrote" in caplog.text
    assert [p.name for p in cache.iterdir()] == [f"ref-{first['reference_cache']['key']}.safetensors"]
    ref = os.path.realpath(qwen)
    assert ref in layer_loads  # the first evaluation ran the reference

    layer_loads.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="moecompress"):
        second = evaluate(perturbed, qwen, low_memory=low_memory, reference_cache=cache, **SMALL)
    assert second["reference_cache"]["status"] == "hit" and "the reference model is not run" in caplog.text
    assert ref not in layer_loads and os.path.realpath(perturbed) in layer_loads  # only the model ran
    want = numeric_fields(plain)
    assert numeric_fields(first) == want and numeric_fields(second) == want  # bit-identical, not approximately equal
    assert len(want) > 50

    # the reference evaluated against itself (a run's reference row) needs no model at all on a hit
    layer_loads.clear()
    same = evaluate(qwen, qwen, low_memory=low_memory, reference_cache=cache, **SMALL)
    assert same["reference_cache"]["status"] == "hit" and layer_loads == []
    assert same["kl"] == 0.0 and same["routing"]["router_kl"] == 0.0
    assert same["ppl"] == same["ppl_reference"] == plain["ppl_reference"]


def test_reference_row_writes_what_a_variant_replays(qwen, perturbed, tmp_path, layer_loads):
    cache = tmp_path / "c"
    assert evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]["status"] == "written"
    layer_loads.clear()
    r = evaluate(perturbed, qwen, reference_cache=cache, **SMALL)
    assert r["reference_cache"]["status"] == "hit" and os.path.realpath(qwen) not in layer_loads
    assert numeric_fields(r) == numeric_fields(evaluate(perturbed, qwen, **SMALL))


def test_data_seq_len_and_weights_change_the_key(qwen, tmp_path, caplog):
    ref = shutil.copytree(qwen, tmp_path / "ref")  # copy2 keeps modification times: same fingerprint
    cache = tmp_path / "c"
    base = evaluate(ref, ref, reference_cache=cache, **SMALL)["reference_cache"]
    assert base["status"] == "written"
    assert evaluate(ref, ref, reference_cache=cache, **SMALL)["reference_cache"]["status"] == "hit"
    assert evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]["key"] == base["key"]

    def status(path=ref, **kw):
        caplog.clear()
        with caplog.at_level("INFO", logger="moecompress"):
            r = evaluate(path, path, reference_cache=cache, **dict(SMALL, **kw))["reference_cache"]
        assert r["key"] != base["key"]
        return r["status"], caplog.text

    st, text = status(seq_len=24)
    assert st == "written" and "differs in" in text and "windows_sha256" in text
    st, text = status(data=["builtin:heldout-code"])
    assert st == "written" and "data" in text
    st, _ = status(samples=3)
    assert st == "written"
    _perturb(qwen, tmp_path / "edited")
    st, text = status(path=tmp_path / "edited")
    assert st == "written" and "reference" in text
    # the same folder rewritten in place: a new modification time is a new key
    (shard,) = ref.glob("*.safetensors")
    sd = load_file(shard)
    sd = {k: v * 1.01 if "o_proj" in k else v for k, v in sd.items()}
    save_file(sd, shard, metadata={"format": "pt"})
    st, text = status(path=ref)
    assert st == "written" and "reference" in text


def test_settings_that_change_rounding_are_in_the_key(qwen):
    data_info = {"d": {"spec": "s", "text_sha256": "t", "windows": 4, "seq_len": 32}}
    kw = dict(data_info=data_info, windows_sha256={"d": "x"}, batch_size=3, low_memory=False,
              device=torch.device("cpu"), dtype=torch.float32)
    base = key_hash(cache_key(qwen, **kw))
    assert key_hash(cache_key(qwen, **kw)) == base
    for change in (dict(batch_size=4), dict(low_memory=True), dict(dtype=torch.bfloat16),
                   dict(windows_sha256={"d": "y"})):
        assert key_hash(cache_key(qwen, **dict(kw, **change))) != base, change


def test_size_cap_skips_the_cache_with_a_log_line(qwen, perturbed, tmp_path, caplog, layer_loads):
    cache = tmp_path / "c"
    with caplog.at_level("INFO", logger="moecompress"):
        r = evaluate(perturbed, qwen, reference_cache=cache, reference_cache_max_bytes=10_000, **SMALL)
    rc = r["reference_cache"]
    assert rc["status"] == "skipped" and "exceed the cap" in rc["reason"]
    assert "reference cache: not written: it would exceed the cap" in caplog.text
    assert not cache.exists() or not list(cache.iterdir())
    assert numeric_fields(r) == numeric_fields(evaluate(perturbed, qwen, **SMALL))
    layer_loads.clear()
    again = evaluate(perturbed, qwen, reference_cache=cache, reference_cache_max_bytes=10_000, **SMALL)
    assert again["reference_cache"]["status"] == "skipped" and os.path.realpath(qwen) in layer_loads


def test_writing_evicts_the_oldest_entries_over_the_cap(qwen, tmp_path, caplog):
    cache = tmp_path / "c"
    a = evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]
    cap = int(a["bytes"] * 1.5)  # room for one entry, not two
    with caplog.at_level("INFO", logger="moecompress"):
        b = evaluate(qwen, qwen, reference_cache=cache, reference_cache_max_bytes=cap,
                     **dict(SMALL, seed=8))["reference_cache"]
    assert b["status"] == "written" and "removed the older entry" in caplog.text
    assert [p.name for p in cache.iterdir()] == [f"ref-{b['key']}.safetensors"]


def test_unreadable_entry_is_recomputed(qwen, tmp_path, caplog):
    cache = tmp_path / "c"
    a = evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]
    with open(a["path"], "r+b") as f:
        f.truncate(100)
    with caplog.at_level("WARNING", logger="moecompress"):
        b = evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]
    assert b["status"] == "written" and "unusable" in caplog.text
    assert evaluate(qwen, qwen, reference_cache=cache, **SMALL)["reference_cache"]["status"] == "hit"


def test_cli_reference_cache(qwen, perturbed, tmp_path, capsys):
    args = ["eval", str(perturbed), "--reference", str(qwen), "--samples", "2", "--seq-len", "16",
            "--batch-size", "2", "--reference-cache", str(tmp_path / "c")]
    out = [tmp_path / "a.json", tmp_path / "b.json"]
    for o in out:
        assert main(args + ["--json", str(o)]) == 0
    a, b = (json.loads(o.read_text()) for o in out)
    assert a["reference_cache"]["status"] == "written" and b["reference_cache"]["status"] == "hit"
    assert numeric_fields(a) == numeric_fields(b)
    capped = tmp_path / "c.json"
    assert main(args + ["--json", str(capped), "--seed", "5", "--reference-cache-max-gib", "0"]) == 0
    assert json.loads(capped.read_text())["reference_cache"]["status"] == "skipped"
    assert len(list((tmp_path / "c").iterdir())) == 1
    capsys.readouterr()


def test_a_file_in_place_of_the_folder_is_refused_before_running(qwen, tmp_path, layer_loads):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        evaluate(qwen, qwen, reference_cache=tmp_path / "f", **SMALL)
    assert layer_loads == []


def test_tied_embeddings(tiny_ckpt, tmp_path):
    ref = tiny_ckpt("qwen3_moe", tie_word_embeddings=True)
    model = _perturb(ref, tmp_path / "m")
    cache = tmp_path / "c"
    plain = evaluate(model, ref, **SMALL)
    assert evaluate(model, ref, reference_cache=cache, **SMALL)["reference_cache"]["status"] == "written"
    hit = evaluate(model, ref, reference_cache=cache, **SMALL)
    assert hit["reference_cache"]["status"] == "hit" and numeric_fields(hit) == numeric_fields(plain)
