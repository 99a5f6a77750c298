"""The exact benchmark teacher: its closed-form velocity is the probability path's, its RK4 endpoints converge,
its data are the mixture's, and it runs the teacher stage (pretrained init) and loads like any teacher."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.teachers.exact import ExactTeacher, GaussianMixture, class_of, rk4
from schemas.config import ExactTeacher as ExactTeacherConfig


def mixture_1d(modes=3, std=0.3):
    cfg = SimpleNamespace(classes=2, modes_per_class=modes, mode_std=std, channels=1, sample_size=1,
                          mean_std=1.0, mixture_seed=3)
    return GaussianMixture(cfg)


def density(mix, x, t, cls):
    """p_t(x) of a 1-d mixture: x_t | k ~ N((1-t) mu_k, (1-t)^2 s^2 + t^2), the class's modes equally likely."""
    a = 1 - t
    var = a * a * mix.std ** 2 + t * t
    mu = mix.means[:, 0]
    keep = mix._mask(torch.tensor([cls]))[0]
    comps = torch.exp(-(x[:, None] - a * mu[None]) ** 2 / (2 * var)) / torch.sqrt(torch.tensor(2 * torch.pi * var))
    return (comps * keep).sum(1) / keep.sum()


@pytest.mark.parametrize("cls", [0, 1, -1])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_velocity_satisfies_the_continuity_equation_of_the_path(t, cls):
    """d p_t / dt + d (p_t v) / dx = 0 by central finite differences: v moves the path's density exactly."""
    mix = mixture_1d()
    x = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64)
    h = 1e-4

    def flux(xx):
        v = mix.velocity(xx.float().view(-1, 1, 1, 1), torch.full((len(xx),), t), torch.full((len(xx),), cls))
        return density(mix, xx, t, cls) * v.double().view(-1)
    dp_dt = (density(mix, x, t + h, cls) - density(mix, x, t - h, cls)) / (2 * h)
    # float32 velocity: a wider step for the space derivative
    hx = 1e-2
    dflux_dx = (flux(x + hx) - flux(x - hx)) / (2 * hx)
    assert torch.allclose(dp_dt, -dflux_dx, atol=2e-3 * float(dp_dt.abs().max()) + 1e-4)
    assert dp_dt.abs().max() > 1e-2                 # the density does move: the check is not 0 = 0


def test_velocity_of_one_mode_is_the_derivative_of_its_path():
    """One Gaussian mode: the ODE path from x_1 = z is x_t = (1-t) mu + sqrt((1-t)^2 s^2 + t^2) z; the closed
    form equals its time derivative (finite difference) at every point of it."""
    cfg = SimpleNamespace(classes=1, modes_per_class=1, mode_std=0.4, channels=2, sample_size=2, mean_std=1.0,
                          mixture_seed=1)
    mix = GaussianMixture(cfg)
    mu = mix.means[0].view(1, 2, 2, 2)
    z = torch.randn(5, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def path(t):
        return (1 - t) * mu + ((1 - t) ** 2 * 0.16 + t * t) ** 0.5 * z
    for t in (0.1, 0.4, 0.8):
        h = 1e-5
        fd = (path(t + h) - path(t - h)) / (2 * h)
        v = mix.velocity(path(t).float(), torch.full((5,), t), torch.zeros(5, dtype=torch.long))
        assert torch.allclose(v.double(), fd, atol=1e-4)


def test_rk4_endpoint_converges_and_beats_euler():
    ecfg = ExactTeacherConfig(channels=2, sample_size=4, classes=3, modes_per_class=2)
    teacher = ExactTeacher(ecfg)
    noise = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, null = teacher.encode(["a handwritten digit one"] * 16), teacher.encode([""] * 16)
    fine = teacher.exact_endpoints(noise, cond, null, 4.0, steps=100)
    finer = teacher.exact_endpoints(noise, cond, null, 4.0, steps=200)
    coarse = teacher.exact_endpoints(noise, cond, null, 4.0, steps=25)
    err_fine, err_coarse = (fine - finer).pow(2).mean(), (coarse - finer).pow(2).mean()
    assert err_fine < 1e-8
    assert err_coarse > err_fine                    # the error shrinks with the step: a converging solve
    from pipeline.sampling import sample
    from pipeline.schedule import fixed_sigmas

    euler = sample(teacher.velocity, noise, fixed_sigmas(32, 3.0), cond, null, 4.0)
    assert (euler - finer).pow(2).mean() > 100 * err_fine   # a 32-step Euler teacher is an approximation


def test_rk4_matches_a_linear_ode():
    x = rk4(lambda y, s, c: -y, torch.ones(2, 3), torch.linspace(1, 0, 51, dtype=torch.float64), {})
    assert torch.allclose(x, torch.full((2, 3), torch.e), rtol=1e-6)     # dx/ds = -x from s=1 to 0: e^1


def test_prompts_classes_and_exact_data():
    ecfg = ExactTeacherConfig(channels=1, sample_size=4, classes=4, modes_per_class=2, mode_std=0.05)
    teacher = ExactTeacher(ecfg)
    assert class_of("a handwritten digit five", 4) == 1 and class_of("", 4) is None
    assert class_of("a red cube", 4) == class_of("a red cube", 4)
    x = teacher.sample_data(["a handwritten digit two"] * 64, torch.Generator().manual_seed(0))
    modes = teacher.modes_of(x)
    assert set((modes // 2).tolist()) == {2}             # every sample in its class's modes
    assert len(set(modes.tolist())) == 2                 # and both modes drawn
    cond = teacher.encode(["a handwritten digit two", ""])
    assert teacher.mixture.classes_from(cond).tolist() == [2, -1]
    assert teacher.mixture.classes_from({k: v.half() for k, v in cond.items()}).tolist() == [2, -1]


def test_teacher_stage_pretrains_an_init_that_loads(tmp_path):
    from pipeline.teachers import describe_teacher, load_teacher, teacher_depth
    from schemas.config import RunConfig
    from stages import teacher as teacher_stage
    from pipeline.runner import run_job

    cfg = RunConfig.model_validate({"root": str(tmp_path), "teacher": {"kind": "exact", "exact": {
        "train_steps": 30, "weak_checkpoint_step": 10, "num_layers": 1, "batch_size": 16}}})
    for job in teacher_stage.jobs(cfg):
        run_job(job, "local")
    t = load_teacher(cfg)
    assert t.transformer is not None and t.weak_transformer is not None
    assert teacher_depth(cfg) == 1 and describe_teacher(cfg).sample_shape == (4, 8, 8)
    cond = t.encode(["a handwritten digit three"] * 2)
    v_net = t.weak_velocity(torch.zeros(2, 4, 8, 8), torch.full((2,), 0.5), cond)
    assert v_net.shape == (2, 4, 8, 8)
    again = [job for job in teacher_stage.jobs(cfg)]
    assert run_job(again[0], "local")["skipped"] == 1          # cached: a second run trains nothing


def test_the_exact_study_preset_loads_and_its_ladder_passes_the_checks(tmp_path):
    """`flowsteer init --preset exact-study` writes a config whose every ladder row (PeRFlow's real x0 = exact
    data, the GAN rows' disc_blocks) passes the load-time checks."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from schemas.config import load_config
    from stages.train import runs

    path = tmp_path / "exact.yaml"
    assert CliRunner().invoke(app, ["init", str(path), "--preset", "exact-study"]).exit_code == 0
    cfg = load_config(path)
    assert cfg.teacher.kind == "exact" and cfg.has_real_images and len(cfg.train.seeds) == 3
    assert len(runs(cfg)) == 8 * 3
