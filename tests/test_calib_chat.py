"""Conversation datasets as calibration / evaluation text: rendered with the model's chat template."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from conftest import quick_config, run_cli
from moecompress.calib.chat import chat_renderer, plain
from moecompress.calib.data import load_texts, make_calibration_windows
from moecompress.errors import UserError

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [
    {"id": "a", "messages": [{"role": "user", "content": "What does zip() do?"},
                             {"role": "assistant", "content": "It pairs items of several iterables."}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]},
    {"id": "c", "messages": []},  # an empty conversation is dropped, like a blank text
]


@pytest.fixture
def tokenizer():
    from moecompress.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversations_become_one_templated_document_each(tmp_path, tokenizer, caplog):
    spec = str(_jsonl(tmp_path / "chat.jsonl", CHATS))
    with caplog.at_level(logging.INFO, logger="moecompress"):
        src = load_texts(spec, chat=chat_renderer(tokenizer))
    assert list(src.documents) == [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in CHATS[:2]]
    assert src.documents[0] == "<|user|>\nWhat does zip() do?<|end|>\n<|assistant|>\nIt pairs items of several " \
                               "iterables.<|end|>\n"
    assert "column 'messages' (conversations)" in src.description and "2 conversations rendered" in caplog.text
    # the string column 'id' is not taken for the text, and the rendering is part of the text's hash
    no_template = load_texts(spec)
    assert no_template.documents[1] == "system: Be brief.\nuser: 2+2?\nassistant: 4"
    assert no_template.text_hash != src.text_hash
    w = make_calibration_windows(src, tokenizer, 4, 16, 0)
    assert tuple(w.input_ids.shape) == (4, 16)


def test_sharegpt_turns_and_a_text_column_wins(tmp_path, tokenizer):
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello"}]}]
    src = load_texts(str(_jsonl(tmp_path / "s.jsonl", sharegpt)), chat=chat_renderer(tokenizer))
    assert src.documents[0] == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}], tokenize=False)
    both = [dict(r, text=f"plain text {i}") for i, r in enumerate(CHATS)]
    src = load_texts(str(_jsonl(tmp_path / "b.jsonl", both)), chat=chat_renderer(tokenizer))
    assert list(src.documents) == ["plain text 0", "plain text 1", "plain text 2"]


def test_tool_calls_text_parts_and_turns_of_different_keys(tmp_path, tokenizer):
    """Turns with different keys make datasets type the column List(Json): still conversations, never the 'id'
    column; a tool-calling turn without content, text parts of a multimodal turn, and the turns' other keys
    reach the template."""
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% if m.tool_calls %}[calls {{ m.tool_calls[0].function.name }}]{% endif %}"
                               "{% if m.reasoning_content %}[thought {{ m.reasoning_content }}]{% endif %}{% endfor %}")
    rows = [{"id": "x", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "tool", "content": "42", "name": "f"}]},
        {"id": "y", "messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]},
                                 {"role": "assistant", "content": "ok", "reasoning_content": "hmm"}]}]
    src = load_texts(str(_jsonl(tmp_path / "t.jsonl", rows)), chat=chat_renderer(tokenizer))
    assert list(src.documents) == ["<|user|>Hi<|assistant|>[calls f]<|tool|>42",
                                   "<|user|>Look<|assistant|>ok[thought hmm]"]


def test_conversations_after_many_empty_rows_are_found(tmp_path, tokenizer):
    """A column that opens with more empty conversations than the type check looks at is still conversations."""
    rows = [{"messages": []} for _ in range(40)] + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tool_calls": [
            {"type": "function", "function": {"name": "f"}}]}]},
        {"messages": [{"role": "user", "content": "hello there"}]}]
    src = load_texts(str(_jsonl(tmp_path / "late.jsonl", rows)))
    assert list(src.documents) == ["user: hi\nassistant: yo", "user: hello there"]


def test_a_broken_conversation_is_one_line(tmp_path, tokenizer):
    rows = [CHATS[0], {"messages": [{"content": "who said this?"}]}]
    with pytest.raises(UserError, match=r"row 1: every turn needs a role"):
        load_texts(str(_jsonl(tmp_path / "x.jsonl", rows)), chat=chat_renderer(tokenizer))
    odd = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "oracle", "value": "yo"}]}]
    with pytest.raises(UserError, match=r"row 0: ShareGPT turn from 'oracle' is not a role this knows"):
        load_texts(str(_jsonl(tmp_path / "o.jsonl", odd)))
    odd[0]["conversations"][1]["from"] = "chatgpt"
    assert list(load_texts(str(_jsonl(tmp_path / "c.jsonl", odd))).documents) == ["user: hi\nassistant: yo"]
    with pytest.raises(UserError, match=r"column 'messages' holds neither text nor conversations"):
        load_texts(str(_jsonl(tmp_path / "n.jsonl", [{"id": "a", "messages": [1, 2]}])))
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match=r"row 0: the chat template refused the conversation: .*roles must alternate"):
        load_texts(str(_jsonl(tmp_path / "y.jsonl", CHATS)), chat=chat_renderer(tokenizer))
    assert plain([{"role": "user", "content": "x"}]) == "user: x"
    assert chat_renderer(None) is None


def test_quantize_and_eval_calibrate_on_the_models_chat_template(tiny_ckpt, tmp_path, capsys):
    """The model folder's own template (tokenizer_config.json) renders `--calib` conversations."""
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt("qwen3_moe"), model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = _jsonl(tmp_path / "chat.jsonl", CHATS[:2] * 20)
    from moecompress.pipeline import quantize

    summary = quantize(model, tmp_path / "q", quick_config(method="gptq", calib=str(data), calib_samples=4, seq_len=32))
    assert "(conversations)" in summary["calibration"]["source"]
    # rendered with the folder's template, not as plain lines
    from transformers import AutoTokenizer

    templated = load_texts(str(data), chat=chat_renderer(AutoTokenizer.from_pretrained(model)))
    assert summary["calibration"]["text_hash"] == templated.text_hash != load_texts(str(data)).text_hash
    rc, err = run_cli(capsys, "eval", tmp_path / "q", "--reference", model, "--data", data, "--samples", 2,
                      "--seq-len", 32, "--json", tmp_path / "e.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["data"]["chat"]["windows"] == 2


def test_a_column_is_chosen_after_the_path(tmp_path, tokenizer, capsys, tiny_ckpt):
    """PATH#COLUMN picks the text column (the only way to choose one from the command line or a recipe)."""
    pr = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "Write a haiku", "response": "Autumn moonlight falls"},
                                        {"prompt": "Say hi", "response": "Hi!"}])
    with pytest.raises(UserError, match=r"several string columns .* name one after the path: PATH#prompt"):
        load_texts(str(pr))
    assert list(load_texts(f"{pr}#response").documents) == ["Autumn moonlight falls", "Hi!"]
    with pytest.raises(UserError, match=r"no string column 'nope'"):
        load_texts(f"{pr}#nope")
    from moecompress.evals.data import dataset_name

    assert (dataset_name(f"{pr}#response"), dataset_name(str(pr)), dataset_name(f"{tmp_path}/#x")) == (
        "pr-response", "pr", f"{tmp_path.name}-x")
    chats = _jsonl(tmp_path / "c.jsonl", [dict(r, text="plain") for r in CHATS])
    assert list(load_texts(f"{chats}#messages", chat=chat_renderer(tokenizer)).documents) == [
        tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in CHATS[:2]]
    text = tmp_path / "notes.txt"
    text.write_text("some text")
    with pytest.raises(UserError, match=r"a column \(#x\) can only be chosen in a dataset file or folder"):
        load_texts(f"{text}#x")
    # and from the command line, as --calib
    rc, err = run_cli(capsys, "quantize", tiny_ckpt("qwen3_moe"), "--out", tmp_path / "q", "--calib", f"{pr}#response",
                      "--calib-samples", 2, "--seq-len", 16, "--group-size", 32)
    assert rc == 0, err
    assert "column 'response'" in json.loads((tmp_path / "q" / "moecompress.json").read_text())["calibration"]["source"]
