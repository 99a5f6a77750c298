"""Online Trajectory Alignment (FlowSteer Alg. 2): PeRFlow's chord objective on the teacher's own states.

Window starts and ends are authentic teacher states z_{s_k} = ODESolve(teacher, eps, 1 -> s_k): the
trajectory store's boundary states, plus a `train.online_fraction` share of each batch rolled out fresh
by the frozen teacher (DataSource.segments), so the student never trains from points the teacher does not
visit (the teacher-trajectory mismatch of PeRFlow's interpolated starts).
"""
from __future__ import annotations

import torch

from pipeline.methods.base import register
from pipeline.methods.perflow import PeRFlow


@register
class OTA(PeRFlow):
    name = "ota"
    uses_cache = True

    @classmethod
    def check_config(cls, cfg, options) -> None:
        """No x0 to check: OTA's windows are the teacher's own states."""

    @classmethod
    def x0_source(cls, cfg, options) -> str | None:
        return None

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        """On-trajectory windows, windows uniform (as PeRFlow), a fixed online share per batch."""
        cfg = self.ctx.cfg
        return self.ctx.data.segments(cfg.train.batch_size, window_probs=None,
                                      online_fraction=cfg.train.online_fraction)

    def generator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = super().generator_losses(student, batch, step)
        # the cache/online mix actually used in this batch (logged next to the losses)
        losses["online_share"] = batch["online_mask"].float().mean()
        return losses
