"""What several methods share, in one place: a method module imports this, never another method module.

- `rowwise` broadcasts a per-sample vector over a batch (defined in pipeline/sampling.py, its lowest user);
- the chord helpers: PeRFlow's per-window straightening (Yan et al. 2024), the objective of perflow, ota and
  flowsteer, and the on-trajectory points scflow and ayf-emd draw their times and states from;
- `ChordMethod` (the chord loss on K windows of the fixed grid) and `OnTrajectoryChordMethod` (that loss on
  the teacher's own states, OTA / FlowSteer Alg. 2), the bases of the registered chord methods.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.base import Method
from pipeline.sampling import rowwise
from pipeline.schedule import shift_sigma, unshift_sigma

__all__ = ["rowwise", "uniform", "chord_times", "chord_velocity", "chord_point",
           "on_trajectory_points", "ChordMethod", "OnTrajectoryChordMethod"]


def uniform(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n draws of U[0, 1) from the method generator, on `like`'s device and dtype."""
    return torch.rand(n, generator=generator, device=generator.device).to(like)


# ---------------------------------------------------------------- chords of the fixed grid's windows
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


def chord_velocity(z_start, z_end, sigma_start, sigma_end) -> torch.Tensor:
    """PeRFlow's per-window target v* = (z_e - z_s) / (s_e - s_s)."""
    return (z_end - z_start) / rowwise(sigma_end - sigma_start, z_start)


def chord_point(z_start, v_star, sigma_start, t) -> torch.Tensor:
    """The point at time t on the window's chord: z_t = z_s + (t - s_s) v*."""
    return z_start + rowwise(t - sigma_start, z_start) * v_star


def on_trajectory_points(seg: dict, shift: float, generator: torch.Generator):
    """t uniform in unshifted time inside the row's window; z_t on the chord of its two cached states."""
    s0, s1 = seg["sigma_start"], seg["sigma_end"]
    t = chord_times(s0, s1, shift, generator).to(s0)
    return t, chord_point(seg["z_start"], chord_velocity(seg["z_start"], seg["z_end"], s0, s1), s0, t)


# ---------------------------------------------------------------- the chord objective
class ChordMethod(Method):
    """PeRFlow's objective on the K windows of the fixed grid; subclasses say where z_s and z_e come from.

    The student is guidance-free: it gets the prompt condition only. The teacher's per-sample CFG scale w
    (carried in the batch as `guidance`) shapes the targets but is not a student input, so guidance is
    distilled into the student at the average of the generate stage's w range."""

    @property
    def num_windows(self) -> int:
        return len(self.ctx.edges) - 1

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


class OnTrajectoryChordMethod(ChordMethod):
    """The chord objective on authentic teacher states (OTA, FlowSteer Alg. 2): cached boundary states plus a
    `train.online_fraction` share of fresh teacher rollouts per batch, windows uniform (as PeRFlow)."""

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        cfg = self.ctx.cfg
        return self.ctx.data.segments(cfg.train.batch_size, window_probs=None,
                                      online_fraction=cfg.train.online_fraction)

    def generator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = super().generator_losses(student, batch, step)
        # the cache/online mix actually used in this batch (logged next to the losses)
        losses["online_share"] = batch["online_mask"].float().mean()
        return losses
