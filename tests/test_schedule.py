"""The fixed grid, the diffusers default it replaces, window alignment, and the Euler / CFG sampler."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import toy_sections, write_config
from pipeline.sampling import euler, guided, sample
from pipeline.schedule import default_sigmas, fixed_sigmas, make_sigmas, piecewise_sigmas
from schemas.config import ConfigError, load_config


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 32])
def test_fixed_sigmas_closed_form(n, shift):
    s = fixed_sigmas(n, shift)
    expected = [shift * (1 - i / n) / (1 + (shift - 1) * (1 - i / n)) for i in range(n + 1)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32))
    assert len(s) == n + 1 and s[0] == 1.0 and s[-1] == 0.0
    assert (s[1:] < s[:-1]).all()


def test_sd3_four_step_example():
    torch.testing.assert_close(fixed_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 32])
def test_default_sigmas_match_installed_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    torch.testing.assert_close(default_sigmas(n, shift), sched.sigmas)
    torch.testing.assert_close(make_sigmas(n, shift, "diffusers"), sched.sigmas)


@pytest.mark.parametrize("mu", [0.5, 1.15])
@pytest.mark.parametrize("n", [2, 4, 28])
def test_default_sigmas_match_diffusers_dynamic_shift(n, mu):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(n, mu=mu)
    torch.testing.assert_close(default_sigmas(n, 3.0, mu), sched.sigmas)
    fixed = fixed_sigmas(n, 3.0, mu)
    assert fixed[0] == 1.0 and fixed[-1] == 0.0 and (fixed[1:] < fixed[:-1]).all()


def test_default_grid_flaw_and_fix():
    """At shift 3, N=4 the default's last model call moves by ~0.009 after a 0.59 step; fixed steps are even-ish."""
    d, f = default_sigmas(4, 3.0), fixed_sigmas(4, 3.0)
    d_steps, f_steps = d[:-1] - d[1:], f[:-1] - f[1:]
    assert d_steps[-1] < 0.01 and d_steps[-2] > 0.59
    assert f_steps.min() > 0.09 and f[-2] == 0.5


def test_make_sigmas_rejects_unknown_kind():
    assert torch.equal(make_sigmas(4, 3.0), fixed_sigmas(4, 3.0))
    with pytest.raises(ValueError, match="unknown schedule 'karras'"):
        make_sigmas(4, 3.0, "karras")
    with pytest.raises(ValueError, match=">= 1"):
        fixed_sigmas(0)


@pytest.mark.parametrize("m,k", [(32, 4), (8, 4), (12, 3), (4, 4), (6, 1)])
def test_teacher_grid_contains_window_boundaries(m, k):
    grid = fixed_sigmas(m, 3.0)
    torch.testing.assert_close(grid[:: m // k], fixed_sigmas(k, 3.0))     # DataSource.edges: every (M/K)-th point


def test_default_grid_is_not_aligned():
    """Why the fix matters for distillation: the stock 32-step grid misses the stock 4-step points."""
    assert not torch.allclose(default_sigmas(32, 3.0)[::8], default_sigmas(4, 3.0), atol=1e-3)


@pytest.mark.parametrize("m,k", [(30, 4), (32, 3), (5, 2)])
def test_misaligned_grids_are_rejected(m, k, tmp_path):
    path = write_config(tmp_path / "bad.yaml", **dict(toy_sections(tmp_path), schedule={"teacher_steps": m,
                                                                                         "windows": k}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and f"schedule.teacher_steps ({m})" in msg and f"windows ({k})" in msg


@pytest.mark.parametrize("bad", [{"windows": 0}, {"windows": -4}, {"teacher_steps": 0}, {"shift": 0}])
def test_nonpositive_schedule_values_are_config_errors(bad, tmp_path):
    path = write_config(tmp_path / "bad.yaml", **dict(toy_sections(tmp_path), schedule=bad))
    with pytest.raises(ConfigError, match="schedule"):
        load_config(path)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12])
def test_piecewise_sigmas_keep_window_edges(n, k):
    if n < k and k % n:
        with pytest.raises(ValueError, match="window edges"):
            piecewise_sigmas(n, k, 3.0)
        return
    s = piecewise_sigmas(n, k, 3.0)
    edges = fixed_sigmas(k, 3.0)
    assert len(s) == n + 1 and s[-1] == 0.0 and (s[1:] < s[:-1]).all()
    if n >= k:
        for e in edges:                                # every edge is a step point
            assert torch.isclose(s, e, atol=1e-6).any(), (n, k, float(e))
        mid = (s[:-1] + s[1:]) / 2                     # steps per window differ by at most one
        counts = torch.bincount((edges[1:, None] > mid).sum(0), minlength=k)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    else:                                              # each step spans k/n windows, starting on edges
        torch.testing.assert_close(s, edges[:: k // n])
    if n % k == 0:
        torch.testing.assert_close(s, fixed_sigmas(n, 3.0))


# --- the Euler sampler and CFG -------------------------------------------------------------------------


def exact_velocity(x0):
    """The true rectified-flow velocity towards one data point: v = (x - x0) / sigma."""
    return lambda x, sigma, cond: (x - x0) / sigma.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["fixed", "diffusers"])
def test_euler_calls_back_each_step_and_lands_on_data(kind):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigmas = make_sigmas(5, 3.0, kind)
    calls = []
    out = euler(exact_velocity(x0), noise, sigmas, {},
                callback=lambda i, x, s, v: calls.append((i, float(s), None if v is None else v.clone(), x.clone())))
    assert [c[0] for c in calls] == list(range(6))
    torch.testing.assert_close(torch.tensor([c[1] for c in calls]), sigmas)
    assert all(c[2] is not None for c in calls[:-1]) and calls[-1][2] is None
    for i, s, _, x in calls:                           # every state lies on the straight noise-data line
        torch.testing.assert_close(x, (1 - s) * x0 + s * noise, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-5)


def nonlinear_model():
    """A velocity depending on x, sigma and both condition tensors (so CFG mixing is observable)."""
    torch.manual_seed(0)
    w = torch.randn(4, 4)

    def model(x, sigma, cond):
        h = torch.tanh(x @ w + cond["encoder_hidden_states"].mean(1).reshape(-1, 1, 1, 4))
        return h * (1 + sigma.reshape(-1, 1, 1, 1)) + cond["pooled_projections"].reshape(-1, 1, 1, 1)
    return model


def conds(b, seed):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(b, 3, 4, generator=g), "pooled_projections": torch.randn(b, 1, generator=g)}


def test_per_sample_guidance_equals_one_sample_at_a_time():
    model, cond, null = nonlinear_model(), conds(3, 1), conds(3, 2)
    noise, sigmas, w = torch.randn(3, 1, 4, 4), fixed_sigmas(4, 3.0), torch.tensor([1.0, 3.0, 7.5])
    batched = sample(model, noise, sigmas, cond, null, w)
    for i in range(3):
        one = lambda d: {k: v[i:i + 1] for k, v in d.items()}  # noqa: E731
        alone = sample(model, noise[i:i + 1], sigmas, one(cond), one(null), float(w[i]))
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[1], sample(model, noise, sigmas, cond, null, 7.5)[1])


def test_cfg_formula():
    model, cond, null = nonlinear_model(), conds(2, 3), conds(2, 4)
    x, s = torch.randn(2, 1, 4, 4), torch.full((2,), 0.7)
    v_c, v_u = model(x, s, cond), model(x, s, null)
    torch.testing.assert_close(guided(model, null, 1.0)(x, s, cond), v_c)
    torch.testing.assert_close(guided(model, null, 0.0)(x, s, cond), v_u)
    torch.testing.assert_close(guided(model, null, torch.tensor([2.0, 5.0]))(x, s, cond),
                               v_u + torch.tensor([2.0, 5.0]).reshape(-1, 1, 1, 1) * (v_c - v_u))
    # Without guidance, sample is plain conditional Euler.
    torch.testing.assert_close(sample(model, x, fixed_sigmas(3), cond), euler(model, x, fixed_sigmas(3), cond))
