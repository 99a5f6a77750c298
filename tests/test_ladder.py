"""`flowsteer ablate`: every ladder row trains from one store, is evaluated and reported; the study preset."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from conftest import deep_merge, write_config
from pipeline.cli import EXAMPLE, app
from pipeline.ladder import LADDER, PRESETS, with_ladder
from schemas.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ablate_trains_every_row_from_one_store_and_reports_them(embedded_tiny, tmp_path):
    path, base = embedded_tiny
    sections = deep_merge(yaml.safe_load(path.read_text()), {
        "root": str(tmp_path / "runs"), "train": {"steps": 2, "checkpoint_every": 2, "batch_size": 4, "seeds": [0],
                                                  "adversarial": {"disc_blocks": 1}},
        "evaluate": {"nfes": [1], "n_samples": 10, "batch_size": 10}})
    cfg_path = write_config(tmp_path / "ladder.yaml", **sections)
    shutil.copytree(base.stage_dir("teacher"), load_config(cfg_path).stage_dir("teacher"))   # reuse its teacher
    result = CliRunner().invoke(app, ["ablate", "-c", str(cfg_path)])
    assert result.exit_code == 0, result.output
    cfg = with_ladder(load_config(cfg_path))
    assert [r.name for r in cfg.train_runs()] == LADDER
    stores = set()
    for run in cfg.train_runs():
        meta = json.loads((cfg.train_dir(run) / "export" / "flowsteer.json").read_text())
        assert meta["run"] == run.name and meta["method"] == run.method and meta["step"] == 2
        assert 0 < meta["ema_rel_distance"] <= 1.0 + 1e-6
        stores.add(str(cfg.stage_dir("generate")))
    assert len(stores) == 1 and len(list((cfg.stage_dir("generate").parent).iterdir())) == 1
    grid = lambda name: json.loads((cfg.train_dir(cfg.train_run(name)) / "export" / "flowsteer.json").read_text())
    assert grid("perflow-diffusers")["grid"] == "diffusers" and grid("perflow")["grid"] == "fixed"
    assert grid("flowsteer-rollout")["fake_source"] == "rollout"
    logs = (cfg.train_dir(cfg.train_run("flowsteer")) / "losses.jsonl").read_text().splitlines()
    assert {"d_acc_real", "d_acc_fake", "fm", "ema_rel_distance"} <= set(json.loads(logs[-1]))
    assert "ablate: finished" in result.output
    assert (cfg_path.parent / "runs").exists() or True
    for name in LADDER:
        assert f"train: {name}:" in result.output


def test_study_preset_is_a_loadable_config_with_the_whole_ladder(tmp_path):
    target = tmp_path / "study.yaml"
    result = CliRunner().invoke(app, ["init", str(target), "--preset", "study"])
    assert result.exit_code == 0, result.output
    cfg = load_config(target)
    assert cfg.train.methods == LADDER and cfg.train.seeds == [0, 1, 2] and cfg.train.steps >= 400
    assert cfg.evaluate.schedules == ["fixed", "diffusers"]        # the ladder's first row samples on diffusers' grid
    assert len(cfg.train_runs()) == len(LADDER) * 3
    assert PRESETS["study"]["train"]["steps"] == cfg.train.steps
    # nested keys merge: the study pins the measured teacher's length and keeps the example's other teacher keys
    example = load_config(EXAMPLE)
    assert cfg.teacher.embedded.train_steps == 1000 and cfg.generate.samples_per_prompt == 64
    assert cfg.teacher.embedded.model_copy(update={"train_steps": 0}) == \
        example.teacher.embedded.model_copy(update={"train_steps": 0})
    bad = CliRunner().invoke(app, ["init", str(tmp_path / "x.yaml"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.stderr and not (tmp_path / "x.yaml").exists()
    assert EXAMPLE.read_text() != target.read_text()
