"""rmsnorm (Triton) against rmsnorm_torch, with and without the fused residual add."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from moecompress.kernels.testing import assert_close, ensure_interpreter  # noqa: E402

DEVICE = ensure_interpreter()

from moecompress.kernels.rmsnorm import rmsnorm, rmsnorm_torch  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.mark.parametrize("shape", [(1, 72), (7, 128), (33, 100), (2, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm(gen, shape, dtype, residual):
    x = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    r = torch.randn(*shape, generator=gen).to(dtype) if residual else None
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    got = rmsnorm(x.to(DEVICE), w.to(DEVICE), 1e-5, residual=None if r is None else r.to(DEVICE), out=out)
    ref = rmsnorm_torch(x, w, 1e-5, residual=r)
    if residual:
        assert_close(got[0], ref[0].float(), TOL[dtype], "rmsnorm(x + r)")
        if DEVICE == "cpu" and dtype == torch.bfloat16:
            # the triton 3.9 interpreter truncates fp32 -> bf16 instead of rounding to nearest even:
            # allow one bf16 ulp there (compiled kernels must match exactly)
            ulp = ref[1].float().abs() * 2.0**-7
            assert ((got[1].float() - ref[1].float()).abs() <= ulp).all(), "residual sum off by more than 1 ulp"
        else:
            assert torch.equal(got[1].cpu(), ref[1]), "residual sum must be exactly the rounded x + r"
    else:
        assert got.data_ptr() == out.data_ptr()
        assert_close(got, ref.float(), TOL[dtype], "rmsnorm")


def test_matches_hf_formula(gen):
    x = torch.randn(5, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    hf = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert_close(rmsnorm(x.to(DEVICE), w.to(DEVICE)), hf, 1e-5, "vs HF")
