"""The batch loader: each step's rows drawn ahead by `train.loader_workers` processes, exactly.

Why it stays exact: the rows of step s are a pure function of (seed, rank, s) and the checkpointed real-data
cursor (pipeline/data.py `StepRows`), so who draws them, when, and in which process cannot change them. Worker w
of N draws steps first + w, first + w + N, ...; torch's DataLoader hands their outputs back round-robin, i.e. in
step order. Batch s is bit-identical with 0, 1 or 4 workers, and a resumed run restarts the loader at its step
with the saved cursor (tests/test_loader.py). With no workers, `train.prefetch` > 0 draws on one thread instead.

Workers hand their rows over through one shared-memory arena mapped before they fork (pipeline/batch_arena.py):
only offsets cross the queue, so taking a batch costs the step ~no time. The first batch after a (re)start is
drawn in the training process and sizes the arena. On CUDA the arena is page-locked and rows are copied to the
device on a side stream, so the copy of the next batch overlaps the step; the teacher solves a batch needs then
run in the training process (`Method.complete`, pipeline/teacher_solves.py). A worker that dies or fails is an
error naming the step, never a hang (torch checks its workers every few seconds while the step waits).
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batch_arena import BatchArena, SlotCounter, tree_nbytes
from pipeline.errors import UserError


class LoaderError(RuntimeError):
    """A loader worker died or failed; the message names the step whose batch it was drawing."""


class StepRange(IterableDataset):
    """(s, draw(s) packed into `arena`) for steps first..last-1, the steps split round-robin over the
    DataLoader's workers, each worker `depth` batches ahead (its rows read into its arena slots)."""

    def __init__(self, draw: Callable[[int], dict], first: int, last: int, arena: BatchArena):
        self.draw, self.first, self.last, self.arena = draw, first, last, arena

    def __iter__(self):
        from pipeline import shard_reader

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)          # a worker reads rows; the training process keeps the cores' math
        if info is not None:
            self.arena.enter(worker)
            shard_reader.ARENA = self.arena
        for step in range(self.first + worker, self.last, workers):
            self.arena.next_batch()
            with torch.no_grad():
                rows = self.draw(step)
            yield step, self.arena.pack(rows)


def to_device(tree: Any, device: torch.device, used_on=None, copy: bool = False) -> Any:
    """Tensors of a (nested) batch on `device`, floating ones as float32 (rows may come in the store's float16);
    on CUDA non-blocking (from page-locked memory: asynchronous), in the current stream, each recorded as used on
    stream `used_on` (the step's; the caller makes it wait for the copy). With `copy` no output is its input
    tensor (rows viewing the batch arena, whose slot is refilled a few batches later)."""
    if isinstance(tree, dict):
        return {k: to_device(v, device, used_on, copy) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device, used_on, copy) for v in tree)
    if not isinstance(tree, torch.Tensor):
        return tree
    t = tree.to(device, non_blocking=device.type == "cuda")
    t = t.float() if t.is_floating_point() else t
    if copy and t is tree:
        t = t.clone()
    if used_on is not None:               # allocated on the side stream, used on the step's
        t.record_stream(used_on)
    return t


def worker_message(exc: BaseException) -> str:
    """The original message of an error re-raised from a worker (torch puts the worker's traceback first)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    head, sep, rest = last.partition(": ")
    if sep and "Traceback" in str(exc) and " " not in head:     # "module.ErrorType: message"
        last = rest
    return last[:300]


class BatchLoader:
    """Hands out step s's rows on the device for s = first, first + 1, ... (in order), drawn ahead.

    `workers` > 0: a DataLoader over `StepRange` with that many processes, each `depth` batches ahead;
    `workers` = 0, `depth` > 0: one thread `depth` batches ahead; both 0: drawn inside `next`.
    `wait_seconds`: the time the steps spent waiting for their rows (with nothing ahead, the draw itself)."""

    def __init__(self, draw: Callable[[int], dict], device, workers: int, depth: int, last_step: int,
                 timeout_s: float = 0.0):
        self.draw, self.device = draw, torch.device(device)
        self.workers, self.depth, self.last_step = workers, depth, last_step
        self.timeout_s = timeout_s
        self.wait_seconds = 0.0
        self._next_step: int | None = None          # the step the running pipeline hands out next
        self._first = 0                             # the step it started at (worker w draws first + w + kN)
        self._iter = None                           # workers: the DataLoader's iterator
        self._arena: BatchArena | None = None       # workers: the shared memory their batches arrive in
        self._first_rows: tuple[int, dict] | None = None    # workers: the batch drawn here at a (re)start
        self._copied = None                         # CUDA: the event of the last copy out of the arena
        self._pending: deque[tuple[int, Future]] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if workers == 0 and depth > 0 else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------ the pipeline
    def _start(self, step: int) -> None:
        self.discard()
        first = step
        if self.workers > 0:
            depth = max(1, self.depth)
            rows, need = self._drawn_counted(step)  # drawn here: what it reads and holds sizes the arena
            self._first_rows, first = (step, rows), step + 1
            if self._arena is None or need > self._arena.slot_bytes:
                self._release_arena()
                self._arena = BatchArena.for_batch(need, depth + 2, self.workers)
            self._arena.release()                   # the workers fork with the arena not page-locked
            if step + 1 < self.last_step:
                loader = DataLoader(StepRange(self.draw, step + 1, self.last_step, self._arena), batch_size=None,
                                    num_workers=self.workers, prefetch_factor=depth,
                                    multiprocessing_context="fork", timeout=self.timeout_s,
                                    generator=torch.Generator().manual_seed(0))
                # (an explicit generator: the DataLoader's base seed must not consume the global RNG)
                self._iter = iter(loader)
            if self.device.type == "cuda":
                self._arena.pin(self.device)
        self._next_step, self._first = step, first     # last: a start that failed is redone by the next call

    def _drawn_counted(self, step: int) -> tuple[dict, int]:
        """Step `step`'s rows drawn here, and the slot bytes a worker needs for them: what the draw reads into
        its slot (`shard_reader.empty`, intermediates included) plus the batch's tensors (a bound)."""
        from pipeline import shard_reader

        counter, before = SlotCounter(), shard_reader.ARENA
        shard_reader.ARENA = counter
        try:
            rows = self._drawn(step)
        finally:
            shard_reader.ARENA = before
        return rows, counter.used + tree_nbytes(rows)

    def _fill(self, upto: int) -> None:
        nxt = self._next_step + len(self._pending)
        while nxt <= upto and (nxt < self.last_step or not self._pending):
            self._pending.append((nxt, self._pool.submit(self._drawn, nxt)))
            nxt += 1

    def _drawn(self, step: int) -> dict:
        with torch.no_grad():
            return self.draw(step)

    def _rows(self, step: int) -> dict:
        if self._first_rows is not None and self._first_rows[0] == step:
            rows, self._first_rows = self._first_rows[1], None
            return rows
        if self._iter is not None:
            try:
                got, rows = next(self._iter)
            except StopIteration:
                raise LoaderError(f"batch loader: no batch for step {step + 1} (it ends at step "
                                  f"{self.last_step})") from None
            except UserError as exc:
                raise UserError(f"step {step + 1}: {worker_message(exc)}") from None
            except Exception as exc:  # noqa: BLE001  (a worker died or raised: name the step, never hang)
                raise LoaderError(f"batch loader: {self._failed_worker(step)} the batch of step "
                                  f"{self._owed_step(step) + 1} ({type(exc).__name__}: {worker_message(exc)})") from exc
            if got != step:
                raise LoaderError(f"batch loader handed out step {got + 1} for step {step + 1}")
            return self._arena.unpack(rows)
        if self._pool is not None:
            self._fill(step + self.depth)
            got, future = self._pending.popleft()
            if got != step:
                raise LoaderError(f"batch loader handed out step {got + 1} for step {step + 1}")
            return future.result()
        return self._drawn(step)

    def rows(self, step: int) -> dict:
        """Step `step`'s rows as drawn (CPU, in the store's dtypes), the wait for them counted in wait_seconds; a
        step out of sequence restarts the pipeline there. From workers they are views of the batch arena, valid
        until rows of a later step are asked for (`next` copies them)."""
        t0 = time.perf_counter()
        if self._next_step != step:
            self._start(step)
        rows = self._rows(step)
        self._next_step = step + 1
        self.wait_seconds += time.perf_counter() - t0
        return rows

    def _dead_worker(self) -> int | None:
        workers = getattr(self._iter, "_workers", [])
        return next((i for i, w in enumerate(workers) if not w.is_alive()), None)

    def _failed_worker(self, step: int) -> str:
        dead = self._dead_worker()
        return "a worker failed while drawing" if dead is None else f"worker {dead} died while drawing"

    def _owed_step(self, step: int) -> int:
        """The step a dead worker was drawing: its first step not yet handed out (torch may notice the death
        while the loop waits for another worker's batch)."""
        dead = self._dead_worker()
        if dead is None:
            return step
        return step + (dead - (step - self._first)) % self.workers

    def next(self, step: int) -> dict:
        """Step `step`'s rows on the device, float32. Rows cross processes in the store's dtype (float16: half of
        float32's bytes); the copy and the cast are the device's work (on the CPU, the step's), not waiting."""
        self._wait_copied()                 # the last copy out of the arena is done before its slot can refill
        rows = self.rows(step)
        if self._stream is not None:
            step_stream = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._stream):
                out = to_device(rows, self.device, step_stream, copy=self.workers > 0)
                self._copied = torch.cuda.Event()
                self._copied.record(self._stream)
            step_stream.wait_stream(self._stream)
        else:
            out = to_device(rows, self.device, copy=self.workers > 0)
        return out

    def _wait_copied(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def discard(self) -> None:
        """Drop what was drawn ahead and stop the workers (a resume restarts at its own step)."""
        self._wait_copied()
        while self._pending:
            _, future = self._pending.popleft()
            future.cancel()
            try:
                future.result()
            except BaseException:       # a cancelled or failed draw that will never be used
                pass
        if self._iter is not None:
            workers = list(getattr(self._iter, "_workers", []))
            self._iter._shutdown_workers()
            for w in workers:               # none may still write the arena a restart reuses
                if w.is_alive():
                    w.kill()
                w.join(timeout=5)
            self._iter = None
        self._next_step, self._first_rows = None, None

    def _release_arena(self) -> None:
        if self._arena is not None:
            self._wait_copied()
            self._arena.release()
            self._arena = None

    def close(self) -> None:
        self.discard()
        self._release_arena()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
