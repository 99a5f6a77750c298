"""Evaluation as labs run it: a tiny random SD3 pipeline dir scored on held-out Parquet prompts with FID, CLIP
score, PickScore, HPSv2 and ImageReward (tiny random metric models, tests/tiny_metrics.py) through the CLI, the
report naming the prompt set; missing weights stop before any work; `evaluate --follow` scores a training
run's checkpoints while it trains."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import deep_merge, toy_sections, write_config
from pipeline.cli import app
from pipeline.runner import write_record
from schemas.config import load_config

HELD_OUT = ["a cat on a mat", "a photo of a red square", "a blue circle", "a green triangle", "a red cat"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sd3_eval(tmp_path_factory):
    """A config on a tiny SD3 dir with every preference metric set, evaluate.prompts a Parquet file, and an
    `ota` export of the teacher's transformer (so the student job has a checkpoint to score)."""
    import tiny_sd3
    from pipeline.export import export_student
    from tiny_metrics import build_pickscore_dir, metric_sections

    base = tmp_path_factory.mktemp("sd3eval")
    pipe_dir = tiny_sd3.build_tiny_sd3_pipeline(base / "sd3")
    prompts = base / "heldout.parquet"
    pq.write_table(pa.table({"id": list(range(len(HELD_OUT))), "caption": HELD_OUT}), prompts)
    evaluate = {"prompts": str(prompts), "prompt_column": "caption", "n_samples": 6, "nfes": [1], "teacher_nfe": 2,
                "batch_size": 4, "seeds": [0], "clip_path": str(build_pickscore_dir(base / "clip")),
                **metric_sections(base)}
    path = write_config(base / "c.yaml", **deep_merge(toy_sections(base), {
        "teacher": {"kind": "sd3", "path": str(pipe_dir), "factory": None},
        "train": {"methods": ["ota"]}, "evaluate": evaluate}))
    cfg = load_config(path)
    run = cfg.train_runs(["ota"])[0]
    transformer = tiny_sd3.load_tiny_sd3_pipeline(pipe_dir).transformer
    export_student(cfg.train_dir(run) / "export", run, transformer, cfg, (4, 8, 8))
    write_record(cfg.train_dir(run), "export", "done")
    return path, cfg


def test_sd3_evaluate_on_heldout_parquet_prompts_scores_every_metric_and_reports_them(sd3_eval):
    path, cfg = sd3_eval
    assert cfg.evaluate.features == "pixels"                 # no classifier for SD3, no Inception configured
    res = _cli("evaluate", "-c", path)
    assert res.exit_code == 0, res.output
    assert "FID on raw pixels" in res.output                  # the pixels fallback is said, not hidden
    scores = pd.read_parquet(cfg.stage_dir("evaluate") / "scores.parquet")
    want = {"fid", "clip_score", "pickscore", "hpsv2", "imagereward", "fidelity_mse"}
    assert want <= set(scores[scores.run == "ota"].metric)    # (besides the robust trajectory statistics)
    assert {"clip_score", "pickscore", "hpsv2", "imagereward"} <= set(scores[scores.run == "teacher"].metric)
    assert (scores.prompt_set == "heldout").all() and scores.prompt_hash.nunique() == 1
    assert (scores.n == 6).all()
    import hashlib
    assert scores.prompt_hash.iloc[0] == hashlib.sha256("\n".join(HELD_OUT).encode()).hexdigest()[:16]

    card = (cfg.train_dir(cfg.train_runs(["ota"])[0]) / "export" / "README.md").read_text()   # the model card
    assert "Prompts: `heldout` (held-out); 6 samples per value" in card
    assert "| teacher (2 steps, CFG 4) | fixed | 2 |" in card and "| this student | fixed | 1 |" in card
    for title in ("PickScore", "HPSv2", "ImageReward", "CLIP score"):
        assert title in card.split("## Scores")[1]

    res = _cli("report", "-c", path)
    assert res.exit_code == 0, res.output
    text = (Path(cfg.root) / "report" / "report.md").read_text()
    for title in ("FID", "CLIP score", "PickScore", "HPSv2", "ImageReward"):
        assert f"### {title}" in text
    assert "heldout" in text and "held-out" in text
    assert "raw pixels" in text and "clean-fid's Inception" not in text

    # rerun: nothing is redone
    res = _cli("evaluate", "-c", path)
    assert res.exit_code == 0 and "(1 skipped" in res.output, res.output


@pytest.mark.parametrize("key", ["pickscore_path", "hpsv2_path", "imagereward_path", "clip_path"])
def test_missing_weights_exit_2_naming_the_key_before_any_work(sd3_eval, tmp_path, key):
    path, cfg = sd3_eval
    bad = write_config(tmp_path / "bad.yaml", **deep_merge(
        load_config(path).model_dump(mode="json"),
        {"root": str(tmp_path / "runs"), "evaluate": {key: str(tmp_path / "missing")}}))
    res = _cli("evaluate", "-c", bad)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and f"evaluate.{key}" in lines[-1], res.output
    assert not (tmp_path / "runs").exists()                   # nothing written, no model loaded


# ---------------------------------------------------------------- scoring while training
def test_follow_scores_each_checkpoint_as_training_commits_it(make_toy_config):
    """The watcher's sleep advances a real training run one segment (checkpoint + record) at a time."""
    from pipeline.cli import run_stage
    from pipeline.follow import training_finished, watch
    from pipeline.runner import execute_unit, is_done
    from stages import train

    cfg = load_config(make_toy_config(train={"methods": ["ota"], "steps": 6, "checkpoint_every": 2},
                                      evaluate={"nfes": [1], "features": "pixels", "n_samples": 8}))
    run_stage("generate", cfg, "local")
    job = train.jobs(cfg, ["ota"])[0]
    worker, pending = job.make_worker(), list(job.units)

    def train_one_segment(_seconds):
        unit = pending.pop(0)
        assert execute_unit(worker, job.out_dir, unit)[0] == "done"

    seen = []

    def score_pass():
        run_stage("evaluate", cfg, "local", methods=["ota"], follow=True)
        seen.append(sorted(set(pd.read_parquet(cfg.stage_dir("evaluate") / "curves.parquet").step)))

    passes = watch(score_pass, lambda: training_finished(cfg, ["ota"]), poll=0, sleep=train_one_segment)
    assert passes == 5 and not pending and is_done(job.out_dir, "export")
    # each pass scored the checkpoints committed so far: none, 2, 2+4, 2+4+6, and after export nothing new
    assert seen == [[], [2], [2, 4], [2, 4, 6], [2, 4, 6]]
    curves = pd.read_parquet(cfg.stage_dir("evaluate") / "curves.parquet")
    assert set(curves.checkpoint) == {"ota@2", "ota@4", "ota@6"} and {"fid", "fidelity_mse"} <= set(curves.metric)
    # the step-6 checkpoint's EMA student is the exported student: their scores agree
    res = _cli("evaluate", "-c", make_toy_config(train={"methods": ["ota"], "steps": 6, "checkpoint_every": 2},
                                                 evaluate={"nfes": [1], "features": "pixels", "n_samples": 8}))
    assert res.exit_code == 0, res.output
    final = pd.read_parquet(cfg.stage_dir("evaluate") / "scores.parquet")
    a = curves[(curves.step == 6)].set_index("metric").value
    b = final[final.run == "ota"].set_index("metric").value
    assert a["fidelity_mse"] == pytest.approx(b["fidelity_mse"], rel=1e-4, abs=1e-7)
    # TensorBoard curves: one event dir per run with a scalar per (metric, grid, NFE)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = cfg.stage_dir("evaluate") / "follow" / "tb"
    acc = EventAccumulator(str(next(tb.iterdir())))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/fid/fixed_nfe1")] == [2, 4, 6]
    # idempotent: another pass redoes nothing (training keeps two checkpoints: step 2's file is gone, its
    # scores stay in the curves)
    res = _cli("evaluate", "-c", make_toy_config(train={"methods": ["ota"], "steps": 6, "checkpoint_every": 2},
                                                 evaluate={"nfes": [1], "features": "pixels", "n_samples": 8}),
               "--follow", "--poll", "0.1")
    assert res.exit_code == 0 and "evaluate: 2 units done (2 skipped" in res.output, res.output
    assert set(pd.read_parquet(cfg.stage_dir("evaluate") / "curves.parquet").step) == {2, 4, 6}


def test_follow_beside_a_concurrent_training_process(make_toy_config):
    """`flowsteer evaluate --follow` in this process while `flowsteer train` runs in another: it returns only
    after training's export record, having scored checkpoints as they appeared, the last one included."""
    import os
    import subprocess
    import sys

    from pipeline.cli import run_stage
    from pipeline.runner import is_done

    path = make_toy_config(train={"methods": ["ota"], "steps": 20, "checkpoint_every": 4},
                           evaluate={"nfes": [1], "features": "pixels", "n_samples": 8})
    cfg = load_config(path)
    run_stage("generate", cfg, "local")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    trainer = subprocess.Popen([sys.executable, "-c", "from pipeline.cli import app; app()", "train", "-c", str(path)],
                               cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        res = _cli("evaluate", "-c", path, "--follow", "--poll", "0.3")
        train_dir = cfg.train_dir(cfg.train_runs(["ota"])[0])
        assert is_done(train_dir, "export")                    # it stopped because training said it finished
    finally:
        _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err.decode()[-2000:]
    assert res.exit_code == 0, res.output
    steps = set(pd.read_parquet(cfg.stage_dir("evaluate") / "curves.parquet").step)
    assert 20 in steps and len(steps) >= 2 and steps <= {4, 8, 12, 16, 20}


def test_model_card_title_and_tags(make_toy_config):
    from pipeline.model_card import card_title, front_matter

    cfg = load_config(make_toy_config(train={"methods": ["flowsteer"]}))
    tags = front_matter(cfg, "flowsteer")["tags"]
    assert tags.count("flowsteer") == 1 and "few-step" in tags
    title = card_title(cfg, "flowsteer", {"run": "flowsteer-adv"})
    assert title == "Flow-matching teacher in 4 steps: flowsteer-adv, method flowsteer (flowsteer distillation)"


def test_checkpoint_student_is_the_export_with_lora_merged(make_toy_config):
    """A checkpoint's EMA student (LoRA fused) has the exported student's weights, tensor for tensor."""
    import torch

    from pipeline.cli import run_stage
    from pipeline.follow import checkpoint_student, vouched_checkpoints
    from pipeline.student import load_student
    from pipeline.teachers import load_teacher

    cfg = load_config(make_toy_config(train={"methods": ["ota"], "steps": 4, "checkpoint_every": 2,
                                                    "student": {"kind": "lora", "rank": 2}}))
    run_stage("generate", cfg, "local")
    run_stage("train", cfg, "local", methods=["ota"])
    run = cfg.train_runs(["ota"])[0]
    (step, path), = [c for c in vouched_checkpoints(cfg.train_dir(run)) if c[0] == 4]
    teacher = load_teacher(cfg)
    mine = checkpoint_student(cfg, run, teacher, path, "cpu").module.state_dict()
    # a byo teacher's LoRA export is fused onto the teacher's transformer (what evaluate passes)
    exported = load_student(cfg.train_dir(run) / "export", base=teacher.transformer).module.state_dict()
    assert mine.keys() == exported.keys() and not any("lora" in k for k in mine)
    assert all(torch.equal(mine[k], exported[k]) for k in mine)
