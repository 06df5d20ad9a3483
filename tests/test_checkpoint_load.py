"""load_model reads plain and quantized checkpoints into the same model transformers builds."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, quick_config
from moecompress.checkpoint.dequant import write_dequantized
from moecompress.checkpoint.load import load_model
from moecompress.cli import main
from moecompress.pipeline import quantize


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))


# in-memory: save_pretrained(save_original_format=False) names (``mlp.``, fused experts), read as well
@pytest.mark.parametrize("layout", [{}, {"original_format": False}], ids=["default", "in-memory"])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_checkpoint_matches_transformers(tiny_ckpt, family, layout):
    src = tiny_ckpt(family, **layout)
    _, ours = load_model(src)
    with torch.no_grad():
        rel = _rel(ours(IDS).logits, _hf(src)(IDS).logits)
    assert rel < 1e-6, f"{family}: load_model vs from_pretrained, relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "qwen3_moe"])
def test_low_precision_load_keeps_what_transformers_keeps_in_fp32(tiny_ckpt, family, dtype):
    """An fp32 checkpoint loaded in bf16/fp16: DeepSeek/GLM routers (``_keep_in_fp32_modules_strict``) stay fp32
    in our model as in transformers', so both choose the same experts; every other tensor takes the dtype."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    src = tiny_ckpt(family)
    _, ours = load_model(src, dtype)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, experts_implementation="eager").eval()
    theirs = dict(hf.named_parameters()) | dict(hf.named_buffers())
    mine = dict(ours.named_parameters()) | dict(ours.named_buffers())
    kept = {n for n, t in theirs.items() if t.is_floating_point() and t.dtype == torch.float32}
    assert {n for n, t in mine.items() if t.is_floating_point() and t.dtype == torch.float32} == kept
    # transformers 5.25 keeps DeepSeek's routers in fp32 (5.17 does not): then so do we
    declared = "gate.weight" in (getattr(hf, "_keep_in_fp32_modules_strict", None) or ())
    assert any(n.endswith("mlp.gate.weight") for n in kept) == declared
    assert declared or family == "qwen3_moe" or Version(transformers.__version__) < Version("5.25")
    ids = {}
    for name, model in (("ours", ours), ("theirs", hf)):
        seen = []
        hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out[-1].detach()))
                 for n, m in model.named_modules() if n.endswith("mlp.gate")]
        with torch.no_grad():
            model(IDS)
        for h in hooks:
            h.remove()
        ids[name] = [t.sort(dim=-1).values for t in seen]
    assert all(torch.equal(a, b) for a, b in zip(ids["ours"], ids["theirs"])) and ids["ours"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen3_5_moe", "qwen3_next"])
def test_quantized_checkpoint_matches_dequantized_twin(tiny_ckpt, tmp_path, family, fmt):
    src = tiny_ckpt(family)
    out = tmp_path / "q"
    quantize(src, out, quick_config(bits=4, format=fmt, method="rtn"))
    _, ours = load_model(out)
    twin = _hf(write_dequantized(out, tmp_path / "deq"))
    _, float_src = load_model(src)
    with torch.no_grad():
        a, b, c = ours(IDS).logits, twin(IDS).logits, float_src(IDS).logits
    assert _rel(a, b) < 1e-6, f"{family}/{fmt}: load_model vs dequantized twin {_rel(a, b):.2e}"
    assert _rel(a, c) > 1e-4, "the quantized model must differ from its float source"


def test_quantize_refuses_a_quantized_source(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, quick_config(bits=4, method="rtn"))
    rc = main(["quantize", str(out), "--out", str(tmp_path / "qq"), "--method", "rtn", "--group-size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "already quantized" in err and "Traceback" not in err
    assert not (tmp_path / "qq").exists()
