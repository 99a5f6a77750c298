"""The trajectory store: teacher ODE states at the K+1 window edges, one Zarr v3 shard per generate unit.

Layout (`<root>/generate/<fp>/store.zarr`; S samples, P prompts, K windows, M teacher steps):
    states        [S, K+1, C, H, W] float32   edge k = fixed_sigmas(K)[k]; 0 = the noise, K = the sample
    steps         [S, M+1, C, H, W] float32   every teacher step (only with generate.record_every_step)
    guidance      [S] float32                 CFG scale w of the sample's trajectory
    prompt_index  [S] int64                   row of prompt_embeds / pooled_embeds
    seed          [S] int64                   noise_for(seed, shape) is the sample's initial noise
    prompt_embeds [P, L, D], pooled_embeds [P, D'] (+ null_* [1, ...] for "")  teacher conditions
    attrs         meta (the config sections that decide the store + fingerprint), prompts, shapes
Sample arrays are sharded `shard_size` samples per shard file, one writer per shard, one inner chunk
per sample; everything is allocated when the store is created and never resized.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from schemas.config import GENERATE_RUN_ONLY_KEYS

FORMAT = 1
STORE_NAME = "store.zarr"
# Teacher condition keys (SD3 argument names) -> store array names.
COND_ARRAYS = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_embeds"}


# ---------------------------------------------------------------- deterministic per-sample draws
def noise_for(seed: int | Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The initial noise of a sample (float32, CPU) from its seed alone; a list of seeds gives [n, *shape]."""
    if not isinstance(seed, (int, np.integer)):
        return torch.stack([noise_for(int(s), shape) for s in seed]) if len(seed) else torch.empty(0, *shape)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)))


def sample_seeds(base_seed: int, n: int) -> np.ndarray:
    """Per-sample seeds hashed from (generate.seed, index): large, so they never meet small evaluation seeds."""
    return np.array([np.random.SeedSequence([base_seed, i]).generate_state(1, np.uint32)[0] for i in range(n)],
                    dtype=np.int64)


def guidance_for(seeds: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """w ~ U[lo, hi] per sample, drawn from the sample's seed (a stream apart from its noise)."""
    return np.array([lo + (hi - lo) * np.random.default_rng([int(s), 1]).random() for s in seeds], dtype=np.float32)


# ---------------------------------------------------------------- what a config's store must be
def generate_prompts(cfg) -> list[str]:
    """generate.prompts (one prompt a line) or the embedded digit prompts."""
    if cfg.generate.prompts is None:
        from pipeline.digits import DIGIT_PROMPTS

        return list(DIGIT_PROMPTS)
    path = Path(cfg.generate.prompts)
    if not path.is_file():
        raise UserError(f"generate.prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"generate.prompts file {path} has no prompts")
    return prompts


def store_meta(cfg) -> dict[str, Any]:
    """The config sections that decide a store's contents, its fingerprint, and the prompts' hash."""
    gen = cfg.generate.model_dump(mode="json", exclude=set(GENERATE_RUN_ONLY_KEYS))
    prompts = generate_prompts(cfg)
    return {"format": FORMAT, "teacher": cfg.teacher.model_dump(mode="json"),
            "schedule": cfg.schedule.model_dump(mode="json"), "generate": gen,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
            "fingerprint": cfg.fingerprint("generate")}


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


# ---------------------------------------------------------------- the store
class TrajectoryStore:
    """Reader (and per-shard writer) of one trajectory store; holds no sample data beyond a small shard cache."""

    def __init__(self, group, path: Path, cache_bytes: int):
        self.group, self.path = group, path
        attrs = group.attrs.asdict()
        self.meta: dict[str, Any] = attrs["meta"]
        self.prompts: list[str] = attrs["prompts"]
        self.sample_shape: tuple[int, ...] = tuple(attrs["sample_shape"])
        self.shard_size: int = attrs["shard_size"]
        self.cond_arrays: dict[str, str] = attrs["cond_arrays"]
        self.states = group["states"]
        self.steps = group["steps"] if "steps" in group else None
        self.num_samples: int = self.states.shape[0]
        self.num_windows: int = self.states.shape[1] - 1
        # Per-sample scalars are tiny: read once.
        self.guidance = np.asarray(group["guidance"][:])
        self.prompt_index = np.asarray(group["prompt_index"][:])
        self.seed = np.asarray(group["seed"][:])
        self.prompt_embeds = group[self.cond_arrays.get("encoder_hidden_states", "prompt_embeds")]
        self.pooled_embeds = group[self.cond_arrays.get("pooled_projections", "pooled_embeds")]
        self._null = {k: torch.from_numpy(np.asarray(group[f"null_{name}"][:])) for k, name in self.cond_arrays.items()}
        # Whole shards are cached (LRU, bounded) when small enough: random batches then cost one read per shard.
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._shard_bytes = self.shard_size * int(np.prod(self.states.shape[1:])) * 4

    # ------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, meta: dict, prompts: list[str], sample_shape: Sequence[int], shard_size: int,
               teacher_steps: int, num_windows: int, plan: dict[str, np.ndarray], cond: dict[str, torch.Tensor],
               null_cond: dict[str, torch.Tensor], record_every_step: bool = False) -> "TrajectoryStore":
        """Allocate every array (shards of `shard_size` samples), write the plan and conditions, mark created."""
        import zarr

        path = Path(path)
        if path.exists():
            shutil.rmtree(path)             # a creation cut short: nothing in it can have been finished
        S, C = len(plan["seed"]), tuple(int(s) for s in sample_shape)
        shard = min(shard_size, S)
        g = zarr.open_group(str(path), mode="w")
        for name, edges in [("states", num_windows + 1)] + ([("steps", teacher_steps + 1)] if record_every_step else []):
            g.create_array(name, shape=(S, edges, *C), chunks=(1, edges, *C), shards=(shard, edges, *C),
                           dtype="float32", fill_value=0.0, compressors=None)
        for name, dtype in (("guidance", "float32"), ("prompt_index", "int64"), ("seed", "int64")):
            g.create_array(name, data=np.asarray(plan[name], dtype=dtype), chunks=(max(S, 1),))
        names = {k: COND_ARRAYS.get(k, k) for k in cond}
        for key, name in names.items():
            for prefix, value in (("", cond[key]), ("null_", null_cond[key][:1])):
                arr = value.detach().float().cpu().numpy()
                g.create_array(prefix + name, data=arr, chunks=(1, *arr.shape[1:]), compressors=None)
        # Written last: a store without `meta` is an interrupted creation and is rebuilt.
        g.attrs.update({"prompts": list(prompts), "sample_shape": list(C), "shard_size": shard,
                        "cond_arrays": names, "teacher_steps": teacher_steps})
        g.attrs["meta"] = meta
        return cls.open(path, meta, mode="r+", check_complete=False)

    @staticmethod
    def created(path: Path) -> bool:
        """Whether `path` holds a store whose creation finished."""
        import zarr

        try:
            return "meta" in zarr.open_group(str(path), mode="r").attrs
        except Exception:
            return False

    @classmethod
    def open(cls, path: str | Path, expected_meta: dict | None = None, mode: str = "r",
             check_complete: bool = True, cache_bytes: int = 256 << 20) -> "TrajectoryStore":
        """Open a store (a store.zarr or the generate dir holding one); refuse one made by another config."""
        import zarr

        path = Path(path)
        if (path / STORE_NAME).is_dir():
            path = path / STORE_NAME
        if not cls.created(path):
            raise UserError(f"no trajectory store at {path}; run `flowsteer generate` first")
        store = cls(zarr.open_group(str(path), mode=mode), path, cache_bytes)
        if expected_meta is not None:
            diff = meta_differences(store.meta, expected_meta)
            if diff:
                raise UserError(f"trajectory store {path} was built from another config ({mismatch_summary(diff)}); "
                                f"point train.store at a matching store or run `flowsteer generate`")
        if check_complete:
            missing = store.missing_shards()
            if missing:
                raise UserError(f"trajectory store {path} is incomplete ({len(missing)} of {store.num_shards} "
                                f"shards not generated); run `flowsteer generate` to finish it")
        return store

    # ------------------------------------------------------------ shards
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples)

    def missing_shards(self) -> list[int]:
        """Shards without a `done` completion record (records live beside the store, written by the runner)."""
        from pipeline.runner import is_done

        return [j for j in range(self.num_shards) if not is_done(self.path.parent, shard_key(j))]

    def write_shard(self, shard: int, states: np.ndarray, steps: np.ndarray | None = None) -> str:
        """Write one whole shard (one write per array, never a partial shard); returns its checksum."""
        lo, hi = self.shard_range(shard)
        states = np.ascontiguousarray(states, dtype=np.float32)
        if states.shape != (hi - lo, *self.states.shape[1:]):
            raise ValueError(f"shard {shard} expects states {(hi - lo, *self.states.shape[1:])}, got {states.shape}")
        arrays = [(self.states, states)] + ([(self.steps, steps)] if self.steps is not None else [])
        for arr, data in arrays:
            # zarr reads an existing shard before overwriting it: drop a damaged leftover so a redo never fails.
            key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
            (self.path / arr.path / key).unlink(missing_ok=True)
            arr[lo:hi] = np.ascontiguousarray(data, dtype=np.float32)
        self._cache.pop(shard, None)
        return checksum(states, steps if self.steps is not None else None)

    def shard_checksum(self, shard: int) -> str:
        """The checksum of a shard as it reads back from disk (raises if zarr cannot decode it)."""
        lo, hi = self.shard_range(shard)
        steps = np.asarray(self.steps[lo:hi]) if self.steps is not None else None
        return checksum(np.asarray(self.states[lo:hi]), steps)

    def _shard_states(self, shard: int) -> np.ndarray:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        lo, hi = self.shard_range(shard)
        data = np.asarray(self.states[lo:hi])
        self._cache[shard] = data
        while len(self._cache) * self._shard_bytes > self._cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------ reader API
    def segment(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(z at edge k, z at edge k+1) of sample i: window k of its teacher trajectory."""
        if self._shard_bytes > self._cache_bytes or i // self.shard_size not in self._cache:
            if not (0 <= i < self.num_samples and 0 <= k < self.num_windows):
                raise IndexError(f"segment ({i}, {k}) out of range "
                                 f"({self.num_samples} samples, {self.num_windows} windows)")
            pair = np.asarray(self.states[int(i), int(k):int(k) + 2])   # one chunk read, no whole shard
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
            data = np.asarray(self.states.oindex[uniq])
            out[:] = data[inv[:, None], ks[:, None] + np.arange(2)]
        return out[:, 0], out[:, 1]

    def iter_shards(self) -> Iterator[dict[str, Any]]:
        """Shard by shard, in order: dict(start, stop, states, guidance, prompt_index, seed[, steps])."""
        for j in range(self.num_shards):
            lo, hi = self.shard_range(j)
            item = {"shard": j, "start": lo, "stop": hi, "states": np.asarray(self.states[lo:hi]),
                    "guidance": self.guidance[lo:hi], "prompt_index": self.prompt_index[lo:hi],
                    "seed": self.seed[lo:hi]}
            if self.steps is not None:
                item["steps"] = np.asarray(self.steps[lo:hi])
            yield item

    def cond(self, prompt_indices) -> dict[str, torch.Tensor]:
        """Teacher conditions (float32, CPU) for the given prompt rows; each distinct prompt is read once."""
        p = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
        uniq, inv = np.unique(p, return_inverse=True)
        return {k: torch.from_numpy(np.asarray(self.group[name].oindex[uniq])[inv])
                for k, name in self.cond_arrays.items()}

    def null_cond(self, n: int) -> dict[str, torch.Tensor]:
        """The unconditional ("" prompt) condition, n rows."""
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self._null.items()}


def shard_key(shard: int) -> str:
    """The generate unit (and completion record) key of a shard."""
    return f"shard-{shard:05d}"


def checksum(states: np.ndarray, steps: np.ndarray | None = None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(states, dtype=np.float32).tobytes())
    if steps is not None:
        h.update(np.ascontiguousarray(steps, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]
