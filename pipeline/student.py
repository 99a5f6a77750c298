"""Exported students: a diffusers-style directory that plain diffusers can load, plus flowsteer's sampler.

    <dir>/transformer/     the (EMA) student via Method.save_student (SD3: save_pretrained); `flow_map/`
                           instead when the method's student is not a drop-in (Method.drop_in); a LoRA
                           student of a drop-in method saves its adapter instead (pipeline/lora_export.py)
    <dir>/scheduler/       FixedFlowMatchEulerScheduler config (the fixed grid; drop-in for SD3 pipelines)
    <dir>/flowsteer.json   {method, network, windows, teacher_steps, shift, fingerprint, sample_shape}
    <dir>/README.md        the model card (pipeline/model_card.py)
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


def network_dir(method_name: str) -> str:
    """Where the export keeps the network: `transformer/` for a drop-in SD3 student, else `flow_map/`."""
    return "transformer" if get_method(method_name).drop_in else "flow_map"


def export_student(directory, run, student_module, cfg,
                   sample_shape: tuple[int, ...] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the export into a temp dir and rename it into place, so `directory` is whole or absent.
    `run`: a schemas.config.TrainRun or a run name (its first seed); `student_module`: the network, or a
    pipeline.lora_export.LoraAdapter; `extra` joins the metadata."""
    directory = Path(directory)
    run = cfg.train_run(run) if isinstance(run, str) else run
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        _write_export(tmp, run, student_module, cfg, sample_shape, extra or {}, shown_path=str(directory))
    return directory


def _write_export(tmp: Path, run, student_module: torch.nn.Module, cfg, sample_shape, extra,
                  shown_path: str) -> None:
    from pipeline.diffusers_scheduler import FixedFlowMatchEulerScheduler
    from pipeline.model_card import write_model_card

    from pipeline.lora_export import LoraAdapter, write_lora

    if isinstance(student_module, LoraAdapter):
        extra = {**extra, **write_lora(tmp, student_module, cfg)}
        network = extra.pop("network")
    else:
        network = network_dir(run.method)
        get_method(run.method).save_student(student_module, tmp / network)
    FixedFlowMatchEulerScheduler(shift=cfg.schedule.shift).save_pretrained(str(tmp / "scheduler"))
    meta = {"method": run.method, "run": run.name, "train_seed": run.seed, "options": run.options,
            "network": network, "windows": cfg.schedule.windows, "teacher_steps": cfg.schedule.teacher_steps,
            "shift": cfg.schedule.shift, "fingerprint": cfg.fingerprint("train", run),
            "sample_shape": list(sample_shape) if sample_shape else None,
            # float32 weights whatever teacher.dtype / train.mixed_precision were (docs/precision.md)
            "dtype": "float32", "teacher_dtype": cfg.teacher.dtype, **extra}
    method = get_method(run.method)
    x0 = method.x0_source(cfg, run.options)
    if x0 is not None:                # what the method's x0 was; the report labels teacher-sample reflow
        meta["x0_source"] = x0
        if x0 == "teacher_samples":
            meta["label"] = "reflow on teacher samples"
    (tmp / META).write_text(json.dumps(meta, indent=1))
    write_model_card(tmp, cfg, run.method, meta, shown_path=shown_path)


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


def load_student(directory, device="cpu", base: torch.nn.Module | None = None) -> Student:
    """An export as a Student; a LoRA export is fused onto its base transformer (the teacher's directory it
    recorded, else a copy of `base`, e.g. the loaded teacher's transformer)."""
    from pipeline.lora_export import is_lora_export, load_lora_module
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    directory = Path(directory)
    if not (directory / META).is_file():
        raise UserError(f"{directory} is not an exported student (no {META}); run `flowsteer train` first")
    meta = json.loads((directory / META).read_text())
    method = get_method(meta["method"])
    if is_lora_export(meta):
        return Student(load_lora_module(directory, meta, device, base), method, meta)
    return Student(method.load_student(directory / meta.get("network", "transformer"), device), method, meta)
