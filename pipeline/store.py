"""The trajectory store: teacher ODE states at the K+1 window edges, one Zarr v3 shard per generate unit.

Layout (`<root>/generate/<fp>/store.zarr`; S samples, P prompts, K windows, M teacher steps, T =
generate.store_dtype; docs/store.md):
    states        [S, K+1, C, H, W] T     edge k = fixed_sigmas(K)[k]; 0 = the noise, K = the sample
    steps         [S, M+1, C, H, W] T     every teacher step (only with generate.record_every_step)
    guidance      [S] float32             CFG scale w of the sample's trajectory
    prompt_index  [S] int64               row of prompts.parquet (beside the store)
    seed          [S] int64               seeds.noise_for(seed, shape) is the sample's initial noise
    prompt_embeds [S, L, D] T, pooled_embeds [S, D'] T   the sample's prompt condition, per sample row,
                                          encoded and written by the unit of its shard
    null_*        [1, ...] T              the "" condition (written by shard 0's unit)
    attrs         meta (the config sections that decide the store + fingerprint), shapes, store_dtype
Sample arrays are sharded `shard_size` samples per shard file, one writer per shard, one inner chunk per
sample; everything is allocated when the store is created and never resized. Readers get float32.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.datasets import PROMPTS_FILE, prompt_summary
from pipeline.row_arrays import create_rows, decode, read_rows
from pipeline.rowstore import RowStore
from schemas.config import GENERATE_RUN_ONLY_KEYS

FORMAT = 2
STORE_NAME = "store.zarr"


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


# ---------------------------------------------------------------- the store
class TrajectoryStore(RowStore):
    """Reader (and per-shard writer) of one trajectory store; holds no sample data beyond a small shard cache."""

    kind = "trajectory store"
    file_name = STORE_NAME
    command = "flowsteer generate"
    mismatch_fix = "point train.store at a matching store or run `flowsteer generate`"
    rebuild_hint = ("nothing was deleted; `flowsteer generate --rebuild` (or `flowsteer status --verify --repair`) "
                    "deletes the store and generates it anew")

    def __init__(self, group, path: Path, cache_bytes: int = 256 << 20):
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
        # Whole shards are cached (as float32) when all of them fit: random batches then cost one read per shard.
        # A store bigger than the cache is read row by row: under random batches a cached shard would rarely be
        # hit again, and reading a whole shard for one row costs shard_size rows (bench/loader_bench.py).
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._shard_bytes = self.shard_size * int(np.prod(self.states.shape[1:])) * 4
        self._cache_shards = self._shard_bytes * self.num_shards <= cache_bytes

    # ------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, meta: dict, prompts: Sequence[str] | int, sample_shape: Sequence[int],
               shard_size: int, teacher_steps: int, num_windows: int, plan: dict[str, np.ndarray],
               cond: dict[str, torch.Tensor] | None = None, null_cond: dict[str, torch.Tensor] | None = None,
               record_every_step: bool = False, store_dtype: str = "float32", compressor: str = "none",
               cond_shapes: dict[str, Sequence[int]] | None = None, cond_extents: dict | None = None,
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
                          store_dtype, compressor, cond_shapes, int(prompts), run_attrs or {}, cond_extents)
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
                  store_dtype, compressor, cond_shapes, num_prompts: int, run_attrs: dict,
                  cond_extents: dict | None = None) -> None:
        for name, edges in [("states", num_windows + 1)] + ([("steps", teacher_steps + 1)] if record_every_step else []):
            create_rows(g, name, S, (edges, *C), shard, store_dtype, compressor)
        for name, dtype in (("guidance", "float32"), ("prompt_index", "int64"), ("seed", "int64")):
            g.create_array(name, data=np.asarray(plan[name], dtype=dtype), chunks=(max(S, 1),))
        shapes = cond_shapes or {k: tuple(v.shape[1:]) for k, v in (cond or {}).items()}
        names = cls.create_cond_arrays(g, S, shapes, shard, store_dtype, compressor, cond_extents)
        g.attrs.update({"sample_shape": list(C), "shard_size": shard, "cond_arrays": names,
                        "teacher_steps": teacher_steps, "store_dtype": store_dtype, "num_rows": S,
                        "num_prompts": num_prompts, "cond_in_shards": cond is None, "run": dict(run_attrs)})
        g.attrs["meta"] = meta

    @property
    def prompts(self):
        """The prompt rows (TextColumn over prompts.parquet beside the store: len, [i], take, iteration)."""
        from pipeline.datasets import TextColumn

        if self._prompts is None:
            self._prompts = TextColumn(self.path.parent / PROMPTS_FILE)
        return self._prompts

    @property
    def row_arrays(self) -> tuple[str, ...]:
        return ("states", "steps") if self.steps is not None else ("states",)

    # ------------------------------------------------------------ shards
    def write_shard(self, shard: int, states, steps=None, cond: dict[str, torch.Tensor] | None = None,
                    null: dict[str, torch.Tensor] | None = None, written_cond: dict | None = None) -> str:
        """Write one whole shard: states (+ steps) and, in a store whose units encode, the rows' conditions
        (+ the "" condition from shard 0) unless already `written_cond`; returns its checksum
        (RowStore.write_shard_data)."""
        rows = {"states": states, **({"steps": steps} if self.steps is not None else {})}
        checksum = self.write_shard_data(shard, rows, cond, null, written_cond)
        self._cache.pop(shard, None)
        return checksum

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
        if not self._cache_shards or i // self.shard_size not in self._cache:
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
        if self._cache_shards:
            for j in np.unique(shards):
                rows = np.nonzero(shards == j)[0]
                data = self._shard_states(int(j))
                local = idx[rows] - j * self.shard_size
                out[rows] = data[local[:, None], ks[rows, None] + np.arange(2)]
        else:                                    # a big store: read only the asked rows
            from pipeline.shard_reader import ShardRows

            direct = ShardRows.of(self.states)
            if direct is not None:               # the plain layout: just edges k, k+1 of each row, from the file
                raw = np.empty(out.shape, dtype=self.states.dtype)
                direct.read_into(idx, raw, first=ks, count=2)
                out[:] = decode(raw, self.store_dtype)
            else:
                uniq, inv = np.unique(idx, return_inverse=True)
                data = decode(read_rows(self.states, uniq), self.store_dtype)
                out[:] = data[inv[:, None], ks[:, None] + np.arange(2)]
        return out[:, 0], out[:, 1]

    def cond(self, prompt_indices, stored: bool = False) -> dict[str, torch.Tensor]:
        """Teacher conditions (CPU; float32, or with `stored` the store dtype) for the given prompt indices; each
        distinct prompt is read once."""
        p = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
        if len(p) and (p.min() < 0 or p.max() >= self.num_prompts):
            raise IndexError(f"prompt index out of range (prompts < {self.num_prompts})")
        return self.row_cond(self._prompt_row[p], stored)

    def cond_nbytes(self) -> int:
        """float32 bytes of one condition per prompt (what a reader caching all prompts would hold)."""
        return self.num_prompts * sum(int(np.prod(self.group[n].shape[1:])) * 4 for n in self.cond_arrays.values())

