"""RowStore: the sharded-row store both the trajectory store and the latent store are (docs/store.md), made of
row arrays (pipeline/row_arrays.py: dtypes, creation, durable shard writes, row reads, checksums)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.row_arrays import create_rows, decode, digest, encode, read_metadata, read_rows, write_shard_rows
from pipeline.shard_reader import ShardRows, empty_stored

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
