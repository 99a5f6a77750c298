"""Faults of issue 13, each reproduced and held to its fixed behaviour (docs/reliability.md).

Concurrent runs, corrupt store metadata, a truncated checkpoint, a torn loss log, a pickle placed as a
checkpoint, a full disk (patched writes; a real tmpfs when root), a resume with another batch size, a
train.store of another generate seed, and two trains at once.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.files import LOCK_NAME, StageBusy, StageLock
from pipeline.runner import drop_record, read_record
from schemas.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
SLOW_TEACHER = {"kind": "byo", "factory": "fault_teachers:make_slow_toy_teacher", "kwargs": {"delay": 0.15}}



def perflow_dir(cfg):
    """The train dir of the config's perflow run (its first seed)."""
    return cfg.train_dir(cfg.train_run("perflow"))

def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def temp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def store_arrays(cfg) -> dict[str, np.ndarray]:
    from pipeline.store import TrajectoryStore

    st = TrajectoryStore.open(cfg.stage_dir("generate"))
    return {"states": np.asarray(st.states[:]), "seed": st.seed, "guidance": st.guidance}


def checkpoint_tensors(train_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(train_dir / "checkpoints" / f"step-{step:06d}.pt", weights_only=True)["student"]


def perflow_dir(cfg) -> Path:
    """The train dir of the config's perflow run (seed train.seeds[0])."""
    return cfg.train_dir(cfg.train_runs(["perflow"])[0])


def spawn(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- one writer per stage directory
def test_a_held_stage_lock_refuses_a_second_run_naming_host_and_pid(make_toy_config):
    path = make_toy_config()
    cfg = load_config(path)
    with StageLock(cfg.stage_dir("generate")):
        res = cli("generate", "-c", path)
    assert res.exit_code == 2
    assert error_lines(res.output) == [l for l in res.output.splitlines() if l.strip()]
    (line,) = error_lines(res.output)
    assert f"host {socket.gethostname()} pid {os.getpid()}" in line and "--wait" in line
    assert not (cfg.stage_dir("generate") / "store.zarr").exists()      # the refused run wrote nothing
    # --wait: a run started while the lock is held waits for it, then goes ahead.
    with StageLock(cfg.stage_dir("generate")) as lock:
        waiter = spawn("generate", "-c", path, "--wait", cwd=path.parent)
        line = waiter.stderr.readline()
        assert line.startswith("waiting:") and f"pid {os.getpid()}" in line, line
        time.sleep(1.0)
        assert waiter.poll() is None                   # still waiting on us
        lock.release()
        out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert read_record(cfg.stage_dir("generate"), "shard-00001")["status"] == "done"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pipeline.files import StageLock; StageLock(sys.argv[2]).acquire(); "
                               "print('locked', flush=True); time.sleep(600)", str(REPO), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StageBusy, match=f"pid {holder.pid}"):
        StageLock(tmp_path).acquire()
    holder.kill()                                     # kill -9: the kernel drops its flock
    holder.wait()
    with StageLock(tmp_path) as lock:
        assert lock.path.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]


def test_a_lock_naming_a_dead_pid_is_held_while_its_descriptor_lives(tmp_path):
    """Liveness is the kernel lock's alone: a live descriptor holding the flock keeps it, whatever pid the
    file names (a forked child of a dead holder, a holder this process cannot see)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keeper = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "os.write(fd, sys.argv[2].encode()); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path / LOCK_NAME), f"{socket.gethostname()} {dead.pid} 0\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout.readline().strip() == "locked"
        t0 = time.time()
        while time.time() - t0 < 2.5:              # the old code took it over after a second
            with pytest.raises(StageBusy, match=f"pid {dead.pid}"):
                StageLock(tmp_path, poll_seconds=0.1).acquire()
            time.sleep(0.2)
    finally:
        keeper.kill()
        keeper.wait()
    with StageLock(tmp_path):                      # the descriptor closed: free at once
        pass


def _unshare_works() -> bool:
    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid needs root and a kernel that allows it")
def test_a_run_in_another_pid_namespace_does_not_take_a_live_lock(make_toy_config, tmp_path):
    """Issue 23 case 1: a second run in another PID namespace (a container on the same volume) cannot see the
    holder's pid; it must still find the directory held and exit 2, leaving the holder's directory alone."""
    path = make_toy_config()
    cfg = load_config(path)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    with StageLock(cfg.stage_dir("generate")):
        t0 = time.time()
        res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "pipeline.cli",
                              "generate", "-c", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2, res.stdout + res.stderr
        (line,) = error_lines(res.stderr)
        assert f"pid {os.getpid()}" in line and "is in use by host" in line
        assert not (cfg.stage_dir("generate") / "store.zarr").exists()
        assert time.time() - t0 < 60


@pytest.mark.parametrize("offset", [0.0, 2.5])      # started together; staggered (the issue saw 1.5-5 s)
def test_concurrent_generates_leave_the_store_of_a_single_run(make_toy_config, tmp_path, offset):
    single = load_config(make_toy_config("single.yaml", root=str(tmp_path / "single"), teacher=SLOW_TEACHER))
    assert cli("generate", "-c", tmp_path / "single.yaml").exit_code == 0
    path = make_toy_config("both.yaml", root=str(tmp_path / "both"), teacher=SLOW_TEACHER)
    first = spawn("generate", "-c", path, cwd=tmp_path)
    time.sleep(offset)
    second = spawn("generate", "-c", path, cwd=tmp_path)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert 0 in codes and set(codes) <= {0, 2}, outs
    for code, (_, err) in zip(codes, outs):
        if code == 2:                                 # refused: one line naming the holder
            assert len(error_lines(err)) == 1 and "is in use by host" in err
        else:
            assert not error_lines(err)
    both = load_config(path)
    a, b = store_arrays(single), store_arrays(both)
    assert all(np.array_equal(a[k], b[k]) for k in a)   # bitwise the single run's store
    for j in range(2):
        assert read_record(both.stage_dir("generate"), f"shard-{j:05d}")["checksum"] == \
            read_record(single.stage_dir("generate"), f"shard-{j:05d}")["checksum"]


def test_two_concurrent_trains_keep_one_ordered_loss_log(make_toy_config, tmp_path):
    path = make_toy_config(train={"steps": 6, "checkpoint_every": 2, "log_every": 1, "methods": ["perflow"]})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    procs = [spawn("train", "-c", path, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outs
    log = [json.loads(l) for l in (perflow_dir(cfg) / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))            # no duplicated or out-of-order rows


def test_shared_trains_split_the_runs_and_each_trains_once(make_toy_config, tmp_path):
    """Two `train --share` processes on one config with four runs: both exit 0, every run is trained, and no
    run's steps were trained twice (one ordered loss log each; the losses of a single-process run)."""
    train = {"steps": 4, "checkpoint_every": 2, "log_every": 1, "methods": ["perflow", "ota"], "seeds": [0, 1]}
    path = make_toy_config(train=train)
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    procs = [spawn("train", "-c", path, "--share", cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = 0
    for run in cfg.train_runs():
        log = [json.loads(l) for l in (cfg.train_dir(run) / "losses.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4]           # trained once, in order
        assert (cfg.train_dir(run) / "export" / "flowsteer.json").is_file()
        trained += 1
    assert trained == 4
    # every unit (training segment, export) was run by exactly one process: run here = done - skipped
    from stages.train import jobs

    ran = [int(d) - int(s) for out, _ in outs for d, s in re.findall(r"train: (\d+) units done \((\d+) skipped", out)]
    assert sum(ran) == sum(len(job.units) for job in jobs(cfg)), outs
    solo = load_config(make_toy_config("solo.yaml", root=str(tmp_path / "solo"), train=train))
    assert cli("generate", "-c", tmp_path / "solo.yaml").exit_code == 0
    assert cli("train", "-c", tmp_path / "solo.yaml").exit_code == 0
    for run in cfg.train_runs():
        strip = [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")}
                 for l in (cfg.train_dir(run) / "losses.jsonl").read_text().splitlines()]
        alone = [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")}
                 for l in (solo.train_dir(run) / "losses.jsonl").read_text().splitlines()]
        assert strip == alone


def test_shared_evaluate_waits_for_a_held_teacher_job_instead_of_running_students_without_it(make_toy_config,
                                                                                             tmp_path):
    """Evaluate's students need the teacher job's outputs: `evaluate --share` waits for a held teacher job
    (the study run's second process once failed 20 student units by skipping ahead) and then succeeds."""
    from stages.evaluate import jobs

    path = make_toy_config(train={"steps": 2, "checkpoint_every": 2, "methods": ["perflow"]},
                           evaluate={"nfes": [1], "n_samples": 8, "features": "pixels"})
    cfg = load_config(path)
    for stage in ("generate", "train"):
        assert cli(stage, "-c", path).exit_code == 0
    teacher_job, students_job = jobs(cfg)
    with StageLock(teacher_job.out_dir):                 # another process is evaluating the teacher
        proc = spawn("evaluate", "-c", path, "--share", cwd=tmp_path)
        time.sleep(8)
        assert proc.poll() is None                       # waiting, not failing student units
        assert not any(students_job.out_dir.glob("_records/*")) if students_job.out_dir.exists() else True
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    assert "failed" not in out + err


# ---------------------------------------------------------------- never delete on doubt
def test_corrupt_store_metadata_is_an_error_naming_the_file_and_nothing_is_deleted(make_toy_config):
    path = make_toy_config()
    cfg = load_config(path)
    out = cfg.stage_dir("generate")
    assert cli("generate", "-c", path).exit_code == 0
    before = store_arrays(cfg)
    meta_file = out / "store.zarr" / "states" / "zarr.json"
    good = meta_file.read_bytes()
    meta_file.write_bytes(b"\x00garbage{")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    res = cli("generate", "-c", path)
    assert res.exit_code == 2
    (line,) = error_lines(res.output)
    assert str(meta_file) in line and "--rebuild" in line
    res = cli("status", "-c", path, "--verify")
    assert res.exit_code == 0 and str(meta_file) in res.output and "nothing deleted" in res.output
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files      # no record dropped, nothing deleted
    assert read_record(out, "shard-00000")["status"] == "done"
    # Root metadata too: one bad read never counts as "no store".
    meta_file.write_bytes(good)
    root_meta = out / "store.zarr" / "zarr.json"
    root_good = root_meta.read_bytes()
    root_meta.write_bytes(b"{not json")
    res = cli("generate", "-c", path)
    assert res.exit_code == 2 and str(root_meta) in error_lines(res.output)[0]
    # Only an explicit repair deletes; the next generate rebuilds the same store.
    res = cli("status", "-c", path, "--verify", "--repair")
    assert "deleted" in res.output and not (out / "store.zarr").exists()
    assert cli("generate", "-c", path).exit_code == 0
    assert all(np.array_equal(before[k], store_arrays(cfg)[k]) for k in before)
    # --rebuild deletes and regenerates a sound store too.
    root_meta.write_bytes(root_good)
    res = cli("generate", "-c", path, "--rebuild")
    assert res.exit_code == 0 and "(0 skipped" in res.output
    assert np.array_equal(before["states"], store_arrays(cfg)["states"])


def test_shards_are_fsynced_before_their_record(make_toy_config, monkeypatch):
    import pipeline.files as files

    synced, order = set(), []
    real_fsync_file = files.fsync_file
    monkeypatch.setattr(files, "fsync_file", lambda p: (synced.add(Path(p).resolve()), real_fsync_file(p)))
    real_write = files.atomic_write_json

    def record(path, obj):
        if "_records" in str(path):
            order.append((obj["key"], {p for p in synced if "/states/c/" in str(p)}))
        real_write(path, obj)
    monkeypatch.setattr("pipeline.runner.atomic_write_json", record)
    path = make_toy_config()
    assert cli("generate", "-c", path).exit_code == 0
    shard_dir = load_config(path).stage_dir("generate") / "store.zarr" / "states" / "c"
    assert [key for key, _ in order] == ["shard-00000", "shard-00001"]
    for i, (key, shards_synced) in enumerate(order):          # shard i's file was fsynced before its record
        assert any(p.relative_to(shard_dir.resolve()).parts[0] == str(i) for p in shards_synced)


def test_resume_with_another_batch_size_is_refused(make_toy_config, tmp_path):
    path = make_toy_config(generate={"batch_size": 4})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    full = store_arrays(cfg)
    drop_record(cfg.stage_dir("generate"), "shard-00001")          # as if killed after the first shard
    other = make_toy_config("b2.yaml", generate={"batch_size": 1})
    res = cli("generate", "-c", other)
    assert res.exit_code == 2
    (line,) = error_lines(res.output)
    assert "generate.batch_size" in line and "batch_size 4" in line
    assert read_record(cfg.stage_dir("generate"), "shard-00001") is None
    assert cli("generate", "-c", path).exit_code == 0              # the original batch size resumes
    assert np.array_equal(store_arrays(cfg)["states"], full["states"])
    assert cli("generate", "-c", other).exit_code == 0             # a finished store: nothing generated


# ---------------------------------------------------------------- checkpoints and the loss log
def _train(path):
    res = cli("train", "-c", path)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def trained(make_toy_config):
    """A toy run trained to step 4 (checkpoints at 2 and 4), with its step-4 weights."""
    path = make_toy_config(train={"methods": ["perflow"]})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    _train(path)
    train_dir = perflow_dir(cfg)
    return path, cfg, train_dir, checkpoint_tensors(train_dir, 4)


def test_truncated_checkpoint_falls_back_to_the_previous_one(trained):
    path, cfg, train_dir, weights = trained
    ckpt = train_dir / "checkpoints" / "step-000004.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    res = cli("status", "-c", path, "--verify")
    assert "steps-000004" in res.output and "cannot be loaded" in res.output
    res = _train(path)
    assert "warning: checkpoint" in res.output and "step-000002.pt" in res.output
    assert "(3 skipped" not in res.output
    again = checkpoint_tensors(train_dir, 4)
    assert all(torch.equal(weights[k], again[k]) for k in weights)   # resumed exactly


def test_torn_loss_log_line_is_dropped_on_resume(trained):
    path, cfg, train_dir, _ = trained
    log = train_dir / "losses.jsonl"
    clean = log.read_text()
    drop_record(train_dir, "steps-000004")
    drop_record(train_dir, "export")
    (train_dir / "latest.json").write_text(json.dumps({"step": 2, "file": "checkpoints/step-000002.pt"}))
    log.write_text(clean + '{"step": 5, "loss": 0.1')                # a write cut short
    _train(path)
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [json.loads(l)["loss"] for l in clean.splitlines()]


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))           # creates a file if it ever runs


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
def test_a_pickle_placed_as_checkpoint_never_runs(trained, tmp_path, fmt):
    path, cfg, train_dir, weights = trained
    marker = tmp_path / f"pwned-{fmt}"
    bad = train_dir / "checkpoints" / "step-000040.pt"
    payload = {"step": 40, "x": _Payload(str(marker))}
    if fmt == "pickle":
        bad.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, bad)
    (train_dir / "latest.json").write_text(json.dumps({"step": 40, "file": "checkpoints/step-000040.pt"}))
    drop_record(train_dir, "export")
    res = cli("status", "-c", path, "--verify")
    assert not marker.exists()
    res = _train(path)
    assert not marker.exists()
    assert "warning: checkpoint" in res.output and "step-000040.pt" in res.output
    assert json.loads((train_dir / "latest.json").read_text())["step"] == 4


# ---------------------------------------------------------------- disk full
def test_disk_full_while_saving_a_checkpoint(make_toy_config, monkeypatch):
    """A write failing with ENOSPC: one line with the path and errno text, a failed record, no temp file
    left, exit 1; the rerun resumes to the weights of an uninterrupted run."""
    import pipeline.files as files

    ref = make_toy_config("ref.yaml", root=str(Path(make_toy_config().parent) / "ref"), train={"methods": ["perflow"]})
    assert cli("generate", "-c", ref).exit_code == 0
    _train(ref)
    ref_weights = checkpoint_tensors(perflow_dir(load_config(ref)), 4)

    path = make_toy_config(train={"methods": ["perflow"]})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    real_write = files._Writes.write

    def full_disk(self, data):
        if "step-000004" in str(self._f.name) and self._f.tell() > 1000:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)
    monkeypatch.setattr(files._Writes, "write", full_disk)
    res = cli("train", "-c", path)
    assert res.exit_code == 1
    (line,) = error_lines(res.output)
    train_dir = perflow_dir(cfg)
    assert "No space left on device" in line and str(train_dir / "checkpoints" / "step-000004.pt") in line
    assert "Traceback" not in res.output
    assert read_record(train_dir, "steps-000004")["status"] == "failed"
    assert not temp_files(cfg.root) and not (train_dir / "checkpoints" / "step-000004.pt").exists()
    monkeypatch.setattr(files._Writes, "write", real_write)         # space freed
    _train(path)
    weights = checkpoint_tensors(train_dir, 4)
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)


def test_a_real_full_disk_during_train_then_resume(make_toy_config, tiny_tmpfs):
    """A 4 MiB tmpfs filled up to leave less than a checkpoint: the real ENOSPC path end to end."""
    path = make_toy_config(root=str(tiny_tmpfs / "runs"), train={"methods": ["perflow"]})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    free = shutil.disk_usage(tiny_tmpfs).free
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as f:                  # leave ~20 KiB: records fit, a checkpoint does not
        f.write(b"\0" * max(0, free - 20 * 1024))
    res = cli("train", "-c", path)
    assert res.exit_code == 1
    (line,) = error_lines(res.output)
    assert "No space left on device" in line and str(perflow_dir(cfg)) in line
    assert "Traceback" not in res.output and not temp_files(tiny_tmpfs)
    filler.unlink()
    _train(path)
    assert (perflow_dir(cfg) / "export" / "flowsteer.json").is_file()


# ---------------------------------------------------------------- fingerprints
def test_train_store_of_another_generate_seed_is_not_reported_done(make_toy_config, tmp_path):
    a = make_toy_config("a.yaml", root=str(tmp_path / "a"))
    b = make_toy_config("b.yaml", root=str(tmp_path / "b"), generate={"seed": 1})
    for p in (a, b):
        assert cli("generate", "-c", p).exit_code == 0
    store_a, store_b = (load_config(p).stage_dir("generate") for p in (a, b))
    train = {"methods": ["perflow"], "steps": 2, "checkpoint_every": 2}
    on_a = make_toy_config("ta.yaml", root=str(tmp_path / "t"), train={**train, "store": str(store_a)})
    on_b = make_toy_config("tb.yaml", root=str(tmp_path / "t"), train={**train, "store": str(store_b)})
    _train(on_a)
    dir_a, dir_b = (perflow_dir(load_config(p)) for p in (on_a, on_b))
    assert dir_a != dir_b
    res = _train(on_b)
    assert "(0 skipped" in res.output                                   # trained anew on the other data
    res = cli("train", "-c", make_toy_config("tc.yaml", root=str(tmp_path / "t"),
                                             train={**train, "store": str(tmp_path / "nowhere")}))
    assert res.exit_code == 2 and "train.store" in error_lines(res.output)[0]


# ---------------------------------------------------------------- leftovers (issue 23 case 7)
def test_a_checkpoint_temp_file_of_a_killed_write_is_swept_on_the_next_run(make_toy_config):
    path = make_toy_config(train={"methods": ["perflow"], "steps": 4, "checkpoint_every": 2})
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    assert cli("train", "-c", path).exit_code == 0
    ckpts = perflow_dir(cfg) / "checkpoints"
    leftover = ckpts / ".step-000010.pt.123456.0a1b2c3d.tmp"      # as a train killed mid-write leaves it
    leftover.write_bytes(b"\0" * 4096)
    other = ckpts / "notes.tmp"                                    # not of our naming: left alone
    other.write_text("mine")
    res = cli("train", "-c", path)
    assert res.exit_code == 0 and "(3 skipped" in res.output, res.output
    assert not leftover.exists() and other.exists()


def test_a_killed_ray_driver_takes_its_local_cluster_with_it(make_toy_config, tmp_path):
    """kill -9 of a `--executor ray` driver: the processes of the cluster it started (raylet, gcs, the
    dashboard and runtime-env agents, workers) are gone seconds later (pipeline/ray_guard.py)."""
    psutil = pytest.importorskip("psutil")
    path = make_toy_config(teacher=SLOW_TEACHER)
    driver = spawn("generate", "-c", path, "--executor", "ray", cwd=tmp_path)
    seen: dict[int, float] = {}
    t0 = time.time()
    while time.time() - t0 < 240:
        for p in psutil.Process(driver.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen[p.pid] = p.create_time()
        names = set()
        for pid in seen:
            with contextlib.suppress(psutil.Error):
                names.add(psutil.Process(pid).name())
        if any("raylet" in n for n in names) and any("Agent" in n for n in names) or driver.poll() is not None:
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.communicate()
    time.sleep(2.0)                                                  # the guard has reported them
    for p in psutil.Process(driver.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            seen[p.pid] = p.create_time()
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    def alive() -> list[str]:
        out = []
        for pid, created in seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {p.name()}")
        return out
    deadline = time.time() + 30
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not alive()
