"""Train stage: exact resume, non-finite stop, segment rows, export loadable by plain diffusers."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import deep_merge, generated_toy, kill_training_after, write_config
from pipeline.checkpoint import latest_step, load_checkpoint
from pipeline.runner import JobFailed, read_record, run_job
from schemas.config import load_config

TRAIN = {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "online_fraction": 0.5,
         "adversarial": {"disc_blocks": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """A generated toy trajectory store (one generate for the whole module) and its run's sections."""
    return generated_toy(tmp_path_factory, "train", {"train": TRAIN})


def config_at(toy_store, name: str, **train):
    """A config with its own root that reads the module's store through `train.store`."""
    base, sections, gen_cfg = toy_store
    over = {"root": str(base / name), "train": {**train, "store": str(gen_cfg.stage_dir("generate"))}}
    return load_config(write_config(base / f"{name}.yaml", **deep_merge(sections, over)))


def train_job(cfg, method):
    from stages.train import jobs

    (job,) = jobs(cfg, methods=[method])
    return job


def losses(cfg, method):
    path = cfg.train_dir(cfg.train_run(method)) / "losses.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # timings differ run to run; everything else must not
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.mark.parametrize("method,train", [("perflow", {}), ("flowsteer", {}),
                                          ("ota", {"mixed_precision": "bf16", "prefetch": 2}),
                                          ("flowsteer", {"loader_workers": 2, "prefetch": 2}),
                                          ("ota", {"compile": True})])
def test_resume_is_exact(toy_store, monkeypatch, method, train):
    """Killed mid-segment after step 3 (checkpoint at 2), resumed: the same losses and weights as one run
    (also with bf16 autocast, batches drawn two steps ahead by a thread or by two loader worker processes (the
    pending ones are redrawn on resume), and with the student's blocks compiled)."""
    name = "-".join([method, *(f"{k}{v}" for k, v in train.items())])
    whole = config_at(toy_store, f"whole-{name}", **train)
    run_job(train_job(whole, method), progress=False)

    cut = config_at(toy_store, f"cut-{name}", **train)
    job = train_job(cut, method)
    run_job(dataclasses.replace(job, units=job.units[:1]), progress=False)     # steps 1, 2 committed
    restore = kill_training_after(monkeypatch, 3)
    with pytest.raises(JobFailed, match="simulated kill"):
        run_job(train_job(cut, method), progress=False)
    assert latest_step(cut.train_dir(cut.train_run(method))) == 2
    assert [r["step"] for r in losses(cut, method)] == [1, 2, 3]          # step 3 was logged, not committed
    restore()
    torch.manual_seed(1234)                                                 # a fresh process's RNG
    np.random.seed(1234)
    run_job(train_job(cut, method), progress=False)

    a, b = losses(whole, method), losses(cut, method)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    run_dir = lambda cfg: cfg.train_dir(cfg.train_run(method))
    sa, sb = load_checkpoint(run_dir(whole)), load_checkpoint(run_dir(cut))
    assert sa["step"] == sb["step"] == 4
    for key in sa["student"]:
        assert torch.equal(sa["student"][key], sb["student"][key]), key
    assert (cut.train_dir(cut.train_run(method)) / "export" / "flowsteer.json").is_file()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(toy_store, monkeypatch):
    from pipeline.methods import get_method

    cfg = config_at(toy_store, "nan")
    ota = get_method("ota")
    original = ota.generator_losses

    def poisoned(self, student, batch, step):
        out = original(self, student, batch, step)
        if step == 2:                         # the 3rd step (0-based index 2)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ota, "generator_losses", poisoned)
    with pytest.raises(JobFailed) as err:
        run_job(train_job(cfg, "ota"), progress=False)
    out_dir = cfg.train_dir(cfg.train_run("ota"))
    rec = read_record(out_dir, "steps-000004")
    assert rec["status"] == "failed"
    assert "NonFiniteLoss" in rec["message"] and "step 3" in rec["message"] and "'loss' is nan" in rec["message"]
    assert "step 3" in str(err.value)
    assert latest_step(out_dir) == 2
    state = load_checkpoint(out_dir)
    assert all(torch.isfinite(t).all() for t in state["student"].values())
    assert not (out_dir / "export").exists()


def test_online_rows_follow_the_cached_teacher_trajectory(toy_store):
    """An online rollout from a stored sample's own noise, prompt and w reproduces its cached segment; segment
    rows drawn for a step and completed in the training process land on the teacher's window ends."""
    from pipeline.data import RowSource
    from pipeline.seeds import noise_for
    from pipeline.teacher_solves import TeacherSolves
    from pipeline.teachers import load_teacher
    from stages.train import open_store

    _, _, cfg = toy_store
    store = open_store(cfg)
    teacher = load_teacher(cfg)
    source = RowSource(cfg, store, teacher.sample_shape, seed=0)
    solves = TeacherSolves(teacher, store, "cpu", source.windows)
    idx = np.arange(min(4, store.num_samples))
    seeds = np.asarray(store.seed[:])[idx]
    noise = torch.stack([torch.as_tensor(noise_for(int(s), teacher.sample_shape)) for s in seeds]).float()
    k = torch.tensor([3, 1, 0, 2])[:len(idx)]
    prompt = torch.as_tensor(np.asarray(store.prompt_index[:])[idx])
    cond = {c: torch.as_tensor(np.asarray(v)).float() for c, v in store.cond(prompt.numpy()).items()}
    w = torch.as_tensor(np.asarray(store.guidance[:])[idx]).float()
    z_start, z_end = solves.rollout(noise, k, cond, w)
    c_start, c_end = store.segments(idx, k.numpy())
    torch.testing.assert_close(z_start, torch.as_tensor(np.asarray(c_start)).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_end, torch.as_tensor(np.asarray(c_end)).float(), atol=1e-4, rtol=1e-4)

    rows = source.at(5).segments(10, window_probs=(0.0, 0.0, 1.0, 0.0), online_fraction=0.3)
    assert rows["online_mask"].tolist() == [False] * 7 + [True] * 3
    assert (rows["z_end"][7:] == 0).all()                          # online rows: nothing until completed
    noise = rows["z_start"][7:].clone()
    batch = solves.complete_segments(rows)
    assert (batch["k"] == 2).all()
    assert torch.equal(batch["sigma_start"], source.windows.edges[2].expand(10))
    assert torch.equal(batch["sigma_end"], source.windows.edges[3].expand(10))
    on = {c: v[7:] for c, v in batch["cond"].items()}
    expected = solves.rollout(noise, batch["k"][7:], on, batch["guidance"][7:])
    assert torch.equal(batch["z_start"][7:], expected[0]) and torch.equal(batch["z_end"][7:], expected[1])
    # one teacher window from a cached start lands on the cached end
    torch.testing.assert_close(solves.teacher_window(batch["z_start"][:7], 2, {c: v[:7] for c, v in batch["cond"].items()},
                                                     batch["guidance"][:7]), batch["z_end"][:7], atol=1e-4, rtol=1e-4)


def test_export_loads_in_plain_diffusers_and_sd3_pipeline(toy_store, tmp_path):
    from diffusers import SD3Transformer2DModel

    from pipeline.diffusers_scheduler import FixedFlowMatchEulerScheduler
    from pipeline.export import export_student
    from pipeline.student import load_student
    from pipeline.teachers import load_teacher
    from stages.train import build_trainer, train_segment

    # a LoRA student, trained 2 steps: the export merges the adapters into plain SD3 weights
    cfg = config_at(toy_store, "lora", student={"kind": "lora", "rank": 2}, steps=2, checkpoint_every=2)
    out_dir = cfg.train_dir(cfg.train_run("ota"))
    trainer = build_trainer(cfg, "ota", out_dir)
    trainable = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    train_segment(trainer, out_dir, 2)
    export = export_student(tmp_path / "export", "ota", trainer.ema_student(), cfg, (1, 8, 8))
    trainer.close()
    plain = SD3Transformer2DModel.from_pretrained(export / "transformer")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    teacher = load_teacher(cfg)
    changed = [n for n, p in plain.named_parameters() if "attn" in n and not torch.equal(p, teacher.transformer.state_dict()[n])]
    assert changed, "the merged LoRA update must change the attention weights"
    student = load_student(export)
    cond = teacher.encode(["a red square", "a blue circle"])
    x = student.sample(torch.randn(2, 1, 8, 8), cond, nfe=4)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert json.loads((export / "flowsteer.json").read_text())["windows"] == 4

    # a plain SD3 student export drives a StableDiffusion3Pipeline with the exported fixed scheduler
    tiny = pytest.importorskip("tiny_sd3")
    pipe_dir = tiny.build_tiny_sd3_pipeline(tmp_path / "tiny")
    pipe = tiny.load_tiny_sd3_pipeline(pipe_dir)
    export2 = export_student(tmp_path / "export2", "ota", pipe.transformer, cfg)
    pipe.transformer = SD3Transformer2DModel.from_pretrained(export2 / "transformer")
    pipe.scheduler = FixedFlowMatchEulerScheduler.from_pretrained(export2 / "scheduler")
    image = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[0] == 1 and np.isfinite(image).all()
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_train_stage_rejects_store_of_another_teacher(toy_store):
    from pipeline.errors import UserError
    from stages.train import jobs

    cfg = config_at(toy_store, "other")
    base, sections, gen_cfg = toy_store
    other = load_config(write_config(base / "other.yaml", **deep_merge(sections, {
        "root": str(base / "other"), "teacher": {"kwargs": {"seed": 7}},
        "train": {"store": str(gen_cfg.stage_dir("generate"))}})))
    (job,) = jobs(other, methods=["ota"])
    with pytest.raises(UserError, match="store"):
        job.prepare()
    with pytest.raises(UserError, match="nope.*neither a method"):
        jobs(cfg, methods=["nope"])


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_ray_train_two_workers_average_gradients(toy_store, sharding):
    """train.workers=2: Ray Train runs the loop on 2 gloo ranks, each with its own seeds and batch share; under
    fsdp the student is sharded and the checkpoint and export are the same gathered ones."""
    import ray

    cfg = config_at(toy_store, f"ray-{sharding}", workers=2, steps=2, checkpoint_every=2, sharding=sharding)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_job(train_job(cfg, "ota"), progress=False)
    finally:
        ray.shutdown()
    out_dir = cfg.train_dir(cfg.train_run("ota"))
    state = load_checkpoint(out_dir)
    assert state["step"] == 2 and state["world"] == 2
    r0, r1 = state["ranks"]
    assert not torch.equal(r0["step_rng"], r1["step_rng"])            # rank-derived streams
    assert all(torch.isfinite(t).all() for t in state["student"].values())
    assert [json.loads(line)["step"] for line in (out_dir / "losses.jsonl").read_text().splitlines()] == [1, 2]
    assert (out_dir / "export" / "transformer").is_dir()


def test_seeds_and_variants_train_one_student_each_from_one_store(toy_store):
    """train.seeds x run names: one job per run, its own dir and its own seed's losses; `-m` takes a variant."""
    from stages.train import jobs

    cfg = config_at(toy_store, "seeds", steps=2, checkpoint_every=2, seeds=[0, 1],
                    variants={"perflow-lr": {"method": "perflow", "options": {"x0": "teacher_samples"}}})
    planned = jobs(cfg, methods=["perflow", "perflow-lr"])
    assert [j.out_dir.name.split("-s")[0] for j in planned] == ["perflow", "perflow", "perflow-lr", "perflow-lr"]
    for job in planned[:2]:
        run_job(job, progress=False)
    logs = [[json.loads(x)["loss"] for x in (j.out_dir / "losses.jsonl").read_text().splitlines()] for j in planned[:2]]
    assert logs[0] != logs[1]                                   # seed 0 and seed 1 draw different batches
    meta = json.loads((planned[1].out_dir / "export" / "flowsteer.json").read_text())
    assert (meta["run"], meta["method"], meta["train_seed"]) == ("perflow", "perflow", 1)
    # a variant with the same method, options and seed is the same training: same fingerprint
    assert planned[2].out_dir.name.split("-")[-1] == planned[0].out_dir.name.split("-")[-1]
