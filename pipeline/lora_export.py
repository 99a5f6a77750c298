"""A LoRA student's export format: a diffusers LoRA directory on the teacher (pipeline/export.py writes the
directory and merges it: `flowsteer export --merge`).

    <dir>/pytorch_lora_weights.safetensors   the EMA adapter (keys `transformer.*`, peft names) with its
                                             LoraConfig in the file's metadata, as
                                             StableDiffusion3Pipeline.save_lora_weights writes it; so
                                             `pipe.load_lora_weights(<dir>)` on the teacher's pipeline loads it
    <dir>/transformer/                       after `flowsteer export --merge`: the adapter fused into the base
                                             weights (W + (alpha / r) B A), a plain SD3Transformer2DModel

flowsteer.json records `student: {kind: lora, rank, alpha, merged}` and `base`, the teacher's transformer
directory the adapter belongs to (None for a byo teacher: the loader is then given the base module).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class LoraAdapter:
    """What a LoRA export saves: peft's adapter state dict and its LoraConfig as a dict."""
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]


def ema_adapter(trainer) -> LoraAdapter:
    """A LoRA trainer's EMA adapter as diffusers saves it."""
    from pipeline.lora import adapter_metadata, adapter_state_dict

    return LoraAdapter(adapter_state_dict(trainer.student, trainer.ema.shadow), adapter_metadata(trainer.student))


def base_transformer_dir(cfg) -> str | None:
    """The teacher's transformer directory on disk (sd3: <path>/transformer, embedded: the teacher stage's)."""
    if cfg.teacher.kind == "sd3":
        return str((Path(cfg.teacher.path) / "transformer").resolve())
    if cfg.teacher.kind == "embedded":
        return str((cfg.stage_dir("teacher") / "transformer").resolve())
    return None


def write_lora(tmp: Path, adapter: LoraAdapter, cfg) -> dict[str, Any]:
    """Save the adapter into the export's temp dir; returns the flowsteer.json entries it adds."""
    from diffusers import StableDiffusion3Pipeline

    metadata = json.loads(json.dumps(adapter.metadata, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    StableDiffusion3Pipeline.save_lora_weights(str(tmp), transformer_lora_layers=adapter.state,
                                               transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS)
    return {"network": LORA_WEIGHTS, "base": base_transformer_dir(cfg), "student": student_meta(cfg, merged=False)}


def student_meta(cfg, merged: bool) -> dict[str, Any]:
    """flowsteer.json's `student` entry: how the student was trained (and whether the export is fused)."""
    spec = cfg.train.student
    if spec.kind == "full":
        return {"kind": "full"}
    return {"kind": "lora", "rank": spec.rank, "alpha": spec.alpha or spec.rank,
            "target_modules": list(spec.target_modules), "merged": merged}


def is_lora_export(meta: dict[str, Any]) -> bool:
    return (meta.get("student") or {}).get("kind") == "lora" and meta.get("network") == LORA_WEIGHTS


def load_lora_module(directory: Path, meta: dict[str, Any], device, base: torch.nn.Module | None = None):
    """The base transformer with the export's adapter fused in: the base from `meta['base']` on disk, else a
    float32 copy of `base` (e.g. the loaded teacher's transformer)."""
    from diffusers import SD3Transformer2DModel

    base_dir = meta.get("base")
    if base_dir and (Path(base_dir) / "config.json").is_file():
        net = SD3Transformer2DModel.from_pretrained(base_dir)
    elif base is not None:
        net = copy.deepcopy(base)
        from pipeline.lora import tuner_layers
        if tuner_layers(net):             # a training teacher's transformer still carrying a student's adapters
            net.unload_lora()
    else:
        raise UserError(f"{directory} is a LoRA export and its base transformer ({base_dir or 'a byo teacher'}) "
                        f"is not on disk; load it with the teacher's transformer as `base`")
    net = net.float()
    net.load_lora_adapter(str(directory), prefix="transformer", weight_name=LORA_WEIGHTS)
    net.fuse_lora(lora_scale=1.0)
    net.unload_lora()
    return net.to(device).eval().requires_grad_(False)


def card_lines(cfg, meta: dict[str, Any], export_dir: str, no_t5: str = "") -> str | None:
    """The model card's load lines for an unmerged LoRA export of a drop-in student (None otherwise)."""
    if not is_lora_export(meta):
        return None
    n = meta["windows"]
    sigmas = ", ".join(f"{1 - i / n:g}" for i in range(n))
    where = f"\"{cfg.teacher.path}\"" if cfg.teacher.kind == "sd3" else "<the teacher's diffusers pipeline dir>"
    return ("A diffusers LoRA directory for the teacher's transformer: load it on the teacher's pipeline (the "
            "`sigmas` are the fixed grid before the shift the pipeline's scheduler applies):\n\n"
            "```python\n"
            "from diffusers import StableDiffusion3Pipeline\n"
            f"pipe = StableDiffusion3Pipeline.from_pretrained({where}{no_t5})\n"
            f"pipe.load_lora_weights(\"{export_dir}\")\n"
            f"image = pipe(\"a photo of a cat\", num_inference_steps={n}, sigmas=[{sigmas}], "
            "guidance_scale=1.0).images[0]\n"
            "```\n\n"
            f"`flowsteer export {export_dir} --merge` writes `transformer/` with the adapter fused "
            "(a full SD3Transformer2DModel), or from flowsteer: `pipeline.student.load_student(dir)`.\n")


def student_line(meta: dict[str, Any]) -> str:
    """The card's one line on what was trained."""
    st = meta.get("student") or {}
    if st.get("kind") != "lora":
        return "full fine-tune of the teacher's transformer (float32 weights)"
    what = f"LoRA adapter (rank {st['rank']}, alpha {st['alpha']:g}) on the teacher's frozen transformer"
    if meta.get("network") == LORA_WEIGHTS:
        return what + f"; this directory is a diffusers LoRA dir (`{LORA_WEIGHTS}`)"
    if st.get("merged_by"):
        return what + f"; `transformer/` holds it fused into full weights (`flowsteer export --merge`; the " \
                      f"adapter alone stays in `{LORA_WEIGHTS}`)"
    return what + f"; fused into full weights under `{meta.get('network')}/` (the method's student is not a drop-in)"
