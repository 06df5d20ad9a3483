"""The reference model as the evaluator drives it: live, live and recorded into the cache, or replayed.

:func:`open_reference` returns an object with the interface the evaluator already uses --
``forward(ids)`` of :class:`WholeModel`, or ``embed / run_layer / load_head / window_logits /
release`` of :class:`StreamedModel` -- so the evaluation loops are the same with and without a
cache. Batches are replayed in the order they were recorded (the cache key pins the windows and
the batch size, so the order is the same).

A replay loads only the reference's ``lm_head`` (:class:`HeadOnly`); no decoder layer of the
reference is loaded or run.
"""

from __future__ import annotations

import torch

from .collect import HeadOnly, StreamedModel, WholeModel
from .ref_cache import Record, ReferenceCache, Replay
from .routing_metrics import RouterOut


class RecordingWhole(WholeModel):
    """A :class:`WholeModel` that records its ``lm_head`` inputs and routing, batch by batch."""

    def __init__(self, path, device, dtype, record: Record):
        super().__init__(path, device, dtype)
        self.record, self._batch = record, 0

    def forward(self, ids: torch.Tensor, keep_head_input: bool = True):
        logits, routes = super().forward(ids, keep_head_input=True)
        b, self._batch = self._batch, self._batch + 1
        x = self.head_input
        # the cache recomputes logits as lm_head(x): refuse a family that does anything after lm_head
        if b == 0 and (x is None or not torch.equal(self.head(x), logits)):
            self.record.drop("this model's logits are not lm_head(final hidden states), so they cannot be replayed")
        if x is not None:
            self.record.add_head(b, 0, x)
        for i, r in routes.items():
            self.record.add_route(i, b, r)
        return logits, routes


class RecordingStreamed(StreamedModel):
    """A :class:`StreamedModel` that records its routing layer by layer and ``lm_head`` inputs per window."""

    def __init__(self, path, device, dtype, record: Record):
        super().__init__(path, device, dtype)
        self.record = record

    def run_layer(self, i: int):
        routes = super().run_layer(i)
        for b, r in enumerate(routes or []):
            self.record.add_route(i, b, r)
        return routes

    def window_logits(self, b: int, w: int) -> torch.Tensor:
        x = self.window_head_input(b, w)
        self.record.add_head(b, w, x)
        return self.head(x)


class ReplayWhole:
    """Stands in for the reference's :class:`WholeModel`: the b-th ``forward`` replays batch b."""

    def __init__(self, replay: Replay, path, device, dtype):
        self.replay, self.device = replay, torch.device(device)
        self.moe_layers = replay.moe_layers
        self.lm_head = HeadOnly(path, self.device, dtype)
        self._batch = 0

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, RouterOut]]:
        b, self._batch = self._batch, self._batch + 1
        _check_batch(self.replay, b, ids)
        logits = self.lm_head.head(self.replay.head_input(b, self.device))
        return logits, {i: self.replay.route(i, b, self.device) for i in self.moe_layers}


class ReplayStreamed:
    """Stands in for the reference's :class:`StreamedModel`: each layer's routing and each window's logits."""

    def __init__(self, replay: Replay, path, device, dtype):
        self.replay, self.path, self.device, self.dtype = replay, path, torch.device(device), dtype
        self.moe_layers, self.num_layers = replay.moe_layers, replay.num_layers
        self.lm_head: HeadOnly | None = None

    def embed(self, batches: list[torch.Tensor]) -> None:
        for b, ids in enumerate(batches):
            _check_batch(self.replay, b, ids)

    def run_layer(self, i: int) -> list[RouterOut] | None:
        if i not in self.moe_layers:
            return None
        return [self.replay.route(i, b, self.device) for b in range(len(self.replay.batch_windows))]

    def load_head(self) -> None:
        self.lm_head = HeadOnly(self.path, self.device, self.dtype)

    def window_logits(self, b: int, w: int) -> torch.Tensor:
        return self.lm_head.head(self.replay.head_input(b, self.device, w, 1))

    def release(self) -> None:
        self.lm_head = None


def _check_batch(replay: Replay, b: int, ids: torch.Tensor) -> None:
    if b >= len(replay.batch_windows) or ids.shape[0] != replay.batch_windows[b]:
        raise RuntimeError(f"reference cache: batch {b} of {ids.shape[0]} windows does not match the recorded "
                           f"batches {replay.batch_windows}")


def open_reference(reference_dir, device, dtype, low_memory: bool, cache: ReferenceCache | None):
    """``(reference, record)``: a replay on a cache hit (record None), else the live reference, recording
    into ``record`` when there is a cache."""
    replay = cache.load() if cache is not None else None
    if replay is not None:
        return (ReplayStreamed if low_memory else ReplayWhole)(replay, reference_dir, device, dtype), None
    if cache is None:
        return (StreamedModel if low_memory else WholeModel)(reference_dir, device, dtype), None
    record = cache.record()
    return (RecordingStreamed if low_memory else RecordingWhole)(reference_dir, device, dtype, record), record
