"""TensorBoard curves and sample grids for a training run (what diffusers' `--report_to tensorboard` users expect).

The trainer hands every logged row (the same row as `losses.jsonl`: each named loss, grad_norm, lr,
data_wait_s, teacher_data_s, step_s, online_share) to `scalars`, so TensorBoard costs nothing between log
steps. At each committed checkpoint the train stage calls `sample_grid`: the EMA student's samples at 1 and
4 NFE from fixed noise and the store's first prompts, so the grids of one run are comparable over steps.
Events go to `<train dir>/tb/`; a resumed run purges the events past its checkpoint so curves do not fork.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GRID_NFES = (1, 4)
GRID_SAMPLES = 4
GRID_SEED = 1234                # the grid's noise: the same images at every checkpoint of every run


def tb_dir(train_dir: str | Path) -> Path:
    return Path(train_dir) / "tb"


def scalar_tag(name: str) -> str:
    """Losses under loss/ (the discriminator's under loss_d/), timing and the rest under train/."""
    if name.startswith("d_"):
        return f"loss_d/{name[2:]}"
    if name in ("grad_norm", "lr", "online_share") or name.endswith("_s"):
        return f"train/{name}"
    return f"loss/{name}"


class TensorBoardLogger:
    """A SummaryWriter for one run; `resume_step` > 0 drops events logged after that step by a killed run."""

    def __init__(self, log_dir: str | Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(name), float(value), step)
        self.writer.flush()

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """`images` [N, C, H, W] in [0, 1], written as one grid row."""
        from pipeline.images import image_grid

        self.writer.add_image(tag, image_grid(images, nrow=len(images)), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@torch.no_grad()
def sample_grid(logger: TensorBoardLogger, trainer, step: int, nfes=GRID_NFES, n: int = GRID_SAMPLES) -> None:
    """The EMA student's samples at each NFE in `nfes` (same noise, same prompts) as images `samples/nfe<N>`."""
    from pipeline.images import sample_images, student_sampler
    from pipeline.seeds import noise_for

    data, method = trainer.data, trainer.method
    if data.store is None or not data.num_prompts:
        return
    teacher, device = data.teacher, trainer.device
    rows = torch.arange(n) % data.num_prompts
    cond = {k: v.to(device) for k, v in data.store.cond(rows.numpy()).items()}
    noise = noise_for([GRID_SEED + i for i in range(n)], tuple(teacher.sample_shape))
    student = trainer.ema_student()
    sched = trainer.cfg.schedule
    for nfe in nfes:
        sampler = student_sampler(type(method), student, nfe, sched.windows, sched.shift)
        _, images = sample_images(teacher, sampler, noise, n, device, n, cond=cond)
        logger.images(f"samples/nfe{nfe}", images, step)
