"""Tile config lookup: fallback chain, merging, and the shipped JSON files."""

import json

import pytest

from moecompress.kernels import tuning


@pytest.fixture
def tmp_configs(tmp_path, monkeypatch):
    (tmp_path / "op.json").write_text(json.dumps({
        "default": {"default": {"A": 1, "B": 1, "C": 1}, "int4": {"B": 2}, "int4:t16": {"C": 3}},
        "GPU X": {"default": {"A": 10}, "int4:t16": {"B": 20, "_note": "comment"}},
    }))
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning._load.cache_clear()
    yield
    tuning._load.cache_clear()


def test_fallback_and_merge(tmp_configs):
    assert tuning.get_config("op", "cpu", "dense:t1") == {"A": 1, "B": 1, "C": 1}
    assert tuning.get_config("op", "cpu", "int4:t64") == {"A": 1, "B": 2, "C": 1}
    assert tuning.get_config("op", "cpu", "int4:t16") == {"A": 1, "B": 2, "C": 3}
    assert tuning.get_config("op", "GPU X", "int4:t16") == {"A": 10, "B": 20, "C": 3}
    assert tuning.get_config("op", "GPU X", "int8:t16") == {"A": 10, "B": 1, "C": 1}
    assert tuning.get_config("missing", "GPU X", "k") == {}
    cfg = tuning.get_config("op", "cpu", "")
    cfg["A"] = 99
    assert tuning.get_config("op", "cpu", "")["A"] == 1, "callers get a fresh dict"


def test_token_bucket():
    assert [tuning.token_bucket(t) for t in (1, 2, 16, 17, 1024, 5000)] == ["t1", "t16", "t16", "t64", "t1024", "tmax"]


@pytest.mark.parametrize("op,keys", [
    ("fused_moe", ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")),
    ("quant_linear", ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps")),
    ("routing", ("BLOCK_T", "num_warps")),
    ("rmsnorm", ("num_warps",)),
])
@pytest.mark.parametrize("device", ["cpu", "NVIDIA H200", "Some Unknown GPU"])
def test_shipped_configs_complete(op, keys, device):
    for key in ("dense:t1", "int4:t16", "int8:tmax", "e64", "h4096"):
        cfg = tuning.get_config(op, device, key)
        missing = [k for k in keys if k not in cfg]
        assert not missing, f"{op}/{device}/{key} lacks {missing}"
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            if k in cfg:
                assert cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0
