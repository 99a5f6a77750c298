"""Batches drawn ahead of the step on a background thread (`train.prefetch`), deterministically.

Why it stays exact: a batch is drawn only from the *batch stream* (DataSource's generator and real-data
cursor, and the teacher solves a batch needs), which nothing but the drawing thread touches; the step's own
random draws use the method generator. One worker thread draws batches in step order, so batch s is the
same with prefetch 0, 1 or 4. A checkpoint saves the batch stream as it was *before* the oldest batch not yet
handed to a step; a resumed run redraws exactly the batches that were pending (docs/precision.md).
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


class BatchPrefetcher:
    """Hands out `draw(step)` for steps 0, 1, ... in order, up to `depth` of them prepared ahead.

    `get_state()` / `set_state(state)` read and restore the batch stream; `last_step` bounds what is drawn
    (no batch past the end of training). `wait_seconds`: the time steps spent waiting for their batch
    (with depth 0, the data reads inside the draw, as DataSource counts them)."""

    def __init__(self, draw: Callable[[int], dict], get_state: Callable[[], Any], set_state: Callable[[Any], None],
                 depth: int, last_step: int, read_seconds: Callable[[], float]):
        self._draw, self._get_state, self._set_state = draw, get_state, set_state
        self.depth, self.last_step = depth, last_step
        self._read_seconds = read_seconds
        self._pending: deque[tuple[int, Future]] = deque()
        self._next = 0                  # the next step whose batch is not yet drawn or pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if depth > 0 else None
        self.wait_seconds = 0.0

    def _drawn(self, step: int):
        """(stream state before this batch, the batch): runs on the worker thread, or inline with depth 0."""
        state = self._get_state()
        with torch.no_grad():           # grad mode is per thread
            return state, self._draw(step)

    def next(self, step: int) -> dict:
        """The batch of `step` (which must follow the previous one), topping up the batches drawn ahead."""
        if self._pool is None:
            r0 = self._read_seconds()
            _, batch = self._drawn(step)
            self.wait_seconds += self._read_seconds() - r0
            self._next = step + 1
            return batch
        if not self._pending:           # the first batch, or the first after a resume
            self._next = step
        self._fill(step + self.depth)
        pending_step, future = self._pending.popleft()
        if pending_step != step:
            raise RuntimeError(f"prefetcher holds the batch of step {pending_step}, step {step} asked for it")
        t0 = time.perf_counter()
        _, batch = future.result()
        self.wait_seconds += time.perf_counter() - t0
        return batch

    def _fill(self, upto: int) -> None:
        """Queue the draws of steps up to `upto` (one worker thread: they run in step order)."""
        while self._next <= upto and (self._next < self.last_step or not self._pending):
            self._pending.append((self._next, self._pool.submit(self._drawn, self._next)))
            self._next += 1

    def state_dict(self) -> Any:
        """The batch stream before the oldest pending batch (or now, when none is pending)."""
        if self._pending:
            return self._pending[0][1].result()[0]
        return self._get_state()

    def load_state_dict(self, state: Any) -> None:
        self.discard()
        self._set_state(state)

    def discard(self) -> None:
        """Drop the batches drawn ahead (waiting for the one being drawn, so nothing races the stream)."""
        while self._pending:
            _, future = self._pending.popleft()
            future.cancel()
            try:
                future.result()
            except BaseException:       # a cancelled or failed draw that will never be used
                pass
        self._next = 0

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
