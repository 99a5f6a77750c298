"""`flowsteer sample`: a PNG grid (one row per prompt) from the teacher or an exported student.

The teacher runs Euler with CFG on the fixed or the diffusers-default grid (`--schedule fixed | diffusers`) (to see the schedule's effect);
a student runs its own method's guidance-free sampler. Column c of every row starts from the same noise,
`noise_for((seed << 20) + c)`, so rows differ only by prompt and a teacher grid and a student grid made
with the same seed start from the same noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError

SEED_STRIDE = 1 << 20           # seeds s and s+1 get disjoint noise for up to 2**20 images per prompt


def resolve_export(cfg, checkpoint: str) -> Path:
    """A run name (a method or a train.variants key; its first train seed) -> its exported student under the
    train stage; otherwise a path to an export dir."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    from pipeline.methods import METHODS, method_names

    if checkpoint not in cfg.train.variants and checkpoint not in METHODS:
        raise UserError(f"checkpoint '{checkpoint}' is not 'teacher', a method name ({', '.join(method_names())}), "
                        "a train.variants name or an export directory")
    from pipeline.export import export_dir

    export = export_dir(cfg, checkpoint)
    if not export.is_dir():
        raise UserError(f"no exported student for '{checkpoint}' at {export}: run `flowsteer train -m {checkpoint}` first")
    return export


DEFAULT_ROWS = 10               # without --prompt: the first rows of the run's prompt set (all 10 digits)


def default_prompts(cfg) -> list[str]:
    """The run's own prompts (generate.prompts, or the embedded digit prompts), the first DEFAULT_ROWS of them."""
    from pipeline.datasets import generate_prompts

    if cfg.generate.prompts is None and cfg.teacher.kind not in ("embedded", "exact"):
        raise UserError("give the prompts to sample with --prompt, or name a prompt file in generate.prompts "
                        "(only the embedded teacher has a default set)")
    return generate_prompts(cfg)[:DEFAULT_ROWS]


@torch.no_grad()
def sample_grid(cfg, checkpoint: str = "teacher", steps: int = 4, schedule: str = "fixed",
                guidance: float | None = None, prompts: list[str] | None = None, per_prompt: int = 8,
                seed: int = 0, out: str | Path = "samples.png") -> Path:
    """Sample `per_prompt` images for each prompt and save them as a grid (rows = prompts); returns the path."""
    from pipeline.images import sample_images, student_sampler, teacher_sampler, write_grid
    from pipeline.schedule import make_sigmas
    from pipeline.teachers import load_teacher

    if steps < 1 or per_prompt < 1:
        raise UserError(f"--steps ({steps}) and --per-prompt ({per_prompt}) must be >= 1")
    is_teacher = checkpoint == "teacher"
    if is_teacher:
        sigmas = make_sigmas(steps, cfg.schedule.shift, schedule)     # ValueError names a bad schedule
        guidance = cfg.evaluate.guidance if guidance is None else guidance
    elif schedule != "fixed" or guidance is not None:
        raise UserError("--schedule and --guidance apply to the teacher only (students sample guidance-free "
                        "on their method's grid)")
    export = None if is_teacher else resolve_export(cfg, checkpoint)
    prompts = list(prompts) if prompts else default_prompts(cfg)

    teacher = load_teacher(cfg)                      # students reuse its prompt encoder and decoder
    student = None
    if export is not None:
        from pipeline.student import load_student

        student = load_student(export, teacher.device, base=getattr(teacher, "transformer", None))
    from pipeline.seeds import noise_for            # the noise evaluate and generate use too

    shape = tuple(teacher.sample_shape)
    column_noise = torch.stack([noise_for(seed * SEED_STRIDE + c, shape) for c in range(per_prompt)])

    rows = [p for p in prompts for _ in range(per_prompt)]
    if student is not None:
        sampler = student_sampler(student.method, student.module, steps, student.meta["windows"],
                                  student.meta["shift"])
    else:                                            # w = 1 is the conditional model: no null pass
        sampler = teacher_sampler(teacher, sigmas, None if guidance == 1.0 else guidance)
    _, images = sample_images(teacher, sampler, column_noise[[j % per_prompt for j in range(len(rows))]], len(rows),
                              teacher.device, cfg.evaluate.batch_size, prompts=rows)
    return write_grid(images, out, nrow=per_prompt)
