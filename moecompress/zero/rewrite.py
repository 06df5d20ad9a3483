"""Stream a checkpoint into a new folder, one decoder layer at a time, changing some tensors.

What ``zero-experts add``, ``convert`` and ``baseline`` share: every tensor is read from the
source shards and written to the output (atomically: a temporary sibling renamed at the end),
with each decoder layer's tensors passed through a function first; the config, side files
(tokenizer...) and a ``moecompress.json`` record go beside them. Peak memory is one layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..arch.handle import ModelHandle, decoder_layers
from ..checkpoint.writer import ShardedWriter, atomic_output_dir, check_output_path, copy_side_files
from ..errors import UserError

LayerFn = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def rewrite_checkpoint(handle: ModelHandle, out_dir: str | Path, config: dict, layer_fn: LayerFn, record: dict,
                       overwrite: bool = False, desc: str = "layers", max_shard_bytes: int = 4 << 30,
                       extra_files: dict[str, bytes] | None = None) -> dict:
    """Write ``handle``'s checkpoint to ``out_dir`` with ``layer_fn(i, {stored name: tensor})`` applied
    to each decoder layer (it returns the tensors to write, by output name); ``extra_files``: more files
    for the folder (logs, plots). Returns the record written."""
    out_dir = Path(out_dir)
    check_output_path(handle.reader.path, out_dir, overwrite)
    layers = decoder_layers(handle.skeleton())
    for i, layer in enumerate(layers):  # a checkpoint missing tensors is refused before anything is written
        missing = handle.missing_tensors(i, layer)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"{handle.reader.path}: tensor '{missing[0]}'{more} is missing from the shards")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for i in tqdm(range(handle.num_layers), desc=desc, unit="layer"):
            tensors = {n: _finite(n, handle.reader.get(n)) for n in handle.layer_tensor_names(i)}
            for name, t in layer_fn(i, tensors).items():
                writer.add(name, t)
        for name in handle.non_layer_tensor_names():
            writer.add(name, _finite(name, handle.reader.get(name)))
        record = dict(record, shards=writer.close(), size_bytes=writer.total_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(handle.reader.path, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / "moecompress.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, refused (one line) if it holds NaN/Inf: nothing useful is derived from such a checkpoint."""
    from ..finite import check_finite

    check_finite(t, name, t.dtype, t.dtype)
    return t
