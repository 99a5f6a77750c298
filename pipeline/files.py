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
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import UserError


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
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None   # say which file
        raise


class _Writes:
    """A file object that remembers an OSError of its writes: torch.save turns a failed write (ENOSPC)
    into an opaque RuntimeError, and the disk-full message must name the errno and the path."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write_stream(path: str | Path, write: Callable[[Any], None]) -> None:
    """`write(f)` into a binary file object, atomically (for large payloads such as checkpoints)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            f = _Writes(raw)
            try:
                write(f)
                f.flush()
            except Exception as exc:
                if f.error is not None and exc is not f.error:
                    raise f.error from None
                raise
            os.fsync(raw.fileno())


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


# ---------------------------------------------------------------- one writer per stage directory
LOCK_NAME = ".lock"


class StageBusy(UserError):
    """Another live process holds the stage directory's lock (the CLI prints it as one `error:` line)."""


TEMP_NAME = re.compile(r"^\..+\.[0-9]+\.[0-9a-f]{8}\.tmp$")      # temp_name's pattern


def sweep_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temp files and dirs that `temp_name` made under `directory` (a writer killed mid-write leaves
    one, e.g. `.step-000010.pt.<pid>.<rand>.tmp`). Called by the holder of the directory's StageLock: no
    writer of this directory can be running, whatever host or namespace it was on."""
    import shutil

    removed = []
    for sub, dirs, files in os.walk(directory):
        for name in [*files, *dirs]:
            if TEMP_NAME.match(name):
                p = Path(sub) / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
        dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
    return removed


class StageLock:
    """An advisory lock on `<dir>/.lock` (fcntl.flock) held by the driver for a whole stage run.

    Liveness comes from the kernel lock alone: the kernel releases a flock when the last descriptor of its
    holder closes (the holder exits or is killed), so a killed run never blocks the next one, and a holder
    this process cannot see (another PID namespace or container, another host on NFSv4, where Linux
    implements flock with the server's byte-range locks) is simply "held". The file's text (`host pid
    time`) only names the holder in messages; it never decides anything. The file is never unlinked (a
    waiter holding the old inode would lock a name nobody else uses). docs/reliability.md lists the
    filesystems this holds on.
    """

    def __init__(self, directory: str | Path, wait: bool = False, poll_seconds: float = 0.5):
        self.path = Path(directory) / LOCK_NAME
        self.wait, self.poll_seconds = wait, poll_seconds
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            text = self.path.read_text().split()
        except OSError:
            return "an unknown process"
        return f"host {text[0]} pid {text[1]}" if len(text) >= 2 else "an unknown process"

    def acquire(self) -> "StageLock":
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        announced = False
        while True:
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not self.wait:
                    raise StageBusy(f"{self.path.parent} is in use by {self.holder()} (another flowsteer run "
                                    f"writes there); wait for it to finish or rerun with --wait") from None
                if not announced:
                    import sys

                    print(f"waiting: {self.path.parent} is in use by {self.holder()}", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(self.poll_seconds)
                continue
            except OSError as exc:
                os.close(fd)
                raise StageBusy(f"cannot lock {self.path}: {exc.strerror} (this filesystem has no file locks; "
                                f"see docs/reliability.md)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:                            # someone removed the file by hand between open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n".encode())
            self.fd = fd
            sweep_temp_files(self.path.parent)      # ours now: a killed writer's leftovers go
            return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)            # the file stays (unlinking would race a waiter)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
