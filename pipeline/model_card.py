"""The exported student's model card: `export/README.md` with Hugging Face front matter.

Only the text: pipeline/export.py writes it, with the export (method, teacher, schedule, NFE, training
config, how to load it) and again with the student's scores (`export.write_card_scores`, called by the
evaluate stage), so a shared export says what it is and how well it does. The load lines are plain diffusers where the student is a
drop-in (`Method.drop_in`); otherwise the card says so and gives flowsteer's loader.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.methods import get_method
from pipeline.schedule import fixed_sigmas

def hub_id(path: str | None) -> str | None:
    """A Hugging Face repo id when a local teacher dir is a hub cache snapshot (models--org--name/...)."""
    for part in Path(path or "").parts:
        m = re.fullmatch(r"models--([\w.-]+)--([\w.-]+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def teacher_description(cfg) -> str:
    t = cfg.teacher
    if t.kind == "sd3":
        return f"Stable Diffusion 3 pipeline at `{t.path}`" + (f" ({hub_id(t.path)})" if hub_id(t.path) else "")
    if t.kind == "byo":
        return f"a flow-matching teacher built by `{t.factory}`"
    if t.kind == "exact":
        x = t.exact
        return (f"flowsteer's exact benchmark teacher: a Gaussian mixture ({x.classes} classes x {x.modes_per_class} "
                f"modes, {x.channels}x{x.sample_size}x{x.sample_size} latents) with a closed-form velocity; the "
                f"student started from an SD3Transformer2DModel ({x.num_layers} layers) pretrained on that field")
    e = t.embedded
    return (f"flowsteer's embedded teacher: an SD3Transformer2DModel ({e.num_layers} layers, "
            f"{e.num_attention_heads}x{e.attention_head_dim}) trained on MNIST digits, MiniLM prompt encoder")


def card_title(cfg, method: str, meta: dict[str, Any]) -> str:
    """E.g. "SD3 (sd3-medium) in 4 steps: flowsteer-adv, method flowsteer": what was distilled, into how many
    steps, by which run and method."""
    t = cfg.teacher
    teacher = {"sd3": "SD3" + (f" ({Path(t.path).name})" if t.path else ""), "byo": "Flow-matching teacher",
               "embedded": "Embedded MNIST teacher"}[t.kind]
    run = meta.get("run", method)
    return (f"{teacher} in {cfg.schedule.windows} steps: {run}"
            + (f", method {method}" if run != method else "") + " (flowsteer distillation)")


def _uses_t5(cfg) -> bool:
    """Whether the teacher ran with T5 (SD3 dir that has it, `use_t5` not off): the student expects the same."""
    from pipeline.teachers.sd3 import _has_t5

    path = Path(cfg.teacher.path or "")
    return bool(cfg.teacher.kwargs.get("use_t5", True)) and (path / "model_index.json").is_file() and _has_t5(path)


def front_matter(cfg, method: str) -> dict[str, Any]:
    tags = ["flowsteer", "text-to-image", "flow-matching", "distillation", "few-step", method]
    if cfg.teacher.kind == "sd3":
        tags += ["sd3", "stable-diffusion-3"]
    tags = list(dict.fromkeys(tags))          # the method "flowsteer" is also the library's tag: once
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    base = hub_id(cfg.teacher.path) if cfg.teacher.kind == "sd3" else None
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    return meta


def load_lines(cfg, meta: dict[str, Any], export_dir: str, drop_in: bool) -> str:
    """The python that loads this export: plain diffusers for a drop-in SD3 student, flowsteer otherwise."""
    from pipeline.lora_export import card_lines

    lora = card_lines(cfg, meta, export_dir, "" if cfg.teacher.kind != "sd3" or _uses_t5(cfg)
                      else ", text_encoder_3=None, tokenizer_3=None")
    if lora is not None:
        return lora
    n = meta["windows"]
    sigmas = ", ".join(f"{1 - i / n:g}" for i in range(n))     # linspace(1, 1/N, N): the scheduler shifts it
    if drop_in and cfg.teacher.kind == "sd3":
        no_t5 = "" if _uses_t5(cfg) else "text_encoder_3=None, tokenizer_3=None, "   # as the teacher was run
        return (
            "In plain diffusers (the teacher pipeline with this transformer; the `sigmas` are the fixed grid "
            f"before the shift the pipeline's scheduler applies: {n} steps ending exactly at 0):\n\n"
            "```python\n"
            "from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline\n"
            f"pipe = StableDiffusion3Pipeline.from_pretrained(\"{cfg.teacher.path}\", {no_t5}transformer="
            f"SD3Transformer2DModel.from_pretrained(\"{export_dir}/transformer\"))\n"
            f"image = pipe(\"a photo of a cat\", num_inference_steps={n}, sigmas=[{sigmas}], "
            "guidance_scale=1.0).images[0]\n"
            "```\n\n"
            "The student needs no CFG (`guidance_scale=1.0`). `scheduler/` holds the same grid as a scheduler "
            "(`pipeline.diffusers_scheduler.FixedFlowMatchEulerScheduler`, part of flowsteer).\n")
    why = ("This student is **not a drop-in** for `StableDiffusion3Pipeline`: it is a flow map with an embedding "
           "of the step size t - s that the pipeline never passes, so the network is stored under `flow_map/` "
           "(not `transformer/`) and a plain-diffusers load fails instead of silently sampling something else. "
           if not drop_in else
           "The transformer is a plain `SD3Transformer2DModel`, but the teacher's prompt encoder and decoder "
           "are flowsteer's, not a diffusers pipeline, so sample it through flowsteer. ")
    return (why + "With flowsteer installed:\n\n"
            "```python\n"
            "from pipeline.student import load_student\n"
            f"student = load_student(\"{export_dir}\")            # .module, .sample(noise, cond, nfe)\n"
            "```\n\n"
            f"or from the command line: `flowsteer sample {export_dir} -p \"a prompt\" -n {n}` "
            "(with the run's config for the teacher's encoder).\n")


def render(cfg, method: str, meta: dict[str, Any], export_dir: str, drop_in: bool,
           scores_markdown: str | None = None) -> str:
    from pipeline.lora_export import student_line

    fm = yaml.safe_dump(front_matter(cfg, method), sort_keys=False).strip()
    sched = cfg.schedule
    train = cfg.train.model_dump(mode="json", exclude={"methods", "variants", "method_options", "store", "seeds"})
    options = meta.get("options", cfg.train.method_options.get(method, {}))     # this run's (a variant's) options
    run = {"name": meta.get("run", method), "method": method, "seed": meta.get("train_seed"), "options": options}
    training = yaml.safe_dump({"run": run, "train": train}, sort_keys=False).strip()
    scores = (scores_markdown.strip() + "\n" if scores_markdown else
              "No scores yet: this card was written at export, before `flowsteer evaluate` scored the student.\n")
    edges = ", ".join(f"{float(s):.4g}" for s in fixed_sigmas(sched.windows, sched.shift))
    return f"""---
{fm}
---

# {card_title(cfg, method, meta)}

{get_method(method).description}

- **Teacher**: {teacher_description(cfg)}.
- **Student**: {student_line(meta)}.
- **Schedule**: the fixed FlowMatchEuler grid sigma_i = shift(1 - i/N), i = 0..N, shift {sched.shift:g}, ending
  exactly at sigma = 0: {sched.windows} windows with edges `{edges}`, on the {sched.teacher_steps}-step teacher grid.
- **Steps (NFE)**: {sched.windows} recommended (one per window); 1, 2 and multiples of {sched.windows} also lie on the
  grid. Guidance-free: one network call per step.
- **Fingerprint**: `{meta.get('fingerprint', '')}` (flowsteer's key of the config that made it).

## How to load

{load_lines(cfg, meta, export_dir, drop_in)}
## Scores

{scores}
## Training config

```yaml
{training}
```
"""
