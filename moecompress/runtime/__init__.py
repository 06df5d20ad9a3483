"""Built-in inference runtime: our MoE blocks and kernels inside transformers' layers, own KV cache and loop."""

from .bench import benchmark
from .generate import GenerationResult, Runtime
from .sampling import SamplingParams

__all__ = ["GenerationResult", "Runtime", "SamplingParams", "benchmark"]
