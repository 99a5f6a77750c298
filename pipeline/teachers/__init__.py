"""Teacher loading: embedded (trained by `flowsteer teacher`), sd3 (local diffusers dir), byo (module:function)."""
from __future__ import annotations

import importlib

import torch

from pipeline.errors import UserError
from pipeline.teachers.base import DTYPES, Teacher, TeacherAtPrecision, TransformerTeacher, sd3_velocity  # noqa: F401


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is available (use device: cpu)")
    return torch.device(name)


def load_teacher(cfg, device: str | torch.device | None = None) -> TeacherAtPrecision:
    """The configured teacher, frozen, on `device` (default cfg.device), at `teacher.dtype`: every call casts
    its inputs to that dtype and returns float32 (TeacherAtPrecision; docs/precision.md)."""
    return TeacherAtPrecision(_load(cfg, resolve_device(str(device or cfg.device))), DTYPES[cfg.teacher.dtype])


def _load(cfg, dev: torch.device):
    kind = cfg.teacher.kind
    if kind == "embedded":
        from pipeline.teachers.embedded import load_embedded_teacher

        return load_embedded_teacher(cfg.stage_dir("teacher"), cfg.teacher.embedded, dev)
    if kind == "sd3":
        from pipeline.teachers.sd3 import load_sd3_teacher

        return load_sd3_teacher(cfg.teacher.path, dev, dtype=cfg.teacher.dtype, **cfg.teacher.kwargs)
    module_name, _, func = cfg.teacher.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"teacher.factory '{cfg.teacher.factory}' cannot be imported: {exc}") from None
    teacher = factory(device=dev, **cfg.teacher.kwargs)
    missing = [m for m in ("sample_shape", "encode", "velocity", "decode") if not hasattr(teacher, m)]
    if missing:
        raise UserError(f"teacher.factory '{cfg.teacher.factory}' returned an object without {', '.join(missing)}")
    return teacher
