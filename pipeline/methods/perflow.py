"""PeRFlow (Yan et al. 2024, FlowSteer Alg. 1): piecewise reflow on K windows of the fixed grid.

Each window [s_s -> s_e] of the fixed grid is straightened separately: the student learns the chord
velocity v* = (z_e - z_s) / (s_e - s_s) at every point of the chord z_t = z_s + (t - s_s) v*.
PeRFlow is "off-trajectory": the window start is real data noised to s_s, and the window end is the
teacher's CFG ODE solve from there (M/K Euler sub-steps on the fixed M-grid). OTA (ota.py) only changes
where z_s and z_e come from; the chord objective below is the one implementation all three methods use.

The student is guidance-free: it gets the prompt condition only. The teacher's per-sample CFG scale w
(carried in the batch as `guidance`) shapes the targets but is not a student input, so guidance is
distilled into the student at the average of the generate stage's w range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data import has_real_data
from pipeline.errors import UserError
from pipeline.methods.base import Method, register
from pipeline.schedule import shift_sigma

X0_SOURCES = ("real", "teacher_samples")


def unshift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of the static shift (SD3 eq. 23): u = s / (a - (a - 1) s)."""
    return s / (shift - (shift - 1) * s)


def chord_times(sigma_start: torch.Tensor, sigma_end: torch.Tensor, shift: float,
                generator: torch.Generator) -> torch.Tensor:
    """t in (s_e, s_s], uniform in unshifted time u inside each row's window.

    Uniform in u (not in sigma) because the student's n > K step grids (schedule.piecewise_sigmas) space
    their points evenly in u inside a window, and PeRFlow draws t uniformly in its own unshifted time."""
    r = torch.rand(sigma_start.shape, generator=generator, device=generator.device, dtype=torch.float64)
    u_s = unshift_sigma(sigma_start.double(), shift)
    u_e = unshift_sigma(sigma_end.double(), shift)
    u = u_s - r.to(u_s.device) * (u_s - u_e)           # r in [0, 1) -> u in (u_e, u_s]
    return shift_sigma(u, shift).to(sigma_start.dtype)


def rowwise(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] vector shaped to broadcast over samples like `like` ([B, 1, 1, 1])."""
    return s.to(like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def chord_velocity(z_start, z_end, sigma_start, sigma_end) -> torch.Tensor:
    """PeRFlow's per-window target v* = (z_e - z_s) / (s_e - s_s)."""
    return (z_end - z_start) / rowwise(sigma_end - sigma_start, z_start)


def chord_point(z_start, v_star, sigma_start, t) -> torch.Tensor:
    """The point at time t on the window's chord: z_t = z_s + (t - s_s) v*."""
    return z_start + rowwise(t - sigma_start, z_start) * v_star


def uniform_windows(n: int, windows: int, generator: torch.Generator) -> torch.Tensor:
    """Window indices k ~ U{0..K-1} (PeRFlow draws t uniformly over [0, 1], i.e. windows uniformly)."""
    return torch.randint(windows, (n,), generator=generator, device=generator.device)


@register
class PeRFlow(Method):
    name = "perflow"
    # x0 (docs/precision.md): real images, as PeRFlow trains: the MNIST digits (embedded teacher) or the
    # run's latent store (data.images); `method_options.perflow.x0: teacher_samples` = the store's final
    # samples instead, a different baseline ("reflow on teacher samples").
    uses_cache = True

    @classmethod
    def check_config(cls, cfg, options) -> None:
        x0 = options.get("x0", "real")
        if x0 not in X0_SOURCES:
            raise UserError(f"train.method_options.{cls.name}.x0 must be one of {', '.join(X0_SOURCES)}, got {x0!r}")
        if x0 == "real" and not has_real_data(cfg):
            raise UserError(f"{cls.name} draws x0 from real images, and a {cfg.teacher.kind} teacher has none: set "
                            f"data.images (then `flowsteer encode`), or train.method_options.{cls.name}.x0: "
                            f"teacher_samples for reflow on teacher samples")

    @classmethod
    def x0_source(cls, cfg, options) -> str | None:
        if options.get("x0", "real") == "teacher_samples":
            return "teacher_samples"
        return "digits" if cfg.teacher.kind == "embedded" else "latents"

    @property
    def num_windows(self) -> int:
        return len(self.ctx.windows) - 1

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        """Off-trajectory windows: z_s = (1 - s_s) x0 + s_s eps from real data, z_e = teacher solve of the window."""
        ctx = self.ctx
        draw = ctx.data.teacher_samples if ctx.options.get("x0", "real") == "teacher_samples" else ctx.data.real
        real = draw(ctx.cfg.train.batch_size)
        x0 = real["x0"].to(ctx.device)
        n = x0.shape[0]
        k = uniform_windows(n, self.num_windows, ctx.generator).to(ctx.device)
        windows = ctx.windows.to(ctx.device)
        s_s, s_e = windows[k], windows[k + 1]
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        z_s = (1 - rowwise(s_s, x0)) * x0 + rowwise(s_s, x0) * eps
        z_e = ctx.data.teacher_window(z_s, k, real["cond"], real["guidance"])
        return dict(z_start=z_s, z_end=z_e, sigma_start=s_s, sigma_end=s_e, k=k, cond=real["cond"],
                    guidance=real["guidance"])

    def distillation_loss(self, student, batch: dict) -> torch.Tensor:
        """L = || v_theta(z_t, t, c) - v* ||^2 at a random point t of each row's chord (PeRFlow Alg. 1)."""
        z_s, s_s, s_e = batch["z_start"], batch["sigma_start"], batch["sigma_end"]
        v_star = chord_velocity(z_s, batch["z_end"], s_s, s_e)
        t = chord_times(s_s, s_e, self.ctx.cfg.schedule.shift, self.ctx.generator)
        v = self.velocity(student, chord_point(z_s, v_star, s_s, t), t, batch["cond"])
        return F.mse_loss(v.float(), v_star.float())

    def generator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        distill = self.distillation_loss(student, batch)
        return {"loss": distill, "distill": distill.detach()}
