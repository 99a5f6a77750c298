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

from pipeline.errors import UserError
from pipeline.methods.base import MethodOptions, register
from pipeline.methods.common import ChordMethod, rowwise
from pipeline.schedule import shift_sigma, unshift_sigma

X0_SOURCES = ("real", "teacher_samples")
GRIDS = ("fixed", "diffusers")


class PeRFlowOptions(MethodOptions):
    x0: str = "real"            # where x0 comes from (docs/precision.md): X0_SOURCES
    grid: str = "fixed"         # where the K windows lie (docs/ablation.md): GRIDS


def sub_grids(edges: torch.Tensor, k: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """[steps + 1, B] teacher sub-grids of windows k of `edges`, evenly spaced in unshifted time."""
    u_s, u_e = unshift_sigma(edges[k].double(), shift), unshift_sigma(edges[k + 1].double(), shift)
    frac = torch.arange(steps + 1, dtype=torch.float64)[:, None] / steps
    return shift_sigma(u_s[None] + frac * (u_e - u_s)[None], shift).float()


def uniform_windows(n: int, num_windows: int, generator: torch.Generator) -> torch.Tensor:
    """Window indices k ~ U{0..K-1} (PeRFlow draws t uniformly over [0, 1], i.e. windows uniformly)."""
    return torch.randint(num_windows, (n,), generator=generator, device=generator.device)


@register
class PeRFlow(ChordMethod):
    name = "perflow"
    description = ("PeRFlow (piecewise rectified flow): per window, the chord velocity between a noised real image "
                   "and the teacher's CFG solve from it.")
    Options = PeRFlowOptions
    ladder_rank = 10            # FlowSteer Table 5: PeRFlow on diffusers' default grid, then on the fixed one
    ladder_rows = (("perflow-diffusers", {"grid": "diffusers"}), ("perflow", {}))
    # x0 (docs/precision.md): real images, as PeRFlow trains: the MNIST digits (embedded teacher) or the
    # run's latent store (data.images); `method_options.perflow.x0: teacher_samples` = the store's final
    # samples instead, a different baseline ("reflow on teacher samples").

    def __init__(self, ctx):
        super().__init__(ctx)
        # grid "diffusers": PeRFlow as users run it today, its windows on the default scheduler's grid (the
        # paper's first ablation row); the teacher then solves each window with M/K sub-steps of its own.
        from pipeline.diffusers_scheduler import diffusers_sigmas   # diffusers loads only where it is used

        self.grid_edges = (diffusers_sigmas(self.num_windows, shift=ctx.cfg.schedule.shift).to(ctx.device)
                           if self.options["grid"] == "diffusers" else None)

    def export_meta(self) -> dict:
        return {**super().export_meta(), "grid": self.options["grid"]}

    @classmethod
    def check_config(cls, cfg, options) -> None:
        opts = cls.parse_options(options)
        x0 = opts["x0"]
        if opts["grid"] not in GRIDS:
            raise UserError(f"train.method_options.{cls.name}.grid must be one of {', '.join(GRIDS)}")
        if x0 not in X0_SOURCES:
            raise UserError(f"train.method_options.{cls.name}.x0 must be one of {', '.join(X0_SOURCES)}, got {x0!r}")
        if x0 == "real" and not cfg.has_real_images:
            raise UserError(f"{cls.name} draws x0 from real images, and a {cfg.teacher.kind} teacher has none: set "
                            f"data.images (then `flowsteer encode`), or train.method_options.{cls.name}.x0: "
                            f"teacher_samples for reflow on teacher samples")

    @classmethod
    def x0_source(cls, cfg, options) -> str | None:
        if cls.parse_options(options)["x0"] == "teacher_samples":
            return "teacher_samples"
        return {"embedded": "digits", "exact": "exact_data"}.get(cfg.teacher.kind, "latents")

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        """Off-trajectory windows: z_s = (1 - s_s) x0 + s_s eps from real data, z_e = teacher solve of the window.

        x0 and its prompt: DataSource.real (digits or the run's latents), or DataSource.teacher_samples."""
        ctx = self.ctx
        draw = ctx.data.teacher_samples if self.options["x0"] == "teacher_samples" else ctx.data.real
        real = draw(ctx.cfg.train.batch_size)
        x0 = real["x0"].to(ctx.device)
        n = x0.shape[0]
        k = uniform_windows(n, self.num_windows, ctx.generator).to(ctx.device)
        edges = (ctx.edges if self.grid_edges is None else self.grid_edges).to(ctx.device)
        s_s, s_e = edges[k], edges[k + 1]
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        z_s = (1 - rowwise(s_s, x0)) * x0 + rowwise(s_s, x0) * eps
        grid = None
        if self.grid_edges is not None:
            cfg = ctx.cfg.schedule
            grid = sub_grids(self.grid_edges.cpu(), k.cpu(), cfg.teacher_steps // cfg.windows, cfg.shift)
        z_e = ctx.data.teacher_window(z_s, k, real["cond"], real["guidance"], grid=grid)
        return dict(z_start=z_s, z_end=z_e, sigma_start=s_s, sigma_end=s_e, k=k, cond=real["cond"],
                    guidance=real["guidance"])
