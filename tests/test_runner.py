"""Runner: records written last, reruns redo only unfinished units, local and Ray executors agree."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.files import atomic_write_bytes
from pipeline.runner import (Job, JobFailed, Unit, job_status, read_record, run_job,
                             write_record)


class CountingWorker:
    """Writes `<unit>.out`, logs every call to calls.txt, and raises after writing for units in crash_once."""

    def __init__(self, out_dir: str, crash_once: tuple[str, ...] = ()):
        self.out_dir, self.crash_once = Path(out_dir), crash_once

    def run(self, unit: Unit) -> dict:
        with open(self.out_dir / "calls.txt", "a") as f:
            f.write(f"{unit.key} {os.getpid()}\n")
        (self.out_dir / f"{unit.key}.out").write_text(str(unit.params["value"] * 2))
        marker = self.out_dir / f"{unit.key}.crashed"
        if unit.key in self.crash_once and not marker.exists():
            marker.touch()
            raise RuntimeError(f"boom in {unit.key}")    # after the output, before the record
        return {"doubled": unit.params["value"] * 2}


def make_job(out_dir: Path, n: int = 4, crash_once: tuple[str, ...] = ()) -> Job:
    import functools

    units = [Unit(f"u{i}", {"value": i}) for i in range(n)]
    return Job("toy", out_dir, units, functools.partial(CountingWorker, str(out_dir), crash_once), num_cpus=1)


def calls(out_dir: Path) -> list[str]:
    p = out_dir / "calls.txt"
    return [line.split()[0] for line in p.read_text().splitlines()] if p.exists() else []


def test_crashed_unit_is_redone_and_done_units_skipped(tmp_path):
    job = make_job(tmp_path, crash_once=("u2",))
    with pytest.raises(JobFailed, match="boom in u2"):
        run_job(job, progress=False)
    assert (tmp_path / "u2.out").exists()                        # its output was written ...
    assert read_record(tmp_path, "u2")["status"] == "failed"     # ... but it does not count as done
    assert read_record(tmp_path, "u1") == {**read_record(tmp_path, "u1"), "status": "done", "doubled": 2}
    st = job_status(job)
    assert (st["done"], st["failed"], st["pending"]) == (3, 1, 0)
    assert st["errors"] == ["u2: RuntimeError: boom in u2"]

    st = run_job(job, progress=False)
    assert calls(tmp_path) == ["u0", "u1", "u2", "u3", "u2"]    # only the failed unit ran again
    assert (st["done"], st["failed"], st["skipped"]) == (4, 0, 3)
    run_job(job, progress=False)
    assert len(calls(tmp_path)) == 5                             # everything done: nothing runs


def test_unit_without_record_counts_as_pending(tmp_path):
    job = make_job(tmp_path, n=3)
    write_record(tmp_path, "u0", "done")
    st = job_status(job)
    assert (st["done"], st["pending"], st["failed"]) == (1, 2, 0)
    run_job(job, progress=False)
    assert calls(tmp_path) == ["u1", "u2"]
    assert (tmp_path / "plan.parquet").exists()


def test_records_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "_records" / "u.json"
    write_record(tmp_path, "u", "done", n=1)
    assert json.loads(target.read_text())["n"] == 1

    def torn_replace(src, dst):                               # the process dies right before the rename
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", torn_replace)
    with pytest.raises(OSError):
        write_record(tmp_path, "u", "failed", n=2)
    monkeypatch.undo()
    assert json.loads(target.read_text())["n"] == 1           # readers still see the whole old record
    assert read_record(tmp_path, "u")["status"] == "done"
    # A half-written file (say from a non-atomic writer) reads as "no record", i.e. pending, never as done.
    atomic_write_bytes(target, b'{"status": "do')
    assert read_record(tmp_path, "u") is None


@pytest.fixture
def ray_local():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}})
    yield ray
    ray.shutdown()


def test_ray_executor_runs_the_same_units(tmp_path, ray_local):
    job = make_job(tmp_path, n=4, crash_once=("u1",))
    with pytest.raises(JobFailed, match="boom in u1"):
        run_job(job, executor="ray", progress=False)
    assert sorted(calls(tmp_path)) == ["u0", "u1", "u2", "u3"]
    pids = {line.split()[1] for line in (tmp_path / "calls.txt").read_text().splitlines()}
    assert str(os.getpid()) not in pids                       # units ran in actor processes
    st = run_job(job, executor="ray", progress=False)
    assert sorted(calls(tmp_path)) == ["u0", "u1", "u1", "u2", "u3"]
    assert (st["done"], st["skipped"]) == (4, 3)
    assert {read_record(tmp_path, f"u{i}")["doubled"] for i in range(4)} == {0, 2, 4, 6}
