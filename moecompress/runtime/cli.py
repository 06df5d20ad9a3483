"""``moecompress generate``: tokenize a prompt, run the runtime, print the continuation and its speed."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.reader import read_config
from ..errors import UserError
from ..devices import resolve_device
from .generate import GenerationResult, Runtime
from .sampling import SamplingParams


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    # without its files transformers 5 builds an empty tokenizer of the model type instead of failing
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{model_dir}: no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model_dir}: no usable tokenizer ({first})") from None


def generate_text(model_dir: str, prompt: str, max_new_tokens: int, *, greedy: bool, temperature: float,
                  top_p: float, seed: int, device: str, dtype: str,
                  cpu_weights: str = "packed", offload: dict | None = None) -> tuple[str, GenerationResult]:
    """(decoded continuation, result); every input problem is a UserError raised before any loading."""
    path = Path(model_dir)
    read_config(path)  # a folder with a readable config.json (before the tokenizer is looked for)
    if not prompt:
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    greedy = greedy or temperature == 0  # vLLM's and OpenAI's spelling of greedy decoding
    SamplingParams(greedy, temperature, top_p, seed)  # validates
    resolve_device(device)
    tokenizer = load_tokenizer(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError("the prompt encodes to no tokens")
    rt = Runtime.load(path, device=device, dtype=dtype, cpu_weights=cpu_weights, offload=offload)
    rt.warmup(ids.shape[0], ids.shape[1], ids.shape[1] + max_new_tokens)
    result = rt.generate(ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed)
    return tokenizer.decode(result.tokens[0], skip_special_tokens=True), result


def offload_placement(model_dir: str, spec: str, vram: str | None, load_json: str | None,
                      device: str, context: int = 4096) -> dict[int, list[int]]:
    """``--offload-experts auto|N`` as ``{moe layer: experts kept on the device}`` (``runtime.plan``)."""
    from ..units import parse_size
    from .plan import load_from_eval, model_parts, plan

    if not device.startswith("cuda"):
        raise UserError("--offload-experts splits experts between a GPU and the CPU: it needs --device cuda "
                        "(on a CPU everything already runs from host memory)")
    if spec != "auto" and not (spec.isascii() and spec.isdigit()):
        raise UserError(f"--offload-experts {spec!r}: 'auto' or a number of experts per layer")
    if spec != "auto" and vram is not None:
        raise UserError("--vram only applies with --offload-experts auto (a number of experts per layer says "
                        "what stays on the GPU)")
    parts = model_parts(model_dir, stored=True)  # as the runtime holds it: a float checkpoint's experts in float
    load = load_from_eval(load_json, parts) if load_json else None
    if spec == "auto":
        if vram is None:
            raise UserError("--offload-experts auto needs --vram (the GPU memory to fill)")
        return plan(parts, parse_size(vram, "--vram", memory=True), context=context, load=load, context_option=None).on_gpu
    n = int(spec)
    out = {}
    for layer, sizes in parts.experts.items():
        row = (load or {}).get(layer) or [1.0] * len(sizes)
        out[layer] = sorted(sorted(range(len(sizes)), key=lambda e: -row[e])[:n])
    return out


def speed_line(r: GenerationResult) -> str:
    decode = (f"{r.decode_tokens_per_s:.1f} tokens/s ({r.decode_steps} tokens)" if r.decode_steps
              else "n/a (one token)")
    graph = ", CUDA graph" if r.cuda_graph else ""
    return f"prefill {r.prefill_tokens_per_s:.1f} tokens/s ({r.prompt_len} tokens), decode {decode}{graph}"
