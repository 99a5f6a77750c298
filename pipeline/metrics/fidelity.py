"""Trajectory fidelity: how closely a student's N-step output follows the teacher's M-step output from the
same initial noise and prompt (the distillation target itself, so it isolates distillation error from
sample quality). Measured in the space the ODE runs in (pixels for the embedded teacher, latents for SD3).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from pipeline.metrics.base import Metric, Samples, register


def per_sample_mse(student_x: torch.Tensor, teacher_x: torch.Tensor) -> torch.Tensor:
    """mean_{c,h,w} (x_student - x_teacher)^2 for each sample: [N]."""
    if student_x.shape != teacher_x.shape:
        raise ValueError(f"student outputs {tuple(student_x.shape)} and teacher outputs "
                         f"{tuple(teacher_x.shape)} differ in shape")
    return (student_x.float().cpu() - teacher_x.float().cpu()).pow(2).flatten(1).mean(1)


class TargetError(Metric):
    """A statistic of each sample's squared distance to a target output from the same noise and prompt: the
    teacher's (then the teacher itself has no value) or, for the exact teacher, the exact ODE endpoint's."""
    target: ClassVar[str] = "teacher"
    needs = ("teacher_outputs",)
    digits, exponent_below = 4, 1e-3

    @classmethod
    def teacher_note(cls, cfg) -> str:
        return ("the teacher's outputs are this metric's target (0 by construction)" if cls.target == "teacher"
                else super().teacher_note(cfg))


@register
class FidelityMSE(TargetError):
    name, title, better, order = "fidelity_mse", "Trajectory fidelity, mean MSE", "lower", 40
    description = ("Mean over samples of the squared distance between the student's output and the teacher's "
                   "output from the same noise and prompt, in the ODE's space (0 = identical); dominated by "
                   "the samples that switch mode: see its median, 90th percentile and mode-switch rate.")

    def score(self, samples: Samples) -> float | None:
        if samples.kind == "teacher":
            return None
        target = self.ctx.teacher_outputs(samples.seed, samples.noise_seeds)
        return float(per_sample_mse(samples.x, target).mean())
