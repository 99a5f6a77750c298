"""Teacher loading: embedded (trained by `flowsteer teacher`), exact (closed-form Gaussian mixture, its init
pretrained by `flowsteer teacher`), sd3 (local diffusers dir), byo (module:function)."""
from __future__ import annotations

import importlib

import torch

from pipeline.errors import UserError
from pipeline.teachers.base import (DTYPES, Teacher, TeacherAtPrecision, TeacherLayout, TransformerTeacher,  # noqa: F401
                                    sd3_velocity)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is available (use device: cpu)")
    return torch.device(name)


def teacher_depth(cfg, build: bool = False) -> int | None:
    """How many transformer blocks the configured teacher has, found without loading it (None: unknown
    until it loads, e.g. a byo teacher, unless `build`: then a byo teacher is built once on the CPU to count
    its `transformer.transformer_blocks`); lets `train.adversarial.disc_blocks` be checked before any work."""
    if cfg.teacher.kind == "embedded":
        return cfg.teacher.embedded.num_layers
    if cfg.teacher.kind == "exact":
        return cfg.teacher.exact.num_layers
    if cfg.teacher.kind == "sd3" and cfg.teacher.path:
        from pipeline.teachers.sd3 import transformer_depth

        return transformer_depth(cfg.teacher.path)
    if cfg.teacher.kind == "byo" and build:
        blocks = getattr(getattr(load_teacher(cfg, "cpu"), "transformer", None), "transformer_blocks", None)
        return len(blocks) if blocks is not None else None
    return None


def load_teacher(cfg, device: str | torch.device | None = None) -> TeacherAtPrecision:
    """The configured teacher, frozen, on `device` (default cfg.device), at `teacher.dtype`: every call casts
    its inputs to that dtype and returns float32 (TeacherAtPrecision; docs/precision.md)."""
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    return TeacherAtPrecision(_load(cfg, resolve_device(str(device or cfg.device))), DTYPES[cfg.teacher.dtype])


def _load(cfg, dev: torch.device):
    kind = cfg.teacher.kind
    if kind == "embedded":
        from pipeline.teachers.embedded import load_embedded_teacher

        return load_embedded_teacher(cfg.stage_dir("teacher"), cfg.teacher.embedded, dev)
    if kind == "exact":
        from pipeline.teachers.exact import load_exact_teacher

        return load_exact_teacher(cfg.stage_dir("teacher"), cfg.teacher.exact, dev)
    if kind == "sd3":
        from pipeline.teachers.sd3 import load_sd3_teacher

        return load_sd3_teacher(cfg.teacher.path, dev, dtype=cfg.teacher.dtype, **cfg.teacher.kwargs)
    factory = _import(cfg.teacher.factory, "teacher.factory")
    teacher = factory(device=dev, **cfg.teacher.kwargs)
    missing = [m for m in ("sample_shape", "encode", "velocity", "decode") if not hasattr(teacher, m)]
    if missing:
        raise UserError(f"teacher.factory '{cfg.teacher.factory}' returned an object without {', '.join(missing)}")
    return teacher


def _import(spec: str, key: str):
    module_name, _, func = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{key} '{spec}' cannot be imported: {exc}") from None


def describe_teacher(cfg) -> TeacherLayout:
    """The teacher's shapes and condition layout without building its networks (the driver plans and
    creates stores with this; workers build the teacher). A byo teacher without `teacher.describe` is
    built once on the CPU to look (slow for a large model: give it a describe function)."""
    kind = cfg.teacher.kind
    if kind == "embedded":
        from pipeline.teachers.embedded import describe_embedded

        return describe_embedded(cfg.teacher.embedded)
    if kind == "exact":
        from pipeline.teachers.exact import describe_exact

        return describe_exact(cfg.teacher.exact)
    if kind == "sd3":
        from pipeline.teachers.sd3 import describe_sd3

        return describe_sd3(cfg.teacher.path, **cfg.teacher.kwargs)
    if cfg.teacher.describe:
        layout = _import(cfg.teacher.describe, "teacher.describe")(**cfg.teacher.kwargs)
        if not isinstance(layout, TeacherLayout):
            raise UserError(f"teacher.describe '{cfg.teacher.describe}' returned {type(layout).__name__}, "
                            f"not a TeacherLayout")
        for key, extent in layout.cond_extents.items():
            shape = layout.cond_shapes.get(key)
            if shape is None or len(extent) != len(shape) or not all(1 <= e <= n for e, n in zip(extent, shape)):
                raise UserError(f"teacher.describe '{cfg.teacher.describe}': cond_extents['{key}'] = {list(extent)} "
                                f"is not a block of its condition's shape {list(shape) if shape else 'none'}")
        return layout
    teacher = load_teacher(cfg, "cpu")
    with torch.no_grad():
        cond = teacher.encode([""])
    image = tuple(teacher.sample_shape) if hasattr(teacher, "encode_images") else None
    return TeacherLayout.of(teacher.sample_shape, {k: v.shape[1:] for k, v in cond.items()}, image)
