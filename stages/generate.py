"""Generate stage: run the teacher ODE from noise with CFG and cache its window-edge states in the store.

Plan: sample i has prompt i % P, seed sample_seeds(generate.seed)[i] and w ~ U[generate.guidance] from that
seed; units are shards of `generate.shard_size` consecutive samples. Everything a unit writes depends only
on the config and its shard (batches are cut inside the shard, torch threads = cpus_per_worker), so local,
Ray, any worker count and kill-and-resume all give bit-identical stores.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write_parquet
from pipeline.runner import Job, Unit, drop_record, read_record
from pipeline.store import (STORE_NAME, TrajectoryStore, generate_prompts, guidance_for, noise_for, sample_seeds,
                            shard_key, store_meta)


def plan_samples(cfg) -> dict[str, np.ndarray]:
    """The per-sample plan: sample, prompt_index, seed, guidance (deterministic from the config)."""
    n_prompts = len(generate_prompts(cfg))
    S = n_prompts * cfg.generate.samples_per_prompt
    seeds = sample_seeds(cfg.generate.seed, S)
    lo, hi = cfg.generate.guidance
    return {"sample": np.arange(S, dtype=np.int64), "prompt_index": np.arange(S, dtype=np.int64) % n_prompts,
            "seed": seeds, "guidance": guidance_for(seeds, lo, hi)}


def jobs(cfg, **_) -> list[Job]:
    """One job: a unit per shard. Cheap (reads the prompt list only); the teacher loads in workers."""
    if cfg.generate.samples_per_prompt < 1 or cfg.generate.shard_size < 1 or cfg.generate.batch_size < 1:
        raise UserError("generate.samples_per_prompt, shard_size and batch_size must all be >= 1")
    # Absolute paths: Ray actors (maybe on other nodes, other working dirs) resolve the same files.
    cfg = cfg.model_copy(update={"root": str(Path(cfg.root).absolute())})
    out_dir = cfg.stage_dir("generate")
    S = len(generate_prompts(cfg)) * cfg.generate.samples_per_prompt
    shard = min(cfg.generate.shard_size, S)
    units = [Unit(shard_key(j), {"shard": j, "start": lo, "stop": min(lo + shard, S)}, min(lo + shard, S) - lo)
             for j, lo in enumerate(range(0, S, shard))]
    meta = store_meta(cfg)
    g = cfg.generate
    return [Job("generate", out_dir, units, functools.partial(GenerateWorker, cfg, meta),
                prepare=functools.partial(prepare_store, cfg, meta, out_dir, [u.key for u in units]),
                num_cpus=g.cpus_per_worker, num_gpus=g.gpus_per_worker, max_retries=g.max_retries,
                item_name="samples")]


def prepare_store(cfg, meta: dict, out_dir: Path, keys: list[str]) -> None:
    """Driver side, before any unit: create the store (plan + prompt embeddings) or check the existing one."""
    path = out_dir / STORE_NAME
    plan = plan_samples(cfg)
    _write_sample_table(out_dir, plan)
    if TrajectoryStore.created(path):
        TrajectoryStore.open(path, meta, check_complete=False)      # refuses a store of another config
        return
    for key in keys:                                                 # a rebuilt store has no finished shards
        drop_record(out_dir, key)
    from pipeline.teachers import load_teacher

    prompts = generate_prompts(cfg)
    teacher = load_teacher(cfg, _driver_device(cfg.device))
    with torch.no_grad():
        cond, null = teacher.encode(prompts), teacher.encode([""])
    TrajectoryStore.create(path, meta, prompts, teacher.sample_shape, cfg.generate.shard_size,
                           cfg.schedule.teacher_steps, cfg.schedule.windows, plan, cond, null,
                           cfg.generate.record_every_step)


def _driver_device(name: str) -> str:
    # The driver may sit on a CPU-only head node; prompt encoding is cheap there.
    return name if not name.startswith("cuda") or torch.cuda.is_available() else "cpu"


def _write_sample_table(out_dir: Path, plan: dict[str, np.ndarray]) -> None:
    atomic_write_parquet(out_dir / "samples.parquet", pa.table(plan))


@contextlib.contextmanager
def torch_threads(n: int):
    """CPU results can depend on the thread count: pin it per unit, the same under every executor."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class GenerateWorker:
    """Loads the teacher once (per process / Ray actor) and fills whole shards."""

    def __init__(self, cfg, meta: dict):
        from pipeline.schedule import fixed_sigmas
        from pipeline.teachers import load_teacher

        self.cfg = cfg
        self.threads = cfg.generate.cpus_per_worker
        with torch_threads(self.threads):
            self.teacher = load_teacher(cfg)
        self.store = TrajectoryStore.open(cfg.stage_dir("generate") / STORE_NAME, meta, mode="r+",
                                          check_complete=False)
        self.grid = fixed_sigmas(cfg.schedule.teacher_steps, cfg.schedule.shift)
        self.per_window = cfg.schedule.teacher_steps // cfg.schedule.windows

    def run(self, unit: Unit) -> dict[str, Any]:
        from pipeline.sampling import sample

        lo, hi = unit.params["start"], unit.params["stop"]
        st = self.store
        dev = self.teacher.device
        states = np.empty((hi - lo, *st.states.shape[1:]), dtype=np.float32)
        steps = np.empty((hi - lo, *st.steps.shape[1:]), dtype=np.float32) if st.steps is not None else None
        with torch_threads(self.threads):
            for b in range(lo, hi, self.cfg.generate.batch_size):
                rows = slice(b - lo, min(b + self.cfg.generate.batch_size, hi) - lo)
                n = rows.stop - rows.start
                noise = noise_for(st.seed[b:b + n], st.sample_shape).to(dev)
                # float32 states and conditions: the teacher casts to teacher.dtype itself (load_teacher)
                cond = {k: v.to(dev) for k, v in st.cond(st.prompt_index[b:b + n]).items()}
                null = {k: v.to(dev) for k, v in st.null_cond(n).items()}
                w = torch.from_numpy(st.guidance[b:b + n]).to(dev)

                def record(i, x, sigma, v, rows=rows):
                    if i % self.per_window == 0:
                        states[rows, i // self.per_window] = x.float().cpu().numpy()
                    if steps is not None:
                        steps[rows, i] = x.float().cpu().numpy()

                sample(self.teacher.velocity, noise, self.grid, cond, null, w, record)
        digest = st.write_shard(unit.params["shard"], states, steps)
        return {"checksum": digest, "samples": hi - lo, "worker_pid": os.getpid()}


def verify_unit(job: Job, unit: Unit) -> str | None:
    """`status --verify`: a done shard must read back with the checksum its writer recorded."""
    rec = read_record(job.out_dir, unit.key)
    if not rec or rec.get("status") != "done":
        return None
    try:
        store = TrajectoryStore.open(job.out_dir / STORE_NAME, check_complete=False)
        got = store.shard_checksum(unit.params["shard"])
    except Exception as exc:  # unreadable metadata or a shard zarr cannot decode (e.g. truncated)
        return f"shard unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if got != rec.get("checksum"):
        return "shard checksum differs from its completion record (corrupt or overwritten)"
    return None
