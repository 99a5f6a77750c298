"""Is a finished shard still whole? The cheap check every reader of a row store makes (docs/reliability.md).

A shard's `done` record lists the files its unit wrote, with their sizes (`shard_files`, called by the
worker after the files are durable). Before a reader trusts a shard, it checks those files exist at those
sizes (`check_shards`: one stat per file, once per shard per process); generate and encode redo a shard
that fails it instead of skipping it (`redo_damaged`). Without this, Zarr reads a deleted shard file as its
fill value (zeros) and trains on it. Full checksums stay with `flowsteer status --verify`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import UserError

REPAIR = "run `flowsteer status --verify --repair` (it marks the shard for redo), then the stage that wrote it"
_checked: set[tuple[str, int, float]] = set()      # (store, shard, record mtime) found whole in this process


def _shard_arrays(store, shard: int) -> list[tuple[str, tuple[int, ...]]]:
    """(array name, shard coordinates) of every sharded array a unit writes for `shard` (the "" condition
    arrays belong to shard 0)."""
    out = []
    for name in sorted(store.group.array_keys()):
        arr = store.group[name]
        if getattr(arr, "shards", None) is None:       # per-sample plan arrays, written at creation
            continue
        if name.startswith("null_"):
            if shard == 0:
                out.append((name, (0,) * arr.ndim))
        else:
            out.append((name, (shard,) + (0,) * (arr.ndim - 1)))
    return out


def shard_files(store, shard: int) -> dict[str, int | None]:
    """{path relative to the store: size in bytes} of the shard's files as they are now; None where Zarr
    wrote no file (a shard of nothing but the fill value)."""
    out: dict[str, int | None] = {}
    for name, coords in _shard_arrays(store, shard):
        rel = f"{name}/{store.group[name].metadata.encode_chunk_key(coords)}"
        try:
            out[rel] = os.stat(Path(store.path) / rel).st_size
        except FileNotFoundError:
            out[rel] = None
    return out


def shard_problem(store_path: Path, files: dict[str, int | None]) -> str | None:
    """Why the recorded files of a shard are not whole now (missing, or another size), else None."""
    for rel, size in sorted(files.items()):
        if size is None:
            continue
        try:
            now = os.stat(Path(store_path) / rel).st_size
        except FileNotFoundError:
            return f"{rel} is missing (recorded {size} bytes)"
        if now != size:
            return f"{rel} is {now} bytes, recorded {size}"
    return None


def _records(store, shard_key: Callable[[int], str]) -> Iterator[tuple[int, dict, float]]:
    from pipeline.runner import read_record, records_dir

    out_dir = Path(store.path).parent
    for j in range(store.num_shards):
        rec = read_record(out_dir, shard_key(j))
        if rec and rec.get("status") == "done" and isinstance(rec.get("files"), dict):
            try:
                mtime = os.stat(records_dir(out_dir) / f"{shard_key(j)}.json").st_mtime
            except OSError:
                mtime = 0.0
            yield j, rec, mtime


def check_shards(store, shard_key: Callable[[int], str]) -> None:
    """Raise one UserError naming the store, the shard and the repair command when a finished shard's files
    are missing or of another size (checked once per shard per process). `shard_key(j)` names shard j's
    record (pipeline.rowstore.shard_key; passed in, as the store's module imports this one)."""
    for j, rec, mtime in _records(store, shard_key):
        key = (str(store.path), j, mtime)
        if key in _checked:
            continue
        problem = shard_problem(store.path, rec["files"])
        if problem:
            raise UserError(f"{store.kind} {store.path}: shard {j} ({shard_key(j)}) is damaged: {problem}; {REPAIR}")
        _checked.add(key)


def forget() -> None:
    """Check every shard again (a new command in a long-lived process, e.g. tests or a notebook)."""
    _checked.clear()


def redo_damaged(store, out_dir: Path, shard_key: Callable[[int], str]) -> list[str]:
    """Drop the `done` record of every finished shard whose files are not whole (so the stage redoes it
    instead of skipping it); returns the shard keys dropped. Call under the stage lock."""
    from pipeline.runner import drop_record

    dropped = []
    for j, rec, _ in _records(store, shard_key):
        problem = shard_problem(store.path, rec["files"])
        if problem:
            drop_record(out_dir, shard_key(j))
            print(f"{shard_key(j)} of {store.path} is damaged ({problem}): it is written again",
                  file=sys.stderr, flush=True)
            dropped.append(shard_key(j))
    return dropped


@contextlib.contextmanager
def named_read_errors(store, shard: int | str):
    """Zarr's undecodable shard (e.g. `Stored and computed checksum do not match` from a truncated file with
    an older record) as one UserError naming the store, the shard and the repair command."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as exc:
        text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{store.kind} {store.path}: shard {shard} cannot be read ({text}); {REPAIR}") from None
