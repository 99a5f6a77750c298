"""`flowsteer plan`: exact parameter counts from configs alone (meta device), the memory formulas, generate's
store bytes, and `train` refusing a run that cannot fit before it loads anything."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import deep_merge, toy_sections, write_config
from pipeline.cli import app, run_stage
from schemas.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meta_counts_equal_the_loaded_teacher_and_peft(tmp_path):
    """The plan's counts, made without weights, equal those of the teacher actually loaded (transformer, text
    encoders + VAE of an SD3 dir) and of the adapters peft really adds."""
    import tiny_sd3

    from pipeline.lora import attach_adapters
    from pipeline.plan import config_teacher, lora_params
    from pipeline.teachers import load_teacher

    pipe_dir = tiny_sd3.build_tiny_sd3_pipeline(tmp_path / "sd3")
    cfg = load_config(write_config(tmp_path / "c.yaml", **deep_merge(toy_sections(tmp_path), {
        "teacher": {"kind": "sd3", "path": str(pipe_dir), "factory": None}})))
    planned = config_teacher(cfg)
    assert all(p.device.type == "meta" for p in planned.transformer.parameters())
    pipe = tiny_sd3.load_tiny_sd3_pipeline(pipe_dir)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert planned.params == count(pipe.transformer)
    assert planned.encoder_params == count(pipe.text_encoder) + count(pipe.text_encoder_2) + count(pipe.vae)
    assert planned.image_tokens == (8 // 2) ** 2 and planned.text_tokens == tuple(
        load_teacher(cfg).encode(["x"])["encoder_hidden_states"].shape)[1]
    spec = cfg.train.student.model_copy(update={"kind": "lora", "rank": 3})
    net = pipe.transformer
    before = count(net)
    attach_adapters(net, spec)
    assert count(net) - before == lora_params(planned.transformer, 3, list(spec.target_modules))


def test_plan_parts_follow_the_formulas(tmp_path):
    from pipeline.plan import config_teacher, plan, shape_teacher

    cfg = load_config(write_config(tmp_path / "c.yaml", **deep_merge(toy_sections(tmp_path), {
        "device": "cuda", "teacher": {"dtype": "bfloat16"}, "train": {"mixed_precision": "bf16"}})))
    teacher = config_teacher(cfg)
    P = teacher.params
    ddp, fsdp, lora = plan(cfg, teacher, "scflow", gpus=4, batch_size=8)
    assert ddp.parts["teacher"] == 2 * P and ddp.parts["masters"] == 4 * P and ddp.parts["optimizer"] == 8 * P
    assert ddp.parts["ema"] == 8 * P                     # the EMA and SCFlow's target
    assert ddp.parts["disc"] > 0                         # heads only: the backbone is the teacher's
    assert fsdp.parts["masters"] == -(-4 * P // 4) and fsdp.parts["gathered"] > 0
    assert fsdp.parts["activations"] == ddp.parts["activations"] == lora.parts["activations"]
    assert lora.parts["teacher"] == 2 * P and 0 < lora.trained < P and lora.parts["masters"] == 4 * lora.trained
    assert lora.total < ddp.total and fsdp.total < ddp.total
    # two rows per GPU cost twice the activations of one
    one = plan(cfg, teacher, "scflow", gpus=4, batch_size=4)[0].parts["activations"]
    assert ddp.parts["activations"] == 2 * one
    # the public SD3-Medium transformer has 2.03 B parameters (its model card)
    assert shape_teacher("sd3-medium").params == pytest.approx(2.03e9, rel=0.005)


def test_plan_command_and_generate_store_bytes(tmp_path):
    """The printed plan has the three modes; its store bytes are what generate allocates (uncompressed)."""
    import zarr

    cfg_path = write_config(tmp_path / "c.yaml", **toy_sections(tmp_path))
    result = CliRunner().invoke(app, ["plan", "-c", str(cfg_path), "--gpus", "2", "--gpu-memory", "80",
                                      "--throughput", "100", "-m", "flowsteer"])
    assert result.exit_code == 0, result.output
    assert all(mode in result.output for mode in ("full/ddp", "full/fsdp x2", "lora", "fits", "GPU-hours"))
    cfg = load_config(cfg_path)
    from pipeline.plan import generate_cost

    cost = generate_cost(cfg)
    run_stage("generate", cfg, "local")
    g = zarr.open_group(str(cfg.stage_dir("generate") / "store.zarr"), mode="r")
    arrays = [name for name in g.array_keys() if name not in ("guidance", "prompt_index", "seed")]
    allocated = sum(int(np.prod(g[name].shape)) * g[name].dtype.itemsize for name in arrays)
    assert cost["store_bytes"] == allocated
    assert cost["samples"] == g["seed"].shape[0]
    bad = CliRunner().invoke(app, ["plan", "-c", str(cfg_path), "--shape", "nope"])
    assert bad.exit_code == 2 and bad.output.count("error:") == 1


def test_train_refuses_a_plan_that_cannot_fit_before_loading(make_toy_config, tmp_path, monkeypatch):
    import pipeline.teachers as teachers

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(teachers, "load_teacher", no_load)
    path = make_toy_config("tight.yaml", train={"gpu_memory_gb": 1e-6})
    result = CliRunner().invoke(app, ["train", "-c", str(path)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: train:") and "flowsteer plan" in lines[0]
    assert not (tmp_path / "runs").exists()
    # a budget that fits passes the check (and then needs its store, which it does not have)
    ok = make_toy_config("roomy.yaml", train={"gpu_memory_gb": 80})
    roomy = CliRunner().invoke(app, ["train", "-c", str(ok)])
    assert "GB per GPU" not in roomy.output
    torch.manual_seed(0)
