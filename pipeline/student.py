"""Exported students: a diffusers-style directory that plain diffusers can load, plus flowsteer's sampler.

    <dir>/transformer/     the (EMA, LoRA-merged) student via Method.save_student (SD3: save_pretrained)
    <dir>/scheduler/       FixedFlowMatchEulerScheduler config (the fixed grid; drop-in for SD3 pipelines)
    <dir>/flowsteer.json   {method, windows, teacher_steps, shift, fingerprint, sample_shape}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.methods.base import get_method

META = "flowsteer.json"


def export_student(directory, run, student_module: torch.nn.Module, cfg,
                   sample_shape: tuple[int, ...] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the export into a temp dir and rename it into place, so `directory` is whole or absent.
    `run`: a schemas.config.TrainRun or a run name (its first seed); `extra` joins the metadata."""
    directory = Path(directory)
    run = cfg.train_run(run) if isinstance(run, str) else run
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        _write_export(tmp, run, student_module, cfg, sample_shape, extra or {})
    return directory


def _write_export(tmp: Path, run, student_module: torch.nn.Module, cfg, sample_shape, extra) -> None:
    from pipeline.diffusers_scheduler import FixedFlowMatchEulerScheduler

    get_method(run.method).save_student(student_module, tmp / "transformer")
    FixedFlowMatchEulerScheduler(shift=cfg.schedule.shift).save_pretrained(str(tmp / "scheduler"))
    meta = {"method": run.method, "run": run.name, "train_seed": run.seed, "options": run.options,
            "windows": cfg.schedule.windows, "teacher_steps": cfg.schedule.teacher_steps,
            "shift": cfg.schedule.shift, "fingerprint": cfg.fingerprint("train", run),
            "sample_shape": list(sample_shape) if sample_shape else None, **extra}
    (tmp / META).write_text(json.dumps(meta, indent=1))


@dataclass
class Student:
    """A loaded export: `.module` is the network, `.sample` runs its method's few-step sampler."""
    module: torch.nn.Module
    method: Any                   # the Method class (its `sample` classmethod)
    meta: dict[str, Any]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: dict, nfe: int, callback=None,
               sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """`nfe` steps of the method's sampler on its own grid, or on `sigmas` (nfe + 1 values) when given."""
        if sigmas is not None and len(sigmas) != nfe + 1:
            raise ValueError(f"{nfe} steps need {nfe + 1} sigmas, got {len(sigmas)}")
        return self.method.sample(self.module, noise, cond, nfe, self.meta["windows"], self.meta["shift"],
                                  callback=callback, sigmas=sigmas)


def load_student(directory, device="cpu") -> Student:
    directory = Path(directory)
    if not (directory / META).is_file():
        raise UserError(f"{directory} is not an exported student (no {META}); run `flowsteer train` first")
    meta = json.loads((directory / META).read_text())
    method = get_method(meta["method"])
    return Student(method.load_student(directory / "transformer", device), method, meta)
