"""Stage `teacher`: train the embedded teacher and its digit classifier, or check that a given teacher loads.

embedded: two units in cfg.stage_dir("teacher"): "classifier" (CNN on the first 4000 digits, scored on the
last 1000) and "teacher" (rectified-flow training, resumable from its checkpoint). exact: one unit "init"
(the SD3-architecture init pretrained on the closed-form field, pipeline/teachers/exact.py). sd3 / byo: one unit
"check" that loads the teacher once and records its sample shape, so a bad path fails here, not mid-generate.
"""
from __future__ import annotations

import functools
from pathlib import Path

from pipeline.files import atomic_write_json
from pipeline.runner import Job, Unit


class TeacherWorker:
    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, unit: Unit) -> dict:
        return getattr(self, f"_{unit.key}")(Path(unit.params["out_dir"]))

    def _device(self):
        from pipeline.teachers import resolve_device

        return resolve_device(self.cfg.device)

    def _classifier(self, out_dir: Path) -> dict:
        from pipeline.digits import split_digits
        from pipeline.metrics.classifier import FILE, save_classifier, train_classifier

        ecfg = self.cfg.teacher.embedded
        train, held_out = split_digits()
        clf, acc = train_classifier(train, held_out, ecfg.classifier_epochs, seed=self.cfg.teacher.seed,
                                    device=self._device())
        save_classifier(clf, out_dir / FILE)
        facts = {"held_out_accuracy": round(acc, 4), "train_digits": len(train[1]), "held_out_digits": len(held_out[1]),
                 "epochs": ecfg.classifier_epochs}
        atomic_write_json(out_dir / "classifier.json", facts)
        print(f"teacher: digit classifier held-out accuracy {acc:.2%}")
        return facts

    def _teacher(self, out_dir: Path) -> dict:
        from pipeline.teachers.embedded import train_embedded_teacher

        return train_embedded_teacher(out_dir, self.cfg.teacher.embedded, seed=self.cfg.teacher.seed,
                                      device=self._device())

    def _init(self, out_dir: Path) -> dict:
        from pipeline.teachers.exact import pretrain_init

        return pretrain_init(out_dir, self.cfg.teacher.exact, seed=self.cfg.teacher.seed, device=self._device())

    def _check(self, out_dir: Path) -> dict:
        from pipeline.teachers import load_teacher

        teacher = load_teacher(self.cfg)
        return {"sample_shape": list(teacher.sample_shape), "kind": self.cfg.teacher.kind}


def jobs(cfg, **opts) -> list[Job]:
    out = cfg.stage_dir("teacher")
    keys = {"embedded": ["classifier", "teacher"], "exact": ["init"]}.get(cfg.teacher.kind, ["check"])
    sizes = {"classifier": 1, "teacher": cfg.teacher.embedded.train_steps, "check": 1,
             "init": cfg.teacher.exact.train_steps}
    units = [Unit(k, {"out_dir": str(out)}, sizes[k]) for k in keys]
    if cfg.teacher.kind not in ("embedded", "exact"):
        _check_path(cfg)
    return [Job("teacher", out, units, functools.partial(TeacherWorker, cfg), item_name="steps")]


def _check_path(cfg) -> None:
    """Fail fast (one line) on a missing sd3 dir, before any worker starts."""
    if cfg.teacher.kind == "sd3":
        from pipeline.teachers.sd3 import check_sd3_dir, check_t5

        check_t5(check_sd3_dir(cfg.teacher.path), cfg.teacher.kwargs.get("use_t5"))


def verify_unit(job: Job, unit: Unit) -> str | None:
    """`flowsteer status --verify`: the unit's files must exist and load."""
    out = Path(job.out_dir)
    if unit.key == "classifier":
        from pipeline.errors import UserError
        from pipeline.metrics.classifier import load_classifier

        try:
            load_classifier(out)
        except UserError as exc:
            return str(exc)
    if unit.key in ("teacher", "init"):
        for name in ("transformer", "weak_transformer"):
            if not (out / name / "config.json").is_file():
                return f"{out / name} is missing"
    return None
