"""The lm-eval adapter: exact scores from our loaded model, and local tasks run through `evaluate`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from moecompress.checkpoint.load import load_model  # noqa: E402
from moecompress.evals.evaluate import evaluate  # noqa: E402
from moecompress.evals.lm_eval_adapter import make_lm  # noqa: E402

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0,
     "text": "def add(a, b):\n    return a + b\n"},
    {"question": "Two plus two equals", "choices": [" four", " purple"], "answer": 0,
     "text": "The quick brown fox jumps over the lazy dog."},
    {"question": "Water is", "choices": [" wet", " dry"], "answer": 1, "text": "import os\nprint(os.getcwd())\n"},
]


def _tasks(folder):
    folder.mkdir()
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: tiny_mc\n" + head + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        "task: tiny_ppl\n" + head + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: tiny_gen\n" + head + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen3_moe")


@pytest.fixture(scope="module")
def lm(qwen):
    from transformers import AutoTokenizer

    _, model = load_model(qwen)
    return make_lm(model, AutoTokenizer.from_pretrained(str(qwen)), batch_size=2)


def _req(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def _direct_logprobs(lm, ids):
    logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits, -1)


def test_loglikelihood_matches_a_direct_forward(lm):
    ctx, cont = "The capital of France is", " Paris"
    (score, greedy), = lm.loglikelihood([_req(ctx, cont)], disable_tqdm=True)
    ids_ctx, ids_all = lm.tok_encode(ctx), lm.tok_encode(ctx + cont)
    logp = _direct_logprobs(lm, ids_all[:-1])
    expect = sum(float(logp[t - 1, ids_all[t]]) for t in range(len(ids_ctx), len(ids_all)))
    assert score == pytest.approx(expect, rel=1e-5)
    assert greedy == all(int(logp[t - 1].argmax()) == ids_all[t] for t in range(len(ids_ctx), len(ids_all)))


def test_loglikelihood_rolling_matches_a_direct_forward(lm):
    text = "import os\nprint(os.getcwd())\n"
    (score,) = lm.loglikelihood_rolling([_req(text)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tok_encode(text)  # every token scored, the first after the prefix
    logp = _direct_logprobs(lm, ids[:-1])
    assert score == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), rel=1e-5)


def test_generate_until_is_greedy(lm):
    (text,) = lm.generate_until([_req("Water is", {"until": ["\n"], "max_gen_toks": 5})], disable_tqdm=True)
    ids = lm.tok_encode("Water is")
    for _ in range(5):
        ids.append(int(_direct_logprobs(lm, ids)[-1].argmax()))
    assert text == lm.tok_decode(ids[-5:]).split("\n")[0]


def test_tasks_run_through_evaluate(qwen, tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    r = evaluate(qwen, qwen, samples=2, seq_len=16, batch_size=2, tasks="tiny_mc,tiny_ppl,tiny_gen",
                 tasks_path=str(tasks))
    res = r["lm_eval"]["results"]
    assert set(res) == {"tiny_mc", "tiny_ppl", "tiny_gen"}
    assert 0.0 <= res["tiny_mc"]["acc,none"] <= 1.0
    assert res["tiny_ppl"]["bits_per_byte,none"] > 0 and "exact_match,none" in res["tiny_gen"]
    assert r["settings"]["tasks"] == ["tiny_mc", "tiny_ppl", "tiny_gen"]
    json.dumps(r, allow_nan=False)
