"""One shared-memory arena through which loader workers hand batches to the training process.

Why: torch sends a tensor between processes by passing its shared-memory file descriptor over a fresh socket
connection (multiprocessing's resource_sharer, with its authentication handshake), ~0.5 ms per tensor on this
machine's CPU, paid by the training process while it waits: 10 tensors a batch made 4-6 ms of every step, 2-5% of
an emulated 250 or 100 ms GPU step (bench/loader_bench.py). The arena is one shared buffer made by the training
process *before* the workers fork, so every worker already has it mapped: a worker reads its rows straight into a
slot of it (pipeline/shard_reader.py `empty`), copies any other tensor of the batch in, and sends only
`ArenaRef`s (offset, dtype, shape); the training process turns them back into views of its own mapping. Nothing
but a few small tuples crosses the queue.

Layout: `workers` x `slots` slots of `slot_bytes`; worker w's batch j lives in slot (w, j mod slots), so a slot is
reused `slots` batches later. Safe when slots > that worker's batches in flight + 1 (pipeline/loader.py uses
prefetch + 2): worker w draws its batch j only after the training process took its batch j - prefetch (torch's
DataLoader hands a worker one new task per batch taken), by which time every step before that one has moved its
rows out of the arena (`BatchLoader.next`: a CPU clone, or a device copy it waits for before taking more).

Slots are sized by the first batch, drawn in the training process with a `SlotCounter` counting what the draw
reads (pipeline/loader.py). A batch larger than its slot still arrives whole: the tensors that do not fit travel
torch's usual way (a view of the arena is cloned first: sharing it would move this worker's whole arena).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

ALIGN = 64          # bytes: every tensor in a slot starts on a cache line (and any dtype's alignment)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(tuple(int(d) for d in shape)).numel() * dtype.itemsize


def tree_nbytes(tree) -> int:
    """Slot bytes a batch needs: its tensors, each aligned."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(v) for v in tree)
    return _aligned(tree.numel() * tree.element_size()) if isinstance(tree, torch.Tensor) else 0


@dataclass(frozen=True)
class ArenaRef:
    """A contiguous tensor at byte `offset` of the arena."""
    offset: int
    dtype: torch.dtype
    shape: tuple


class BatchArena:
    """The arena (see the module docstring). Made in the training process; `enter(worker)` in a worker."""

    def __init__(self, slot_bytes: int, slots: int, workers: int):
        self.slot_bytes, self.slots, self.workers = _aligned(max(ALIGN, slot_bytes)), slots, workers
        # Anonymous shared memory, inherited by the forked workers: not a file in /dev/shm, whose size a container
        # caps (64 MiB by default in Docker) below one SD3 batch.
        self._map = mmap.mmap(-1, self.slot_bytes * slots * workers, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self._base = self.buffer.data_ptr()
        self.worker, self.batch, self.used = -1, -1, 0      # worker side: the slot being filled
        self.pinned = False

    @classmethod
    def for_batch(cls, need: int, slots: int, workers: int) -> "BatchArena":
        """An arena whose slots hold `need` bytes (SlotCounter) with room to spare (1/8, at least 64 KiB)."""
        return cls(need + max(need // 8, 64 << 10), slots, workers)

    # ------------------------------------------------------------ in a worker
    def enter(self, worker: int) -> None:
        self.worker, self.batch, self.used = worker, -1, 0

    def next_batch(self) -> None:
        """Start filling this worker's next slot."""
        self.batch += 1
        self.used = 0

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """A contiguous tensor in the current slot, or None when the slot is full."""
        shape = tuple(int(d) for d in shape)
        nbytes = _nbytes(shape, dtype)
        if self.worker < 0 or self.used + nbytes > self.slot_bytes:
            return None
        start = (self.worker * self.slots + self.batch % self.slots) * self.slot_bytes + self.used
        self.used += _aligned(nbytes)
        return self.buffer[start:start + nbytes].view(dtype).view(shape)

    def _ref(self, t: torch.Tensor):
        if t.numel() == 0:                # no bytes: any offset names it
            return ArenaRef(0, t.dtype, tuple(t.shape))
        inside = t.untyped_storage().data_ptr() == self._base
        if inside and t.is_contiguous():
            return ArenaRef(t.data_ptr() - self._base, t.dtype, tuple(t.shape))
        into = self.take(t.shape, t.dtype)
        if into is None:                  # no room: torch's usual way, never for a view of the arena itself
            return t.clone() if inside else t     # (torch would move the whole arena into a new shared file)
        into.copy_(t)
        return ArenaRef(into.data_ptr() - self._base, t.dtype, tuple(t.shape))

    def pack(self, tree):
        """`tree` with every tensor replaced by its ArenaRef (copied into the current slot if it is not there)."""
        if self.buffer.data_ptr() != self._base:
            raise RuntimeError("the batch arena's memory moved in this worker (a view of it was shared)")
        if isinstance(tree, dict):
            return {k: self.pack(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.pack(v) for v in tree)
        return self._ref(tree) if isinstance(tree, torch.Tensor) else tree

    # ------------------------------------------------------------ in the training process
    def unpack(self, tree):
        """`tree` with every ArenaRef replaced by the view of the arena it names."""
        if isinstance(tree, dict):
            return {k: self.unpack(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.unpack(v) for v in tree)
        if isinstance(tree, ArenaRef):
            nbytes = _nbytes(tree.shape, tree.dtype)
            if not 0 <= tree.offset <= self.buffer.numel() - nbytes:
                raise RuntimeError(f"a loader worker sent arena offset {tree.offset} (+{nbytes} bytes) outside its "
                                   f"{self.buffer.numel()} bytes")
            return self.buffer[tree.offset:tree.offset + nbytes].view(tree.dtype).view(tree.shape)
        return tree

    def pin(self, device) -> bool:
        """Page-lock the arena for the CUDA driver (cudaHostRegister, portable), so device copies from it are
        asynchronous DMA; False if the driver refuses (copies then stage through the driver, still correct).
        Only once the workers have forked: a driver may keep page-locked memory out of a forked child."""
        if not self.pinned and torch.cuda.is_available():
            with torch.cuda.device(device):
                err = torch.cuda.cudart().cudaHostRegister(self._base, self.buffer.numel(), 1)
            self.pinned = int(getattr(err, "value", err)) == 0
            if not self.pinned:
                _clear_cuda_error()       # else torch's next launch check reports this refusal as its own error
        return self.pinned

    def release(self) -> None:
        """Undo `pin` (before the workers fork again, and before the memory goes)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._base)
            self.pinned = False


class SlotCounter:
    """Stands in for the arena (pipeline/shard_reader.py `ARENA`) while a batch is drawn in the training process:
    counts the bytes the draw asks `empty` for (what a worker would read into its slot, intermediates included)
    and hands out nothing, so the draw allocates as usual."""

    def __init__(self):
        self.used = 0

    def take(self, shape, dtype: torch.dtype) -> None:
        self.used += _aligned(_nbytes(shape, dtype))
        return None


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (torch exposes no cudaGetLastError): best effort, via the loaded
    libcudart."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "libcudart" in line)
        ctypes.CDLL(path).cudaGetLastError()
    except (OSError, StopIteration, AttributeError):
        pass
