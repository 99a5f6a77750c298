"""Generate stage: plan, contents, determinism across executors / worker counts / kill-and-resume, faults."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.runner import JobFailed, job_status, read_record, run_job
from pipeline.seeds import noise_for
from pipeline.store import TrajectoryStore, generated_store_path, store_meta
from schemas.config import load_config

REPO = Path(__file__).resolve().parent.parent
TESTS = str(REPO / "tests")
SLOW = "test_generate:make_slow_toy_teacher"   # importable where PYTHONPATH has tests/ (Ray workers, CLI)


def make_slow_toy_teacher(device="cpu", delay: float = 0.0, fail: bool = False, fail_load_if: str = "", **kw):
    """The toy teacher with a pause per forward call (so tests can strike mid-unit), or one that raises."""
    from pipeline.teachers.toy import make_toy_teacher

    if fail_load_if and os.path.exists(fail_load_if):
        raise RuntimeError("teacher weights unreadable on purpose")
    teacher = make_toy_teacher(device=device, **kw)
    forward = teacher.velocity

    def velocity(x, sigma, cond):
        if fail:
            raise RuntimeError("teacher exploded on purpose")
        time.sleep(delay)
        return forward(x, sigma, cond)
    teacher.velocity = velocity
    return teacher


@pytest.fixture
def tests_on_path(monkeypatch):
    """Child processes (Ray workers, the CLI) can import this module's teacher factory."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, str(REPO), os.environ.get("PYTHONPATH", "")]))


def gen_config(make_toy_config, name="toy.yaml", delay=None, **generate):
    over = {"generate": {"samples_per_prompt": 2, "shard_size": 2, "batch_size": 2, **generate}}
    if delay is not None:
        over["teacher"] = {"kind": "byo", "factory": SLOW, "kwargs": {"delay": delay}}
    return load_config(make_toy_config(name, **over))


def generate(cfg, executor="local", workers=None):
    from stages.generate import jobs

    [job] = jobs(cfg)
    return job, run_job(job, executor, workers=workers, progress=False)


def states_of(cfg) -> np.ndarray:
    return np.asarray(TrajectoryStore.open(generated_store_path(cfg)).states[:])


# ---------------------------------------------------------------- contents
def test_store_holds_the_teacher_trajectory(make_toy_config):
    from pipeline.sampling import sample
    from pipeline.schedule import fixed_sigmas
    from pipeline.teachers import load_teacher

    cfg = gen_config(make_toy_config, samples_per_prompt=3, shard_size=4, batch_size=3, record_every_step=True)
    job, st = generate(cfg)
    assert (st["done"], st["skipped"], len(job.units)) == (3, 0, 3)        # 9 samples in shards 4, 4, 1
    store = TrajectoryStore.open(generated_store_path(cfg), store_meta(cfg))
    assert store.states.shape == (9, 5, 1, 8, 8) and store.steps.shape == (9, 9, 1, 8, 8)
    assert np.array_equal(store.prompt_index, np.arange(9) % 3)
    lo, hi = cfg.generate.guidance
    assert ((store.guidance >= lo) & (store.guidance <= hi)).all() and len(set(store.guidance.tolist())) == 9
    # Edge 0 is the sample's own noise; the window edges are every (M/K)-th teacher step.
    assert torch.equal(torch.from_numpy(store.states[:, 0]), noise_for(store.seed, (1, 8, 8)))
    assert np.array_equal(store.states[:], store.steps[:, ::2])
    # The final edge is the teacher's CFG sample from that noise with that w (recomputed independently).
    teacher = load_teacher(cfg)
    i = np.array([1, 5, 8])
    prompts = [store.prompts[p] for p in store.prompt_index[i]]
    ref = sample(teacher.velocity, noise_for(store.seed[i], (1, 8, 8)), fixed_sigmas(8, 3.0),
                 teacher.encode(prompts), teacher.encode([""] * 3), torch.from_numpy(store.guidance[i]))
    assert torch.allclose(torch.from_numpy(store.states[i, -1]), ref, atol=1e-5)
    key = "encoder_hidden_states"
    assert torch.equal(store.cond(store.prompt_index[i])[key], teacher.encode(prompts)[key])
    # Records carry the shard checksum; the per-sample plan table sits beside the store.
    assert read_record(job.out_dir, "shard-00000")["checksum"]
    import pyarrow.parquet as pq
    assert pq.read_table(job.out_dir / "samples.parquet").num_rows == 9


def test_rerun_skips_and_local_batches_do_not_matter_for_plan(make_toy_config):
    cfg = gen_config(make_toy_config)
    job, _ = generate(cfg)
    before = {u.key: read_record(job.out_dir, u.key)["time"] for u in job.units}
    _, st = generate(cfg)
    assert st["skipped"] == len(job.units)
    assert {u.key: read_record(job.out_dir, u.key)["time"] for u in job.units} == before


# ---------------------------------------------------------------- faults
def test_store_of_another_config_is_refused(make_toy_config, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    a = gen_config(make_toy_config, "a.yaml")
    generate(a)
    b_path = make_toy_config("b.yaml", schedule={"teacher_steps": 16},
                             generate={"samples_per_prompt": 2, "shard_size": 2, "batch_size": 2})
    b = load_config(b_path)
    # train.store pointing at a store of another grid.
    with pytest.raises(UserError, match=r"another config \(schedule.teacher_steps: store 8, config 16"):
        TrajectoryStore.open(generated_store_path(a), store_meta(b))
    # A directory reused by another config: generate refuses it instead of mixing trajectories.
    shutil.copytree(generated_store_path(a), generated_store_path(b))
    res = CliRunner().invoke(app, ["generate", "--config", str(b_path)])
    assert res.exit_code == 2 and "error: trajectory store" in res.output and "teacher_steps" in res.output
    assert np.array_equal(states_of(a), np.asarray(TrajectoryStore.open(generated_store_path(b), check_complete=False).states[:]))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_found_by_status_verify_and_redone(make_toy_config, damage):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = make_toy_config(generate={"samples_per_prompt": 2, "shard_size": 2, "batch_size": 2})
    cfg = load_config(path)
    job, _ = generate(cfg)
    good = states_of(cfg)
    shard_file = generated_store_path(cfg) / "states" / "c" / "1" / "0" / "0" / "0" / "0"     # shard 1 of [S, K+1, C, H, W]
    data = shard_file.read_bytes()
    shard_file.write_bytes(data[: len(data) // 2] if damage == "truncate"
                           else data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    res = CliRunner().invoke(app, ["status", "--config", str(path), "--verify"])
    assert "corrupt: generate/shard-00001" in res.output, res.output
    assert "corrupt: generate/shard-00000" not in res.output
    assert job_status(job)["pending"] == 1
    _, st = generate(cfg)
    assert (st["done"], st["skipped"]) == (3, 2)
    assert np.array_equal(states_of(cfg), good)


def test_application_error_recorded_as_failed(make_toy_config, tests_on_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = make_toy_config(teacher={"kind": "byo", "factory": SLOW, "kwargs": {"fail": True}},
                           generate={"samples_per_prompt": 1, "shard_size": 2})
    with pytest.raises(JobFailed, match="teacher exploded on purpose"):
        generate(load_config(path))
    res = CliRunner().invoke(app, ["status", "--config", str(path)])
    assert "failed shard-00000: RuntimeError: teacher exploded on purpose" in res.output


@pytest.mark.timeout(300)
def test_compiled_teacher_writes_the_eager_store_and_a_half_made_one_resumes_only_as_started(make_toy_config):
    """generate.compile: the teacher's blocks compiled (regional), run-only (the same store), its states within
    float tolerance of the eager ones; a store started eager is not finished compiled (nor the reverse)."""
    from pipeline.runner import drop_record
    from stages.generate import jobs

    eager = gen_config(make_toy_config, "eager.yaml")
    generate(eager)
    full = states_of(eager)
    compiled = gen_config(make_toy_config, "compiled.yaml", compile=True)
    assert compiled.stage_dir("generate") == eager.stage_dir("generate")
    drop_record(eager.stage_dir("generate"), "shard-00001")          # as if killed after the first shard
    with pytest.raises(UserError, match="generate.compile is true but the store .* started with compile false"):
        generate(compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    [job] = jobs(compiled, rebuild=True)
    run_job(job, "local", progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1         # the blocks ran compiled
    np.testing.assert_allclose(states_of(compiled), full, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(240)
def test_killed_cli_resumes_without_redoing_units(make_toy_config, tests_on_path):
    """kill -9 the real CLI after its first unit record; the rerun finishes the rest, bit-identical."""
    ref = gen_config(make_toy_config, "ref.yaml", shard_size=1, batch_size=1)
    generate(ref)
    slow_path = make_toy_config("slow.yaml", teacher={"kind": "byo", "factory": SLOW, "kwargs": {"delay": 0.03}},
                                generate={"samples_per_prompt": 2, "shard_size": 1, "batch_size": 1})
    cfg = load_config(slow_path)
    records = cfg.stage_dir("generate") / "_records"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "generate", "--config", str(slow_path)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (records.is_dir() and any(records.glob("*.json"))) and time.time() < deadline:
            assert proc.poll() is None, "generate exited before its first record"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = {p.name: p.read_bytes() for p in records.glob("*.json")}
    assert 1 <= len(first) < 6, f"{len(first)} units done before the kill"
    job, st = generate(cfg)
    assert st["done"] == 6 and st["skipped"] == len(first)
    assert all((records / name).read_bytes() == body for name, body in first.items())   # none written twice
    assert np.array_equal(states_of(cfg), states_of(ref))


# ---------------------------------------------------------------- Ray
@pytest.fixture
def ray_local(tests_on_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _kill_first_running_actor(stop: threading.Event, killed: list):
    """Kill -9 the first Ray actor process seen inside a unit (`ray::_UnitActor.run`)."""
    import psutil

    while not stop.is_set() and not killed:
        for p in psutil.process_iter(["cmdline"]):
            if any("ray::_UnitActor.run" in c for c in (p.info["cmdline"] or [])):
                p.send_signal(signal.SIGKILL)
                killed.append(p.pid)
                return
        time.sleep(0.02)


@pytest.mark.timeout(240)
def test_ray_one_worker_killed_mid_unit_matches_local(make_toy_config, ray_local, tmp_path):
    ref = gen_config(make_toy_config, "ref.yaml")
    generate(ref)
    cfg = gen_config(make_toy_config, "ray.yaml", delay=0.05)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_running_actor, args=(stop, killed))
    watcher.start()
    try:
        job, st = generate(cfg, "ray", workers=1)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no actor was caught mid-unit"
    assert st["done"] == 3
    pids = {read_record(job.out_dir, u.key)["worker_pid"] for u in job.units}
    assert killed[0] not in pids                 # the killed actor committed nothing; its replacement did
    assert np.array_equal(states_of(cfg), states_of(ref))

    # A worker that cannot even start (its teacher fails to load on the actor): units fail with the cause.
    flag = tmp_path / "broken"
    bad = load_config(make_toy_config("bad.yaml", teacher={"kind": "byo", "factory": SLOW,
                                                            "kwargs": {"fail_load_if": str(flag)}},
                                      generate={"max_retries": 0}))
    from stages.generate import jobs

    [job] = jobs(bad)
    job.prepare()                                # the driver builds the store while the teacher still loads
    flag.touch()
    with pytest.raises(JobFailed, match="no worker could start: RuntimeError: teacher weights unreadable"):
        run_job(job, "ray", progress=False)


@pytest.mark.timeout(240)
def test_ray_cluster_survives_losing_a_worker_node(make_toy_config, tests_on_path):
    import ray
    from ray.cluster_utils import Cluster

    ref = gen_config(make_toy_config, "ref.yaml", samples_per_prompt=6)
    generate(ref)
    cfg = gen_config(make_toy_config, "cluster.yaml", delay=0.1, samples_per_prompt=6)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        records = cfg.stage_dir("generate") / "_records"

        stop, removed = threading.Event(), []

        def remove_when_both_actors_work():
            # Both actors have committed a unit, so each is now inside its next one: the node dies mid-unit.
            while not stop.is_set():
                if len({read_record(records.parent, p.stem)["worker_pid"] for p in records.glob("*.json")}) >= 2:
                    cluster.remove_node(worker_node)
                    removed.append(True)
                    return
                time.sleep(0.02)
        t = threading.Thread(target=remove_when_both_actors_work)
        t.start()
        try:
            _, st = generate(cfg, "ray", workers=2)
        finally:
            stop.set()
            t.join()
        assert removed, "the run ended before both actors worked"
        assert st["done"] == 9
        assert len({read_record(records.parent, p.stem)["worker_pid"] for p in records.glob("*.json")}) >= 2
        assert np.array_equal(states_of(cfg), states_of(ref))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_embedded_default_prompts_and_conditions(embedded_tiny):
    """The embedded teacher: the ten digit prompts, their MiniLM conditions cached per prompt in the store."""
    from pipeline.digits import DIGIT_PROMPTS
    from pipeline.teachers import load_teacher

    _, cfg = embedded_tiny
    generate(cfg)
    store = TrajectoryStore.open(generated_store_path(cfg), store_meta(cfg))
    assert list(store.prompts) == DIGIT_PROMPTS and store.states.shape[1:] == (cfg.schedule.windows + 1, 1, 32, 32)
    enc = load_teacher(cfg).encode(DIGIT_PROMPTS)
    got = store.cond(np.arange(10))
    assert all(torch.equal(got[k], enc[k].float()) for k in enc)
    assert np.isfinite(store.states[:]).all() and np.abs(store.states[:, -1]).max() < 10


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import yaml
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(fillout_defaults(cluster))       # what `ray up` checks before launching anything
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types and any("g5" in t["node_config"]["InstanceType"] for t in types.values())
    assert any("pip install" in c and "-e ." in c for c in cluster["setup_commands"])


# ---------------------------------------------------------------- workers encode; typed stores
RECORDING = "test_generate:make_recording_toy_teacher"
TOY_DESCRIBE = "pipeline.teachers.toy:describe_toy_teacher"


def make_recording_toy_teacher(device="cpu", log_dir: str = "", **kw):
    """The toy teacher, leaving a file named after the pid of every process that builds it."""
    from pipeline.teachers.toy import make_toy_teacher

    Path(log_dir, str(os.getpid())).touch()
    return make_toy_teacher(device=device, **kw)


@pytest.mark.timeout(300)
def test_ray_driver_never_builds_the_teacher(make_toy_config, ray_local, tmp_path):
    """generate --executor ray: the driver plans and creates the store from the teacher's layout; the teacher
    is built only in the workers, which encode their own shards' prompts (float16 store = local run)."""
    log = tmp_path / "built"
    log.mkdir()
    ray_cfg = gen_config(make_toy_config, "ray.yaml", store_dtype="float16")
    ray_cfg = load_config(make_toy_config("ray.yaml", teacher={"kind": "byo", "factory": RECORDING,
                                                              "describe": TOY_DESCRIBE, "kwargs": {"log_dir": str(log)}},
                                          generate={"samples_per_prompt": 2, "shard_size": 2, "batch_size": 2,
                                                    "store_dtype": "float16"}))
    job, st = generate(ray_cfg, "ray", workers=2)
    builders = {int(p.name) for p in log.iterdir()}
    workers = {read_record(job.out_dir, u.key)["worker_pid"] for u in job.units}
    assert st["done"] == 3 and os.getpid() not in builders and os.getpid() not in workers
    assert workers <= builders
    store = TrajectoryStore.open(generated_store_path(ray_cfg))
    assert str(store.states.dtype) == "float16" and str(store.group["prompt_embeds"].dtype) == "float16"
    ref = gen_config(make_toy_config, "ref.yaml", store_dtype="float16")
    generate(ref)
    assert np.array_equal(np.asarray(store.states[:]), np.asarray(TrajectoryStore.open(generated_store_path(ref)).states[:]))
    assert np.array_equal(np.asarray(store.group["prompt_embeds"][:]),
                          np.asarray(TrajectoryStore.open(generated_store_path(ref)).group["prompt_embeds"][:]))


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_typed_store_resumes_bit_identical_and_verifies(make_toy_config, store_dtype):
    """Half the shards, then a fresh worker finishes: the same bytes as one unbroken run; readers get float32
    values equal to the float32 store's rounded to the store dtype."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.runner import execute_unit
    from stages.generate import jobs

    whole = gen_config(make_toy_config, "whole.yaml", store_dtype=store_dtype)
    generate(whole)
    path = make_toy_config("parts.yaml", root=str(Path(whole.root).parent / "other"),
                           generate={"samples_per_prompt": 2, "shard_size": 2, "batch_size": 2,
                                     "store_dtype": store_dtype})
    parts = load_config(path)
    [job] = jobs(parts)
    job.prepare()
    worker = job.make_worker()
    execute_unit(worker, job.out_dir, job.units[1])            # one shard, then this "process" is gone
    job2, st = generate(parts)
    assert (st["done"], st["skipped"]) == (3, 1)
    a, b = TrajectoryStore.open(generated_store_path(whole)), TrajectoryStore.open(generated_store_path(parts))
    for name in ("states", "prompt_embeds", "pooled_embeds", "null_prompt_embeds"):
        assert np.array_equal(np.asarray(a.group[name][:]), np.asarray(b.group[name][:])), name
    res = CliRunner().invoke(app, ["status", "--verify", "--config", str(path)])
    assert "corrupt" not in res.output and res.exit_code == 0
    f32 = gen_config(make_toy_config, "f32.yaml")
    generate(f32)
    exact = TrajectoryStore.open(generated_store_path(f32))
    z0, z1 = b.segments([0, 5], [0, 3])
    e0, e1 = exact.segments([0, 5], [0, 3])
    assert z1.dtype == np.float32 and np.allclose(z1, e1, atol=0.05, rtol=0.02) and not np.array_equal(z1, e1)
    c = b.cond([1])["encoder_hidden_states"]
    assert c.dtype == torch.float32 and torch.allclose(c, exact.cond([1])["encoder_hidden_states"], atol=0.02)
