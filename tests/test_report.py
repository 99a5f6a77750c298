"""Report stage: the ladder, per-metric tables, plots and grids from a (synthetic) scores table and run files."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline import scores as sc
from pipeline.runner import run_job
from schemas.config import load_config

METHODS = ["perflow", "ota", "flowsteer"]
PNG = b"\x89PNG\r\n\x1a\n"
# FID per (run, schedule) at 1 NFE: perflow -> ota is far beyond the seed spread, ota -> flowsteer within it
BASE_FID = {("perflow", "diffusers"): 50.0, ("perflow", "fixed"): 30.0, ("ota", "fixed"): 20.0,
            ("flowsteer", "fixed"): 19.8, ("ota", "diffusers"): 45.0, ("flowsteer", "diffusers"): 44.0}


def _row(cfg, run, train_seed, schedule, nfe, seed, metric, value, fp, n=1000):
    checkpoint = run if run == "teacher" or len(cfg.train.seeds) == 1 else f"{run}/s{train_seed}"
    return {"checkpoint": checkpoint, "fingerprint": fp, "run": run, "train_seed": train_seed, "schedule": schedule,
            "nfe": nfe, "metric": metric, "value": float(value), "n": n, "seed": seed,
            "guidance": 4.0 if run == "teacher" else float("nan"), "features": "classifier", "reference": "digits",
            "sampling_seconds": 0.1 * nfe, "scoring_seconds": 0.2, "unit": f"{checkpoint}_{schedule}_{nfe}_{seed}"}


def _synthetic_scores(cfg, n=1000) -> pa.Table:
    """Rows as evaluate writes them: the teacher, and each run x training seed x schedule x NFE x eval seed."""
    rng = np.random.default_rng(0)
    ev = cfg.evaluate
    rows = []
    for seed in ev.seeds:
        for metric, v in (("fid", 12.0 + rng.uniform(-1, 1)), ("prompt_accuracy", 0.9)):
            rows.append(_row(cfg, "teacher", None, "fixed", ev.teacher_nfe, seed, metric, v,
                             cfg.fingerprint("teacher"), n))
    for run in cfg.train_runs(METHODS):
        fp = cfg.fingerprint("train", run)
        for schedule in ev.schedules:
            for nfe in ev.nfes:
                for seed in ev.seeds:
                    fid = BASE_FID[run.name, schedule] / nfe + rng.uniform(-1, 1)
                    for metric, v in (("fid", fid), ("prompt_accuracy", 0.5 + 0.05 * np.log2(nfe)),
                                      ("fidelity_mse", 0.1 / nfe)):
                        rows.append(_row(cfg, run.name, run.seed, schedule, nfe, seed, metric, v, fp, n))
    rows.append({**rows[-1], "fingerprint": "stale0000000", "value": 999.0, "unit": "stale"})   # another config
    return pa.Table.from_pylist(rows, schema=sc.schema())


def _write_scores(cfg, table: pa.Table) -> None:
    root = cfg.stage_dir("evaluate")
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "scores.parquet")
    # grid pixels as evaluate saves them (uint8 [N, H, W, C]) for the teacher and two of the runs
    grids = root / "grids"
    grids.mkdir(exist_ok=True)
    ev = cfg.evaluate
    names = [sc.teacher_unit_key(cfg.fingerprint("teacher"), ev.teacher_nfe, 0)]
    names += [sc.student_unit_key(cfg.train_dir(r).name, "fixed", n, 0)
              for r in cfg.train_runs(METHODS[:2]) if r.seed == cfg.train.seeds[0] for n in ev.nfes]
    for i, name in enumerate(names):
        images = np.random.default_rng(i).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, images=images, nrow=3)
        (grids / f"{name}.npz").write_bytes(buf.getvalue())


def _write_run_files(cfg) -> None:
    """What train leaves: flowsteer's losses.jsonl with discriminator accuracies and export metadata."""
    for run in cfg.train_runs(METHODS):
        d = cfg.train_dir(run)
        (d / "export").mkdir(parents=True, exist_ok=True)
        meta = {"method": run.method, "ema_rel_distance": 0.95 - 0.02 * run.seed}
        if run.name == "ota":
            meta["x0_source"] = "teacher_samples"
        (d / "export" / "flowsteer.json").write_text(json.dumps(meta))
        if run.name == "flowsteer":
            real, fake = (0.9, 0.8) if run.seed == 0 else (0.7, 0.6)
            # 8 logged lines: the report averages the last quarter (steps 70, 80), not one noisy last step
            lines = [json.dumps({"step": 10 * i, "loss": 1.0, "d_loss": 2.0, "d_acc_real": 0.5, "d_acc_fake": 0.5,
                                 "d_acc_pair": 0.5}) for i in range(1, 7)]
            lines += [json.dumps({"step": 70, "loss": 0.9, "d_loss": 1.5 + 0.2 * run.seed, "d_acc_real": real,
                                  "d_acc_fake": fake, "d_acc_pair": 1.0}),
                      json.dumps({"step": 80, "loss": 0.9, "d_loss": 1.7 + 0.2 * run.seed, "d_acc_real": real,
                                  "d_acc_fake": fake, "d_acc_pair": 0.8}), '{"step": 3']
            (d / "losses.jsonl").write_text("\n".join(lines))


def _report(cfg, methods=None):
    from stages import report

    status = [run_job(job, "local", progress=False) for job in report.jobs(cfg, methods=methods)]
    return status, report.after(cfg, methods=methods)


def _table(md: str, heading: str) -> dict[str, str]:
    section = md.split(heading)[1].split("\n#")[0]
    return {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}


@pytest.fixture
def two_seed_cfg(make_toy_config):
    return load_config(make_toy_config(train={"seeds": [0, 1]}, evaluate={
        "seeds": [0, 1], "nfes": [1, 2, 4, 8], "schedules": ["fixed", "diffusers"]}))


def test_report_opens_with_the_ladder_and_marks_only_steps_beyond_the_spread(two_seed_cfg):
    cfg = two_seed_cfg
    _write_scores(cfg, _synthetic_scores(cfg))
    _write_run_files(cfg)
    _report(cfg, METHODS)
    md = open(cfg.root + "/report/report.md").read()
    assert md.split("\n## ")[1].startswith("Ablation ladder: FID (lower is better)")
    ladder = md.split("## Ablation ladder")[1].split("\n## ")[0]
    assert ("| ladder step | 1 NFE | 2 NFE | 4 NFE | D loss | D acc real / fake | D acc pairs |"
            in ladder)                                                                    # 8 NFE is not a column
    steps = [line.split("|")[1].strip() for line in ladder.splitlines() if line.startswith("| ") and "NFE" not in line]
    assert steps == ["perflow, sampled on diffusers' default grid", "perflow", "ota, reflow on teacher samples",
                     "flowsteer"]
    rows = _table(md, "## Ablation ladder")
    one_nfe = {k: v.split("|")[2] for k, v in rows.items()}
    assert " ± " in one_nfe["perflow"] and one_nfe["perflow"].strip().endswith("↓")      # 50 -> 30
    assert one_nfe["ota, reflow on teacher samples"].strip().endswith("↓")              # 30 -> 20
    assert not one_nfe["flowsteer"].strip().endswith(("↓", "↑"))                        # 20 -> 19.8: in the spread
    d_cells = [c.strip() for c in rows["flowsteer"].split("|")[-4:-1]]
    assert d_cells == ["1.70", "0.80 / 0.70", "0.90"]          # last quarter of the log, then the mean of seeds
    assert [c.strip() for c in rows["perflow"].split("|")[-4:-1]] == ["–", "–", "–"]
    assert "Mean ± standard deviation over 2 training seeds × 2 evaluation seeds." in ladder
    assert "EMA vs raw weights" in ladder and "perflow 0.94 · ota 0.94 · flowsteer 0.94" in ladder
    assert "Teacher, 8 steps with CFG 4 (16 network passes): **" in ladder
    assert "999" not in md and "⚠" not in md                                              # stale row out; n = 1000


def test_report_renders_tables_plots_and_grids(two_seed_cfg):
    cfg = two_seed_cfg
    _write_scores(cfg, _synthetic_scores(cfg))
    status, msg = _report(cfg, METHODS)
    out = cfg.root + "/report"
    assert msg.startswith("report: ") and f"{out}/report.md" in msg
    md = open(f"{out}/report.md").read()
    for title in ("### FID (lower is better)", "### Prompt accuracy (higher is better)",
                  "### Trajectory fidelity, mean MSE (lower is better)"):
        assert title in md
    assert "| FID | lower | Frechet distance" in md
    assert "| the generate prompts | 1000 | the `evaluate.features` space" in md      # prompt set, samples, needs
    assert "the prompts the students were distilled on, not held out" in md
    fid = _table(md, "### FID (lower is better)")
    assert set(fid) == {"run", *METHODS, *(f"{m} · diffusers' default grid" for m in METHODS)}
    assert fid["ota"].count(" ± ") == 4 + 1                  # 4 NFEs, and the teacher's value beside them
    assert fid["ota"].split("|")[-2] == fid["flowsteer"].split("|")[-2]
    # bold only where the best is ahead of the runner-up by more than the spread: at 1 NFE flowsteer (19.8)
    # and ota (20.0) are within it, so nobody; at 8 NFE (2.5 vs 2.475 +- noise) neither
    fid_text = md.split("### FID (lower is better)")[1].split("Teacher")[0]
    assert "**" not in fid_text
    acc = md.split("### Prompt accuracy (higher is better)")[1].split("Teacher")[0]
    assert "**" not in acc                                   # tied students: nobody is bold
    for png in ("plots/metrics.png", "grids/nfe1.png", "grids/nfe4.png"):
        assert open(f"{out}/{png}", "rb").read(8) == PNG
    assert "![metrics vs NFE](plots/metrics.png)" in md and "![samples at 2 NFE](grids/nfe2.png)" in md
    html = open(f"{out}/report.html").read()
    assert "<table>" in html and '<img src="plots/metrics.png"' in html


def test_bold_marks_a_best_beyond_the_spread(make_toy_config):
    cfg = load_config(make_toy_config(evaluate={"seeds": [0, 1], "nfes": [1]}))
    fp = {r.name: cfg.fingerprint("train", r) for r in cfg.train_runs(METHODS)}
    rows = [_row(cfg, m, 0, "fixed", 1, s, "fid", v + s * 0.1, fp[m])
            for m, v in (("perflow", 30), ("ota", 20), ("flowsteer", 25)) for s in (0, 1)]
    _write_scores(cfg, pa.Table.from_pylist(rows, schema=sc.schema()))
    _report(cfg, METHODS)
    fid = _table(open(cfg.root + "/report/report.md").read(), "### FID (lower is better)")
    assert "**20.05 ± 0.07**" in fid["ota"] and "**" not in fid["perflow"] + fid["flowsteer"]


def test_small_samples_warn_and_one_seed_claims_nothing(make_toy_config):
    cfg = load_config(make_toy_config(evaluate={"nfes": [1, 2, 4], "schedules": ["fixed"]}))
    _write_scores(cfg, _synthetic_scores(cfg, n=16))
    _report(cfg, METHODS)
    md = open(cfg.root + "/report/report.md").read()
    assert "> ⚠ marks a value from too few samples" in md and "FID needs 500" in md
    ladder = _table(md, "## Ablation ladder")
    assert "⚠ n=16" in ladder["ota"] and " ± " not in ladder["ota"]
    assert not any(line.strip(" |").endswith(("↓", "↑")) for line in ladder.values())
    assert "no difference is marked as significant" in md


def test_checkpoint_scores_table_for_the_model_card(two_seed_cfg):
    from pipeline.report_tables import checkpoint_scores

    cfg = two_seed_cfg
    run = cfg.train_runs(["ota"])[1]
    assert checkpoint_scores(cfg, run) is None                  # not evaluated yet
    table = _synthetic_scores(cfg)
    _write_scores(cfg, table)
    md = checkpoint_scores(cfg, run)
    lines = md.splitlines()
    assert lines[0] == ("| checkpoint | schedule | NFE | FID (lower is better) | Prompt accuracy (higher is better) | "
                        "Trajectory fidelity, mean MSE (lower is better) |")
    rows = table.to_pandas()
    mine = rows[(rows.run == "ota") & (rows.train_seed == 1) & (rows.schedule == "fixed") & (rows.nfe == 2)
                & (rows.metric == "fid")]
    expected = f"{mine.value.mean():.2f} ± {mine.value.std():.2f}"
    assert any(line.startswith(f"| this student | fixed | 2 | {expected} |") for line in lines)
    assert sum(line.startswith("| this student |") for line in lines) == 2 * 4      # 2 schedules x 4 NFEs
    teacher = rows[(rows.run == "teacher") & (rows.metric == "fid") & (rows.nfe == cfg.evaluate.teacher_nfe)]
    assert any(line.startswith(f"| teacher ({cfg.evaluate.teacher_nfe} steps, CFG {cfg.evaluate.guidance:g}) | "
                               f"fixed | {cfg.evaluate.teacher_nfe} | {teacher.value.mean():.2f}")
               for line in lines)                              # the teacher's value beside the student's
    assert "2 evaluation seeds (mean ± std)" in md


def test_report_notes_runs_not_evaluated_and_needs_scores(make_toy_config):
    from stages import report

    cfg = load_config(make_toy_config(evaluate={"nfes": [1, 2, 4]}))
    with pytest.raises(UserError, match="flowsteer evaluate"):
        report.jobs(cfg)
    _write_scores(cfg, _synthetic_scores(cfg))
    _report(cfg, METHODS + ["scflow"])
    md = open(cfg.root + "/report/report.md").read()
    assert "Not evaluated yet: scflow" in md
