"""The streaming safetensors writer: files the reference reader validates and reads back exactly,
shards split at the size limit, and no tensor kept in memory after it was added."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moecompress.checkpoint.safetensors_stream import StreamingSafetensors
from moecompress.checkpoint.writer import ShardedWriter


def _tensors(gen):
    base = torch.randn(6, 10, generator=gen)
    return {
        "a.f32": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, 9, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(4, generator=gen).half(),
        "d.i32": torch.randint(-2**31, 2**31 - 1, (2, 3, 4), generator=gen, dtype=torch.int32),
        "e.u8": torch.randint(0, 256, (33,), generator=gen, dtype=torch.uint8),
        "f.bool": torch.rand(5, generator=gen) > 0.5,
        "g.scalar": torch.tensor(3.25),
        "h.empty": torch.zeros(0, 4),
        "i.view": base[:, 2:7],            # a non-contiguous view
        "j.shares": base[1],               # shares storage with the view's base
        "k.i64": torch.arange(11, dtype=torch.int64) * -3,
    }


def test_stream_file_reads_back_exactly_through_safetensors(tmp_path, gen):
    ts = _tensors(gen)
    f = StreamingSafetensors(tmp_path / "x.safetensors")
    for k, v in ts.items():
        f.add(k, v)
    f.finish({"format": "pt"})
    assert not (tmp_path / "x.safetensors.data").exists()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == ts.keys()
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    with safe_open(tmp_path / "x.safetensors", "pt") as g:
        assert g.metadata() == {"format": "pt"}
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_sharded_writer_splits_at_the_limit_and_indexes(tmp_path, gen):
    ts = {f"t{i}": torch.randn(64, generator=gen) for i in range(10)}  # 256 bytes each
    w = ShardedWriter(tmp_path, max_shard_bytes=600)  # two tensors per shard
    for k, v in ts.items():
        w.add(k, v)
    names = w.close()
    assert names == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 256 == w.total_bytes
    for k, v in ts.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][k])[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["model.safetensors.index.json"])
    with pytest.raises(RuntimeError, match="twice"):
        w.add("t3", ts["t3"])


def test_sharded_writer_keeps_no_tensor_in_memory(tmp_path):
    """Each tensor is on disk once added (its bytes in the shard's spill file), and the writer holds
    no tensor: the old writer kept a whole shard in a dict until it flushed."""
    w = ShardedWriter(tmp_path)  # 4 GiB shards: everything below goes into one
    t = torch.randn(4 << 20)  # 16 MiB
    w.add("t", t)
    spill = tmp_path / ".shard-00000.safetensors.data"
    assert spill.stat().st_size == t.numel() * 4, "the tensor's bytes are not on disk yet"
    held = [v for v in vars(w).values() if isinstance(v, (torch.Tensor, dict)) and v]
    assert not any(isinstance(v, torch.Tensor) or any(isinstance(x, torch.Tensor) for x in v.values())
                   for v in held), "the writer still holds tensors"
    assert w.close() == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)
    assert not spill.exists()


def test_sharded_writer_abort_removes_spill_files(tmp_path):
    w = ShardedWriter(tmp_path)
    w.add("t", torch.ones(10))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_is_readable_like_any_folder(tmp_path):
    import os
    import stat

    from moecompress.checkpoint.writer import atomic_output_dir

    umask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o755, oct(mode)  # mkdtemp's 0700 would hide the checkpoint from a server's user
