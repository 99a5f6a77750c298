"""RowStore: the sharded-row store both the trajectory store and the latent store are (docs/store.md).

A row array is [N, *row_shape], one inner chunk per row and `shard` rows per shard file, so a unit writes
exactly one file per array and no two writers share one. Values live on disk in `store_dtype`:
    float32, float16   numpy dtypes as they are
    bfloat16           raw uint16 holding the upper 16 bits of the float32 (round-to-nearest-even);
                       view: float32 = (uint32(raw) << 16).view(float32). Zarr has no bfloat16 dtype.
Readers always get float32 back (`decode`). Compression (`none | zstd | blosc`) is Zarr's own codec chain.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.shard_reader import ShardRows, empty_stored

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


def row_chunk(row_shape: Sequence[int], extent: Sequence[int] | None = None) -> tuple[int, ...]:
    """The inner chunk of one row: the whole row, or, for a row whose non-zero part is its leading `extent` (a
    condition's padding: SD3 without T5 pads CLIP's 77 tokens x 2048 features to 333 x 4096 with zeros), per axis
    the smallest divisor of the row's size that covers the extent. The chunks past the extent are then all
    zeros, which Zarr never writes (a chunk equal to the fill value) and the loader never reads
    (pipeline/shard_reader.py): lossless whatever the data, since a chunk that is not all zeros is written."""
    row_shape = tuple(int(s) for s in row_shape)
    if extent is None or len(extent) != len(row_shape):
        return row_shape
    return tuple(next(d for d in range(1, n + 1) if n % d == 0 and d >= min(int(e), n))
                 for n, e in zip(row_shape, extent))


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


def shard_key(shard: int) -> str:
    """The unit (and completion record) key of a shard."""
    return f"shard-{shard:05d}"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def meta_differences(stored: dict, expected: dict) -> list[str]:
    """'key: store X, config Y' for every leaf that differs (both sides JSON-normalised)."""
    a, b = _flat(json.loads(json.dumps(stored))), _flat(json.loads(json.dumps(expected)))
    return [f"{k}: store {a.get(k, '<missing>')!r}, config {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "fingerprint"]


def mismatch_summary(differences: list[str], shown: int = 3) -> str:
    """The first `shown` differences joined by '; ', then '(+N more)' when there are more."""
    more = f" (+{len(differences) - shown} more)" if len(differences) > shown else ""
    return "; ".join(differences[:shown]) + more


def meta_mismatch(stored: dict, expected: dict, what: str, fix: str) -> None:
    """Refuse a store made by another config: one line naming the first differing keys."""
    diff = meta_differences(stored, expected)
    if diff:
        raise UserError(f"{what} was built from another config ({mismatch_summary(diff)}); {fix}")


class RowStore:
    """What both stores share: sharded row arrays, per-row teacher conditions and the "" condition,
    completion records beside the Zarr group (one `done` record per shard, written by the runner), and the
    shard a unit writes whole with its checksum (`write_shard_data`, `shard_checksum`)."""

    kind = "store"
    file_name = "store.zarr"        # the Zarr group inside its stage directory
    command = "flowsteer generate"  # the stage command that builds (and finishes) it
    mismatch_fix = "run `flowsteer generate`"
    row_arrays: tuple[str, ...] = ()   # the sample arrays a unit writes (conditions aside), in checksum order
    cond_in_shards = True           # whether units write their rows' conditions (else creation wrote them)

    def __init__(self, group, path: Path):
        attrs = group.attrs.asdict()
        self.group, self.path = group, Path(path)
        self.meta: dict[str, Any] = attrs["meta"]
        self.sample_shape: tuple[int, ...] = tuple(attrs["sample_shape"])
        self.shard_size: int = attrs["shard_size"]
        self.cond_arrays: dict[str, str] = attrs["cond_arrays"]
        self.store_dtype: str = attrs.get("store_dtype", "float32")
        self.num_samples: int = int(attrs["num_rows"])

    # what to do about unreadable metadata (a subclass names its own rebuild command)
    rebuild_hint = "nothing was deleted; move the store away to rebuild it"

    @classmethod
    def created(cls, path: Path) -> bool:
        """Whether `path` holds a store. Stores are built aside and renamed into place (`build_aside`), so
        an existing path is a finished store; metadata that cannot be read is a UserError naming the file."""
        path = Path(path)
        if not path.exists():
            return False
        meta_file = path / "zarr.json"
        if "meta" not in read_metadata(meta_file, cls.rebuild_hint).get("attributes", {}):
            raise UserError(f"{cls.kind} {path} has no 'meta' in {meta_file} (an interrupted creation by an older "
                            f"version, or not a flowsteer store); {cls.rebuild_hint}")
        return True

    @classmethod
    @contextlib.contextmanager
    def build_aside(cls, path: Path):
        """Yield a temp path to build a new store in; on success it is fsynced and renamed to `path`. Never
        replaces an existing store (only an explicit rebuild deletes one)."""
        from pipeline.files import atomic_path

        path = Path(path)
        if path.exists():
            raise UserError(f"{cls.kind} {path} already exists; {cls.rebuild_hint}")
        with atomic_path(path) as tmp:
            yield tmp

    @staticmethod
    def remove_stale_builds(path: Path) -> None:
        """Temp builds of `path` left by a killed creation (call only under the stage lock)."""
        import shutil

        for leftover in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    @classmethod
    def open(cls, path: str | Path, expected_meta: dict | None = None, mode: str = "r", check_complete: bool = True,
             **kwargs):
        """Open a store (its Zarr group or the stage dir holding one); refuse one made by another config."""
        path = Path(path)
        if (path / cls.file_name).is_dir():
            path = path / cls.file_name
        if not cls.created(path):
            raise UserError(f"no {cls.kind} at {path}; run `{cls.command}` first")
        store = cls.open_group(path, mode, **kwargs)
        if expected_meta is not None:
            meta_mismatch(store.meta, expected_meta, f"{cls.kind} {path}", cls.mismatch_fix)
        if check_complete:
            store.check_complete(f"run `{cls.command}` to finish it")
        return store

    @classmethod
    def open_group(cls, path: Path, mode: str, **kwargs):
        """`cls(zarr group, path, **kwargs)`, with unreadable array metadata a UserError naming the file."""
        import zarr

        try:
            return cls(zarr.open_group(str(path), mode=mode), path, **kwargs)
        except Exception as exc:  # noqa: BLE001  (an array's metadata is unreadable: name it, delete nothing)
            for meta_file in sorted(Path(path).glob("*/zarr.json")):
                read_metadata(meta_file, cls.rebuild_hint)
            raise UserError(f"{cls.kind} {path} cannot be opened ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); {cls.rebuild_hint}") from None

    @staticmethod
    def create_cond_arrays(group, rows: int, cond_shapes: dict[str, Sequence[int]], shard: int,
                           store_dtype: str, compressor: str, extents: dict | None = None) -> dict[str, str]:
        """Per-row condition arrays and their one-row "" (null_) twins; returns key -> array name. `extents`:
        the teacher's non-zero part of a condition (TeacherLayout.cond_extents), chunked apart (`row_chunk`)."""
        names = {k: COND_ARRAYS.get(k, k) for k in cond_shapes}
        for key, name in names.items():
            extent = (extents or {}).get(key)
            create_rows(group, name, rows, cond_shapes[key], shard, store_dtype, compressor, extent)
            create_rows(group, "null_" + name, 1, cond_shapes[key], 1, store_dtype, compressor, extent)
        return names

    # ------------------------------------------------------------ shards
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples)

    def missing_shards(self) -> list[int]:
        """Shards without a `done` completion record."""
        from pipeline.runner import is_done

        return [j for j in range(self.num_shards) if not is_done(self.path.parent, shard_key(j))]

    def check_complete(self, hint: str) -> None:
        missing = self.missing_shards()
        if missing:
            raise UserError(f"{self.kind} {self.path} is incomplete ({len(missing)} of {self.num_shards} "
                            f"shards not written); {hint}")
        from pipeline.shard_check import check_shards

        check_shards(self, shard_key)              # every finished shard's files still there at their recorded sizes

    def write_rows(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a whole shard of each named row array (values already encoded to the store dtype)."""
        lo, hi = self.shard_range(shard)
        for name, data in arrays.items():
            arr = self.group[name]
            if data.shape != (hi - lo, *arr.shape[1:]):
                raise ValueError(f"shard {shard} of '{name}' expects {(hi - lo, *arr.shape[1:])}, got {data.shape}")
            write_shard_rows(self.path, arr, shard, lo, data)

    def cond_shard(self, cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor] | None
                   ) -> dict[str, np.ndarray]:
        """Teacher conditions of a shard's rows (and, from shard 0, the "" condition) as stored arrays."""
        out = {name: encode(cond[k], self.store_dtype) for k, name in self.cond_arrays.items()}
        if null is not None:
            out.update({"null_" + name: encode(null[k][:1], self.store_dtype) for k, name in self.cond_arrays.items()})
        return out

    def write_null(self, null: dict[str, torch.Tensor]) -> None:
        for k, name in self.cond_arrays.items():
            write_shard_rows(self.path, self.group["null_" + name], 0, 0, encode(null[k][:1], self.store_dtype))

    def write_cond(self, shard: int, cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, np.ndarray]:
        """Write a shard's condition rows (+ the "" condition, from shard 0), e.g. while its states are still
        being computed; returns them as stored, for the shard's checksum (`write_shard_data(written_cond=)`)."""
        arrays = self.cond_shard(cond, null)
        self.write_rows(shard, {k: v for k, v in arrays.items() if not k.startswith("null_")})
        if null is not None:
            self.write_null(null)
        return arrays

    def write_shard_data(self, shard: int, rows: dict[str, Any], cond: dict[str, torch.Tensor] | None = None,
                         null: dict[str, torch.Tensor] | None = None,
                         written_cond: dict[str, np.ndarray] | None = None) -> str:
        """Write one whole shard (one write per array, never a partial shard): the unit's row arrays and, in a
        store whose units encode, the rows' conditions (+ the "" condition from shard 0), or take those as
        `written_cond` (what `write_cond` wrote). Returns the checksum of the shard as stored (what
        `shard_checksum` reads back)."""
        arrays = {name: encode(values, self.store_dtype) for name, values in rows.items()}
        self.write_rows(shard, arrays)
        if cond is not None:
            written_cond = self.write_cond(shard, cond, null)
        return digest(*arrays.values(), *(written_cond or {}).values())

    def shard_checksum(self, shard: int) -> str:
        """The checksum of a shard as it reads back from disk (raises if zarr cannot decode it)."""
        lo, hi = self.shard_range(shard)
        names = [*self.row_arrays, *(self.cond_arrays.values() if self.cond_in_shards else ())]
        arrays = [np.asarray(self.group[n][lo:hi]) for n in names]
        if self.cond_in_shards and shard == 0:
            arrays += [np.asarray(self.group["null_" + n][:1]) for n in self.cond_arrays.values()]
        return digest(*arrays)

    # ------------------------------------------------------------ reader API
    def rows(self, name: str, indices, stored: bool = False) -> np.ndarray | torch.Tensor:
        """float32 rows of a row array (`stored`: a tensor in the store dtype, see pipeline/shard_reader.py); each
        distinct row is read once (one chunk read per row)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"row index out of range (rows < {self.num_samples})")
        uniq, inv = np.unique(idx, return_inverse=True)
        arr = self.group[name]
        from pipeline.shard_check import named_read_errors

        with named_read_errors(self, f"of rows {uniq[0]}..{uniq[-1]}" if len(uniq) else "-"):
            if not stored:
                return decode(read_rows(arr, uniq), self.store_dtype)[inv.reshape(-1)]
            tensor, view = empty_stored((len(idx), *arr.shape[1:]), self.store_dtype)
            direct = ShardRows.of(arr)
            if direct is not None:              # the plain layout: rows read from the shard files
                direct.read_into(idx, view)
            elif len(uniq) == len(idx):         # distinct rows: read straight into their places
                read_rows(arr, idx, out=view)
            else:
                view[:] = read_rows(arr, uniq)[inv.reshape(-1)]
            return tensor

    def row_cond(self, indices, stored: bool = False) -> dict[str, torch.Tensor]:
        """Teacher conditions (CPU; float32, or with `stored` the store dtype) of the given rows."""
        return {k: torch.as_tensor(self.rows(name, indices, stored)) for k, name in self.cond_arrays.items()}

    def null_cond(self, n: int) -> dict[str, torch.Tensor]:
        """The unconditional ("" prompt) condition, n rows (float32)."""
        if not hasattr(self, "_null"):
            self._null = {k: torch.from_numpy(decode(np.asarray(self.group["null_" + name][:1]), self.store_dtype))
                          for k, name in self.cond_arrays.items()}
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self._null.items()}


# Teacher condition keys (SD3 argument names) -> store array names.
COND_ARRAYS = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_embeds"}
