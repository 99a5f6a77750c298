"""What the two shard stages share (generate -> trajectory store, encode -> latent store; docs/store.md):
a unit per shard of consecutive rows, a config whose paths every worker resolves alike, the job built
from the stage's worker resources, a worker that loads the teacher once and opens the store for writing,
and `status --verify` of a done shard against the checksum its completion record holds."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.rowstore import RowStore, shard_key
from pipeline.runner import Job, Unit, read_record, torch_threads


def absolute_root(cfg):
    """The config with an absolute root: Ray actors (maybe on other nodes, other working dirs) resolve the
    same files."""
    return cfg.model_copy(update={"root": str(Path(cfg.root).absolute())})


def shard_units(rows: int, shard_size: int) -> list[Unit]:
    """One unit per shard of `shard_size` consecutive rows (the last one shorter): params shard, start, stop."""
    shard = min(shard_size, rows)
    return [Unit(shard_key(j), {"shard": j, "start": lo, "stop": min(lo + shard, rows)}, min(lo + shard, rows) - lo)
            for j, lo in enumerate(range(0, rows, shard))]


def shard_job(stage: str, out_dir: Path, units: list[Unit], make_worker: Callable, prepare: Callable,
              resources, item_name: str) -> Job:
    """The stage's job; `resources` is its config section (cpus_per_worker, gpus_per_worker, max_retries)."""
    return Job(stage, out_dir, units, make_worker, prepare=prepare, num_cpus=resources.cpus_per_worker,
               num_gpus=resources.gpus_per_worker, max_retries=resources.max_retries, item_name=item_name)


class ShardWorker:
    """Loads the teacher once (per process / Ray actor, with the section's thread count) and opens the
    stage's store for writing; a stage's worker adds `run(unit)`."""

    store_cls: type[RowStore] = RowStore

    def __init__(self, cfg, meta: dict, out_dir: Path, resources):
        from pipeline.teachers import load_teacher

        self.cfg, self.threads = cfg, resources.cpus_per_worker
        with torch_threads(self.threads):
            self.teacher = load_teacher(cfg)
        self.store = self.store_cls.open(out_dir, meta, mode="r+", check_complete=False)


def verify_shard(job: Job, unit: Unit, store_cls: type[RowStore]) -> str | None:
    """`status --verify`: a done shard must read back with the checksum its writer recorded."""
    rec = read_record(job.out_dir, unit.key)
    if not rec or rec.get("status") != "done":
        return None
    try:
        store = store_cls.open(job.out_dir, check_complete=False)
    except Exception as exc:  # noqa: BLE001  (unreadable metadata)
        return f"store unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    from pipeline.shard_check import shard_problem

    problem = shard_problem(store.path, rec.get("files") or {})     # cheap first: a file gone or cut short
    if problem:
        return f"shard files damaged ({problem})"
    try:
        got = store.shard_checksum(unit.params["shard"])
    except Exception as exc:  # a shard zarr cannot decode (e.g. truncated)
        return f"shard unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if got != rec.get("checksum"):
        return "shard checksum differs from its completion record (corrupt or overwritten)"
    return None
