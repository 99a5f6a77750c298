"""The one owner of an exported student's directory: its layout, its metadata, its model card.

    <dir>/transformer/     the (EMA) student via Method.save_student (SD3: save_pretrained); `flow_map/`
                           instead when the method's student is not a drop-in (Method.drop_in); a LoRA
                           student of a drop-in method writes its adapter instead (pipeline/lora_export.py)
    <dir>/scheduler/       FixedFlowMatchEulerScheduler config (the fixed grid; drop-in for SD3 pipelines)
    <dir>/flowsteer.json   {method, run, options, network, windows, teacher_steps, shift, fingerprint, ...}
    <dir>/README.md        the model card (text from pipeline/model_card.py)

Who writes what, so data flows one way (docs/architecture.md): the train stage creates the whole directory
once (`export_student`: temp dir, then rename); the evaluate stage, which owns the scores, fills the card's
score section through `write_card_scores` and touches nothing else. Everyone else reads: `read_meta`,
`is_export`, and pipeline/student.py's `load_student`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.files import atomic_path, atomic_write_bytes
from pipeline.methods import get_method

EXPORT_DIR = "export"               # an export's place inside its training run's directory
META = "flowsteer.json"
CARD = "README.md"
SCHEDULER = "scheduler"
EMA_DISTANCE = "ema_rel_distance"   # flowsteer.json: the EMA's distance from the teacher / the raw weights'


def export_dir(cfg, run) -> Path:
    """Where the train stage exports training run `run` (a TrainRun or a run name)."""
    run = cfg.train_run(run) if isinstance(run, str) else run
    return cfg.train_dir(run) / EXPORT_DIR


def network_dir(method_name: str) -> str:
    """Where the export keeps the network: `transformer/` for a drop-in SD3 student, else `flow_map/`."""
    return "transformer" if get_method(method_name).drop_in else "flow_map"


def is_export(directory) -> bool:
    return (Path(directory) / META).is_file()


def read_meta(directory) -> dict[str, Any]:
    """The export's flowsteer.json; a UserError when `directory` is not an export."""
    directory = Path(directory)
    if not is_export(directory):
        raise UserError(f"{directory} is not an exported student (no {META}); run `flowsteer train` first")
    return json.loads((directory / META).read_text())


def meta_if_any(directory) -> dict[str, Any]:
    """The export's flowsteer.json, or {} where there is none or it cannot be read (for the report's labels)."""
    try:
        return json.loads((Path(directory) / META).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def missing_parts(directory) -> list[str]:
    """The parts of a finished export that are not on disk (empty: the export is whole)."""
    directory = Path(directory)
    meta = meta_if_any(directory)
    needed = (META, meta.get("network", "transformer"), SCHEDULER, CARD)
    return [p for p in needed if not (directory / p).exists()]


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


def export_meta(run, cfg, sample_shape, extra: dict[str, Any]) -> dict[str, Any]:
    """flowsteer.json's content for training run `run`."""
    meta = {"method": run.method, "run": run.name, "train_seed": run.seed, "options": run.options,
            "network": network_dir(run.method), "windows": cfg.schedule.windows,
            "teacher_steps": cfg.schedule.teacher_steps, "shift": cfg.schedule.shift,
            "fingerprint": cfg.fingerprint("train", run),
            "sample_shape": list(sample_shape) if sample_shape else None,
            # master weights are float32 whatever teacher.dtype / train.mixed_precision are (docs/precision.md)
            "dtype": "float32", "teacher_dtype": cfg.teacher.dtype, **extra}
    x0 = get_method(run.method).x0_source(cfg, run.options)
    if x0 is not None:                # what the method's x0 was; the report labels teacher-sample reflow
        meta["x0_source"] = x0
        if x0 == "teacher_samples":
            meta["label"] = "reflow on teacher samples"
    return meta


def _write_export(tmp: Path, run, student_module: torch.nn.Module, cfg, sample_shape, extra,
                  shown_path: str) -> None:
    from pipeline.diffusers_scheduler import FixedFlowMatchEulerScheduler

    from pipeline.lora_export import LoraAdapter, write_lora

    if isinstance(student_module, LoraAdapter):    # a LoRA student's adapter: a diffusers LoRA dir
        meta = export_meta(run, cfg, sample_shape, {**extra, **write_lora(tmp, student_module, cfg)})
    else:
        meta = export_meta(run, cfg, sample_shape, extra)
        get_method(run.method).save_student(student_module, tmp / meta["network"])
    FixedFlowMatchEulerScheduler(shift=cfg.schedule.shift).save_pretrained(str(tmp / SCHEDULER))
    (tmp / META).write_text(json.dumps(meta, indent=1))
    write_card(tmp, cfg, meta, shown_path=shown_path)


def write_card(directory, cfg, meta: dict[str, Any], scores_markdown: str | None = None,
               shown_path: str | None = None) -> Path:
    """Write `<directory>/README.md` atomically (the card of the export described by `meta`)."""
    from pipeline.model_card import render

    directory = Path(directory)
    method = meta["method"]
    text = render(cfg, method, meta, shown_path or str(directory), get_method(method).drop_in, scores_markdown)
    path = directory / CARD
    atomic_write_bytes(path, text.encode())
    return path


def write_card_scores(directory, cfg, scores_markdown: str | None) -> Path:
    """The card of an existing export, rewritten with its scores: the one write after the train stage, made
    by the stage that owns the scores (evaluate); the weights and flowsteer.json stay as train wrote them."""
    directory = Path(directory)
    return write_card(directory, cfg, read_meta(directory), scores_markdown)


# ---------------------------------------------------------------- a LoRA export fused: `flowsteer export --merge`
def merge_export(export_dir, cfg, base: torch.nn.Module | None = None) -> Path:
    """`flowsteer export --merge`: write `<export>/transformer/` with the adapter fused, then flowsteer.json
    (network: transformer, student.merged) and the model card; the adapter file stays."""
    from pipeline.lora_export import load_lora_module

    export_dir = Path(export_dir)
    meta_file = export_dir / META
    meta = read_meta(export_dir)
    if (meta.get("student") or {}).get("kind") != "lora":
        raise UserError(f"{export_dir} is not a LoRA export (its student is a full transformer already)")
    if meta["student"].get("merged"):
        return export_dir / "transformer"
    net = load_lora_module(export_dir, meta, "cpu", base)
    with atomic_path(export_dir / "transformer") as tmp:
        net.save_pretrained(str(tmp))
    meta = {**meta, "network": "transformer",
            "student": {**meta["student"], "merged": True, "merged_by": "flowsteer export --merge"}}
    atomic_write_bytes(meta_file, json.dumps(meta, indent=1).encode())
    write_card(export_dir, cfg, meta)
    return export_dir / "transformer"


def resolve_export(cfg, target: str) -> Path:
    """An export directory, or a run name of the config (its first seed's export)."""
    path = Path(target)
    if is_export(path) or path.is_dir():
        return path
    from schemas.config import ConfigError

    try:
        return export_dir(cfg, target)
    except (ConfigError, KeyError, ValueError):
        raise UserError(f"'{target}' is neither an export directory nor a run of this config") from None


def merge_cli(cfg, target: str) -> Path:
    """`flowsteer export TARGET --merge`: the base comes from the recorded teacher dir, else the config's teacher."""
    directory = resolve_export(cfg, target)
    base_dir = meta_if_any(directory).get("base")
    base = None
    if is_export(directory) and not (base_dir and (Path(base_dir) / "config.json").is_file()):
        from pipeline.teachers import load_teacher

        base = load_teacher(cfg, "cpu").transformer
    return merge_export(directory, cfg, base)
