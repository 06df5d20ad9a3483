"""moe_align_block_size against a plain-Python reference: per-expert order, padding, zero experts."""

import zlib

import pytest
import torch

from moecompress.kernels.moe_align import moe_align_block_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(ids: torch.Tensor, block_m: int, e: int):
    flat = ids.reshape(-1).tolist()
    s = len(flat)
    sorted_ids, expert_ids = [], []
    for ex in range(e):
        slots = [i for i, v in enumerate(flat) if v == ex]
        if not slots:
            continue
        n = -(-len(slots) // block_m) * block_m
        sorted_ids += slots + [s] * (n - len(slots))
        expert_ids += [ex] * (n // block_m)
    return sorted_ids, expert_ids


@pytest.mark.parametrize("t,k", [(1, 2), (7, 3), (33, 4), (0, 2)])
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("zero_experts", [0, 3])
def test_matches_reference(t, k, block_m, zero_experts):
    e = 8
    g = torch.Generator().manual_seed(zlib.crc32(f"{t}-{k}-{block_m}-{zero_experts}".encode()))
    ids = torch.randint(0, e + zero_experts, (t, k), generator=g, dtype=torch.int32)
    if t:
        ids[0, 0] = 5  # make sure some expert gets several
        ids[-1, -1] = 5
        ids[(ids == 2)] = 3  # and one expert gets none
    al = moe_align_block_size(ids.to(DEVICE), block_m, e)
    ref_sorted, ref_experts = _reference(ids, block_m, e)
    n = int(al.num_tokens_post_padded.item())
    assert n == len(ref_sorted)
    assert al.sorted_ids.dtype == torch.int32 and al.expert_ids.dtype == torch.int32
    assert al.sorted_ids[:n].cpu().tolist() == ref_sorted
    assert al.expert_ids[: n // block_m].cpu().tolist() == ref_experts
    assert (al.expert_ids[n // block_m:] == -1).all()
    assert (al.sorted_ids[n:] == t * k).all(), "unused rows must hold the padding sentinel"
    assert al.sorted_ids.numel() == al.num_blocks * block_m
    counts = torch.bincount(ids[(ids < e)].long(), minlength=e)
    assert al.counts.cpu().tolist() == counts.tolist()


def test_all_slots_on_zero_experts():
    ids = torch.tensor([[8, 9], [9, 8], [10, 8]], dtype=torch.int32, device=DEVICE)
    al = moe_align_block_size(ids, 16, 8)
    assert int(al.num_tokens_post_padded.item()) == 0
    assert (al.expert_ids == -1).all() and (al.sorted_ids == 6).all()


def test_negative_ids_dropped():
    ids = torch.tensor([[-1, 0], [1, -1]], dtype=torch.int64, device=DEVICE)
    al = moe_align_block_size(ids, 16, 4)
    assert int(al.num_tokens_post_padded.item()) == 32
    assert al.sorted_ids[:32].cpu().tolist() == [1] + [4] * 15 + [2] + [4] * 15
    assert al.expert_ids[:2].cpu().tolist() == [0, 1]
