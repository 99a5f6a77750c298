"""Trajectory fidelity: how closely a student's N-step output follows the teacher's M-step output from the
same initial noise and prompt (the distillation target itself, so it isolates distillation error from
sample quality). Measured in the space the ODE runs in (pixels for the embedded teacher, latents for SD3).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes


def per_sample_mse(student_x: torch.Tensor, teacher_x: torch.Tensor) -> torch.Tensor:
    """mean_{c,h,w} (x_student - x_teacher)^2 for each sample: [N]."""
    if student_x.shape != teacher_x.shape:
        raise ValueError(f"student outputs {tuple(student_x.shape)} and teacher outputs "
                         f"{tuple(teacher_x.shape)} differ in shape")
    return (student_x.float().cpu() - teacher_x.float().cpu()).pow(2).flatten(1).mean(1)


def save_outputs(path: Path, x: torch.Tensor, prompt_index: torch.Tensor, noise_seeds: np.ndarray) -> None:
    """The teacher's final samples for one evaluation seed (with what made them), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, x=x.float().cpu().numpy(), prompt_index=prompt_index.cpu().numpy(), noise_seeds=noise_seeds)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_outputs(path: Path, noise_seeds: np.ndarray | None = None) -> torch.Tensor:
    """The saved teacher samples; checks they were made from the same noise as the student's."""
    try:
        with np.load(Path(path)) as f:
            x, seeds = f["x"], f["noise_seeds"]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"teacher outputs {path} are missing or unreadable ({type(exc).__name__}): "
                        f"rerun `flowsteer evaluate`") from None
    if noise_seeds is not None and not np.array_equal(seeds[:len(noise_seeds)], noise_seeds):
        raise UserError(f"teacher outputs {path} were made from other noise than this evaluation's")
    return torch.from_numpy(x[:len(noise_seeds)] if noise_seeds is not None else x)
