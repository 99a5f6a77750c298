"""The metric registry: a metric added in one place shows up in evaluate's rows and in the report."""
from __future__ import annotations

import pytest

from conftest import fake_export, run_evaluate
from pipeline.errors import UserError
from pipeline.metrics import base, get_metric, metrics_for, registered
from pipeline.runner import run_job
from schemas.config import load_config


class Brightness(base.Metric):
    """A toy metric: the mean pixel value of the decoded samples."""
    name, title, better, order = "brightness", "Mean brightness", "higher", 50
    description = "Mean pixel value of the decoded samples in [0, 1] (a toy metric for the registry test)."
    min_samples = 50

    def score(self, samples):
        return float(samples.images.mean())


@pytest.fixture
def brightness():
    base.register(Brightness)
    yield Brightness
    base.METRICS.pop(Brightness.name)


def test_registry_lists_the_built_in_metrics_in_report_order():
    names = list(registered())
    assert names[:7] == ["fid", "prompt_accuracy", "clip_score", "pickscore", "hpsv2", "imagereward", "fidelity_mse"]
    for cls in registered().values():
        assert cls.better in ("lower", "higher") and cls.title and cls.description
    assert get_metric("clip_score").weights == "evaluate.clip_path"
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        get_metric("nope")


def test_metrics_for_follows_the_run_and_evaluate_metrics(make_toy_config):
    cfg = load_config(make_toy_config(evaluate={"features": "pixels"}))
    # toy teacher: no classifier, no CLIP, so no modes (no switch metrics); not exact: no exact_* metrics
    assert [m.name for m in metrics_for(cfg)] == ["fid", "fidelity_mse", "fidelity_median", "fidelity_p90"]
    cfg = load_config(make_toy_config(evaluate={"features": "pixels", "metrics": ["fidelity_mse"]}))
    assert [m.name for m in metrics_for(cfg)] == ["fidelity_mse"]
    with pytest.raises(UserError, match="unknown metric 'fdi'"):
        metrics_for(load_config(make_toy_config(evaluate={"metrics": ["fdi"]})))
    with pytest.raises(UserError, match="'prompt_accuracy' does not apply"):
        metrics_for(load_config(make_toy_config(evaluate={"metrics": ["prompt_accuracy"]})))
    with pytest.raises(UserError, match="evaluate.clip_path .* is not a directory"):
        get_metric("clip_score").check(load_config(make_toy_config(evaluate={"clip_path": "/nowhere"})))


def test_a_registered_metric_reaches_evaluate_rows_and_the_report(make_toy_config, brightness):
    from pipeline.teacher_outputs import load_outputs
    from pipeline.teachers import load_teacher
    from stages import report

    cfg = load_config(make_toy_config(evaluate={"n_samples": 12, "nfes": [1, 2], "teacher_nfe": 4,
                                                "features": "pixels", "batch_size": 12, "seeds": [0]}))
    fake_export(cfg, "ota", seed=1)
    _, scores = run_evaluate(cfg, ["ota"])
    value = scores[scores.metric == "brightness"].set_index(["checkpoint", "nfe"])["value"]
    assert set(value.index) == {("teacher", 4), ("ota", 1), ("ota", 2)}
    root = cfg.stage_dir("evaluate")
    from stages.evaluate import noise_seeds

    teacher_images = load_teacher(cfg).decode(load_outputs(root / "teacher" / "outputs" / "seed0.npz",
                                                           noise_seeds(0, 12)))
    assert value["teacher", 4] == pytest.approx(float(teacher_images.mean()), rel=1e-6)

    card = (cfg.train_dir(cfg.train_runs(["ota"])[0]) / "export" / "README.md").read_text()   # model card
    assert "| schedule | NFE | FID (lower is better) | Trajectory fidelity, mean MSE (lower is better) | " in card
    assert "Mean brightness (higher is better) |" in card and "| fixed | 2 | " in card

    [run_job(job, "local", progress=False) for job in report.jobs(cfg, methods=["ota"])]
    md = open(cfg.root + "/report/report.md").read()
    assert "### Mean brightness (higher is better)" in md
    assert "| Mean brightness | higher | Mean pixel value of the decoded samples" in md
    table = md.split("### Mean brightness (higher is better)")[1].split("##")[0]
    assert f"{value['ota', 2]:.2f} ⚠ n=12" in table                    # 12 < min_samples: a visible warning
    assert f"Teacher, 4 steps with CFG 4 (8 network passes): **{value['teacher', 4]:.2f} ⚠ n=12**" in table
    # a non-embedded run: the teacher is the FID reference, said under the table; it has a timing row
    fid = md.split("### FID (lower is better)")[1].split("##")[0]
    assert "Teacher, 4 steps with CFG 4 (8 network passes): the teacher's samples are the FID reference" in fid
    assert "⚠ n=12" in fid and "FID needs 500 per value, this run has 12" in md
    timings = md.split("## Timings")[1]
    assert "| teacher | " in timings and "| ota | " in timings


def test_units_scored_before_a_metric_existed_are_redone(make_toy_config):
    cfg = load_config(make_toy_config(evaluate={"n_samples": 8, "nfes": [2], "teacher_nfe": 4,
                                                "features": "pixels", "seeds": [0]}))
    fake_export(cfg, "ota", seed=1)
    run_evaluate(cfg, ["ota"])
    statuses, _ = run_evaluate(cfg, ["ota"])
    assert [s["skipped"] for s in statuses] == [1, 1]
    base.register(Brightness)
    try:
        statuses, scores = run_evaluate(cfg, ["ota"])
    finally:
        base.METRICS.pop(Brightness.name)
    assert [s["skipped"] for s in statuses] == [0, 0]
    assert set(scores[scores.metric == "brightness"].checkpoint) == {"teacher", "ota"}


def test_mode_switch_counts_a_planted_switch(tmp_path):
    """Exact teacher: a student output moved into another mode for 3 of 20 samples counts as 3/20 switches;
    the median ignores them, the mean does not, and the no-switch mean is the error of the 17 others."""
    import numpy as np
    import torch

    from pipeline.metrics.base import EvalContext, Samples
    from pipeline.metrics.trajectory import ExactKept, ExactMean, ExactMedian, ExactSwitch, ModeSwitch
    from pipeline.teachers.exact import ExactTeacher
    from schemas.config import RunConfig

    cfg = RunConfig.model_validate({"root": str(tmp_path), "teacher": {"kind": "exact", "exact": {
        "channels": 1, "sample_size": 4, "classes": 2, "modes_per_class": 2, "mode_std": 0.1, "mean_std": 2.0}}})
    teacher = ExactTeacher(cfg.teacher.exact)
    ctx = EvalContext(cfg, "cpu", teacher, tmp_path / "evaluate")
    prompts = ["a handwritten digit one"] * 20
    seeds = np.arange(20, dtype=np.int64)
    from pipeline.seeds import noise_for

    noise = noise_for(seeds.tolist(), (1, 4, 4))
    target = teacher.exact_endpoints(noise, teacher.encode(prompts), teacher.encode([""] * 20), 4.0)
    modes = teacher.modes_of(target)
    student = target + 0.01
    means = teacher.mixture.means.float().view(-1, 1, 4, 4)
    other = {1 * 2 + 0: 1 * 2 + 1, 1 * 2 + 1: 1 * 2 + 0}      # class 1's two modes swapped
    for i in (2, 5, 11):                                       # plant three switches: same offset, other mode
        student[i] = target[i] - means[modes[i]] + means[other[int(modes[i])]]
    samples = Samples("student", 0, student, teacher.decode(student), prompts, seeds, "unit-a")
    ctx.teacher_outputs = lambda seed, noise_seeds: target  # the teacher's own outputs = the exact ones here
    assert ExactSwitch(ctx).score(samples) == pytest.approx(3 / 20)
    assert ModeSwitch(ctx).score(samples) == pytest.approx(3 / 20)
    assert ExactMedian(ctx).score(samples) == pytest.approx(1e-4, rel=1e-3)
    assert ExactKept(ctx).score(samples) == pytest.approx(1e-4, rel=1e-3)
    assert ExactMean(ctx).score(samples) > 100 * 1e-4           # the mean is the switches'
    kept = np.load(tmp_path / "evaluate" / "per_sample" / "unit-a_exact.npz")
    assert kept["err"].shape == (20,) and (kept["mode"] != kept["target_mode"]).sum() == 3
