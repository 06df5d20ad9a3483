"""Tests for moecompress.calib.data: every text source kind, the builtin split, windows, user errors."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from moecompress.calib import builtin_text
from moecompress.calib.data import (
    CHUNK_CHARS,
    TOKEN_BUDGET_FACTOR,
    CalibWindows,
    TextSource,
    load_texts,
    make_calibration_windows,
)
from moecompress.errors import UserError

PROSE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
)
CODE = "def add(x, y):\n    return x + y\n\nclass Foo:\n    pass\n"


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained here (every string encodes; no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PROSE, CODE] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def user_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(UserError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip(), msg
    assert re.search(match, msg), msg
    return msg


def docs(src: TextSource) -> list[str]:
    return list(src)


# ------------------------------------------------------------------------------------- text files


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("\ufeff" + PROSE + "\n\n" + CODE, encoding="utf-8")
    src = load_texts(str(p))
    assert docs(src) == [PROSE + "\n\n" + CODE]  # BOM stripped, blank lines do not split
    assert src.n_documents == 1 and len(src) == 1 and src.n_chars == len(PROSE + "\n\n" + CODE)
    assert str(p) in src.description
    digest = hashlib.sha256((PROSE + "\n\n" + CODE).encode()).digest()
    assert src.text_hash == hashlib.sha256(digest).hexdigest()


def test_hash_changes_with_text_but_not_order(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(PROSE)
    h1 = load_texts(str(p)).text_hash
    p.write_text(PROSE + ".")
    assert load_texts(str(p)).text_hash != h1
    p.write_text(PROSE)
    assert load_texts(str(p)).text_hash == h1

    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir(), d2.mkdir()
    (d1 / "a.txt").write_text("first")
    (d1 / "b.txt").write_text("second")
    (d2 / "a.txt").write_text("second")
    (d2 / "b.txt").write_text("first")
    s1, s2 = load_texts(str(d1)), load_texts(str(d2))
    assert docs(s1) == ["first", "second"] and docs(s2) == ["second", "first"]
    assert s1.text_hash == s2.text_hash


def test_folder_recursive_sorted_skipping_hidden_binary_empty(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "sub" / "c.py").write_text("see")
    (tmp_path / "sub" / "deeper" / "d").write_text("dee")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "config").write_text("hidden too")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    src = load_texts(str(tmp_path))
    assert docs(src) == ["ay", "bee", "see", "dee"]
    assert "skipped 2 binary" in src.description


def test_folder_of_jsonl_files_is_one_dataset(tmp_path):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}-{j}"}) for j in range(3)))
    assert docs(load_texts(str(tmp_path))) == [f"doc {i}-{j}" for i in range(2) for j in range(3)]


def test_folder_mixing_data_and_text_files_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}))
    (tmp_path / "b.txt").write_text("y")
    user_error(load_texts, str(tmp_path), match=r"mixes dataset files .*b\.txt")


# ------------------------------------------------------------------------------------- datasets


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"id": 1, "text": "alpha", "meta": "m"}, {"id": 2, "text": None, "meta": "m"}, {"id": 3, "text": "beta", "meta": "m"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = load_texts(str(p))
    assert docs(src) == ["alpha", "beta"]  # null rows dropped
    assert "column 'text'" in src.description
    assert src.documents[1] == "beta" and src.documents[-1] == "beta" and src.documents[0:2] == ["alpha", "beta"]
    assert docs(load_texts(str(p), text_column="meta")) == ["m", "m", "m"]


def test_jsonl_single_string_column_and_json_array(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps({"n": i, "content": f"c{i}"}) for i in range(3)))
    assert docs(load_texts(str(p))) == ["c0", "c1", "c2"]
    q = tmp_path / "data.json"
    q.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert docs(load_texts(str(q))) == ["one", "two"]


def test_parquet_file(tmp_path):
    from datasets import Dataset

    p = tmp_path / "d.parquet"
    Dataset.from_dict({"text": ["p1", "p2", "  ", "p3"], "score": [1.0, 2.0, 3.0, 4.0]}).to_parquet(str(p))
    src = load_texts(str(p))
    assert docs(src) == ["p1", "p2", "p3"] and src.n_chars == 6


def test_arrow_file_stream_and_file_format(tmp_path):
    import pyarrow as pa

    table = pa.table({"body": ["a1", "a2"], "n": [1, 2]})
    for name, opener in (("s.arrow", pa.ipc.new_stream), ("f.arrow", pa.ipc.new_file)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, opener(sink, table.schema) as w:
            w.write_table(table)
        assert docs(load_texts(str(tmp_path / name))) == ["a1", "a2"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["s1", "s2"]}).save_to_disk(str(tmp_path / "ds"))
    assert docs(load_texts(str(tmp_path / "ds"))) == ["s1", "s2"]

    dd = DatasetDict({"validation": Dataset.from_dict({"text": ["v"]}), "train": Dataset.from_dict({"text": ["t"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = load_texts(str(tmp_path / "dd"))
    assert docs(src) == ["t"] and "split 'train'" in src.description

    DatasetDict({"b": Dataset.from_dict({"text": ["b"]}), "a": Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "nt")
    )
    assert docs(load_texts(str(tmp_path / "nt"))) == ["b"]  # first split when there is no 'train'


def test_dataset_column_errors(tmp_path):
    from datasets import Dataset

    p = tmp_path / "two.jsonl"
    p.write_text(json.dumps({"title": "t", "body": "b", "n": 1}))
    user_error(load_texts, str(p), match=r"several string columns.*title \(string\).*body.*n \(int64\)")
    q = tmp_path / "nums.parquet"
    Dataset.from_dict({"a": [1, 2], "b": [0.5, 1.5]}).to_parquet(str(q))
    user_error(load_texts, str(q), match=r"no string column; columns: a \(int64\), b \(float64\)")
    r = tmp_path / "badtext.jsonl"
    r.write_text(json.dumps({"text": 3, "other": "x"}))
    user_error(load_texts, str(r), match=r"column 'text' is not a string column")
    user_error(load_texts, str(p), text_column="nope", match=r"no string column 'nope'; columns: title")


def test_empty_dataset_errors(tmp_path):
    from datasets import Dataset, Features, Value

    p = tmp_path / "empty.parquet"
    Dataset.from_dict({"text": []}, features=Features({"text": Value("string")})).to_parquet(str(p))
    user_error(load_texts, str(p), match=r"empty \(0 rows\)")
    q = tmp_path / "blank.jsonl"
    q.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  ", None]))
    user_error(load_texts, str(q), match=r"blank\.jsonl contains no text")
    r = tmp_path / "zero.jsonl"
    r.write_text("")
    user_error(load_texts, str(r), match=r"zero\.jsonl is empty \(0 bytes\)")
    d = tmp_path / "ds"
    Dataset.from_dict({"text": []}, features=Features({"text": Value("string")})).save_to_disk(str(d))
    user_error(load_texts, str(d), match=r"saved dataset .* is empty \(0 rows\)")
    from datasets import DatasetDict

    dd = tmp_path / "dd"  # load_from_disk itself fails on the empty split ("list index out of range")
    DatasetDict({"train": Dataset.from_dict({"text": []}, features=Features({"text": Value("string")})),
                 "test": Dataset.from_dict({"text": ["some text"]})}).save_to_disk(str(dd))
    user_error(load_texts, str(dd), match=r"split 'train' is empty \(0 rows\)")


def test_a_json_file_in_another_encoding_is_one_line(tmp_path):
    """datasets accepts a latin-1 jsonl and decodes its strings only when they are read."""
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"text": "café au lait"}\n'.encode("latin-1"))
    user_error(load_texts, str(p), match=r"latin1\.jsonl holds text that is not UTF-8 .*re-encode it as UTF-8")


def test_malformed_json_is_a_user_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{not json\n')
    user_error(load_texts, str(p), match=r"could not read .*bad\.jsonl as json")


# ------------------------------------------------------------------------------------- errors


def test_path_errors(tmp_path):
    user_error(load_texts, str(tmp_path / "missing.txt"), match=r"does not exist: .*missing\.txt")
    user_error(load_texts, "", match="empty calibration text spec")
    (tmp_path / "empty.txt").write_text("")
    user_error(load_texts, str(tmp_path / "empty.txt"), match=r"empty\.txt contains no text")
    (tmp_path / "ws.txt").write_text(" \n\n\t")
    user_error(load_texts, str(tmp_path / "ws.txt"), match=r"contains no text")
    (tmp_path / "nul.dat").write_bytes(b"abc\x00def")
    user_error(load_texts, str(tmp_path / "nul.dat"), match=r"nul\.dat is not a UTF-8 text file")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    user_error(load_texts, str(tmp_path / "latin.txt"), match=r"not a UTF-8 text file")
    (tmp_path / "t.csv").write_text("text\nhello\n")
    user_error(load_texts, str(tmp_path / "t.csv"), match=r"unsupported file extension '\.csv' for calibration text")
    (tmp_path / "emptydir").mkdir()
    user_error(load_texts, str(tmp_path / "emptydir"), match=r"no non-empty UTF-8 text files \(0 files")
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.bin").write_bytes(b"\x00" * 10)
    user_error(load_texts, str(tmp_path / "bins"), match=r"\(1 files, 1 binary\)")


def test_unknown_builtin_lists_valid_names():
    msg = user_error(load_texts, "builtin:wikitext", match=r"unknown builtin text 'builtin:wikitext'")
    for name in builtin_text.BUILTINS:
        assert f"builtin:{name}" in msg


# ------------------------------------------------------------------------------------- builtins


@pytest.fixture(scope="module")
def stdlib_split():
    return builtin_text.code_documents(), builtin_text.prose_documents()


def test_heldout_rule():
    for key in ("json/decoder.py", "pydoc_data/topics/assert", "os.py"):
        expected = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0
        assert builtin_text.is_heldout(key) == expected


def test_builtin_sets_are_disjoint_and_cover_everything(stdlib_split):
    code, prose = stdlib_split
    assert len(code) > 100 and len(prose) > 20
    code_keys, prose_keys = [k for k, _ in code], [k for k, _ in prose]
    assert code_keys == sorted(code_keys) and "json/decoder.py" in code_keys
    assert prose_keys == sorted(prose_keys) and set(code_keys).isdisjoint(prose_keys)
    assert not any(re.search(r"(^|/)(tests?|site-packages|__pycache__)/", k) for k in code_keys)
    assert not any(k.split("/")[-1].startswith("_sysconfigdata") for k in code_keys)
    for corpus, everything in (("code", code), ("prose", prose)):
        calib = load_texts(f"builtin:stdlib-{corpus}")
        held = load_texts(f"builtin:heldout-{corpus}")
        assert set(calib.doc_digests).isdisjoint(held.doc_digests)
        assert calib.n_documents + held.n_documents == len(everything)
        assert sorted(docs(calib) + docs(held)) == sorted(t for _, t in everything)
        assert 0.02 < held.n_documents / len(everything) < 0.25
    both = load_texts("builtin:stdlib")
    assert both.n_documents == load_texts("builtin:stdlib-code").n_documents + load_texts("builtin:stdlib-prose").n_documents
    assert set(both.doc_digests).isdisjoint(load_texts("builtin:heldout").doc_digests)
    assert "Python" in both.description and "calibration part" in both.description
    assert load_texts("builtin:stdlib").text_hash == both.text_hash  # deterministic


# ------------------------------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + (PROSE if i % 2 else CODE) * (3 + i))
    return load_texts(str(d))


def test_windows_shape_determinism_and_metadata(corpus, tokenizer):
    w = make_calibration_windows(corpus, tokenizer, n_samples=8, seq_len=32, seed=0)
    assert isinstance(w, CalibWindows)
    assert w.input_ids.shape == (8, 32) and w.input_ids.dtype == torch.long
    again = make_calibration_windows(corpus, tokenizer, n_samples=8, seq_len=32, seed=0)
    assert torch.equal(w.input_ids, again.input_ids) and w.metadata == again.metadata
    other = make_calibration_windows(corpus, tokenizer, n_samples=8, seq_len=32, seed=1)
    assert not torch.equal(w.input_ids, other.input_ids)
    assert other.metadata["input_ids_sha256"] != w.metadata["input_ids_sha256"]
    m = w.metadata
    assert m["source"] == corpus.description and m["text_hash"] == corpus.text_hash
    assert (m["seed"], m["n_samples"], m["seq_len"]) == (0, 8, 32)
    assert m["token_count"] >= TOKEN_BUDGET_FACTOR * 8 * 32 and not m["windows_overlap"]
    assert m["separator"] == "eos" and m["separator_ids"] == [tokenizer.eos_token_id]
    assert m["input_ids_sha256"] == hashlib.sha256(w.input_ids.numpy().astype("<i8").tobytes()).hexdigest()
    json.dumps(m)
    # non-overlapping windows when the stream is long enough
    rows = {tuple(r) for r in w.input_ids.tolist()}
    assert len(rows) == 8


def test_windows_depend_on_text_not_listing_order(tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    texts = [f"Text {i}: " + PROSE * 2 for i in range(6)]
    for i, t in enumerate(texts):
        (a / f"{i}.txt").write_text(t)
        (b / f"{5 - i}.txt").write_text(t)
    sa, sb = load_texts(str(a)), load_texts(str(b))
    assert docs(sa) != docs(sb) and sa.text_hash == sb.text_hash
    wa = make_calibration_windows(sa, tokenizer, 4, 16, seed=3)
    wb = make_calibration_windows(sb, tokenizer, 4, 16, seed=3)
    assert torch.equal(wa.input_ids, wb.input_ids)


def test_windows_are_contiguous_token_slices(tmp_path, tokenizer):
    p = tmp_path / "one.txt"
    p.write_text(PROSE * 20)
    src = load_texts(str(p))
    ids = tokenizer(PROSE * 20, add_special_tokens=False)["input_ids"]
    w = make_calibration_windows(src, tokenizer, 5, 24, seed=7)
    assert w.metadata["token_count"] == len(ids)
    joined = " " + " ".join(map(str, ids)) + " "
    for row in w.input_ids.tolist():
        assert " " + " ".join(map(str, row)) + " " in joined


def test_short_corpus_overlaps_and_too_short_errors(tmp_path, tokenizer, caplog):
    p = tmp_path / "short.txt"
    p.write_text(PROSE)
    src = load_texts(str(p))
    n_tokens = len(tokenizer(PROSE, add_special_tokens=False)["input_ids"])
    with caplog.at_level("WARNING", logger="moecompress"):
        w = make_calibration_windows(src, tokenizer, n_samples=10, seq_len=n_tokens // 2, seed=0)
    assert w.input_ids.shape == (10, n_tokens // 2) and w.metadata["windows_overlap"]
    assert f"gives {n_tokens} tokens: room for 2 distinct windows of {n_tokens // 2} tokens, so 8 of the 10" \
        in caplog.text
    assert w.metadata["token_count"] == n_tokens
    user_error(
        make_calibration_windows, src, tokenizer, 1, n_tokens + 1, 0,
        match=rf"only {n_tokens} tokens, fewer than one window of seq_len={n_tokens + 1}",
    )


def test_bad_window_arguments(corpus, tokenizer):
    user_error(make_calibration_windows, corpus, tokenizer, 0, 16, 0, match=r"n_samples must be >= 1, got 0")
    user_error(make_calibration_windows, corpus, tokenizer, -3, 16, 0, match=r"n_samples must be >= 1")
    user_error(make_calibration_windows, corpus, tokenizer, 4, 0, 0, match=r"seq_len must be >= 1, got 0")
    user_error(make_calibration_windows, corpus, tokenizer, 4, 16.0, 0, match=r"seq_len must be an integer")


def test_raw_tokenizers_tokenizer_uses_blank_line_separator(corpus, tokenizer):
    raw = tokenizer.backend_tokenizer
    w = make_calibration_windows(corpus, raw, 4, 16, seed=0)
    assert w.input_ids.shape == (4, 16)
    assert w.metadata["separator"] == "\\n\\n"
    assert w.metadata["separator_ids"] == tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def test_builtin_stdlib_is_tokenized_lazily(tokenizer):
    src = load_texts("builtin:stdlib")
    w = make_calibration_windows(src, tokenizer, n_samples=16, seq_len=64, seed=0)
    m = w.metadata
    assert w.input_ids.shape == (16, 64)
    assert m["units_tokenized"] < m["units_total"] // 10
    assert TOKEN_BUDGET_FACTOR * 16 * 64 <= m["token_count"] < TOKEN_BUDGET_FACTOR * 16 * 64 + CHUNK_CHARS * 4
    assert torch.equal(w.input_ids, make_calibration_windows(src, tokenizer, 16, 64, seed=0).input_ids)


def test_specs_stamp_follows_the_text_the_loader_reads(tmp_path, monkeypatch):
    """What `run` compares to redo a step: a text file edited changes it; hidden files (a git checkout's .git,
    an editor's swap file), which the loader skips, do not; builtin text depends on the Python, not the venv."""
    import sys

    from moecompress.calib.specs import specs_stamp

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n" * 50)
    before = specs_stamp(str(folder))
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_bytes(b"\0" * 64)
    (folder / ".a.txt.swp").write_bytes(b"swap")
    assert specs_stamp(str(folder)) == before
    (folder / "a.txt").write_text("other text\n" * 50)
    assert specs_stamp(str(folder)) != before
    assert specs_stamp(str(tmp_path / "missing.txt")) != specs_stamp(str(folder))
    builtin = specs_stamp("builtin:heldout-code")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    assert specs_stamp("builtin:heldout-code") == builtin
