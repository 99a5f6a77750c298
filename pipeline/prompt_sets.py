"""The prompts evaluation samples from: a held-out set (`evaluate.prompts`, any format `generate.prompts` reads,
pipeline/datasets.py) or, by default, the generate prompts, which the report labels as such (scores on the
prompts a student was distilled on say little about prompts it never saw).

The driver checks and hashes a held-out column when planning, and copies it into `<evaluate dir>/prompts.parquet`
before the jobs run; workers read back only the rows they sample (TextColumn), and encode them themselves. The set's
name and hash travel in every unit's params, score row and record, so a unit scored on other prompts is redone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COPY = "prompts.parquet"


@dataclass(frozen=True)
class PromptSet:
    name: str          # "<file stem>" for evaluate.prompts; "generate prompts (...)" for the default
    hash: str          # sha256 of the rows joined by newlines, 16 hex digits
    count: int         # rows
    held_out: bool     # from evaluate.prompts (not the prompts the students were distilled on)


def copy_path(cfg) -> Path:
    return cfg.stage_dir("evaluate") / COPY


def prompt_set(cfg) -> PromptSet:
    """Driver side, when planning (also for `flowsteer status`: nothing is written): check and hash
    `evaluate.prompts`, or describe the generate prompts."""
    ev = cfg.evaluate
    if ev.prompts is None:
        from pipeline.datasets import prompt_summary

        count, digest = prompt_summary(cfg)
        source = Path(cfg.generate.prompts).name if cfg.generate.prompts else "digit prompts"
        return PromptSet(f"generate prompts ({source})", digest, count, held_out=False)
    from pipeline.datasets import rows_hash
    from pipeline.errors import UserError

    count, digest = rows_hash(_batches(cfg))
    if count == 0:
        raise UserError(f"evaluate.prompts {ev.prompts} has no rows (empty file)")
    return PromptSet(_stem(ev.prompts), digest, count, held_out=True)


def write_copy(cfg) -> None:
    """Driver side, before the evaluate jobs run: the checked column of evaluate.prompts for the workers."""
    from pipeline.datasets import copy_text_column

    ev = cfg.evaluate
    if ev.prompts is not None:
        copy_text_column(Path(ev.prompts).expanduser(), copy_path(cfg), ev.prompt_column, "evaluate.prompts",
                         "evaluate.prompt_column")


def _batches(cfg):
    from pipeline.datasets import text_batches

    ev = cfg.evaluate
    return text_batches(Path(ev.prompts).expanduser(), ev.prompt_column, "evaluate.prompts", "evaluate.prompt_column")


def _stem(path: str) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def eval_prompts(cfg):
    """Worker side: the rows to sample from (len, [i]): the driver's copy of evaluate.prompts (read back by
    row group), else the generate prompts."""
    if cfg.evaluate.prompts is None:
        from pipeline.datasets import generate_prompts

        return generate_prompts(cfg)
    from pipeline.datasets import TextColumn

    copy = copy_path(cfg)
    return TextColumn(copy) if copy.is_file() else [p for batch in _batches(cfg) for p in batch]
