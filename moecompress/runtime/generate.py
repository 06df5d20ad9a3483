"""The runtime: load a checkpoint once, then generate (prefill, decode loop, sampling, stop tokens).

``Runtime.load(path, device, dtype)`` builds the converted model (:mod:`.convert`); ``generate``
prefills the prompt in one forward, then decodes one token per step against the static KV cache --
eagerly on the CPU, through a captured CUDA graph on the GPU (falling back to eager, with a
warning, if a model cannot be captured). Prompts of one batch share their length (no padding).
Throughput is measured around the prefill and around the decode loop, with a device sync at each
end; the first generated token comes from the prefill's logits and is not counted as decode.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import UserError
from .cache import KVCache
from .convert import ConversionReport, load_runtime_model
from .graphs import DecodeGraph
from .model import RuntimeModel
from .sampling import SamplingParams, sample

log = logging.getLogger("moecompress.runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_ROUND = 256  # cache lengths are rounded up so consecutive generations reuse one cache (and graph)


@dataclass
class GenerationResult:
    """Generated tokens per sequence (up to and including a stop token) and the measured speeds."""

    tokens: list[list[int]]
    batch: int
    prompt_len: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    cuda_graph: bool
    logits: list[torch.Tensor] | None = None  # fp32 [B, V] per step, when asked for

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.batch * self.decode_steps / self.decode_s if self.decode_steps else None


def default_stop_ids(path: str | Path, config) -> list[int]:
    """eos ids of generation_config.json when the checkpoint has one (as transformers does), else config's."""
    gen = Path(path) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class Runtime:
    """A loaded model ready to generate. Build with :meth:`load`."""

    def __init__(self, model: RuntimeModel, device: torch.device, dtype: torch.dtype, use_kernels: bool,
                 cuda_graph: bool, stop_ids: list[int], family: str, report: ConversionReport) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.use_kernels = use_kernels
        self.cuda_graph = cuda_graph
        self.stop_ids = stop_ids
        self.family = family
        self.report = report
        self._cache: KVCache | None = None
        self._graph: DecodeGraph | None = None
        self._arange = torch.arange(0, device=device)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
             kernels: bool | None = None, cuda_graph: bool = True, cpu_weights: str = "packed",
             offload: dict[int, list[int]] | None = None) -> "Runtime":
        """Load ``path`` (plain HF, compressed-tensors or GPTQ). ``dtype="auto"``: fp32 on CPU, the
        checkpoint's float dtype on CUDA. ``kernels``: Triton kernels (default: on CUDA only). ``cpu_weights``
        (CPU): "packed" (``runtime.cpu_packed``), "exact" (packed, fp32 math) or "dequantized" (fp32 at load).
        ``offload``: per MoE layer, the experts kept on ``device``; the rest run on the CPU (``runtime.offload``)."""
        from ..kernels import _common

        dev = resolve_device(device)
        if not Path(path).is_dir():
            raise UserError(f"{path} is not a directory")
        use_kernels = dev.type == "cuda" if kernels is None else kernels
        if use_kernels and not _common.can_launch(torch.empty(0, device=dev)):
            raise UserError("Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
        handle, lm, report = load_runtime_model(path, dev, _resolve_dtype(dtype, dev), use_kernels, cpu_weights,
                                                offload)
        # a step that reaches host-memory experts syncs with the host: no CUDA graphs then
        graphs = cuda_graph and dev.type == "cuda" and not report.offloaded_experts
        return cls(RuntimeModel(lm), dev, report.dtype, use_kernels, graphs,
                   default_stop_ids(path, handle.text_config), handle.family, report)

    # ------------------------------------------------------------------ forward helpers
    def _positions(self, start: int, stop: int) -> torch.Tensor:
        if self._arange.numel() < stop:
            self._arange = torch.arange(max(stop, 2 * self._arange.numel()), device=self.device)
        return self._arange[start:stop]

    def _cache_for(self, batch: int, total: int) -> KVCache:
        limit = self.model.max_positions
        if limit is not None and total > limit:
            raise UserError(f"prompt plus new tokens is {total} tokens, more than the model's "
                            f"max_position_embeddings ({limit}); shorten the prompt or lower --max-new-tokens")
        c = self._cache
        if c is None or c.batch != batch or c.max_len < total:
            length = -(-total // _CACHE_ROUND) * _CACHE_ROUND
            self._cache = KVCache(len(self.model.layers), batch, length)
            self._graph = None
        return self._cache

    def warmup(self, batch: int, prompt_len: int, total_len: int) -> None:
        """Pay first-call costs (and capture the CUDA graph) before a measured ``generate`` of ``batch``
        prompts of ``prompt_len`` tokens reaching ``total_len``: a two-token generation on the same cache."""
        self._cache_for(batch, total_len)
        # two tokens (a decode step too), or one where only one fits: a request at the position limit stays legal
        self.generate(torch.zeros(batch, prompt_len, dtype=torch.long), max(1, min(2, total_len - prompt_len)),
                      stop_ids=[])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, L, V]`` of every position, one forward without a cache (for evaluation)."""
        ids = self._ids(input_ids)
        return self.model.forward(ids, self._positions(0, ids.shape[1]), None, None, last_only=False)

    def _ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UserError(f"input_ids must be [batch, length] with length >= 1, got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.model.vocab_size:
            raise UserError(f"token ids must lie in [0, {self.model.vocab_size})")
        return ids.to(self.device)

    def _decode(self, cache: KVCache, tok: torch.Tensor, pos: int) -> torch.Tensor:
        positions = self._positions(pos, pos + 1)
        if not self.cuda_graph:
            return self.model.forward(tok, positions, cache, pos + 1)
        if self._graph is None:
            def step(ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                return self.model.forward(ids, p, cache, None)

            # the capture's warm-up steps advance linear-attention states (key/value writes are
            # idempotent): put them back so the first replay is the real step
            saved = cache.snapshot_states()
            try:
                self._graph = DecodeGraph(step, tok, positions)
                cache.restore_states(saved)
            except Exception as e:  # a module that syncs with the host cannot be captured: decode eagerly
                log.warning("runtime: CUDA-graph capture failed (%s); decoding without graphs", e)
                self.cuda_graph = False
                cache.restore_states(saved)
                return self.model.forward(tok, positions, cache, pos + 1)
        return self._graph.run(tok, positions)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, *, greedy: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: list[int] | None = None,
                 keep_logits: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` per sequence of ``input_ids [B, L]`` (or ``[L]``).

        ``stop_ids`` (default: the checkpoint's eos ids; ``[]`` for none) end a sequence; generation
        stops when every sequence has. ``keep_logits`` keeps each step's fp32 logits.
        """
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        params = SamplingParams(greedy, temperature, top_p, seed)
        stops = self.stop_ids if stop_ids is None else list(stop_ids)
        ids = self._ids(input_ids)
        batch, length = ids.shape
        cache = self._cache_for(batch, length + max_new_tokens)
        gen = params.generator(self.device)
        stop_t = torch.tensor(stops, dtype=torch.long, device=self.device)
        kept: list[torch.Tensor] = []

        self._sync()
        t0 = time.perf_counter()
        logits = self.model.forward(ids, self._positions(0, length), cache, length)
        if not bool(torch.isfinite(logits).all()):  # else sampling fails or greedy prints garbage
            raise UserError(f"NaN/Inf logits after the prompt (NaN/Inf weights in the checkpoint, or an overflow in "
                            f"{str(self.dtype).replace('torch.', '')})")
        tok = sample(logits, params, gen)
        self._sync()
        t1 = time.perf_counter()
        if keep_logits:
            kept.append(logits.clone())
        out = [tok]
        finished = torch.isin(tok, stop_t)
        for step in range(1, max_new_tokens):
            if stops and bool(finished.all()):
                break
            logits = self._decode(cache, tok[:, None], length + step - 1)
            tok = sample(logits, params, gen)
            if keep_logits:
                kept.append(logits.clone())
            out.append(tok)
            if stops:
                finished |= torch.isin(tok, stop_t)
        self._sync()
        t2 = time.perf_counter()
        return GenerationResult(
            tokens=[_until_stop(row, stops) for row in torch.stack(out, dim=1).tolist()],
            batch=batch, prompt_len=length, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(out) - 1,
            cuda_graph=self.cuda_graph, logits=kept if keep_logits else None,
        )


def _until_stop(row: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype | None:
    """A torch dtype, or None for the checkpoint's own float dtype ("auto" on CUDA)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else None
    if dtype not in _DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(_DTYPES)}, not '{dtype}'")
    return _DTYPES[dtype]
