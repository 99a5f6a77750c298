"""PeRFlow (Yan et al. 2024, FlowSteer Alg. 1): piecewise reflow on K windows of the fixed grid.

Each window [s_s -> s_e] of the fixed grid is straightened separately: the student learns the chord
velocity v* = (z_e - z_s) / (s_e - s_s) at every point of the chord z_t = z_s + (t - s_s) v*.
PeRFlow is "off-trajectory": the window start is real data noised to s_s, and the window end is the
teacher's CFG ODE solve from there (M/K Euler sub-steps on the fixed M-grid). OTA (ota.py) only changes
where z_s and z_e come from; the chord objective is the one implementation all three methods use
(common.ChordMethod).
"""
from __future__ import annotations

import torch

from pipeline.methods.base import register
from pipeline.methods.common import ChordMethod, rowwise


def uniform_windows(n: int, num_windows: int, generator: torch.Generator) -> torch.Tensor:
    """Window indices k ~ U{0..K-1} (PeRFlow draws t uniformly over [0, 1], i.e. windows uniformly)."""
    return torch.randint(num_windows, (n,), generator=generator, device=generator.device)


@register
class PeRFlow(ChordMethod):
    name = "perflow"

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        """Off-trajectory windows: z_s = (1 - s_s) x0 + s_s eps from real data, z_e = teacher solve of the window.

        real() comes from the dataset for the embedded teacher, and from the store's final samples otherwise."""
        ctx = self.ctx
        real = ctx.data.real(ctx.cfg.train.batch_size)
        x0 = real["x0"].to(ctx.device)
        n = x0.shape[0]
        k = uniform_windows(n, self.num_windows, ctx.generator).to(ctx.device)
        edges = ctx.edges.to(ctx.device)
        s_s, s_e = edges[k], edges[k + 1]
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        z_s = (1 - rowwise(s_s, x0)) * x0 + rowwise(s_s, x0) * eps
        z_e = ctx.data.teacher_window(z_s, k, real["cond"], real["guidance"])
        return dict(z_start=z_s, z_end=z_e, sigma_start=s_s, sigma_end=s_e, k=k, cond=real["cond"],
                    guidance=real["guidance"])
