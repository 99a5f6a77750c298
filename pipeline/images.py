"""Images from noise, and image grids: the one path that `flowsteer evaluate`, `flowsteer sample` and the
training run's TensorBoard grids share.

    noise -> condition (prompts encoded by the teacher, or given) -> sampler -> teacher.decode -> grid

A sampler maps (noise, condition) to the final sample in the ODE's space: `teacher_sampler` (Euler with
optional CFG on a sigma grid) or `student_sampler` (a method's own few-step sampler). Grids are torchvision's
`make_grid` with 2 px white padding, written through `write_grid` (PNG, or the format the suffix names).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.files import atomic_write_bytes
from pipeline.sampling import sample

Sampler = Callable[[torch.Tensor, dict], torch.Tensor]       # (noise on the device, condition) -> final x


def teacher_sampler(teacher, sigmas: torch.Tensor, guidance: float | None = None) -> Sampler:
    """The teacher's Euler on `sigmas`; with CFG at scale `guidance` (a null-prompt pass) unless it is None."""
    def run(noise: torch.Tensor, cond: dict) -> torch.Tensor:
        if guidance is None:
            return sample(teacher.velocity, noise, sigmas, cond)
        return sample(teacher.velocity, noise, sigmas, cond, teacher.encode([""] * len(noise)), guidance)
    return run


def student_sampler(method, student: torch.nn.Module, nfe: int, num_windows: int, shift: float,
                    sigmas: torch.Tensor | None = None) -> Sampler:
    """A student's guidance-free sampler: its method's (`Method.sample`) own grid, or `sigmas` when given."""
    return lambda noise, cond: method.sample(student, noise, cond, nfe, num_windows, shift, sigmas=sigmas)


@torch.no_grad()
def sample_images(teacher, sampler: Sampler, noise: torch.Tensor | Callable[[int, int], torch.Tensor], n: int,
                  device, batch_size: int, prompts: Sequence[str] | None = None,
                  cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final samples, decoded images), both float32 on the CPU, for `n` samples in batches of `batch_size`.

    `noise`: the [n, ...] initial noise, or noise(i, j) giving rows i..j-1 (so a large run never holds it
    all); the condition of row i is `prompts[i]` encoded by the teacher, or row i of `cond`."""
    xs, images = [], []
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        z = (noise(i, j) if callable(noise) else noise[i:j]).to(device)
        c = teacher.encode(list(prompts[i:j])) if cond is None else {k: v[i:j] for k, v in cond.items()}
        x = sampler(z, c)
        xs.append(x.float().cpu())
        images.append(teacher.decode(x).float().cpu())
    return torch.cat(xs), torch.cat(images)


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> [N, H, W, C] uint8 (round to nearest, as torchvision.save_image does)."""
    x = images01.detach().float().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images01: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N, C, H, W] images (clamped to [0, 1]) as one [3, H', W'] grid, `nrow` images a row."""
    from torchvision.utils import make_grid

    return make_grid(images01.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)


def write_grid(images01: torch.Tensor, path, nrow: int, keep_pixels: bool = False) -> Path:
    """The images as one grid file (format from the suffix, PNG by default), written atomically; with
    `keep_pixels`, their uint8 pixels beside it (`.npz`, for the report's comparison figures)."""
    from PIL import Image

    path = Path(path)
    arr = to_uint8(image_grid(images01, nrow)[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    if keep_pixels:
        pixels = io.BytesIO()
        np.savez(pixels, images=to_uint8(images01), nrow=nrow)
        atomic_write_bytes(path.with_suffix(".npz"), pixels.getvalue())
    atomic_write_bytes(path, buf.getvalue())
    return path
