"""LoRA students on the embedded teacher (the demo's teacher kind, real digits through the latent store): every
method trains a LoRA student from the CLI's stages and resumes exactly after a kill."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import deep_merge, embedded_sections, kill_training_after, write_config
from pipeline.checkpoint import latest_step, load_checkpoint
from pipeline.cli import run_stage
from pipeline.runner import JobFailed, run_job
from schemas.config import load_config

METHODS = ["perflow", "ota", "flowsteer", "scflow", "ayf-emd"]
LORA = {"steps": 4, "checkpoint_every": 2, "lr": 1e-2, "student": {"kind": "lora", "rank": 2, "alpha": 4},
        "method_options": {"scflow": {"warmup_rf": 0, "warmup_bi": 0}}}

pytestmark = pytest.mark.usefixtures("one_thread")


def config(embedded_tiny, name: str):
    path, cfg = embedded_tiny
    sections = deep_merge(embedded_sections(cfg.root), {"train": LORA})
    return load_config(write_config(path.parent / f"{name}.yaml", **deep_merge(sections, {"root": str(cfg.root)})))


def train_job(cfg, method):
    from stages.train import jobs

    (job,) = jobs(cfg, methods=[method])
    return job


@pytest.fixture(scope="module")
def embedded_lora(embedded_tiny):
    cfg = config(embedded_tiny, "lora")
    run_stage("generate", cfg, "local")
    run_stage("encode", cfg, "local")        # perflow's and scflow's x0: the digits' latents
    return cfg


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_lora_student_on_the_embedded_teacher_and_resumes_exactly(embedded_lora, monkeypatch,
                                                                                     method):
    cfg = embedded_lora
    run_job(train_job(cfg, method), progress=False)
    out = cfg.train_dir(cfg.train_run(method))
    sa = load_checkpoint(out)                 # the uninterrupted run's last state; then the same run, killed
    shutil.rmtree(out)
    cut = train_job(cfg, method)
    restore = kill_training_after(monkeypatch, 3)
    with pytest.raises(JobFailed, match="simulated kill"):
        run_job(cut, progress=False)
    assert latest_step(out) == 2
    restore()
    run_job(train_job(cfg, method), progress=False)
    sb = load_checkpoint(out)
    assert sa["step"] == sb["step"] == 4 and sa["student"].keys() == sb["student"].keys()
    for key in sa["student"]:
        assert "lora_" in key or (method == "ayf-emd" and key.startswith("gap_embed.")), key
        assert torch.equal(sa["student"][key], sb["student"][key]), key
    assert any("lora_B" in k and sa["student"][k].abs().sum() > 0 for k in sa["student"]), "the adapters trained"
