"""The evaluate stage's two student grids on the toy teacher: its own weights exported as a 'perflow' student,
sampled on the fixed grid and on diffusers' FlowMatchEulerDiscreteScheduler grid, scored against the
teacher's 8-step outputs (guidance 1, so the fixed 8-step grid retraces the teacher exactly).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/evaluate_grids.py
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from pipeline.runner import run_job, write_record
from pipeline.export import export_student
from pipeline.teachers.toy import make_toy_transformer
from schemas.config import load_config
from stages import evaluate, report

root = Path(tempfile.mkdtemp(prefix="evaluate_grids_"))
(root / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
(root / "run.yaml").write_text(yaml.safe_dump({
    "root": str(root / "runs"), "device": "cpu",
    "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher"},
    "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
    "generate": {"prompts": str(root / "prompts.txt")},
    "train": {"methods": ["perflow"]},
    "evaluate": {"n_samples": 512, "nfes": [1, 2, 4, 8], "teacher_nfe": 8, "guidance": 1.0, "features": "pixels",
                 "batch_size": 256, "seeds": [0, 1], "schedules": ["fixed", "diffusers"]}}))
cfg = load_config(root / "run.yaml")
run = cfg.train_runs(["perflow"])[0]
export_student(cfg.train_dir(run) / "export", run, make_toy_transformer(seed=0), cfg, sample_shape=(1, 8, 8))
write_record(cfg.train_dir(run), "export", "done")
t0 = time.time()
for job in evaluate.jobs(cfg, ["perflow"]):
    run_job(job, "local", progress=False)
evaluate.after(cfg, ["perflow"])
t1 = time.time()
for job in report.jobs(cfg, ["perflow"]):
    run_job(job, "local", progress=False)
t2 = time.time()
scores = pd.read_parquet(cfg.stage_dir("evaluate") / "scores.parquet")
fid = scores[(scores.run == "perflow") & (scores.metric == "fidelity_mse")]
print(fid.groupby(["nfe", "schedule"])["value"].mean().unstack().to_string(float_format=lambda v: f"{v:.3g}"))
print(f"evaluate {t1 - t0:.1f} s (2 teacher + 16 student units of 512 samples), report {t2 - t1:.1f} s; {root}")
