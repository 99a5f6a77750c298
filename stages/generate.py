"""Generate stage: run the teacher ODE from noise with CFG and cache its window-edge states in the store.

Plan: sample i has prompt i % P, seed sample_seeds(generate.seed)[i] and w ~ U[generate.guidance] from that
seed; units are shards of `generate.shard_size` consecutive samples. Everything a unit writes depends only
on the config and its shard (batches are cut inside the shard, torch threads = cpus_per_worker), so local,
Ray, any worker count and kill-and-resume all give bit-identical stores.

The driver never builds the teacher: it plans from the prompt count, copies the prompts beside the store
and creates the arrays from the teacher's layout (`describe_teacher`, config files only). Each unit
encodes its own shard's prompts on its worker's device and writes those conditions with its states
(docs/store.md: why conditions are stored per sample row).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.datasets import PROMPTS_FILE, prompt_summary
from pipeline.errors import UserError
from pipeline.files import atomic_write_parquet, atomic_write_stream
from pipeline.row_arrays import round_trip
from pipeline.runner import Job, Unit, drop_record, is_done, torch_threads
from pipeline.seeds import guidance_for, noise_for, sample_seeds
from pipeline.shard_stage import ShardWorker, absolute_root, shard_job, shard_units, verify_shard
from pipeline.store import STORE_NAME, TrajectoryStore, store_meta


def plan_samples(cfg) -> dict[str, np.ndarray]:
    """The per-sample plan: sample, prompt_index, seed, guidance (deterministic from the config)."""
    n_prompts, _ = prompt_summary(cfg)
    S = n_prompts * cfg.generate.samples_per_prompt
    seeds = sample_seeds(cfg.generate.seed, S)
    lo, hi = cfg.generate.guidance
    return {"sample": np.arange(S, dtype=np.int64), "prompt_index": np.arange(S, dtype=np.int64) % n_prompts,
            "seed": seeds, "guidance": guidance_for(seeds, lo, hi)}


def check(cfg) -> None:
    """At load (pipeline/preflight.py): the prompts read, and their sample count is under the ceiling."""
    from schemas.config import MAX_COUNT

    n_prompts = prompt_summary(cfg)[0]
    if n_prompts * cfg.generate.samples_per_prompt > MAX_COUNT:    # checked before anything is allocated
        raise UserError(f"generate.samples_per_prompt: {n_prompts} prompts x {cfg.generate.samples_per_prompt} "
                        f"= {n_prompts * cfg.generate.samples_per_prompt} samples is above the ceiling {MAX_COUNT}")


def jobs(cfg, rebuild: bool = False, **_) -> list[Job]:
    """One job: a unit per shard. Cheap (one streamed pass over the prompts); the teacher loads in workers."""
    check(cfg)
    n_prompts = prompt_summary(cfg)[0]
    cfg = absolute_root(cfg)
    out_dir = cfg.stage_dir("generate")
    units = shard_units(n_prompts * cfg.generate.samples_per_prompt, cfg.generate.shard_size)
    meta = store_meta(cfg)
    return [shard_job("generate", out_dir, units, functools.partial(GenerateWorker, cfg, meta),
                      functools.partial(prepare_store, cfg, meta, out_dir, [u.key for u in units], rebuild),
                      cfg.generate, "samples")]


def prepare_store(cfg, meta: dict, out_dir: Path, keys: list[str], rebuild: bool = False) -> None:
    """Driver side under the stage lock, before any unit: create the store (plan, prompts copy, empty arrays)
    or check the existing one. Needs no model: shapes come from the teacher's layout. Only `rebuild` deletes
    a store; unreadable metadata is a UserError naming the file (docs/reliability.md)."""
    path = out_dir / STORE_NAME
    TrajectoryStore.remove_stale_builds(path)                        # a creation killed midway (we hold the lock)
    if rebuild and path.exists():
        delete_store(out_dir, keys)
    plan = plan_samples(cfg)
    _write_sample_table(out_dir, plan)
    if TrajectoryStore.created(path):
        store = TrajectoryStore.open(path, meta, check_complete=False)      # refuses a store of another config
        from pipeline.rowstore import shard_key
        from pipeline.shard_check import redo_damaged

        redo_damaged(store, out_dir, shard_key)                                 # a lost shard file is redone, not skipped
        _check_resume(cfg, store, out_dir, keys)
        return
    for key in keys:                                                 # a new store has no finished shards
        drop_record(out_dir, key)
    from pipeline.teachers import describe_teacher

    layout = describe_teacher(cfg)
    n_prompts = _copy_prompts(cfg, out_dir / PROMPTS_FILE)
    g = cfg.generate
    TrajectoryStore.create(path, meta, n_prompts, layout.sample_shape, g.shard_size, cfg.schedule.teacher_steps,
                           cfg.schedule.windows, plan, record_every_step=g.record_every_step,
                           store_dtype=g.store_dtype, compressor=g.compressor, cond_shapes=layout.cond_shapes,
                           cond_extents=layout.cond_extents,
                           run_attrs={"batch_size": g.batch_size, "compile": g.compile})


def _check_resume(cfg, store: TrajectoryStore, out_dir: Path, keys: list[str]) -> None:
    """generate.batch_size and generate.compile are outside the fingerprint (how the work runs; a finished store
    reads the same to training whatever they were), but the teacher's kernels round differently per batch size
    and compiled (~1e-5): a half-made store is only resumed with the values it was started with (its attrs)."""
    run = store.group.attrs.get("run", {})
    done = sum(is_done(out_dir, k) for k in keys)
    for key in ("batch_size", "compile"):
        started, now = run.get(key), getattr(cfg.generate, key)
        if key == "compile" and started is None:
            started = False if "batch_size" in run else None      # a store from before generate.compile
        if started is not None and started != now and 0 < done < len(keys):
            was = json.dumps(started)         # as the user writes it in YAML: true/false, numbers
            raise UserError(f"generate.{key} is {json.dumps(now)} but the store {store.path} was started with "
                            f"{key} {was} ({done} of {len(keys)} shards done); resume with {key} {was} (results "
                            f"depend on it at ~1e-5) or pass --rebuild to start over")


def delete_store(out_dir: Path, keys: list[str]) -> None:
    """The only deletion of a store: `generate --rebuild` and `status --verify --repair` (under the lock)."""
    shutil.rmtree(out_dir / STORE_NAME, ignore_errors=True)
    for key in keys:
        drop_record(out_dir, key)


def _copy_prompts(cfg, dest: Path) -> int:
    """The prompt rows into prompts.parquet beside the store, streamed and checked; returns their count."""
    if cfg.generate.prompts is None:
        import pyarrow as pa

        from pipeline.digits import DIGIT_PROMPTS

        atomic_write_parquet(dest, pa.table({"text": pa.array(DIGIT_PROMPTS, pa.string())}))
        return len(DIGIT_PROMPTS)
    from pipeline.datasets import copy_text_column

    rows, _ = copy_text_column(cfg.generate.prompts, dest, cfg.generate.prompt_column)
    return rows


def _write_sample_table(out_dir: Path, plan: dict[str, np.ndarray]) -> None:
    """The plan as a table, streamed to the file: no dictionary pages (every seed is distinct, and their
    hash tables cost the driver ~100 bytes a sample) and no in-memory copy of the file."""
    import pyarrow.parquet as pq

    atomic_write_stream(out_dir / "samples.parquet", lambda f: pq.write_table(pa.table(plan), f, use_dictionary=False))


class GenerateWorker(ShardWorker):
    """Solves the teacher ODE for whole shards of the trajectory store."""

    store_cls = TrajectoryStore
    overlap_writes = True       # False: conditions written after the solves (bench/generate_overlap.py's baseline)

    def __init__(self, cfg, meta: dict):
        from pipeline.schedule import fixed_sigmas

        super().__init__(cfg, meta, cfg.stage_dir("generate"), cfg.generate)
        self.teacher_seconds = 0.0
        self.grid = fixed_sigmas(cfg.schedule.teacher_steps, cfg.schedule.shift)
        self.per_window = cfg.schedule.teacher_steps // cfg.schedule.windows
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cond-write")
        if cfg.generate.compile:
            from pipeline.fast_step import compile_blocks

            if not compile_blocks(getattr(self.teacher, "transformer", None)):
                raise UserError("generate.compile: this teacher has no `transformer.transformer_blocks` to compile")

    def velocity(self, x, sigma, cond):
        """The teacher (float32 in and out: load_teacher casts to teacher.dtype itself), timed."""
        t0 = time.perf_counter()
        v = self.teacher.velocity(x, sigma, cond)
        self.teacher_seconds += time.perf_counter() - t0
        return v

    def encode_shard(self, lo: int, hi: int) -> tuple[dict, dict]:
        """The shard's rows' prompt conditions and the "" condition, as the store will hold them (float32):
        each distinct prompt of the shard is encoded once, here, on this worker's device."""
        st = self.store
        p = st.prompt_index[lo:hi]
        uniq, inv = np.unique(p, return_inverse=True)
        with torch.no_grad():
            enc = self.teacher.encode(st.prompts.take(uniq))
            null = self.teacher.encode([""])
        kind = st.store_dtype
        cond = {k: round_trip(v, kind)[torch.as_tensor(inv.reshape(-1))] for k, v in enc.items()}
        return cond, {k: round_trip(v[:1], kind) for k, v in null.items()}

    def run(self, unit: Unit) -> dict[str, Any]:
        lo, hi = unit.params["start"], unit.params["stop"]
        st = self.store
        states = np.empty((hi - lo, *st.states.shape[1:]), dtype=np.float32)
        steps = np.empty((hi - lo, *st.steps.shape[1:]), dtype=np.float32) if st.steps is not None else None
        self.teacher_seconds, t0 = 0.0, time.perf_counter()
        shard = unit.params["shard"]
        with torch_threads(self.threads):
            shard_cond, shard_null = self.encode_shard(lo, hi)
            encode_seconds = time.perf_counter() - t0
            # The conditions (most of a shard's bytes at SD3 shapes) are written while the states are solved.
            cond_args = (shard, shard_cond, shard_null if shard == 0 else None)
            cond_written = self.writer.submit(self.write_cond, *cond_args) if self.overlap_writes else None
            try:
                self.solve(lo, hi, states, steps, shard_cond, shard_null)
            finally:
                if cond_written is not None:
                    wait([cond_written])      # never left writing behind a failed unit
        t1 = time.perf_counter()
        written_cond, cond_write_seconds = cond_written.result() if cond_written else self.write_cond(*cond_args)
        digest = st.write_shard(shard, states, steps, written_cond=written_cond)
        from pipeline.shard_check import shard_files

        return {"checksum": digest, "files": shard_files(st, shard), "samples": hi - lo, "worker_pid": os.getpid(),
                "encode_seconds": round(encode_seconds, 4), "teacher_seconds": round(self.teacher_seconds, 4),
                "cond_write_seconds": round(cond_write_seconds, 4),      # overlapped with the solves
                "write_seconds": round(time.perf_counter() - t1, 4)}

    def write_cond(self, shard: int, cond: dict, null: dict | None) -> tuple[dict, float]:
        t0 = time.perf_counter()
        return self.store.write_cond(shard, cond, null), time.perf_counter() - t0

    def solve(self, lo: int, hi: int, states: np.ndarray, steps: np.ndarray | None, shard_cond: dict,
              shard_null: dict) -> None:
        """The teacher ODE of rows lo..hi, in batches; window-edge states (+ every step's) into the arrays."""
        from pipeline.sampling import sample

        st, dev = self.store, self.teacher.device
        for b in range(lo, hi, self.cfg.generate.batch_size):
            rows = slice(b - lo, min(b + self.cfg.generate.batch_size, hi) - lo)
            n = rows.stop - rows.start
            noise = noise_for(st.seed[b:b + n], st.sample_shape).to(dev)
            # float32 states and conditions: the teacher casts to teacher.dtype itself (load_teacher)
            cond = {k: v[rows].to(dev) for k, v in shard_cond.items()}
            null = {k: v.expand(n, *v.shape[1:]).to(dev) for k, v in shard_null.items()}
            w = torch.from_numpy(st.guidance[b:b + n]).to(dev)

            def record(i, x, sigma, v, rows=rows):
                if i % self.per_window == 0:
                    states[rows, i // self.per_window] = x.float().cpu().numpy()
                if steps is not None:
                    steps[rows, i] = x.float().cpu().numpy()

            sample(self.velocity, noise, self.grid, cond, null, w, record)


def verify_job(job: Job) -> str | None:
    """`status --verify`: the store's metadata must read (a problem here is reported, not repaired)."""
    try:
        if TrajectoryStore.created(job.out_dir / STORE_NAME):
            TrajectoryStore.open(job.out_dir / STORE_NAME, check_complete=False)
    except UserError as exc:
        return str(exc).split("; nothing was deleted")[0]
    return None


def repair_job(job: Job) -> str:
    """`status --verify --repair`: delete the unreadable store and its records."""
    delete_store(job.out_dir, [u.key for u in job.units])
    return f"deleted {job.out_dir / STORE_NAME} and its records; `flowsteer generate` rebuilds it"


def verify_unit(job: Job, unit: Unit) -> str | None:
    """`status --verify`: a done shard must read back with the checksum its writer recorded."""
    return verify_shard(job, unit, TrajectoryStore)
