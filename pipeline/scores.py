"""Score rows: their schema, unit keys, the mean +- spread summary, and the cell text every table uses.

The evaluate stage writes one Parquet file of rows per unit (checkpoint x schedule x NFE x evaluation seed);
the report, and an export's model card, read them back through here, so a number is formatted, warned about
and compared the same way everywhere. A row: (checkpoint, fingerprint, run, train_seed, schedule, nfe, metric,
value, n, seed, prompt_set, prompt_hash, step, ...); the teacher's rows have run "teacher", no train seed and
schedule "fixed"; `step` is the training step of a checkpoint scored while training (null for exports).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import atomic_write_parquet

if TYPE_CHECKING:          # pandas is imported where a summary is built: the CLI's config checks need none
    import pandas as pd

SCHEDULES = ("fixed", "diffusers")      # the student's own grid / diffusers' FlowMatchEulerDiscreteScheduler grid
WARN = "⚠"


@functools.lru_cache(maxsize=1)
def schema() -> pa.Schema:
    return pa.schema([("checkpoint", pa.string()), ("fingerprint", pa.string()), ("run", pa.string()),
                      ("train_seed", pa.int64()), ("schedule", pa.string()), ("nfe", pa.int64()),
                      ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64()), ("seed", pa.int64()),
                      ("guidance", pa.float64()), ("features", pa.string()), ("reference", pa.string()),
                      ("sampling_seconds", pa.float64()), ("scoring_seconds", pa.float64()), ("unit", pa.string()),
                      ("prompt_set", pa.string()), ("prompt_hash", pa.string()), ("step", pa.int64())])


def teacher_unit_key(teacher_fingerprint: str, nfe: int, seed: int) -> str:
    return f"teacher-{teacher_fingerprint}_nfe{nfe}_seed{seed}"


def student_unit_key(train_dir_name: str, schedule: str, nfe: int, seed: int) -> str:
    """`train_dir_name` (<name>-s<seed>-<fp>) names the student uniquely; the rest is the unit's sampling."""
    return f"{train_dir_name}_{schedule}_nfe{nfe}_seed{seed}"


def write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_parquet(path, pa.Table.from_pylist(rows, schema=schema()))


def gather(root: Path, jobs=("teacher", "students")) -> pa.Table:
    """Every unit's rows of the given jobs under an evaluate directory (<job>/scores/<unit>.parquet; "follow"
    holds the checkpoints scored while training); columns an older unit file lacks are null there."""
    tables = []
    for f in sorted(f for job in jobs for f in (Path(root) / job / "scores").glob("*.parquet")):
        t = pq.read_table(f)
        cols = [t[c] if c in t.column_names else pa.nulls(t.num_rows, schema().field(c).type)
                for c in schema().names]
        tables.append(pa.Table.from_arrays(cols, schema=schema()))
    return pa.concat_tables(tables) if tables else schema().empty_table()


# ---------------------------------------------------------------- summaries
def summarize(rows: pd.DataFrame, by=("run", "schedule", "nfe", "metric")) -> pd.DataFrame:
    """Mean and standard deviation over every (training seed, evaluation seed) value of each group, with the
    number of values, of training and evaluation seeds, and the smallest sample count behind a value."""
    import pandas as pd

    if not len(rows):
        return pd.DataFrame(columns=[*by, "mean", "std", "count", "train_seeds", "eval_seeds", "n", "features",
                                     "prompt_set"])
    g = rows.groupby(list(by), sort=False, dropna=False)
    out = g.agg(mean=("value", "mean"), std=("value", "std"), count=("value", "count"),
                train_seeds=("train_seed", "nunique"), eval_seeds=("seed", "nunique"), n=("n", "min"),
                features=("features", "first"), prompt_set=("prompt_set", "first")).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def separated(a, b) -> bool | None:
    """Whether two summarized values differ by more than their spread (|mean_a - mean_b| > std_a + std_b);
    None when either has a single value, so no spread to compare with."""
    if int(a["count"]) < 2 or int(b["count"]) < 2:
        return None
    return abs(float(a["mean"]) - float(b["mean"])) > float(a["std"]) + float(b["std"])


def too_few(metric: str, n: int, features: str | None) -> bool:
    """Fewer samples per value than the metric needs to mean anything (Metric.min_samples_for)."""
    from pipeline.metrics import METRICS, registered

    cls = registered().get(metric) or METRICS.get(metric)
    return cls is not None and int(n) < cls.min_samples_for(features)


def fmt_value(metric: str, value: float) -> str:
    from pipeline.metrics import registered

    cls = registered().get(metric)
    return cls.format(value) if cls is not None else f"{value:.4g}"


def cell(metric: str, r) -> str:
    """'mean ± std' (± only with several values) and a warning mark when the sample count is too small."""
    text = fmt_value(metric, r["mean"])
    if int(r["count"]) > 1:
        text += f" ± {fmt_value(metric, r['std'])}"
    if too_few(metric, r["n"], r.get("features")):
        text += f" {WARN} n={int(r['n'])}"
    return text


def unit_rows(cfg, p: dict, values: dict[str, float], n: int, sampling_seconds: float, scoring_seconds: float,
              unit: str) -> list[dict]:
    """One unit's rows: a row per metric value, with what was sampled (p: the unit's params) and how."""
    from pipeline.metrics.fid import reference_kind

    ev = cfg.evaluate
    return [{"checkpoint": p["checkpoint"], "fingerprint": p["fingerprint"], "run": p["run"],
             "train_seed": p.get("train_seed"), "schedule": p["schedule"], "nfe": p["nfe"], "metric": m,
             "value": float(v), "n": n, "seed": p["seed"],
             "guidance": ev.guidance if p["kind"] == "teacher" else float("nan"), "features": ev.features,
             "reference": reference_kind(cfg), "sampling_seconds": round(sampling_seconds, 3),
             "scoring_seconds": round(scoring_seconds, 3), "unit": unit, "prompt_set": p.get("prompt_set"),
             "prompt_hash": p.get("prompt_hash"), "step": p.get("step")} for m, v in values.items()]
