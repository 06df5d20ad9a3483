"""The one-launch Triton moe_align against the torch version (bit for bit), and fused_moe with it."""

from __future__ import annotations

import pytest
import torch

from moecompress.kernels import _common
from moecompress.kernels.moe_align import moe_align_block_size
from moecompress.kernels.moe_align_triton import moe_align_block_size_triton

pytestmark = pytest.mark.skipif(not (_common.interpreting() or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or a GPU")
DEVICE = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"


@pytest.mark.parametrize("t,k,e,z", [(1, 8, 128, 0), (1, 8, 128, 8), (7, 3, 8, 3), (33, 4, 8, 0), (4, 8, 64, 4),
                                     (32, 8, 128, 0), (1, 2, 8, 2), (3, 2, 8, 6)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_same_as_the_torch_version(t, k, e, z, block_m):
    ids = torch.randint(0, e + z, (t, k), generator=torch.Generator().manual_seed(t * 131 + k * 7 + z),
                        dtype=torch.int32).to(DEVICE)
    if z and t == 3:
        ids[:] = e  # every slot on a zero expert: no blocks at all
    a, b = moe_align_block_size(ids, block_m, e), moe_align_block_size_triton(ids, block_m, e)
    for f in ("sorted_ids", "expert_ids", "num_tokens_post_padded", "counts"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.num_blocks, a.num_slots, a.block_m) == (b.num_blocks, b.num_slots, b.block_m)


def test_large_inputs_take_the_torch_version():
    ids = torch.zeros(300, 1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(moe_align_block_size_triton(ids, 16, 8).sorted_ids, moe_align_block_size(ids, 16, 8).sorted_ids)


def test_fused_moe_with_the_triton_align(monkeypatch):
    from moecompress.kernels.fused_moe import fused_moe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(DEVICE)
    w13 = (torch.randn(8, 64, 64, generator=g) * 0.1).to(DEVICE)
    w2 = (torch.randn(8, 64, 32, generator=g) * 0.1).to(DEVICE)
    w = torch.rand(5, 2, generator=g).to(DEVICE)
    ids = torch.randint(0, 10, (5, 2), generator=g, dtype=torch.int32).to(DEVICE)  # 8, 9: zero experts
    ref = fused_moe(x, w13, w2, w, ids)
    monkeypatch.setenv("MOECOMPRESS_TRITON_ALIGN", "1")
    assert torch.equal(fused_moe(x, w13, w2, w, ids), ref)
