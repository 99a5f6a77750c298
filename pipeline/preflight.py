"""Checks that run before any work, in two kinds (docs/reliability.md):

- config checks: every stage's own `check(cfg)` (a stage module may define one: cheap, reads config files and
  the inputs' headers at most, creates nothing). Every command runs all of them when its config loads
  (`pipeline/cli.config_problems`), so a setting of a late stage (train.adversarial, evaluate.metrics) is
  refused before teacher or generate run; `flowsteer status` lists them and exits non-zero. A check plugs in
  by defining `check(cfg)` in its stage module.
- run checks (`before_run`): what this machine and the earlier stages must provide for a stage to run (the
  device, the teacher's files or factory), checked before the stage creates any directory.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError

# stages that build or run the teacher (report only reads scores)
NEEDS_TEACHER = ("teacher", "generate", "encode", "train", "evaluate")


def before_run(cfg, stage: str) -> None:
    """Refuse (UserError) a stage this machine or the earlier stages cannot serve, before it writes anything."""
    if stage not in NEEDS_TEACHER:
        return
    if cfg.device.startswith("cuda"):
        from pipeline.teachers import resolve_device

        resolve_device(cfg.device)               # no CUDA here: one line, before any store is built
    kind = cfg.teacher.kind
    if kind == "sd3":
        from pipeline.teachers.sd3 import check_sd3_dir

        check_sd3_dir(cfg.teacher.path)
    elif kind == "byo":
        from pipeline.teachers import _import

        _import(cfg.teacher.factory, "teacher.factory")
        if cfg.teacher.describe:
            _import(cfg.teacher.describe, "teacher.describe")
    elif stage != "teacher":
        from pipeline.teachers.embedded import TRANSFORMER

        teacher_dir = Path(cfg.stage_dir("teacher"))
        if not (teacher_dir / TRANSFORMER / "config.json").is_file():
            raise UserError(f"no trained embedded teacher in {teacher_dir}: run `flowsteer teacher` first "
                            f"(nothing was written)")
