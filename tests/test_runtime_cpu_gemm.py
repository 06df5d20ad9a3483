"""Many rows through a packed CPU linear (runtime.cpu_gemm): the weight dequantized to bf16 once, one GEMM."""

from __future__ import annotations

import pytest
import torch

from moecompress.runtime import cpu_gemm
from moecompress.runtime.cpu_packed import HAS_INT4, HAS_INT8, CpuQuantLinear

from test_runtime_cpu_packed import _rel, _weights

needs_layout = pytest.mark.skipif(not (HAS_INT4 and cpu_gemm.int4pack_layout_known()),
                                  reason="this torch/CPU lays int4pack weights out otherwise (kernel only)")
needs_fast_bf16 = pytest.mark.skipif(not cpu_gemm.bf16_gemm_is_fast(), reason="no native bf16 GEMM on this CPU")


@pytest.fixture
def always(monkeypatch):
    """The dequantizing way for any weight size and row count above 1 (the defaults keep small weights and
    few rows on the kernel)."""
    monkeypatch.setattr(cpu_gemm, "DEQUANT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(cpu_gemm, "DEQUANT_ROWS", 2)


@needs_layout
@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (128, 256, 64), (192, 512, 128), (64, 512, 256)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_expanded_int4_weight_is_the_kernels_own(n, k, group, symmetric):
    """``W^T`` read out of the int4pack layout equals, bit for bit, what the kernel multiplies by (its product
    with the identity); the codes read back are the codes packed."""
    q, s, z, _, _ = _weights(n, k, 4, group, symmetric, seed=n + k)
    lin = CpuQuantLinear(q, s, z, 4, group, symmetric=symmetric)
    assert lin.kind == "int4pack"
    codes = cpu_gemm.int4pack_codes_t(lin.packed, n, k, torch.empty(k, n, dtype=torch.uint8))
    assert torch.equal(codes.t(), q)
    wt = cpu_gemm.int4pack_weight_t(lin.packed, lin.sz, n, k, group)
    eye = torch.eye(k, dtype=torch.bfloat16)
    assert torch.equal(wt, lin._packed_mm(eye))


@needs_fast_bf16
@pytest.mark.parametrize("tokens", [2, 97, 130])
@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 32, True, False), (4, 128, False, False), (4, 64, False, True), (8, 256, True, False), (8, 64, True, False),
    (8, 64, False, False)])
def test_many_rows_match_the_kernel_and_the_dequantized_weight(always, tokens, bits, group, symmetric, act_order):
    if bits == 4 and not (HAS_INT4 and cpu_gemm.int4pack_layout_known()):
        pytest.skip("int4pack layout not the one read here")
    if bits == 8 and not HAS_INT8:
        pytest.skip("this torch has no CPU int8 kernel")
    n, k = 128, 256
    q, s, z, g_idx, w = _weights(n, k, bits, group, symmetric, act_order, seed=tokens)
    bias = torch.randn(n)
    lin = CpuQuantLinear(q, s, z, bits, group, g_idx, bias, symmetric=symmetric)
    assert lin.kind == ("int4pack" if bits == 4 else "int8pack" if group == k and symmetric else "int8group")
    assert lin._dequant_ok
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1))
    y = lin(x)
    ref = x @ w.T + bias
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-2  # bf16 activations and weights, fp32 accumulation
    kernel = lin._packed_mm((x[:, lin.perm] if lin.perm is not None else x).bfloat16().contiguous()).float() + bias
    assert _rel(y, kernel) < 1e-2
    # the weight is expanded into a reused scratch buffer: what dequant_mm returns must not be a view of it
    other = CpuQuantLinear(*_weights(n, k, bits, group, symmetric, seed=99)[:3], bits, group, symmetric=symmetric)
    xb = x.bfloat16()
    first = cpu_gemm.dequant_mm(lin.kind, xb if lin.perm is None else xb[:, lin.perm].contiguous(), lin.packed,
                                group, lin.sz)
    kept = first.clone()
    cpu_gemm.dequant_mm(other.kind, xb, other.packed, group, other.sz)
    assert torch.equal(first, kept)
    assert torch.equal(lin(x), y)


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no CPU int4 kernel")
def test_few_rows_small_weights_and_odd_shapes_stay_on_the_kernel(monkeypatch):
    q, s, z, _, _ = _weights(64, 128, 4, 32, True)
    assert not CpuQuantLinear(q, s, z, 4, 32, symmetric=True)._dequant_ok  # 8K weights: below the minimum
    monkeypatch.setattr(cpu_gemm, "DEQUANT_MIN_WEIGHTS", 0)
    q, s, z, _, _ = _weights(48, 128, 4, 32, True)  # 48 rows: not whole 64-row blocks of the layout
    assert not cpu_gemm.dequant_rows_ok("int4pack", 48, 128)
    lin = CpuQuantLinear(q, s, z, 4, 32, symmetric=True)
    assert lin.kind == "int4pack" and not lin._dequant_ok
    assert not cpu_gemm.dequant_rows_ok("codes", 128, 128)
    # below DEQUANT_ROWS the kernel runs, whatever the size
    calls = []
    monkeypatch.setattr(cpu_gemm, "dequant_mm", lambda kind, x2, packed, group, sz, zq=None: calls.append(kind)
                        or torch.zeros(x2.shape[0], packed.shape[0], dtype=torch.bfloat16))
    q, s, z, _, _ = _weights(128, 128, 4, 32, True)
    lin = CpuQuantLinear(q, s, z, 4, 32, symmetric=True)
    lin(torch.randn(cpu_gemm.DEQUANT_ROWS - 1, 128))
    assert not calls
    if lin._dequant_ok:
        lin(torch.randn(cpu_gemm.DEQUANT_ROWS, 128))
        assert len(calls) == 1
        lin(torch.randn(cpu_gemm.DEQUANT_ROWS, 128, requires_grad=True))  # autograd: the kernel
        assert len(calls) == 1


@needs_layout
@needs_fast_bf16
def test_inference_mode_first_then_threads(always):
    """The scratch buffer first made under inference mode still serves calls outside it; two threads
    expanding different weights at once each get their own product."""
    import threading

    lins = [CpuQuantLinear(*_weights(128, 512, 4, 64, False, seed=s)[:3], 4, 64) for s in (1, 2)]
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(3))
    cpu_gemm._SCRATCH.bufs.clear()
    with torch.inference_mode():
        want = [lin(x) for lin in lins]
    with torch.no_grad():
        assert all(torch.equal(lin(x), w) for lin, w in zip(lins, want))
    bad = []

    def work(lin, w):
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(lin(x), w):
                    bad.append(1)

    threads = [threading.Thread(target=work, args=(lin, w)) for lin, w in zip(lins, want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@needs_layout
@needs_fast_bf16
def test_a_long_prompt_gives_the_kernel_paths_tokens(always, tiny_ckpt, tmp_path, monkeypatch):
    """A quantized tiny model (every linear on the dequantizing way) decodes the same greedy tokens after a
    100-token prompt as with the kernels alone."""
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config
    from moecompress.runtime import Runtime

    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, build_config(method="rtn", bits=4, group_size=32, measure_errors=False))
    ids = torch.randint(0, 200, (1, 100), generator=torch.Generator().manual_seed(0))
    rt = Runtime.load(out, device="cpu", dtype="float32")
    assert any(getattr(m, "_dequant_ok", False) for m in rt.model.lm.modules())
    many = rt.generate(ids, 8, stop_ids=[])
    monkeypatch.setattr(cpu_gemm, "DEQUANT_ROWS", 10 ** 9)
    kernel = rt.generate(ids, 8, stop_ids=[])
    assert many.tokens == kernel.tokens


@pytest.mark.parametrize("m", [1, 63, 64, 200, 256, 300, 577])
def test_rows_go_through_the_gemm_in_a_few_shapes(m, monkeypatch):
    """Row chunks of GEMM_CHUNK, the last padded to a multiple of GEMM_PAD: the same product, and only those
    shapes reach ``torch.mm`` (the GEMM library keeps a kernel per shape)."""
    x = torch.randn(m, 96).bfloat16()
    wt = torch.randn(96, 80).bfloat16()
    shapes, mm = set(), torch.mm

    def spy(a, b, **kw):
        shapes.add(tuple(a.shape))
        return mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    y = cpu_gemm.rows_mm(x, wt)
    assert y.shape == (m, 80)
    torch.testing.assert_close(y.float(), x.float() @ wt.float(), rtol=2e-2, atol=2e-2)
    assert all(r == cpu_gemm.GEMM_CHUNK or r % cpu_gemm.GEMM_PAD == 0 for r, _ in shapes), shapes
