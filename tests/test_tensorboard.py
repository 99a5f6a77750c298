"""Train stage for a user: TensorBoard scalars and sample grids, one teacher load for all methods, per-step bars."""
from __future__ import annotations

import json

import pytest

from conftest import deep_merge, generated_toy, toy_sections, write_config
from pipeline.cli import run_stage
from schemas.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """perflow and ota trained in ONE `train` invocation, counting teacher loads."""
    import pipeline.teachers as teachers

    base, _, cfg = generated_toy(tmp_path_factory, "tb", {
        "train": {"steps": 4, "checkpoint_every": 2, "log_every": 2, "online_fraction": 0.5}}, "c.yaml")
    loads = []
    original = teachers.load_teacher

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(teachers, "load_teacher", counting)
    try:
        run_stage("train", cfg, "local", methods=["perflow", "ota"])
    finally:
        mp.undo()
    return cfg, loads


def test_one_teacher_load_for_every_method_of_an_invocation(trained):
    cfg, loads = trained
    assert len(loads) == 1
    for method in ("perflow", "ota"):
        assert (cfg.train_dir(cfg.train_run(method)) / "export" / "flowsteer.json").is_file()


def test_event_file_holds_every_logged_scalar_and_the_sample_grids(trained):
    cfg, _ = trained
    out = cfg.train_dir(cfg.train_run("ota"))
    acc = events(out / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "train/grad_norm", "train/lr", "train/data_wait_s", "train/step_s",
            "train/online_share"} <= tags
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]                    # losses.jsonl stays, written at log steps
    written = [(e.step, e.value) for e in acc.Scalars("loss/loss")]
    assert [s for s, _ in written] == [2, 4]
    assert [v for _, v in written] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([cfg.train.lr] * 2)
    images = set(acc.Tags()["images"])
    assert images == {"samples/nfe1", "samples/nfe4"}
    assert [e.step for e in acc.Images("samples/nfe4")] == [2, 4]   # one grid per committed checkpoint


def test_train_prints_the_tensorboard_line(tmp_path, capsys, trained):
    cfg, _ = trained
    run_stage("train", cfg, "local", methods=["perflow"])          # all done: skipped, but says where things are
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {cfg.root}/train" in out


def test_tensorboard_off_writes_no_events(tmp_path):
    base = tmp_path
    sections = deep_merge(toy_sections(base), {"train": {"steps": 2, "checkpoint_every": 2, "tensorboard": False}})
    cfg = load_config(write_config(base / "c.yaml", **sections))
    on = load_config(write_config(base / "on.yaml", **deep_merge(sections, {"train": {"tensorboard": True}})))
    assert cfg.train_dir(cfg.train_run("perflow")) == on.train_dir(on.train_run("perflow"))   # a run-only switch
    run_stage("generate", cfg, "local")
    run_stage("train", cfg, "local", methods=["perflow"])
    out = cfg.train_dir(cfg.train_run("perflow"))
    assert (out / "losses.jsonl").is_file() and not (out / "tb").exists()


def test_per_step_bar_moves_every_step(trained, capsys, monkeypatch):
    """A fresh method, run through the local executor: its own bar reaches every step, the runner's is off."""
    cfg, _ = trained
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3, "checkpoint_every": 3})})
    run_stage("train", cfg, "local", methods=["perflow"])
    err = capsys.readouterr().err
    assert "train perflow" in err and "3/3" in err and "loss=" in err
    assert "units already done" not in err                        # the runner's unit bar did not draw
