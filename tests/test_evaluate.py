"""Evaluate stage and metrics: Frechet distance, the clean-fid path, fidelity, reruns, user errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import fake_export, run_evaluate
from pipeline.errors import UserError
from pipeline.images import to_uint8
from pipeline.metrics import fid as fidlib
from pipeline.metrics.frechet import frechet_distance, frechet_from_features
from pipeline.runner import write_record
from schemas.config import load_config


# ---------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    """For diagonal covariances d^2 = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 3, size=6), rng.uniform(0.2, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert cleanfid_frechet(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # a full (rotated) covariance: d^2 is invariant under a shared rotation of both Gaussians
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_frechet_from_features_estimates_the_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(0.5, 2.0, size=(20000, 3))
    expected = 3 * 0.5 ** 2 + 3 * (1 + 4 - 2 * 2)
    assert frechet_from_features(a, b) == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------- the clean-fid path
def _blobs(n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """Smooth random images [n, 1, 32, 32] in [0, 1] (blurred noise), a stand-in for digits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 36, 36, generator=g), 5, stride=1)
    return (x - 0.5) * 3 + 0.5 + offset


def _classifier():
    from pipeline.metrics.classifier import DigitClassifier, DigitCNN

    torch.manual_seed(0)
    return DigitClassifier(DigitCNN(), "cpu")


def test_identical_folders_give_fid_zero_and_shifted_sets_do_not(tmp_path):
    images = _blobs(200, 0).clamp(0, 1)
    a = fidlib.write_png_folder(images, tmp_path / "a")
    b = fidlib.write_png_folder(images, tmp_path / "b")
    same = fidlib.write_png_folder(_blobs(200, 1).clamp(0, 1), tmp_path / "same")          # another draw
    shifted = fidlib.write_png_folder(_blobs(200, 2, offset=0.3).clamp(0, 1), tmp_path / "shifted")
    for space in (fidlib.pixel_space(max_size=8), fidlib.classifier_space(_classifier())):
        fa, fb, fs, fx = (fidlib.folder_features(d, space, batch_size=128) for d in (a, b, same, shifted))
        assert fa.shape[0] == 200
        fid_same, fid_shifted = fidlib.fid_from_features(fa, fs), fidlib.fid_from_features(fa, fx)
        assert abs(fidlib.fid_from_features(fa, fb)) < 1e-4 * fid_same
        assert fid_shifted > 2 * fid_same > 0


def test_fid_equals_clean_fids_and_survives_a_scipy_without_sqrtm_disp(monkeypatch):
    """fid_from_features is clean-fid's fid_from_feats (same Gaussian fit and eq. 6), also on a scipy whose
    sqrtm takes no `disp` and returns the matrix alone (the H100 image's; clean-fid's own call fails there)."""
    from cleanfid import fid as cleanfid
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(0.2, 1.1, size=(300, 12))
    ours = fidlib.fid_from_features(a, b)
    assert ours == pytest.approx(float(cleanfid.fid_from_feats(a, b)), rel=1e-6)
    plain = linalg.sqrtm

    def new_scipy_sqrtm(m, **kwargs):
        if kwargs:
            raise TypeError(f"sqrtm() got an unexpected keyword argument '{next(iter(kwargs))}'")
        out = plain(m)
        return out[0] if isinstance(out, tuple) else out

    monkeypatch.setattr(linalg, "sqrtm", new_scipy_sqrtm)
    with pytest.raises(TypeError, match="disp"):
        cleanfid.fid_from_feats(a, b)
    assert fidlib.fid_from_features(a, b) == pytest.approx(ours, rel=1e-9)


def test_classifier_features_through_cleanfid_equal_direct_features(tmp_path):
    """clean-fid's reader (PNG -> RGB 0..255, no resize) must hand the classifier the images we wrote."""
    clf = _classifier()
    images = _blobs(40, 2).clamp(0, 1)
    feats = fidlib.folder_features(fidlib.write_png_folder(images, tmp_path / "x"), fidlib.classifier_space(clf),
                                   batch_size=16)
    quantized = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(feats, clf.features(quantized).numpy(), rtol=1e-4, atol=1e-5)


def test_missing_inception_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="inception_path is not set"):
        fidlib.resolve_inception(None)
    with pytest.raises(UserError, match="not found"):
        fidlib.resolve_inception(tmp_path / "nowhere.pt")
    with pytest.raises(UserError, match="not found"):
        fidlib.resolve_inception(tmp_path)            # a folder without inception-2015-12-05.pt
    (tmp_path / fidlib.INCEPTION_FILE).write_bytes(b"not torchscript")
    assert fidlib.resolve_inception(tmp_path) == tmp_path / fidlib.INCEPTION_FILE
    with pytest.raises(UserError, match="torchscript"):
        fidlib.inception_space(tmp_path, "cpu")


class _FakeInception(torch.nn.Module):
    """A torchscript module shaped like clean-fid's inception-2015-12-05.pt: `.layers` maps [B,3,299,299] -> 2048."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.AdaptiveAvgPool2d(16),
                                          torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 2048))

    def forward(self, x):
        return self.layers(x)


def test_inception_space_matches_cleanfid_wrapper_on_299_inputs(tmp_path):
    """Local weights: our extractor equals clean-fid's InceptionV3W (no download) on its 299x299 inputs."""
    from cleanfid.inception_torchscript import InceptionV3W

    torch.jit.script(_FakeInception()).save(str(tmp_path / fidlib.INCEPTION_FILE))
    space = fidlib.inception_space(tmp_path / fidlib.INCEPTION_FILE, "cpu")
    assert space.resize is None                      # clean-fid's own bicubic resize to 299 is used
    batch = torch.rand(2, 3, 299, 299) * 255
    expected = InceptionV3W(str(tmp_path), download=False)(batch)
    torch.testing.assert_close(space.extract(batch), expected)
    feats = fidlib.folder_features(fidlib.write_png_folder(_blobs(6, 0).clamp(0, 1), tmp_path / "x"), space,
                                   batch_size=6)
    assert feats.shape == (6, 2048)


def test_cli_missing_inception_exits_2_with_one_line(make_toy_config, tmp_path):
    from pipeline.cli import app

    path = make_toy_config(evaluate={"features": "inception", "inception_path": str(tmp_path / "missing.pt")})
    result = CliRunner().invoke(app, ["evaluate", "--config", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Inception weights not found")


# ---------------------------------------------------------------- fidelity
def test_teacher_outputs_round_trip_and_noise_check(tmp_path):
    from pipeline.metrics.fidelity import per_sample_mse
    from pipeline.teacher_outputs import load_outputs, save_outputs

    x = torch.randn(5, 1, 4, 4)
    seeds = np.arange(5) + 100
    save_outputs(tmp_path / "t.npz", x, torch.arange(5) % 3, seeds)
    back = load_outputs(tmp_path / "t.npz", seeds)
    assert torch.equal(back, x)
    assert torch.allclose(per_sample_mse(x + 0.5, back), torch.full((5,), 0.25))
    with pytest.raises(UserError, match="other noise"):
        load_outputs(tmp_path / "t.npz", seeds + 1)


# ---------------------------------------------------------------- the stage, end to end on the toy teacher
def test_evaluate_toy_scores_fidelity_and_skips_on_rerun(make_toy_config):
    # guidance 1: CFG is then the conditional velocity alone, which the guidance-free student copies exactly
    path = make_toy_config(evaluate={"n_samples": 96, "nfes": [1, 8], "teacher_nfe": 8, "guidance": 1.0,
                                     "features": "pixels", "batch_size": 48, "seeds": [0]})
    cfg = load_config(path)
    fake_export(cfg, "perflow", seed=0)      # the teacher itself
    fake_export(cfg, "ota", seed=5)          # another network
    statuses, scores = run_evaluate(cfg, ["perflow", "ota"])
    assert [s["done"] for s in statuses] == [1, 4] and all(s["skipped"] == 0 for s in statuses)

    value = scores.set_index(["checkpoint", "nfe", "metric"])["value"]
    assert set(scores.metric) == {"fid", "fidelity_mse", "fidelity_median", "fidelity_p90"}   # toy: no modes, no switch metrics
    assert (scores.n == 96).all() and (scores.seed == 0).all() and (scores.reference == "teacher").all()
    assert (scores.schedule == "fixed").all() and set(scores.run) == {"perflow", "ota"}   # no teacher row here:
    assert (scores.train_seed == 0).all()          # FID against itself and fidelity to itself are not scored
    # the teacher's network on the teacher's 8-step grid follows the teacher's trajectory exactly ...
    assert value["perflow", 8, "fidelity_mse"] < 1e-8
    assert abs(value["perflow", 8, "fid"]) < 1e-3
    # ... and one step, or another network, does not
    assert value["perflow", 1, "fidelity_mse"] > 1e-4
    assert value["ota", 8, "fidelity_mse"] > 1e-4
    assert value["ota", 8, "fid"] > value["perflow", 8, "fid"] + 1e-3

    root = cfg.stage_dir("evaluate")
    assert (root / "teacher" / "outputs" / "seed0.npz").is_file()
    assert len(list((root / "grids").glob("*.png"))) == 5
    assert not (root / ".tmp").exists() or not any((root / ".tmp").iterdir())

    # rerun: every unit is skipped and the rows are unchanged
    unit_file = next((root / "students" / "scores").glob("ota-s0-*_fixed_nfe8_seed0.parquet"))
    mtime = unit_file.stat().st_mtime_ns
    statuses, again = run_evaluate(cfg, ["perflow", "ota"])
    assert [s["skipped"] for s in statuses] == [1, 4] and unit_file.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again, scores)

    # a new NFE reuses the directory: only its unit runs (one method here; the other's rows stay)
    cfg2 = load_config(make_toy_config("toy2.yaml", evaluate={
        "n_samples": 96, "nfes": [1, 2, 8], "teacher_nfe": 8, "guidance": 1.0, "features": "pixels",
        "batch_size": 48, "seeds": [0]}))
    assert cfg2.stage_dir("evaluate") == root
    statuses, scores2 = run_evaluate(cfg2, ["ota"])
    assert [(s["done"], s["skipped"]) for s in statuses] == [(1, 1), (3, 2)]
    assert len(scores2) == len(scores) + scores.metric.nunique()     # one new unit: a row per metric
    assert set(scores2[scores2.nfe == 2].checkpoint) == {"ota"}


def test_noise_seeds_differ_between_seeds_and_from_training_seeds():
    from pipeline.seeds import sample_seeds
    from stages.evaluate import noise_seeds

    a, b = noise_seeds(0, 1000), noise_seeds(1, 1000)
    assert len(set(a) | set(b)) == 2000 and np.array_equal(a, noise_seeds(0, 1000))
    assert min(a) > 2 ** 32 > max(sample_seeds(0, 100))


def test_evaluate_needs_exports_and_valid_inputs(make_toy_config):
    from stages import evaluate

    cfg = load_config(make_toy_config(evaluate={"features": "pixels"}))
    with pytest.raises(UserError, match="flowsteer train -m ota"):
        evaluate.jobs(cfg, methods=["ota"])
    cfg = load_config(make_toy_config(evaluate={"features": "classifier"}))
    with pytest.raises(UserError, match="embedded teacher"):
        evaluate.jobs(cfg, methods=["ota"])


def test_evaluate_embedded_scores_accuracy_and_classifier_fid(embedded_tiny):
    """The embedded default: classifier-feature FID against the real digits and prompt accuracy."""
    from pipeline.export import export_student
    from pipeline.teachers import load_teacher

    _, base = embedded_tiny
    cfg = base.model_copy(update={"evaluate": base.evaluate.model_copy(
        update={"n_samples": 20, "nfes": [2], "teacher_nfe": 4, "batch_size": 20})})
    teacher = load_teacher(cfg)
    run = cfg.train_runs(["perflow"])[0]
    train_dir = cfg.train_dir(run)
    export_student(train_dir / "export", run, teacher.transformer, cfg, sample_shape=teacher.sample_shape)
    write_record(train_dir, "export", "done")
    _, scores = run_evaluate(cfg, ["perflow"])
    value = scores.set_index(["checkpoint", "nfe", "metric"])["value"]
    assert set(scores.metric) == {"fid", "prompt_accuracy", "fidelity_mse", "fidelity_median", "fidelity_p90", "mode_switch", "fidelity_kept"}
    assert (scores.reference == "digits").all() and (scores.features == "classifier").all()
    assert 0.0 <= value["teacher", 4, "prompt_accuracy"] <= 1.0 and value["perflow", 2, "fid"] > 0
    root = cfg.stage_dir("evaluate")
    assert len(list((root / "reference" / "digits").glob("*.png"))) == 5000
    assert np.load(root / "reference" / "digits_classifier_features.npy").shape == (5000, 128)


def test_evaluate_diffusers_grid_goes_through_the_scheduler(make_toy_config):
    """`evaluate.schedules: [fixed, diffusers]`: the diffusers rows are the student sampled on the sigmas of
    FlowMatchEulerDiscreteScheduler.set_timesteps(nfe), checked against a sampler run by hand on them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.metrics.fidelity import per_sample_mse
    from pipeline.teacher_outputs import load_outputs
    from pipeline.sampling import euler
    from pipeline.schedule import fixed_sigmas
    from pipeline.seeds import noise_for
    from pipeline.student import load_student
    from pipeline.teachers import load_teacher
    from stages.evaluate import noise_seeds

    cfg = load_config(make_toy_config(evaluate={"n_samples": 12, "nfes": [8], "teacher_nfe": 8, "guidance": 1.0,
                                                "features": "pixels", "batch_size": 12, "seeds": [0],
                                                "schedules": ["fixed", "diffusers"]}))
    fake_export(cfg, "perflow", seed=0)
    statuses, scores = run_evaluate(cfg, ["perflow"])
    assert [s["done"] for s in statuses] == [1, 2]
    assert set(zip(scores.schedule, scores.nfe)) == {("fixed", 8), ("diffusers", 8)}
    fidelity = scores[scores.metric == "fidelity_mse"].set_index("schedule")["value"]

    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.schedule.shift)
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas.float()
    assert not torch.allclose(sigmas, fixed_sigmas(8, cfg.schedule.shift), atol=1e-3)    # not the fixed grid
    run = cfg.train_runs(["perflow"])[0]
    student, teacher = load_student(cfg.train_dir(run) / "export"), load_teacher(cfg)
    seeds = noise_seeds(0, 12)
    prompts = [["a red square", "a blue circle", "a green triangle"][i % 3] for i in range(12)]
    x = euler(lambda x, s, c: student.method.velocity(student.module, x, s, c),
              noise_for(seeds.tolist(), (1, 8, 8)), sigmas, teacher.encode(prompts))
    target = load_outputs(cfg.stage_dir("evaluate") / "teacher" / "outputs" / "seed0.npz", seeds)
    assert fidelity["diffusers"] == pytest.approx(float(per_sample_mse(x, target).mean()), rel=1e-5)
    # the teacher's own weights on the teacher's 8-step fixed grid retrace it exactly; on diffusers' grid not
    assert fidelity["fixed"] < 1e-8 and fidelity["diffusers"] > 1e-5


def test_evaluate_scores_every_training_seed(make_toy_config):
    cfg = load_config(make_toy_config(train={"seeds": [0, 1]}, evaluate={
        "n_samples": 8, "nfes": [2], "teacher_nfe": 4, "features": "pixels", "seeds": [0, 1]}))
    fake_export(cfg, "ota", seed=3)
    statuses, scores = run_evaluate(cfg, ["ota"])
    assert [s["done"] for s in statuses] == [2, 4]            # 2 training seeds x 2 evaluation seeds
    students = scores[scores.run == "ota"]
    assert set(zip(students.checkpoint, students.train_seed)) == {("ota/s0", 0), ("ota/s1", 1)}
    assert set(students.seed) == {0, 1} and set(students.metric) == {"fid", "fidelity_mse", "fidelity_median", "fidelity_p90"}
