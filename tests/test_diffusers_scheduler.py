"""FixedFlowMatchEulerScheduler as a drop-in inside a real (tiny) StableDiffusion3Pipeline."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline.diffusers_scheduler import FixedFlowMatchEulerScheduler
from pipeline.sampling import sample
from pipeline.schedule import default_sigmas, fixed_sigmas, shift_sigma
from pipeline.teachers.base import sd3_velocity
from tiny_sd3 import build_tiny_sd3_pipeline, load_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture
def pipe(tiny_dir):
    p = load_tiny_sd3_pipeline(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


def run_and_capture(pipe, steps, **kwargs):
    """Generate and record (sigma, timestep) of every model call as the pipeline steps through them."""
    seen = []

    def on_step_end(p, i, t, kw):
        # step() has advanced step_index past the sigma this call used.
        seen.append((p.scheduler.sigmas[p.scheduler.step_index - 1].item(), float(t)))
        return kw

    out = pipe("a handwritten digit seven", num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **kwargs)
    return out.images, torch.tensor([s for s, _ in seen]), torch.tensor([t for _, t in seen])


def test_pipeline_steps_through_fixed_grid(pipe):
    pipe.scheduler = FixedFlowMatchEulerScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.shift == 3.0
    images, sigmas, timesteps = run_and_capture(pipe, 4)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    torch.testing.assert_close(timesteps, 1000 * sigmas)
    assert pipe.scheduler.sigmas[-1].item() == 0.0
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


def test_stock_scheduler_shows_the_double_shift(pipe):
    """The same pipeline with diffusers' scheduler: last model call at sigma 0.0089 (issue #13243)."""
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    _, sigmas, _ = run_and_capture(pipe, 4)
    torch.testing.assert_close(sigmas, default_sigmas(4, 3.0)[:-1])
    assert sigmas[-1] < 0.01 and sigmas[-2] - sigmas[-1] > 0.59


def test_pipeline_equals_flowsteer_euler_with_cfg(pipe):
    """The drop-in inside diffusers and pipeline.sampling.sample take the same steps from the same noise."""
    pipe.scheduler = FixedFlowMatchEulerScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    latents = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, latents=noise, output_type="latent").images
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, prompts, prompts, negative_prompt=["", ""])
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    null = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
    with torch.no_grad():
        ours = sample(lambda x, s, c: sd3_velocity(pipe.transformer, x, s, c), noise, fixed_sigmas(4, 3.0),
                      cond, null, 4.0)
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-5)


def test_dynamic_shift_in_pipeline(pipe):
    config = dict(pipe.scheduler.config, use_dynamic_shifting=True)
    pipe.scheduler = FixedFlowMatchEulerScheduler.from_config(config)
    _, sigmas, _ = run_and_capture(pipe, 4, mu=0.8)
    torch.testing.assert_close(sigmas, fixed_sigmas(4, mu=0.8)[:-1])
    assert pipe.scheduler.sigmas[-1].item() == 0.0


@pytest.mark.parametrize("n", [1, 2, 4, 8, 28])
@pytest.mark.parametrize("mu", [None, 0.5, 1.15])
def test_set_timesteps_matches_fixed_sigmas(n, mu):
    sched = FixedFlowMatchEulerScheduler(shift=3.0, use_dynamic_shifting=mu is not None)
    sched.set_timesteps(n, mu=mu)
    torch.testing.assert_close(sched.sigmas, fixed_sigmas(n, 3.0, mu))
    torch.testing.assert_close(sched.timesteps, 1000 * sched.sigmas[:-1])
    if mu is None:
        u = 1 - torch.arange(n, dtype=torch.float64) / n
        torch.testing.assert_close(sched.sigmas[:-1].double(), shift_sigma(u, 3.0), rtol=1e-6, atol=1e-7)


def test_explicit_sigmas_keep_diffusers_meaning():
    fixed, stock = FixedFlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (fixed, stock):
        s.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    torch.testing.assert_close(fixed.sigmas, stock.sigmas)
    with pytest.raises(ValueError, match="mu"):
        FixedFlowMatchEulerScheduler(use_dynamic_shifting=True).set_timesteps(4)


def test_euler_step_walks_the_grid():
    """scheduler.step is plain Euler on the fixed grid: a constant velocity lands on x - v."""
    sched = FixedFlowMatchEulerScheduler(shift=3.0)
    sched.set_timesteps(4)
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    y = x
    for t in sched.timesteps:
        y = sched.step(v, t, y, return_dict=False)[0]
    torch.testing.assert_close(y, x - v)


def test_save_and_load_keep_the_fix(pipe, tmp_path):
    sched = FixedFlowMatchEulerScheduler.from_config(dict(pipe.scheduler.config, shift=2.0))
    sched.save_pretrained(tmp_path / "scheduler")
    back = FixedFlowMatchEulerScheduler.from_pretrained(tmp_path / "scheduler")
    assert type(back) is FixedFlowMatchEulerScheduler and back.config.shift == 2.0
    back.set_timesteps(4)
    torch.testing.assert_close(back.sigmas, fixed_sigmas(4, 2.0))

    # A whole pipeline saved with the drop-in loads back with it (model_index names this module).
    pipe.scheduler = sched
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_tiny_sd3_pipeline(tmp_path / "pipe")
    assert type(again.scheduler) is FixedFlowMatchEulerScheduler
