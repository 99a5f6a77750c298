"""Units, completion records, and the interchangeable local and Ray executors.

Contract (every stage): a unit writes its outputs first, then its completion record (temp file, fsync,
rename). A rerun skips units with a `done` record and redoes the rest; `failed` records keep the error
message for `flowsteer status`. The record is written by the process that ran the unit, so a driver crash
never loses finished work.
"""
from __future__ import annotations

import contextlib

import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.files import StageLock, atomic_write_json, atomic_write_parquet


@dataclass(frozen=True)
class Unit:
    key: str                                  # unique within a job, safe as a file name
    params: dict[str, Any] = field(default_factory=dict)
    size: int = 1                             # items (samples, steps) for the progress rate


class Worker(Protocol):
    def run(self, unit: Unit) -> dict[str, Any]:
        """Do the unit's work and write its outputs; return facts to keep in the completion record."""


@dataclass
class Job:
    """One stage's work in one output directory."""
    stage: str
    out_dir: Path
    units: list[Unit]
    make_worker: Callable[[], Worker]         # picklable: built once per process / Ray actor
    prepare: Callable[[], None] | None = None  # driver side, before any unit (e.g. create the store)
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 2                      # infrastructure failures (actor/node death) only
    item_name: str = "items"
    sequential: bool = False                  # units depend on each other (training segments): one at a time
    own_progress: bool = False                # its worker draws a finer bar (per training step) when run locally


class JobFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- completion records
def records_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "_records"


def read_record(out_dir: Path, key: str) -> dict[str, Any] | None:
    p = records_dir(out_dir) / f"{key}.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(out_dir: Path, key: str, status: str, **info: Any) -> None:
    atomic_write_json(records_dir(out_dir) / f"{key}.json",
                      {"key": key, "status": status, "time": time.time(), "host": socket.gethostname(), **info})


def drop_record(out_dir: Path, key: str) -> None:
    (records_dir(out_dir) / f"{key}.json").unlink(missing_ok=True)


def is_done(out_dir: Path, key: str) -> bool:
    rec = read_record(out_dir, key)
    return bool(rec) and rec["status"] == "done"


def execute_unit(worker: Worker, out_dir: Path, unit: Unit) -> tuple[str, str]:
    """Run one unit where the worker lives and commit its record; application errors become `failed`."""
    t0 = time.time()
    try:
        info = worker.run(unit) or {}
    except Exception as exc:  # an application error: recorded, shown by status, redone on rerun
        msg = f"{type(exc).__name__}: {exc}"
        try:
            write_record(out_dir, unit.key, "failed", message=msg, traceback=traceback.format_exc(limit=8))
        except OSError:       # e.g. the disk is full: the unit stays pending, the message still reaches the user
            pass
        return "failed", msg
    write_record(out_dir, unit.key, "done", seconds=round(time.time() - t0, 3), **info)
    return "done", ""


def write_plan(job: Job) -> None:
    """The plan as a Parquet table (unit key, size, params as JSON) beside the records."""
    table = pa.table({"key": [u.key for u in job.units], "size": [u.size for u in job.units],
                      "params": [json.dumps(u.params, sort_keys=True) for u in job.units]})
    atomic_write_parquet(Path(job.out_dir) / "plan.parquet", table)


def job_status(job: Job) -> dict[str, Any]:
    counts = {"done": 0, "failed": 0, "pending": 0}
    errors = []
    for u in job.units:
        rec = read_record(job.out_dir, u.key)
        state = rec["status"] if rec else "pending"
        counts[state if state in counts else "pending"] += 1
        if rec and state == "failed":
            errors.append(f"{u.key}: {rec.get('message', '')}")
    return {"stage": job.stage, "dir": str(job.out_dir), **counts, "errors": errors}


# ---------------------------------------------------------------- executors
def run_job(job: Job, executor: str = "local", address: str | None = None, workers: int | None = None,
            progress: bool = True, wait: bool = False) -> dict[str, Any]:
    """Run every unit of `job` that has no `done` record; raise JobFailed if any unit failed.

    The driver holds the directory's StageLock throughout (one writer per stage directory): a second run
    on the same directory raises StageBusy, or waits for the first with `wait`."""
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor '{executor}' (use local or ray)")
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with StageLock(job.out_dir, wait=wait):
        return _run_locked(job, executor, address, workers, progress)


def _run_locked(job: Job, executor: str, address: str | None, workers: int | None, progress: bool) -> dict[str, Any]:
    failed_here: list[str] = []
    if job.prepare:
        job.prepare()
    write_plan(job)
    pending = [u for u in job.units if not is_done(job.out_dir, u.key)]
    skipped = len(job.units) - len(pending)
    quiet_bar = not progress or not pending or (job.own_progress and executor == "local")
    bar = tqdm(total=sum(u.size for u in pending), unit=f" {job.item_name}", disable=quiet_bar,
               desc=f"{job.stage} ({skipped}/{len(job.units)} units already done)", dynamic_ncols=True)
    if pending:
        if executor == "local":
            _run_local(job, pending, bar, failed_here)
        else:
            _run_ray(job, pending, bar, address, workers, failed_here)
    bar.close()
    status = job_status(job)
    status["skipped"] = skipped
    if status["failed"] or status["pending"]:
        # a failure whose record could not be written (disk full) is still the first thing to show
        first = (failed_here or status["errors"] or ["units left pending"])[0]
        raise JobFailed(f"{job.stage}: {status['failed']} unit(s) failed, {status['pending']} pending; "
                        f"first: {first}")
    return status


def _run_local(job: Job, pending: list[Unit], bar, failed_here: list[str]) -> None:
    worker = job.make_worker()
    for unit in pending:
        state, msg = execute_unit(worker, job.out_dir, unit)
        if state == "failed":
            failed_here.append(f"{unit.key}: {msg}")
        bar.update(unit.size)
        if state == "failed" and job.sequential:
            break                             # later units build on this one: leave them pending


class _UnitActor:
    """A Ray actor: builds the worker (e.g. loads the teacher) once, then takes units."""

    def __init__(self, make_worker: Callable[[], Worker], out_dir: str):
        self.worker = make_worker()
        self.out_dir = Path(out_dir)

    def run(self, unit: Unit) -> tuple[str, str]:
        return execute_unit(self.worker, self.out_dir, unit)

    def pid(self) -> int:
        return os.getpid()


def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:                                 # a private local cluster, even when another one runs on this host
        from pipeline.ray_guard import guard_local_cluster

        guard_local_cluster()             # it ends with this driver, even one killed while it starts
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def _run_ray(job: Job, pending: list[Unit], bar, address: str | None, workers: int | None,
             failed_here: list[str]) -> None:
    """Actors take units one at a time. A dead actor is killed and replaced by the runner (not restarted by
    Ray) and a new actor gets work only once it is up, so a replacement that cannot be placed (its node is
    gone, no capacity left) never holds a unit while live actors finish the queue."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    _ray_init(address)
    per = max(job.num_gpus, 1e-9) if job.num_gpus else job.num_cpus
    avail = ray.cluster_resources().get("GPU" if job.num_gpus else "CPU", 1)
    n_actors = 1 if job.sequential else max(1, min(len(pending), workers or int(avail // per) or 1))
    actor_cls = ray.remote(num_cpus=job.num_cpus, num_gpus=job.num_gpus, max_restarts=0,
                           max_task_retries=0)(_UnitActor)
    queue, attempts = list(pending), {u.key: 0 for u in pending}
    running: dict[Any, tuple[Any, Unit]] = {}       # task ref -> (actor, unit)
    starting: dict[Any, Any] = {}                   # readiness ref -> actor still being built
    idle, spawned = [], []
    start_failures, last_error = 0, ""

    def start_actor() -> None:
        actor = actor_cls.remote(job.make_worker, str(job.out_dir))
        spawned.append(actor)
        starting[actor.pid.remote()] = actor

    for _ in range(n_actors):
        start_actor()
    try:
        while queue or running:
            while queue and idle:
                actor, unit = idle.pop(), queue.pop(0)
                running[actor.run.remote(unit)] = (actor, unit)
            if not running and not starting:    # every worker failed to start: nothing left to run units
                for unit in queue:
                    write_record(job.out_dir, unit.key, "failed", message=f"no worker could start: {last_error}")
                break
            ready, _ = ray.wait(list(running) + list(starting), num_returns=1)
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except RayActorError as exc:    # make_worker raised (e.g. teacher missing) or it died starting
                    start_failures += 1
                    last_error = _short_error(exc)
                    if queue and start_failures <= job.max_retries:
                        start_actor()
                continue
            actor, unit = running.pop(ref)
            try:
                state, msg = ray.get(ref)
                if state == "failed":
                    failed_here.append(f"{unit.key}: {msg}")
                bar.update(unit.size)
                idle.append(actor)
                if state == "failed" and job.sequential:
                    queue.clear()             # later units build on this one: leave them pending
            except (RayActorError, RayTaskError) as exc:  # infrastructure: the actor or its node died mid-unit
                attempts[unit.key] += 1
                ray.kill(actor)
                if is_done(job.out_dir, unit.key):        # it died after committing the record: keep that
                    bar.update(unit.size)
                elif attempts[unit.key] > job.max_retries:
                    write_record(job.out_dir, unit.key, "failed",
                                 message=f"worker died {attempts[unit.key]} times: {_short_error(exc)}")
                else:
                    queue.append(unit)
                if queue:
                    start_actor()             # bounded: every death mid-unit uses up one of that unit's tries
    finally:
        for actor in spawned:                 # free the CPUs/GPUs now, not when the handles are collected
            ray.kill(actor)


def _short_error(exc: BaseException) -> str:
    """The most telling line of a Ray error (its root cause when Ray carries one)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Exit"))]
    return (causes[-1] if causes else lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def torch_threads(n: int):
    """CPU results can depend on the thread count: pin it per unit, the same under every executor."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
