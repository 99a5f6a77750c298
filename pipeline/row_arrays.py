"""One row array on disk, the unit both stores are built of (docs/store.md): [N, *row_shape], one inner chunk per
row (or per block of a condition's non-zero extent, `row_chunk`) and `shard` rows per shard file, so a unit writes
exactly one file per array and no two writers share one. Values live on disk in `store_dtype`:
    float32, float16   numpy dtypes as they are
    bfloat16           raw uint16 holding the upper 16 bits of the float32 (round-to-nearest-even);
                       view: float32 = (uint32(raw) << 16).view(float32). Zarr has no bfloat16 dtype.
Readers always get float32 back (`decode`). Compression (`none | zstd | blosc`) is Zarr's own codec chain.
Here: the dtype encoding, creating an array, writing a whole shard durably, reading rows, a shard's checksum.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.errors import UserError

STORE_DTYPES = ("float32", "float16", "bfloat16")
COMPRESSORS = ("none", "zstd", "blosc")
_ON_DISK = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def on_disk_dtype(store_dtype: str) -> str:
    if store_dtype not in _ON_DISK:
        raise ValueError(f"store dtype '{store_dtype}' is not one of {', '.join(STORE_DTYPES)}")
    return _ON_DISK[store_dtype]


def encode(values, store_dtype: str) -> np.ndarray:
    """float values (numpy or torch, any float dtype) -> the on-disk array of `store_dtype`."""
    if isinstance(values, torch.Tensor):
        a = values.detach().float().cpu().contiguous().numpy()
    else:
        a = np.ascontiguousarray(values, dtype=np.float32)
    if store_dtype == "float32":
        return a
    if store_dtype == "float16":
        return a.astype(np.float16)
    if store_dtype == "bfloat16":
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        return t.bfloat16().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"store dtype '{store_dtype}' is not one of {', '.join(STORE_DTYPES)}")


def decode(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    """The on-disk array -> float32 (exact: every float16 / bfloat16 value is a float32)."""
    raw = np.asarray(raw)
    if store_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def round_trip(values: torch.Tensor, store_dtype: str) -> torch.Tensor:
    """`values` as they will read back from the store (float32), on their device."""
    if store_dtype == "float32":
        return values.float()
    return values.to(torch.float16 if store_dtype == "float16" else torch.bfloat16).float()


def compressors(name: str):
    """Zarr v3 codecs for `generate.compressor` / `encode.compressor` (None = raw bytes)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    raise ValueError(f"compressor '{name}' is not one of {', '.join(COMPRESSORS)}")


MAX_CHUNKS_PER_ROW = 64


def row_chunk(row_shape: Sequence[int], extent: Sequence[int] | None = None) -> tuple[int, ...]:
    """The inner chunk of one row: the whole row, or, for a row whose non-zero part is its leading `extent` (a
    condition's padding: SD3 without T5 pads CLIP's 77 tokens x 2048 features to 333 x 4096 with zeros), per axis
    the smallest divisor of the row's size that covers the extent (2-D rows; at most MAX_CHUNKS_PER_ROW chunks,
    else the whole row). The chunks past the extent are then all zeros, which Zarr never writes (a chunk equal to
    the fill value) and the loader never reads (pipeline/shard_reader.py): lossless whatever the data, since a
    chunk that is not all zeros is written."""
    row_shape = tuple(int(s) for s in row_shape)
    if extent is None or len(extent) != len(row_shape) or len(row_shape) != 2:
        return row_shape
    chunk = tuple(next(d for d in range(1, n + 1) if n % d == 0 and d >= min(max(int(e), 1), n))
                  for n, e in zip(row_shape, extent))
    if math.prod(n // c for n, c in zip(row_shape, chunk)) > MAX_CHUNKS_PER_ROW:
        return row_shape                # a tiny extent (or an awkward size): many small chunks cost more than zeros
    return chunk


def create_rows(group, name: str, rows: int, row_shape: Sequence[int], shard: int, store_dtype: str,
                compressor: str = "none", extent: Sequence[int] | None = None):
    """An empty row array [rows, *row_shape]: one chunk per row (`extent`: several, see `row_chunk`), `shard`
    rows per shard file."""
    row_shape = tuple(int(s) for s in row_shape)
    return group.create_array(name, shape=(rows, *row_shape), chunks=(1, *row_chunk(row_shape, extent)),
                              shards=(max(1, min(shard, rows)), *row_shape), dtype=on_disk_dtype(store_dtype),
                              fill_value=0, compressors=compressors(compressor))


def write_shard_rows(group_path, arr, shard: int, lo: int, data: np.ndarray) -> None:
    """Write one whole shard of a row array (one write). Zarr reads an existing shard file before
    overwriting it, so a damaged leftover of an interrupted writer is removed first."""
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    (Path(group_path) / arr.path / key).unlink(missing_ok=True)
    try:
        arr[lo:lo + len(data)] = data
        make_durable(Path(group_path), Path(group_path) / arr.path / key)
    except OSError as exc:              # Zarr's own errors (ENOSPC) name no file: say which one
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(Path(group_path) / arr.path / key)) from None
        raise


def make_durable(group_path: Path, shard_file: Path) -> None:
    """Zarr renames a shard into place but never fsyncs it: fsync the file and every directory up to the
    store, so the `done` record written after it never vouches for a shard a power cut lost
    (docs/reliability.md)."""
    from pipeline.files import fsync_dir, fsync_file

    if Path(shard_file).exists():       # zarr writes no file for a shard that is all fill value (zeros)
        fsync_file(shard_file)
    d = Path(shard_file).parent
    while d != Path(group_path).parent:
        if d.is_dir():
            fsync_dir(d)
        d = d.parent


def read_metadata(meta_file: Path, hint: str) -> dict:
    """A Zarr metadata file as JSON; unreadable is a UserError naming it (never "no store": one bad read
    must not get a store and its records deleted)."""
    try:
        data = json.loads(Path(meta_file).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"store metadata {meta_file} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                        f"{hint}") from None


def digest(*arrays: np.ndarray | None) -> str:
    """Checksum of arrays as stored on disk (their raw bytes, in order; None entries skipped)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def read_rows(arr, rows: np.ndarray, threads: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """arr[rows] for distinct `rows` in any order: one slice per run of consecutive rows (in sorted order, i.e.
    shard by shard), each read straight into its places in `out` (allocated when None; e.g. shared memory), runs
    read in a few threads. (Zarr's own `oindex` on a sharded array is ~100x slower here: it decodes shard by
    shard per request.)"""
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    ranked = rows[order]
    cuts = np.nonzero(np.diff(ranked) != 1)[0] + 1
    runs = [(int(ranked[g[0]]), int(ranked[g[-1]]) + 1, order[g]) for g in np.split(np.arange(len(rows)), cuts)]

    def one(run):
        lo, hi, at = run
        if (np.diff(at) == 1).all():             # places in order (always for one row): one copy, no gather
            out[at[0]:at[0] + hi - lo] = arr[lo:hi]
        else:
            out[at] = arr[lo:hi]
    if len(runs) == 1 or threads <= 1:
        for run in runs:
            one(run)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(runs))) as pool:
            list(pool.map(one, runs))
    return out
