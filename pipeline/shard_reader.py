"""Rows as stored, for the batch loader: tensors in the store's own dtype to read them into (`empty_stored`: in
a loader worker, in the shared batch arena), and whole rows of an uncompressed sharded Zarr v3 array read straight
from the shard files (`ShardRows`: one `preadv` per row into the caller's buffer), zarr-python's format unchanged.

Why: zarr-python decodes each inner chunk through its codec pipeline (buffers, copies, an event loop), ~4x the
time of the file read itself for SD3's 2.7 MB condition rows (bench/loader_bench.py). Only the layout the stores
write is read this way (pipeline/row_arrays.py `create_rows`: one inner chunk per row or per block of a 2-D
row, codec `bytes`, index at the shard's end, on a local disk); anything else, e.g. a compressed store, goes
through zarr (`of` returns None).

A shard file ends with its index: per inner chunk (offset, nbytes) as little-endian uint64 (all ones: never
written, i.e. the fill value), then a crc32c of the index (zarr's sharding_indexed codec).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

EMPTY = np.uint64(2 ** 64 - 1)


ARENA = None      # in a loader worker: its pipeline/batch_arena.py BatchArena (set by pipeline/loader.py StepRange)


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor to fill with a batch's rows: in a loader worker, in its slot of the shared batch arena (handing it
    to the training process then copies nothing); else, or when the slot is full, a fresh one."""
    t = ARENA.take(tuple(shape), dtype) if ARENA is not None else None
    return t if t is not None else torch.empty(tuple(shape), dtype=dtype)


def empty_stored(shape, store_dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """(tensor in the store dtype, its on-disk-dtype numpy view) to read rows into (`empty`)."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}[store_dtype]
    t = empty(shape, dtype)
    view = t.numpy()
    if store_dtype == "bfloat16":
        return t.view(torch.bfloat16), view.view(np.uint16)
    return t, view


class ShardRows:
    """Row reader of one array; `of(arr)` is None when the array's layout is not the plain one.

    A row is one inner chunk, or (a condition chunked past its non-zero extent, pipeline/row_arrays.py
    `row_chunk`) a 2-D row of [gT x gD] chunks in C order: each written chunk is read whole and placed, each
    never-written one is filled with the fill value (zeros) without touching the disk."""

    def __init__(self, directory: Path, shard_rows: int, row_shape: tuple, chunk: tuple, ndim: int, fill_value,
                 dtype):
        self.directory, self.shard_rows, self.ndim = directory, shard_rows, ndim
        self.fill_value, self.dtype = fill_value, np.dtype(dtype)
        self.row_shape, self.chunk = tuple(row_shape), tuple(chunk)
        self.grid = tuple(n // c for n, c in zip(self.row_shape, self.chunk))
        self.per_row = int(np.prod(self.grid)) if self.grid else 1
        self.row_nbytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.chunk_nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        self._index: dict[int, np.ndarray] = {}     # per shard read: [shard_rows * per_row, 2] (offset, nbytes)

    @classmethod
    def of(cls, arr) -> "ShardRows | None":
        try:
            from zarr.codecs import BytesCodec, ShardingCodec
            from zarr.storage import LocalStore

            meta = arr.metadata
            (codec,) = meta.codecs
            row_shape, chunk = tuple(arr.shape[1:]), tuple(codec.chunk_shape[1:])
            ok = (isinstance(arr.store, LocalStore) and isinstance(codec, ShardingCodec)
                  and len(codec.codecs) == 1 and isinstance(codec.codecs[0], BytesCodec)
                  and str(codec.codecs[0].endian.value) == "little" and codec.index_location.value == "end"
                  and codec.chunk_shape[0] == 1
                  and (chunk == row_shape
                       or (len(row_shape) == 2 and all(n % c == 0 for n, c in zip(row_shape, chunk))))
                  and tuple(meta.chunk_grid.chunk_shape[1:]) == row_shape
                  and np.dtype(arr.dtype).byteorder in "<=|" and getattr(meta.chunk_key_encoding, "separator", "") == "/"
                  and meta.chunk_key_encoding.name == "default")
        except (AttributeError, ValueError, TypeError, ImportError):
            return None
        if not ok:
            return None
        return cls(Path(arr.store.root) / arr.path, int(meta.chunk_grid.chunk_shape[0]), row_shape, chunk, arr.ndim,
                   meta.fill_value, arr.dtype)

    def _path(self, shard: int) -> Path:
        return self.directory / "c" / "/".join([str(shard)] + ["0"] * (self.ndim - 1))

    def _shard_index(self, shard: int, fd: int) -> np.ndarray:
        if shard not in self._index:
            size = os.fstat(fd).st_size
            n = self.shard_rows * self.per_row * 16
            raw = os.pread(fd, n, size - n - 4)
            if len(raw) != n:
                raise OSError(f"{self._path(shard)}: shard index cut short")
            self._index[shard] = np.frombuffer(raw, dtype="<u8").reshape(self.shard_rows * self.per_row, 2)
        return self._index[shard]

    def read_into(self, rows, out: np.ndarray, first=None, count: int | None = None) -> None:
        """out[j] = row rows[j] for every j (rows in any order, repeats allowed; reads sorted: shard files in
        order); with `first` and `count`: out[j] = row rows[j][first[j]:first[j] + count] (its axis 1; rows of
        one chunk only)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.per_row > 1 and first is not None:
            raise ValueError("partial rows are read from arrays of one chunk per row")
        order = np.argsort(rows, kind="stable")
        shards = rows[order] // self.shard_rows
        for shard in np.unique(shards):
            at = order[shards == shard]
            try:
                fd = os.open(self._path(int(shard)), os.O_RDONLY)
            except FileNotFoundError:               # a shard never written reads as its fill value
                out[at] = self.fill_value
                continue
            try:
                index = self._shard_index(int(shard), fd)
                if self.per_row == 1:
                    self._whole_rows(fd, int(shard), index, rows, at, out, first, count)
                else:
                    self._chunked_rows(fd, int(shard), index, rows, at, out)
            finally:
                os.close(fd)

    def _whole_rows(self, fd, shard, index, rows, at, out, first, count) -> None:
        flat = out.reshape(len(rows), -1).view(np.uint8)
        want = flat.shape[1]
        skip = np.zeros(len(rows), dtype=np.int64)
        if first is not None:
            skip = np.asarray(first, dtype=np.int64) * (want // count)
        for j in at:
            offset, nbytes = index[rows[j] % self.shard_rows]
            if offset == EMPTY:
                out[j] = self.fill_value
                continue
            if nbytes != self.row_nbytes:
                raise OSError(f"{self._path(shard)}: row {rows[j]} holds {nbytes} bytes, expected {self.row_nbytes}")
            if os.preadv(fd, [flat[j]], int(offset) + int(skip[j])) != want:
                raise OSError(f"{self._path(shard)}: row {rows[j]} cut short")

    def _chunked_rows(self, fd, shard, index, rows, at, out) -> None:
        (ct, cd), (gt, gd) = self.chunk, self.grid
        scratch = np.empty((ct, cd), dtype=out.dtype)
        for j in at:
            base = (rows[j] % self.shard_rows) * self.per_row
            for t in range(gt):
                for d in range(gd):
                    region = out[j, t * ct:(t + 1) * ct, d * cd:(d + 1) * cd]
                    offset, nbytes = index[base + t * gd + d]
                    if offset == EMPTY:             # never written: all zeros (the padding past the extent)
                        region[...] = self.fill_value
                        continue
                    if nbytes != self.chunk_nbytes:
                        raise OSError(f"{self._path(shard)}: row {rows[j]} chunk ({t}, {d}) holds {nbytes} "
                                      f"bytes, expected {self.chunk_nbytes}")
                    into = region if region.flags.c_contiguous else scratch
                    if os.preadv(fd, [into.reshape(-1).view(np.uint8)], int(offset)) != self.chunk_nbytes:
                        raise OSError(f"{self._path(shard)}: row {rows[j]} cut short")
                    if into is scratch:
                        region[...] = scratch
