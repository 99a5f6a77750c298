"""Report stage: renders the ablation table, plots and grids from a (synthetic) scores table."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.runner import run_job
from schemas.config import load_config

METHODS = ["perflow", "ota", "flowsteer"]
PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic_scores(cfg, seeds=(0, 1)) -> pa.Table:
    """Rows as the evaluate stage writes them: teacher at teacher_nfe, each method at each NFE, two seeds."""
    rng = np.random.default_rng(0)
    rows = []
    ckpts = [("teacher", cfg.fingerprint("teacher"), cfg.evaluate.teacher_nfe)]
    ckpts += [(m, cfg.fingerprint("train", cfg.train_run(m)), n) for m in METHODS for n in cfg.evaluate.nfes]
    for c, fp, nfe in ckpts:
        for seed in seeds:
            metrics = {"fid": 40 / nfe + rng.uniform(0, 1), "prompt_accuracy": 0.5 + 0.05 * np.log2(nfe)}
            if c != "teacher":
                metrics["fidelity_mse"] = 0.1 / nfe
            rows += [{"checkpoint": c, "fingerprint": fp, "nfe": nfe, "metric": k, "value": float(v), "n": 100,
                      "seed": seed, "guidance": 4.0 if c == "teacher" else float("nan"), "features": "classifier",
                      "reference": "digits", "sampling_seconds": 0.1 * nfe, "scoring_seconds": 0.2,
                      "unit": f"{c}-{fp}_nfe{nfe}_seed{seed}"} for k, v in metrics.items()]
    # a stale checkpoint (another training config) must not appear in the report
    rows.append({**rows[-1], "fingerprint": "stale0000000", "value": 999.0, "unit": "stale"})
    return pa.Table.from_pylist(rows)


def _write_scores(cfg, table: pa.Table) -> None:
    root = cfg.stage_dir("evaluate")
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "scores.parquet")
    # grid pixels as evaluate saves them (uint8 [N, H, W, C]) for the teacher and two of the methods
    grids = root / "grids"
    grids.mkdir(exist_ok=True)
    ev = cfg.evaluate
    names = [f"teacher-{cfg.fingerprint('teacher')}_nfe{ev.teacher_nfe}_seed0"]
    names += [f"{m}-{cfg.fingerprint('train', cfg.train_run(m))}_nfe{n}_seed0" for m in METHODS[:2] for n in ev.nfes]
    for i, name in enumerate(names):
        images = np.random.default_rng(i).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, images=images, nrow=3)
        (grids / f"{name}.npz").write_bytes(buf.getvalue())


def _report(cfg, methods=None):
    from stages import report

    status = [run_job(job, "local", progress=False) for job in report.jobs(cfg, methods=methods)]
    return status, report.after(cfg, methods=methods)


def test_report_renders_table_plots_and_grids(make_toy_config):
    cfg = load_config(make_toy_config(evaluate={"seeds": [0, 1], "nfes": [1, 2, 4]}))
    _write_scores(cfg, _synthetic_scores(cfg))
    status, msg = _report(cfg, METHODS)
    out = cfg.root + "/report"
    assert msg.startswith("report: ") and f"{out}/report.md" in msg
    md = open(f"{out}/report.md").read()
    # the ablation table: methods x NFE for each metric, mean ± std over the two seeds
    assert "| method | 1 NFE | 2 NFE | 4 NFE |" in md
    for title in ("### FID (lower is better)", "### Prompt accuracy (higher is better)",
                  "### Trajectory fidelity (MSE) (lower is better)"):
        assert title in md
    fid_table = md.split("### FID (lower is better)")[1].split("###")[0]
    rows = {line.split("|")[1].strip(): line for line in fid_table.splitlines() if line.startswith("| ")}
    assert set(METHODS) <= set(rows) and " ± " in rows["ota"]
    assert "Teacher, 8 steps with CFG 4 (16 network passes): **" in fid_table and fid_table.count("±") == 3 * 3 + 1
    assert "999" not in md                                   # the stale checkpoint is left out
    # best student per NFE in bold: the synthetic FIDs differ per method through the seeded noise
    assert fid_table.split("Teacher")[0].count("**") == 2 * 3
    acc_table = md.split("### Prompt accuracy (higher is better)")[1].split("Teacher")[0]
    assert "**" not in acc_table                             # tied students: nobody is bold
    for png in ("plots/metrics.png", "grids/nfe1.png", "grids/nfe4.png"):
        assert open(f"{out}/{png}", "rb").read(8) == PNG
    assert "![metrics vs NFE](plots/metrics.png)" in md and "![samples at 2 NFE](grids/nfe2.png)" in md
    html = open(f"{out}/report.html").read()
    assert "<table>" in html and '<img src="plots/metrics.png"' in html

    # a rerun rewrites the report from the current scores
    _write_scores(cfg, _synthetic_scores(cfg, seeds=(0,)))
    status, _ = _report(cfg, METHODS)
    assert status[0]["skipped"] == 0
    assert " ± " not in open(f"{out}/report.md").read().split("## Metric vs NFE")[0]


def test_report_notes_methods_not_evaluated_and_needs_scores(make_toy_config):
    from stages import report

    cfg = load_config(make_toy_config(evaluate={"nfes": [1, 2, 4]}))
    with pytest.raises(UserError, match="flowsteer evaluate"):
        report.jobs(cfg)
    _write_scores(cfg, _synthetic_scores(cfg))
    _report(cfg, METHODS + ["scflow"])
    md = open(cfg.root + "/report/report.md").read()
    assert "Not evaluated yet: scflow" in md
