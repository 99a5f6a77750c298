"""FixedFlowMatchEulerScheduler: diffusers' FlowMatchEuler with FlowSteer's fixed sigma grid (drop-in).

`FlowMatchEulerDiscreteScheduler.set_timesteps(N)` spaces N points from 1 down to the training sigma_min,
which is already shifted, and shifts them again (diffusers issue #13243): at shift 3, N=4 it steps through
[1, 0.858, 0.602, 0.0089, 0], so the third call covers 0.60 of the path and the last one only 0.009.
This subclass instead spaces the N points uniformly in unshifted time, u_i = 1 - i/N (i < N), and lets the
parent apply the (static or dynamic) shift and append the final 0: sigma_i = shift(1 - i/N), i = 0..N,
[1, 0.9, 0.75, 0.5, 0] at shift 3, N=4 -- the grid of `pipeline.schedule.fixed_sigmas`.

    pipe.scheduler = FixedFlowMatchEulerScheduler.from_config(pipe.scheduler.config)
"""
from __future__ import annotations

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler
# A saved pipeline names this module as the scheduler's library; diffusers' loader then looks the base class
# up here by name, so re-exporting SchedulerMixin lets DiffusionPipeline.from_pretrained load it back.
from diffusers import SchedulerMixin  # noqa: F401


class FixedFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler whose default grid is sigma_i = shift(1 - i/N), ending exactly at 0."""

    _compatibles = [FlowMatchEulerDiscreteScheduler.__name__]

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        # Only the default grid changes: explicit sigmas/timesteps keep diffusers' meaning.
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            # Unshifted u_i = 1 - i/N for i < N; the parent shifts them (shift or mu) and appends sigma = 0.
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)


def diffusers_sigmas(nfe: int, scheduler_config: dict | None = None, shift: float = 3.0) -> "torch.Tensor":
    """The nfe + 1 sigmas diffusers' own FlowMatchEulerDiscreteScheduler steps through after set_timesteps(nfe)
    (read from the scheduler, not recomputed): the grid a student gets when users keep the default scheduler.
    `scheduler_config`: an export's scheduler config (its shift etc.); else a default one with `shift`."""
    import torch

    if scheduler_config is not None:
        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(nfe)
    return torch.as_tensor(scheduler.sigmas, dtype=torch.float32).cpu()
