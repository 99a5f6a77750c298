"""The trajectory store: teacher ODE states at the K+1 window edges, one Zarr v3 shard per generate unit.

Layout (`<root>/generate/<fp>/store.zarr`; S samples, P prompts, K windows, M teacher steps, T =
generate.store_dtype; docs/store.md):
    states        [S, K+1, C, H, W] T     edge k = fixed_sigmas(K)[k]; 0 = the noise, K = the sample
    steps         [S, M+1, C, H, W] T     every teacher step (only with generate.record_every_step)
    guidance      [S] float32             CFG scale w of the sample's trajectory
    prompt_index  [S] int64               row of prompts.parquet (beside the store)
    seed          [S] int64               noise_for(seed, shape) is the sample's initial noise
    prompt_embeds [S, L, D] T, pooled_embeds [S, D'] T   the sample's prompt condition, per sample row,
                                          encoded and written by the unit of its shard
    null_*        [1, ...] T              the "" condition (written by shard 0's unit)
    attrs         meta (the config sections that decide the store + fingerprint), shapes, store_dtype
Sample arrays are sharded `shard_size` samples per shard file, one writer per shard, one inner chunk per
sample; everything is allocated when the store is created and never resized. Readers get float32.
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.typed_arrays import (COND_ARRAYS, RowStore, create_rows, decode, digest, encode, read_rows,  # noqa: F401
                                   shard_key)
from schemas.config import GENERATE_RUN_ONLY_KEYS

FORMAT = 2
STORE_NAME = "store.zarr"
PROMPTS_FILE = "prompts.parquet"


# ---------------------------------------------------------------- deterministic per-sample draws
def noise_for(seed: int | Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The initial noise of a sample (float32, CPU) from its seed alone; a list of seeds gives [n, *shape]."""
    if not isinstance(seed, (int, np.integer)):
        return torch.stack([noise_for(int(s), shape) for s in seed]) if len(seed) else torch.empty(0, *shape)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)))


def sample_seeds(base_seed: int, n: int) -> np.ndarray:
    """Per-sample seeds hashed from (generate.seed, index): large, so they never meet small evaluation seeds."""
    return np.fromiter((np.random.SeedSequence([base_seed, i]).generate_state(1, np.uint32)[0] for i in range(n)),
                       dtype=np.int64, count=n)


def guidance_for(seeds: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """w ~ U[lo, hi] per sample, drawn from the sample's seed (a stream apart from its noise)."""
    return np.fromiter((lo + (hi - lo) * np.random.default_rng([int(s), 1]).random() for s in seeds),
                       dtype=np.float64, count=len(seeds)).astype(np.float32)


# ---------------------------------------------------------------- what a config's store must be
def generate_prompts(cfg):
    """The prompt rows of generate.prompts (any format of pipeline.datasets) or the embedded digit prompts:
    a list for the digits, else the store's own copy (a TextColumn: len, [i], take, iteration) once
    generate has prepared it, else the rows read in batches into a list (small sets only)."""
    if cfg.generate.prompts is None:
        from pipeline.digits import DIGIT_PROMPTS

        return list(DIGIT_PROMPTS)
    from pipeline.datasets import TextColumn, text_batches

    copy = cfg.stage_dir("generate") / PROMPTS_FILE
    if copy.is_file():
        return TextColumn(copy)
    return [p for batch in text_batches(cfg.generate.prompts, cfg.generate.prompt_column) for p in batch]


def prompt_summary(cfg) -> tuple[int, str]:
    """(number of prompts, sha256 of them joined by newlines): one streamed pass, cached per file state."""
    if cfg.generate.prompts is None:
        from pipeline.digits import DIGIT_PROMPTS

        return len(DIGIT_PROMPTS), _sha("\n".join(DIGIT_PROMPTS))
    path = Path(cfg.generate.prompts)
    if not path.exists():
        raise UserError(f"generate.prompts not found: {path}")
    st = path.stat()
    return _scan(str(path.absolute()), cfg.generate.prompt_column, st.st_mtime_ns, st.st_size)


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _scan(path: str, column: str | None, mtime_ns: int, size: int) -> tuple[int, str]:
    import hashlib

    from pipeline.datasets import text_batches

    h, rows = hashlib.sha256(), 0
    for values in text_batches(path, column):
        for v in values:
            h.update(b"\n" if rows else b"")
            h.update(v.encode())
            rows += 1
    if rows == 0:
        raise UserError(f"generate.prompts {path} has no prompts (empty file)")
    return rows, h.hexdigest()[:16]


def store_meta(cfg) -> dict[str, Any]:
    """The config sections that decide a store's contents, its fingerprint, and the prompts' hash."""
    gen = cfg.generate.model_dump(mode="json", exclude=set(GENERATE_RUN_ONLY_KEYS))
    _, sha = prompt_summary(cfg)
    return {"format": FORMAT, "teacher": cfg.teacher.model_dump(mode="json"),
            "schedule": cfg.schedule.model_dump(mode="json"), "generate": gen,
            "device": cfg.device.split(":")[0], "prompts_sha256": sha, "fingerprint": cfg.fingerprint("generate")}


def generated_store_path(cfg) -> Path:
    """Where this run's generate stage writes its store (training may read another: stages/train.py)."""
    return cfg.stage_dir("generate") / STORE_NAME


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


# ---------------------------------------------------------------- the store
class TrajectoryStore(RowStore):
    """Reader (and per-shard writer) of one trajectory store; holds no sample data beyond a small shard cache."""

    kind = "trajectory store"
    rebuild_hint = ("nothing was deleted; `flowsteer generate --rebuild` (or `flowsteer status --verify --repair`) "
                    "deletes the store and generates it anew")

    def __init__(self, group, path: Path, cache_bytes: int):
        super().__init__(group, path)
        attrs = group.attrs.asdict()
        self.num_prompts: int = int(attrs["num_prompts"])
        self.cond_in_shards: bool = bool(attrs.get("cond_in_shards", True))
        self.states = group["states"]
        self.steps = group["steps"] if "steps" in group else None
        self.num_windows: int = self.states.shape[1] - 1
        # Per-sample scalars are tiny: read once.
        self.guidance = np.asarray(group["guidance"][:])
        self.prompt_index = np.asarray(group["prompt_index"][:])
        self.seed = np.asarray(group["seed"][:])
        # Prompt p's condition is read from the first sample row that has it (the plan puts it at row p).
        self._prompt_row = np.zeros(self.num_prompts, dtype=np.int64)
        self._prompt_row[self.prompt_index[::-1]] = np.arange(len(self.prompt_index))[::-1]
        self._prompts = None
        # Whole shards are cached (LRU, bounded, as float32) when small enough: random batches then cost one
        # read per shard.
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._shard_bytes = self.shard_size * int(np.prod(self.states.shape[1:])) * 4

    # ------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, meta: dict, prompts: Sequence[str] | int, sample_shape: Sequence[int],
               shard_size: int, teacher_steps: int, num_windows: int, plan: dict[str, np.ndarray],
               cond: dict[str, torch.Tensor] | None = None, null_cond: dict[str, torch.Tensor] | None = None,
               record_every_step: bool = False, store_dtype: str = "float32", compressor: str = "none",
               cond_shapes: dict[str, Sequence[int]] | None = None,
               run_attrs: dict | None = None) -> "TrajectoryStore":
        """Allocate every array (shards of `shard_size` samples), write the plan, mark created.

        `prompts` is the prompt list (written to prompts.parquet beside the store) or, when the driver has
        already copied them there, their count. Conditions are either given per prompt here (`cond`,
        `null_cond`: written now, for small stores and tests) or only shaped (`cond_shapes`) and written by
        each unit with its states (`write_shard(..., cond=, null=)`)."""
        import zarr

        path = Path(path)
        if not isinstance(prompts, (int, np.integer)):
            import pyarrow as pa

            from pipeline.files import atomic_write_parquet

            atomic_write_parquet(path.parent / PROMPTS_FILE, pa.table({"text": pa.array(list(prompts), pa.string())}))
            prompts = len(prompts)
        S, C = len(plan["seed"]), tuple(int(s) for s in sample_shape)
        shard = max(1, min(shard_size, S))
        with cls.build_aside(path) as tmp:  # built aside, fsynced, renamed: an existing store.zarr is whole
            g = zarr.open_group(str(tmp), mode="w")
            cls._allocate(g, meta, S, C, shard, teacher_steps, num_windows, plan, cond, record_every_step,
                          store_dtype, compressor, cond_shapes, int(prompts), run_attrs or {})
            if cond is not None:            # per-prompt conditions given now: fill every row's
                store = cls.open(tmp, meta, mode="r+", check_complete=False)
                rows = np.asarray(plan["prompt_index"], dtype=np.int64)
                for j in range(store.num_shards):
                    lo, hi = store.shard_range(j)
                    store.write_rows(j, store.cond_shard({k: v[rows[lo:hi]] for k, v in cond.items()}, None))
                store.write_null(null_cond)
        return cls.open(path, meta, mode="r+", check_complete=False)

    @classmethod
    def _allocate(cls, g, meta, S, C, shard, teacher_steps, num_windows, plan, cond, record_every_step,
                  store_dtype, compressor, cond_shapes, num_prompts: int, run_attrs: dict) -> None:
        for name, edges in [("states", num_windows + 1)] + ([("steps", teacher_steps + 1)] if record_every_step else []):
            create_rows(g, name, S, (edges, *C), shard, store_dtype, compressor)
        for name, dtype in (("guidance", "float32"), ("prompt_index", "int64"), ("seed", "int64")):
            g.create_array(name, data=np.asarray(plan[name], dtype=dtype), chunks=(max(S, 1),))
        shapes = cond_shapes or {k: tuple(v.shape[1:]) for k, v in (cond or {}).items()}
        names = cls.create_cond_arrays(g, S, shapes, shard, store_dtype, compressor)
        g.attrs.update({"sample_shape": list(C), "shard_size": shard, "cond_arrays": names,
                        "teacher_steps": teacher_steps, "store_dtype": store_dtype, "num_rows": S,
                        "num_prompts": num_prompts, "cond_in_shards": cond is None, "run": dict(run_attrs)})
        g.attrs["meta"] = meta

    @classmethod
    def open(cls, path: str | Path, expected_meta: dict | None = None, mode: str = "r",
             check_complete: bool = True, cache_bytes: int = 256 << 20) -> "TrajectoryStore":
        """Open a store (a store.zarr or the generate dir holding one); refuse one made by another config."""
        path = Path(path)
        if (path / STORE_NAME).is_dir():
            path = path / STORE_NAME
        if not cls.created(path):
            raise UserError(f"no trajectory store at {path}; run `flowsteer generate` first")
        store = cls.open_group(path, mode, cache_bytes)
        if expected_meta is not None:
            meta_mismatch(store.meta, expected_meta, f"trajectory store {path}",
                          "point train.store at a matching store or run `flowsteer generate`")
        if check_complete:
            store.check_complete("run `flowsteer generate` to finish it")
        return store

    @property
    def prompts(self):
        """The prompt rows (TextColumn over prompts.parquet beside the store: len, [i], take, iteration)."""
        from pipeline.datasets import TextColumn

        if self._prompts is None:
            self._prompts = TextColumn(self.path.parent / PROMPTS_FILE)
        return self._prompts

    # ------------------------------------------------------------ shards
    def write_shard(self, shard: int, states, steps=None, cond: dict[str, torch.Tensor] | None = None,
                    null: dict[str, torch.Tensor] | None = None) -> str:
        """Write one whole shard (one write per array, never a partial shard): states (+ steps), and, in a
        store whose units encode, the rows' conditions (+ the "" condition from shard 0). Returns the
        checksum of what was written, as stored."""
        arrays = {"states": encode(states, self.store_dtype)}
        if self.steps is not None:
            arrays["steps"] = encode(steps, self.store_dtype)
        if cond is not None:
            arrays.update(self.cond_shard(cond, null))
        self.write_rows(shard, {k: v for k, v in arrays.items() if not k.startswith("null_")})
        if cond is not None and null is not None:
            self.write_null(null)
        self._cache.pop(shard, None)
        return digest(*arrays.values())

    def shard_checksum(self, shard: int) -> str:
        """The checksum of a shard as it reads back from disk (raises if zarr cannot decode it)."""
        lo, hi = self.shard_range(shard)
        names = ["states"] + (["steps"] if self.steps is not None else [])
        if self.cond_in_shards:
            names += list(self.cond_arrays.values())
        arrays = [np.asarray(self.group[n][lo:hi]) for n in names]
        if self.cond_in_shards and shard == 0:
            arrays += [np.asarray(self.group["null_" + n][:1]) for n in self.cond_arrays.values()]
        return digest(*arrays)

    def _shard_states(self, shard: int) -> np.ndarray:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        lo, hi = self.shard_range(shard)
        from pipeline.shard_check import named_read_errors

        with named_read_errors(self, shard):
            data = decode(np.asarray(self.states[lo:hi]), self.store_dtype)
        self._cache[shard] = data
        while len(self._cache) * self._shard_bytes > self._cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------ reader API (float32 out, any store dtype)
    def segment(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(z at edge k, z at edge k+1) of sample i: window k of its teacher trajectory."""
        if self._shard_bytes > self._cache_bytes or i // self.shard_size not in self._cache:
            if not (0 <= i < self.num_samples and 0 <= k < self.num_windows):
                raise IndexError(f"segment ({i}, {k}) out of range "
                                 f"({self.num_samples} samples, {self.num_windows} windows)")
            pair = decode(np.asarray(self.states[int(i), int(k):int(k) + 2]), self.store_dtype)  # one chunk read
            return pair[0], pair[1]
        z0, z1 = self.segments([i], [k])
        return z0[0], z1[0]

    def segments(self, indices, ks) -> tuple[np.ndarray, np.ndarray]:
        """Batched random access: (z_start [n, C, H, W], z_end [n, C, H, W]) for samples `indices`, windows `ks`."""
        idx, ks = np.asarray(indices, dtype=np.int64).reshape(-1), np.asarray(ks, dtype=np.int64).reshape(-1)
        if len(idx) != len(ks):
            raise ValueError(f"{len(idx)} sample indices but {len(ks)} window indices")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples or ks.min() < 0 or ks.max() >= self.num_windows):
            raise IndexError(f"segment index out of range (samples < {self.num_samples}, windows < {self.num_windows})")
        out = np.empty((len(idx), 2, *self.states.shape[2:]), dtype=np.float32)
        shards = idx // self.shard_size
        if self._shard_bytes <= self._cache_bytes:
            for j in np.unique(shards):
                rows = np.nonzero(shards == j)[0]
                data = self._shard_states(int(j))
                local = idx[rows] - j * self.shard_size
                out[rows] = data[local[:, None], ks[rows, None] + np.arange(2)]
        else:                                    # big latents: read only the chunks of the asked samples
            uniq, inv = np.unique(idx, return_inverse=True)
            data = decode(read_rows(self.states, uniq), self.store_dtype)
            out[:] = data[inv[:, None], ks[:, None] + np.arange(2)]
        return out[:, 0], out[:, 1]

    def iter_shards(self) -> Iterator[dict[str, Any]]:
        """Shard by shard, in order: dict(start, stop, states, guidance, prompt_index, seed[, steps]), float32."""
        for j in range(self.num_shards):
            lo, hi = self.shard_range(j)
            item = {"shard": j, "start": lo, "stop": hi, "states": decode(np.asarray(self.states[lo:hi]),
                                                                          self.store_dtype),
                    "guidance": self.guidance[lo:hi], "prompt_index": self.prompt_index[lo:hi],
                    "seed": self.seed[lo:hi]}
            if self.steps is not None:
                item["steps"] = decode(np.asarray(self.steps[lo:hi]), self.store_dtype)
            yield item

    def cond(self, prompt_indices) -> dict[str, torch.Tensor]:
        """Teacher conditions (float32, CPU) for the given prompt indices; each distinct prompt is read once."""
        p = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
        if len(p) and (p.min() < 0 or p.max() >= self.num_prompts):
            raise IndexError(f"prompt index out of range (prompts < {self.num_prompts})")
        return self.row_cond(self._prompt_row[p])

    def sample_cond(self, indices) -> dict[str, torch.Tensor]:
        """Teacher conditions (float32, CPU) of sample rows (their own prompts)."""
        return self.row_cond(indices)

    def cond_nbytes(self) -> int:
        """float32 bytes of one condition per prompt (what a reader caching all prompts would hold)."""
        return self.num_prompts * sum(int(np.prod(self.group[n].shape[1:])) * 4 for n in self.cond_arrays.values())

