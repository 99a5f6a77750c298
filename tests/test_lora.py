"""LoRA students (train.student.kind: lora): one copy of the base weights, every method, exact resume, exports
that plain diffusers loads (`load_lora_weights`) and `flowsteer export --merge`."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import deep_merge, generated_toy, kill_training_after, trainer_for, write_config
from pipeline.checkpoint import latest_step, load_checkpoint
from pipeline.lora import BASE_LOCK, footprint
from pipeline.cli import run_stage
from pipeline.runner import JobFailed, run_job
from schemas.config import load_config
from test_train import config_at, train_job

METHODS = ["perflow", "ota", "flowsteer", "scflow", "ayf-emd"]
LORA = {"kind": "lora", "rank": 2, "alpha": 4}
TRAIN = {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "lr": 1e-2, "student": LORA,
         "adversarial": {"disc_blocks": 1},
         # the GAN terms from step 1, so the shared discriminator backbone is exercised within 4 steps
         "method_options": {"perflow": {"x0": "teacher_samples"}, "scflow": {"warmup_rf": 0, "warmup_bi": 0}}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    return generated_toy(tmp_path_factory, "lora", {"train": TRAIN})


def test_one_copy_of_the_base_weights_for_teacher_student_and_discriminator(toy_store):
    cfg = config_at(toy_store, "share")
    run = trainer_for(cfg, "flowsteer")
    teacher = run.teacher
    base = teacher.transformer
    q = base.transformer_blocks[0].attn.to_q
    # the student is the teacher's module; the discriminator's frozen block is the same module, not a copy
    assert run.student is base and run.disc.shared.blocks[0] is base.transformer_blocks[0]
    assert q.base_layer.weight.data_ptr() == dict(run.student.named_parameters())[
        "transformer_blocks.0.attn.to_q.base_layer.weight"].data_ptr()
    assert not any(p.data_ptr() == q.base_layer.weight.data_ptr() for p in run.disc.parameters())
    assert {p.data_ptr() for p in run.disc.parameters()} == {p.data_ptr() for p in run.disc.heads.parameters()}
    # trained: adapters only, EMA'd and checkpointed; the optimiser holds two float32 moments per adapter weight
    with BASE_LOCK:                       # the prefetch thread's teacher calls flip requires_grad meanwhile
        trainable = [n for n, p in run.student.named_parameters() if p.requires_grad]
    assert trainable == run.param_names
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sorted(run.ema.shadow) == sorted(trainable) == sorted(run.student_state())
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7)
    cond = teacher.encode(["a red square", "a blue circle"])
    before = teacher.velocity(x, sigma, cond)
    for _ in range(2):
        run.train_step()
    foot = footprint(run.student, run.param_names, run.opt)
    n_adapter = sum(dict(run.student.named_parameters())[n].numel() for n in trainable)
    assert foot["trainable_params"] == n_adapter
    assert foot["frozen_params"] == sum(p.numel() for p in base.parameters()) - n_adapter
    # AdamW: exp_avg and exp_avg_sq in float32 per adapter weight, plus a scalar step per tensor
    assert 2 * 4 * n_adapter < foot["optimizer_bytes"] <= 2 * 4 * n_adapter + 8 * len(trainable)
    # the teacher (adapters off) is unchanged by training; the student (adapters on) moved away from it
    assert torch.equal(teacher.velocity(x, sigma, cond), before)
    from pipeline.teachers.base import sd3_velocity
    with torch.no_grad(), BASE_LOCK:
        assert not torch.allclose(sd3_velocity(run.student, x, sigma, cond), before, atol=1e-4)
    run.close()                           # the adapters leave: the transformer is the plain teacher again
    assert not any("lora" in n for n, _ in base.named_parameters())
    assert torch.equal(teacher.velocity(x, sigma, cond), before)


def losses(cfg, method):
    rows = [json.loads(line) for line in (cfg.train_dir(cfg.train_run(method)) / "losses.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_lora_student_and_resumes_exactly(toy_store, monkeypatch, method):
    """Killed after step 3 (checkpoint at 2), resumed in the same process (the shared teacher is reused): the
    same losses and adapter weights as one uninterrupted run; the checkpoint holds the adapters only."""
    whole = config_at(toy_store, f"whole-{method}")
    run_job(train_job(whole, method), progress=False)
    cut = config_at(toy_store, f"cut-{method}")
    job = train_job(cut, method)
    run_job(dataclasses.replace(job, units=job.units[:1]), progress=False)
    restore = kill_training_after(monkeypatch, 3)
    with pytest.raises(JobFailed, match="simulated kill"):
        run_job(train_job(cut, method), progress=False)
    assert latest_step(cut.train_dir(cut.train_run(method))) == 2
    restore()
    torch.manual_seed(1234)
    np.random.seed(1234)
    run_job(train_job(cut, method), progress=False)
    assert losses(whole, method) == losses(cut, method)
    sa, sb = (load_checkpoint(c.train_dir(c.train_run(method))) for c in (whole, cut))
    assert sa["step"] == sb["step"] == 4 and sa["student"].keys() == sb["student"].keys()
    for key in sa["student"]:
        assert "lora_" in key or (method == "ayf-emd" and key.startswith("gap_embed.")), key
        assert torch.equal(sa["student"][key], sb["student"][key]), key
    moved = [k for k in sa["student"] if "lora_B" in k and sa["student"][k].abs().sum() > 0]
    assert moved, "the adapters trained"
    export = cut.train_dir(cut.train_run(method)) / "export"
    meta = json.loads((export / "flowsteer.json").read_text())
    assert meta["student"]["kind"] == "lora" and meta["trainable_params"] > 0 and meta["optimizer_bytes"] > 0
    if meta["network"] == "pytorch_lora_weights.safetensors":       # a byo teacher's base is not on disk
        from pipeline.errors import UserError
        from pipeline.student import load_student
        from pipeline.teachers import load_teacher

        with pytest.raises(UserError, match="base"):
            load_student(export)
        teacher = load_teacher(cut)
        student = load_student(export, base=teacher.transformer)    # what evaluate and `sample` pass
        assert not any("lora" in n for n, _ in teacher.transformer.named_parameters())   # the teacher untouched
        x, sigma, cond = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), teacher.encode(["a red square"] * 2)
        from pipeline.teachers.base import sd3_velocity
        with torch.no_grad():
            assert not torch.allclose(sd3_velocity(student.module, x, sigma, cond), teacher.velocity(x, sigma, cond),
                                      atol=1e-5)


def test_lora_export_loads_in_diffusers_and_merges(toy_store, tmp_path):
    """On a tiny random SD3 pipeline dir: the export is a diffusers LoRA dir that `load_lora_weights` puts on
    the teacher's pipeline, whose latents equal flowsteer's sampler; `flowsteer export --merge` writes a full
    transformer/ that gives the same latents; the model card says which."""
    import tiny_sd3
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.student import load_student

    base, sections, _ = toy_store
    pipe_dir = tiny_sd3.build_tiny_sd3_pipeline(tmp_path / "sd3")
    path = write_config(tmp_path / "sd3.yaml", **deep_merge(sections, {
        "root": str(tmp_path / "runs"), "teacher": {"kind": "sd3", "path": str(pipe_dir), "factory": None},
        "generate": {"samples_per_prompt": 1, "shard_size": 3, "batch_size": 3},
        "train": {"methods": ["ota"], "steps": 2, "checkpoint_every": 2, "batch_size": 2}}))
    cfg = load_config(path)
    run_stage("generate", cfg, "local")
    run_stage("train", cfg, "local")
    export = cfg.train_dir(cfg.train_run("ota")) / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file() and not (export / "transformer").exists()
    assert "load_lora_weights" in (export / "README.md").read_text()

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from pipeline.teachers import load_teacher

    def pipeline(transformer=None):
        extra = {"transformer": transformer} if transformer is not None else {}
        return StableDiffusion3Pipeline.from_pretrained(str(pipe_dir), text_encoder_3=None, tokenizer_3=None, **extra)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    call = dict(prompt="a cat", num_inference_steps=4, sigmas=[1, 0.75, 0.5, 0.25], guidance_scale=1.0,
                output_type="latent")                         # the card's call: the fixed grid, no CFG
    ours = load_student(export).sample(noise, load_teacher(cfg).encode(["a cat"]), 4)
    pipe = pipeline()
    assert not torch.allclose(pipe(latents=noise.clone(), **call).images, ours, atol=1e-4), "the adapter matters"
    pipe.load_lora_weights(str(export))
    assert torch.allclose(pipe(latents=noise.clone(), **call).images, ours, atol=1e-4)

    result = CliRunner().invoke(app, ["export", str(export), "--merge", "-c", str(path)])
    assert result.exit_code == 0, result.output
    merged = pipeline(SD3Transformer2DModel.from_pretrained(export / "transformer"))
    assert torch.allclose(merged(latents=noise.clone(), **call).images, ours, atol=1e-4)
    meta = json.loads((export / "flowsteer.json").read_text())
    assert meta["network"] == "transformer" and meta["student"]["merged"] is True
    assert "flowsteer export --merge" in (export / "README.md").read_text()
    again = CliRunner().invoke(app, ["export", str(tmp_path), "--merge", "-c", str(path)])
    assert again.exit_code == 2 and again.output.count("error:") == 1


def test_every_method_trains_lora_on_a_bf16_sd3_pipeline_dir(toy_store, tmp_path):
    """A tiny random SD3 pipeline dir at teacher.dtype bfloat16: the LoRA base stays bf16 (one copy), the
    adapters float32 under bf16 autocast; every method trains and exports."""
    import tiny_sd3

    _, sections, _ = toy_store
    pipe_dir = tiny_sd3.build_tiny_sd3_pipeline(tmp_path / "sd3")
    cfg = load_config(write_config(tmp_path / "bf16.yaml", **deep_merge(sections, {
        "root": str(tmp_path / "runs"),
        "teacher": {"kind": "sd3", "path": str(pipe_dir), "factory": None, "dtype": "bfloat16"},
        "generate": {"samples_per_prompt": 1, "shard_size": 3, "batch_size": 3},
        "train": {"methods": METHODS, "steps": 1, "checkpoint_every": 1, "batch_size": 2,
                  "mixed_precision": "bf16"}})))
    run_stage("generate", cfg, "local")
    run_stage("train", cfg, "local")
    for method in METHODS:
        out = cfg.train_dir(cfg.train_run(method))
        state = load_checkpoint(out)
        assert state["step"] == 1 and all(t.dtype == torch.float32 for t in state["student"].values()), method
        assert all("lora_" in k or k.startswith("gap_embed.") for k in state["student"]), method
        meta = json.loads((out / "export" / "flowsteer.json").read_text())
        assert (out / "export" / meta["network"]).exists(), method


def test_bad_target_modules_is_one_readable_line(toy_store):
    from pipeline.errors import UserError

    cfg = config_at(toy_store, "badtarget", student={**LORA, "target_modules": ["no_such_layer"]})
    with pytest.raises(UserError, match="train.student.target_modules"):
        trainer_for(cfg, "ota")
