"""Precision and data path: teacher.dtype, bf16/fp16 mixed precision with float32 masters, prefetching,
and PeRFlow's x0 from real-image latents (docs/precision.md)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import deep_merge, generated_toy, toy_sections, trainer_for, write_config
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import app, run_stage
from pipeline.runner import write_record
from schemas.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["perflow", "ota", "flowsteer", "scflow", "ayf-emd"]
BF16 = {"teacher": {"dtype": "bfloat16"},
        "train": {"mixed_precision": "bf16", "steps": 2, "checkpoint_every": 2, "online_fraction": 0.5,
                  "adversarial": {"disc_blocks": 1},
                  "method_options": {"perflow": {"x0": "teacher_samples"},
                                     "scflow": {"warmup_rf": 0, "warmup_bi": 0, "warmup_gan": 0}}}}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The toy teacher in bfloat16, its store generated once for the module."""
    base, _, cfg = generated_toy(tmp_path_factory, "bf16", BF16, "bf16.yaml")
    return base, cfg


# ---------------------------------------------------------------- the teacher at its dtype
def test_teacher_at_bf16_casts_inputs_and_returns_float32(bf16_run):
    from pipeline.teachers import load_teacher, sd3_velocity

    _, cfg = bf16_run
    teacher = load_teacher(cfg)
    assert teacher.dtype == torch.bfloat16
    assert {p.dtype for p in teacher.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher.weak_transformer.parameters()} == {torch.bfloat16}
    cond = teacher.encode(["a red square", "a blue circle"])
    assert {v.dtype for v in cond.values()} == {torch.float32}
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.3])
    v = teacher.velocity(x, sigma, cond)
    assert v.dtype == torch.float32
    by_hand = sd3_velocity(teacher.transformer, x.bfloat16(), sigma, {k: c.bfloat16() for k, c in cond.items()})
    assert torch.equal(v, by_hand.float())
    # a student's autocast region does not change the teacher's targets
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(teacher.velocity(x, sigma, cond), v)
    assert teacher.weak_velocity(x, sigma, cond).dtype == torch.float32
    assert teacher.decode(x).dtype == torch.float32


def test_teacher_dtype_config_and_fingerprints(tmp_path):
    sections = toy_sections(tmp_path)
    a = load_config(write_config(tmp_path / "a.yaml", **sections))
    b = load_config(write_config(tmp_path / "b.yaml", **deep_merge(sections, {"teacher": {"dtype": "bfloat16"}})))
    c = load_config(write_config(tmp_path / "c.yaml", **deep_merge(sections, {"train": {"mixed_precision": "bf16"}})))
    d = load_config(write_config(tmp_path / "d.yaml", **deep_merge(sections, {"train": {"prefetch": 3}})))
    assert a.fingerprint("teacher") == b.fingerprint("teacher")     # the embedded teacher trains in float32
    assert a.fingerprint("generate") != b.fingerprint("generate")
    fp = lambda cfg: cfg.fingerprint("train", cfg.train_run("ota"))     # noqa: E731
    assert fp(a) != fp(c)          # precision enters the train key
    assert fp(a) == fp(d)          # prefetch changes no result
    with pytest.raises(ConfigError, match="teacher.kwargs.dtype: the teacher.s precision is teacher.dtype"):
        load_config(write_config(tmp_path / "e.yaml", **deep_merge(sections, {"teacher": {"kwargs": {"dtype": "bfloat16"}}})))
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(write_config(tmp_path / "f.yaml", **deep_merge(sections, {"train": {"mixed_precision": "fp8"}})))


# ---------------------------------------------------------------- bf16 end to end
def test_bf16_teacher_generate_train_all_methods_evaluate(bf16_run):
    """bf16 teacher + bf16 autocast through generate -> train (all five methods) -> evaluate."""
    from stages import evaluate

    base, cfg = bf16_run
    cfg = load_config(write_config(base / "all.yaml", **deep_merge(
        toy_sections(base), {**BF16, "train": {**BF16["train"], "methods": METHODS},
                             "evaluate": {"n_samples": 8, "nfes": [1, 4], "features": "pixels", "batch_size": 8}})))
    run_stage("train", cfg, "local")
    for method in METHODS:
        out = cfg.train_dir(cfg.train_run(method))
        state = load_checkpoint(out)
        assert state["step"] == 2
        assert {t.dtype for t in state["student"].values() if t.is_floating_point()} == {torch.float32}, method
        assert {t.dtype for t in state["ema"].values()} == {torch.float32}, method
        if state["disc"] is not None:
            assert {t.dtype for t in state["disc"].values() if t.is_floating_point()} == {torch.float32}, method
        meta = json.loads((out / "export" / "flowsteer.json").read_text())
        assert meta["dtype"] == "float32" and meta["teacher_dtype"] == "bfloat16"
        rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((cfg.train_dir(cfg.train_run("perflow")) / "export" / "flowsteer.json").read_text())["label"] == \
        "reflow on teacher samples"
    for job in evaluate.jobs(cfg, methods=METHODS):
        from pipeline.runner import run_job

        run_job(job, "local", progress=False)
    evaluate.after(cfg, methods=METHODS)
    scores = pd.read_parquet(cfg.stage_dir("evaluate") / "scores.parquet")
    assert set(scores.checkpoint) >= set(METHODS) and np.isfinite(scores.value).all()


def test_bf16_student_stays_float32_and_its_loss_decreases_on_a_fixed_batch(bf16_run):
    _, cfg = bf16_run
    trainer = trainer_for(cfg, "perflow", lr=1e-3, grad_clip=0.0)
    assert trainer.autocast_dtype == torch.bfloat16
    rows = trainer.loader.next(0)
    trainer.loader.next = lambda step: rows                   # the same batch every step
    method_rng = trainer.method.ctx.step_rng.get_state()
    losses = []
    for _ in range(20):
        trainer.method.ctx.step_rng.set_state(method_rng)    # ... and the same chord points
        losses.append(trainer.train_step()["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert all(t.dtype == torch.float32 for t in trainer.ema.shadow.values())
    assert losses[-1] < 0.5 * losses[0], losses


def test_fp16_autocast_trains_with_a_grad_scaler(bf16_run):
    _, cfg = bf16_run
    trainer = trainer_for(cfg, "flowsteer", mixed_precision="fp16")
    assert trainer.scaler.is_enabled() and trainer.disc_scaler.is_enabled()
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    for _ in range(2):
        values = trainer.train_step()
    assert np.isfinite(values["loss"]) and all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    assert trainer.state_dict()["scalers"][0]["scale"] > 0


# ---------------------------------------------------------------- prefetching
def test_prefetch_draws_exactly_the_batches_of_inline_drawing(bf16_run):
    """OTA's batches (cached reads + online teacher rollouts) drawn 3 ahead on a thread = drawn in the step."""
    _, cfg = bf16_run
    runs = {}
    for depth in (0, 3):
        trainer = trainer_for(cfg, "ota", prefetch=depth, steps=4)
        runs[depth] = ([trainer.train_step() for _ in range(4)], trainer.student.state_dict())
        trainer.close()
    (losses0, weights0), (losses3, weights3) = runs[0], runs[3]
    assert losses0 == losses3
    assert all(torch.equal(weights0[k], weights3[k]) for k in weights0)


# ---------------------------------------------------------------- PeRFlow's x0
def _write_latents(cfg, n: int = 6):
    """A finished latent store at the run's latent_store_dir with toy-shaped rows (row i = i + 0.01 j)."""
    from pipeline.latents import LatentStore, latent_store_dir
    from pipeline.rowstore import shard_key

    out = latent_store_dir(cfg)
    lat = (np.arange(n)[:, None] + 0.01 * np.arange(64)[None]).reshape(n, 1, 8, 8).astype(np.float32)
    cond = {"encoder_hidden_states": torch.randn(n, 4, 16), "pooled_projections": torch.randn(n, 16)}
    null = {"encoder_hidden_states": torch.zeros(1, 4, 16), "pooled_projections": torch.zeros(1, 16)}
    store = LatentStore.create(out / "latents.zarr", {"format": 1}, n, (1, 8, 8),
                               {"encoder_hidden_states": (4, 16), "pooled_projections": (16,)}, n)
    write_record(out, shard_key(0), "done", checksum=store.write_shard(0, lat, cond, null))
    return lat, cond


def test_perflow_on_byo_teacher_draws_x0_and_prompt_from_the_latent_store(bf16_run, tmp_path):
    base, gen_cfg = bf16_run
    sections = deep_merge(toy_sections(base), BF16)
    sections["train"]["method_options"] = {}                 # x0: real (the default)
    sections["train"]["store"] = str(gen_cfg.stage_dir("generate"))
    sections["data"] = {"images": str(tmp_path / "images")}
    cfg = load_config(write_config(tmp_path / "real.yaml", **sections))
    lat, cond = _write_latents(cfg)
    from stages.train import jobs

    jobs(cfg, methods=["perflow"])                           # has real data: accepted
    trainer = trainer_for(cfg, "perflow", prefetch=0)
    drawn = [trainer.loader.next(step) for step in (0, 1)]   # the rows PeRFlow's first two steps draw
    rows = torch.cat([d["index"] for d in drawn])
    assert len(rows) == 8 and len(set(rows.tolist())) == 6                # a 6-row epoch, then the next one
    for d in drawn:
        assert torch.equal(d["x0"], torch.from_numpy(lat[d["index"].numpy()]))
        assert torch.equal(d["cond"]["pooled_projections"], cond["pooled_projections"][d["index"]])
    assert type(trainer.method).x0_source(cfg, {}) == "latents"


def test_perflow_without_real_data_on_byo_teacher_is_one_error_line(make_toy_config, tmp_path):
    path = make_toy_config("nox0.yaml", train={"methods": ["perflow"], "method_options": {"perflow": {"x0": "real"}}})
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: perflow draws x0 from real images")
    assert "data.images" in lines[0] and "x0: teacher_samples" in lines[0]
    assert not (tmp_path / "runs" / "train").exists()
    bad = make_toy_config("badx0.yaml", train={"methods": ["perflow"], "method_options": {"perflow": {"x0": "noise"}}})
    result = CliRunner().invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "train.method_options.perflow.x0 must be one of" in result.stderr


# ---------------------------------------------------------------- a real SD3 pipeline in bf16
def test_sd3_pipeline_in_bf16_generates_trains_every_method_and_samples(make_toy_config, tmp_path):
    """The reported crash: a tiny random SD3 pipeline dir at teacher.dtype bfloat16 (not kwargs.dtype)."""
    from tiny_sd3 import build_tiny_sd3_pipeline

    pipe_dir = build_tiny_sd3_pipeline(tmp_path / "pipe")
    path = make_toy_config("sd3.yaml", teacher={"kind": "sd3", "path": str(pipe_dir), "factory": None,
                                                "dtype": "bfloat16"},
                           generate={"samples_per_prompt": 1, "shard_size": 3, "batch_size": 3},
                           train={"methods": METHODS, "steps": 1, "checkpoint_every": 1, "batch_size": 2,
                                  "mixed_precision": "bf16", "adversarial": {"disc_blocks": 1}})
    cfg = load_config(path)
    run_stage("generate", cfg, "local")
    run_stage("train", cfg, "local")
    for method in METHODS:
        state = load_checkpoint(cfg.train_dir(cfg.train_run(method)))
        assert state["step"] == 1 and all(t.dtype == torch.float32 for t in state["student"].values()
                                          if t.is_floating_point()), method
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", "-c", str(path), "-p", "a red square", "--per-prompt", 2, "-n", "2",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
