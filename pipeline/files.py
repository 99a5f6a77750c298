"""Durable files: the one home of atomic writes and fsync.

Every writer of a file that a record, a pointer or a reader trusts goes through here: data is written to
a temp file with a name unique to this process and call, fsynced, renamed over the target, and the
directory is fsynced, so a reader sees the old file or the whole new one and a power cut cannot leave a
record vouching for data that never reached the disk. A failed write removes its temp file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so the names created or renamed in it are durable (the same call as for a file)."""
    fsync_file(path)


def fsync_file(path: str | Path) -> None:
    """fsync a file written by someone else (e.g. a Zarr shard, which Zarr renames but never fsyncs)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str | Path) -> Path:
    """A hidden sibling name no other process or call can pick (pid + random), for a write-then-rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to (a file or a directory tree); on success it is
    fsynced and renamed over `path`, on any error it is removed and `path` is untouched."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.is_dir():
            for sub, _, files in os.walk(tmp):
                for f in files:
                    fsync_file(Path(sub) / f)
                fsync_dir(sub)
            if path.is_dir():                     # a directory cannot be renamed over a non-empty one
                old = temp_name(path)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            fsync_file(tmp)
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_stream(path: str | Path, write: Callable[[Any], None]) -> None:
    """`write(f)` into a binary file object, atomically (for large payloads such as checkpoints)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def atomic_write_parquet(path: str | Path, table) -> None:
    """A pyarrow Table as a Parquet file, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
