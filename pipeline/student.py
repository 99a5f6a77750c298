"""A loaded exported student (the directory pipeline/export.py writes): its network and its method's sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.export import read_meta
from pipeline.methods import get_method


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
    from pathlib import Path

    from pipeline.lora_export import is_lora_export, load_lora_module
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    directory = Path(directory)
    meta = read_meta(directory)
    method = get_method(meta["method"])
    if is_lora_export(meta):
        return Student(load_lora_module(directory, meta, device, base), method, meta)
    return Student(method.load_student(directory / meta.get("network", "transformer"), device), method, meta)
