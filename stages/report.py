"""Report stage: <root>/report/report.md and report.html: the ablation ladder first, then a table per metric,
plots, image grids and timings.

Reads only files on disk: the evaluate stage's scores.parquet, grids and records (timings), each training
run's losses.jsonl (the discriminator's accuracy) and export metadata (pipeline/export.py). Metric titles,
directions, descriptions, formats and sample-size warnings come from the metric registry
(pipeline/metrics/base.py); tables from pipeline/report_tables.py. One unit (so `flowsteer status` shows
it), redone on every run: it takes seconds.
"""
from __future__ import annotations

import functools
import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from pipeline.errors import UserError
from pipeline.export import EMA_DISTANCE, export_dir, meta_if_any
from pipeline.files import atomic_write_bytes
from pipeline import scores as sc
from pipeline.metrics import registered
from pipeline.report_tables import (RunInfo, ladder_table, metric_table, prompt_set_text, prompts_summary,
                                    spread_note, title)
from pipeline.runner import Job, Unit, drop_record, read_record
from schemas.config import RunConfig

if TYPE_CHECKING:          # pandas loads when a report is written, not when `flowsteer status` checks the config
    import pandas as pd

LOSSES = "losses.jsonl"                 # the train stage's loss log (one JSON object per logged step)


def report_dir(cfg: RunConfig) -> Path:
    return Path(cfg.root) / "report"


def scores_path(cfg: RunConfig) -> Path:
    return cfg.stage_dir("evaluate") / "scores.parquet"


def jobs(cfg: RunConfig, methods=None) -> list[Job]:
    path = scores_path(cfg)
    if not path.is_file():
        raise UserError(f"no scores at {path}: run `flowsteer evaluate` first")
    methods = list(methods or cfg.train.methods)
    worker = functools.partial(ReportWorker, cfg.model_dump(mode="json"), methods)
    # Rewritten on every run (a few seconds): scores, timings and the chosen methods may all have changed.
    return [Job("report", report_dir(cfg), [Unit("report", {"methods": methods})], worker,
                prepare=functools.partial(drop_record, report_dir(cfg), "report"))]


def after(cfg: RunConfig, methods=None) -> str:
    out = report_dir(cfg)
    return f"report: {out / 'report.md'} (and {out / 'report.html'})"


class ReportWorker:
    def __init__(self, cfg_json: dict, methods: list[str]):
        self.cfg, self.methods = RunConfig.model_validate(cfg_json), methods

    def run(self, unit: Unit) -> dict:
        import pandas as pd

        scores = pd.read_parquet(scores_path(self.cfg))
        if "run" not in scores.columns:
            raise UserError(f"{scores_path(self.cfg)} has no run and schedule columns: rerun `flowsteer evaluate`")
        path = write_report(self.cfg, select(self.cfg, scores, self.methods), report_dir(self.cfg), self.methods)
        return {"report": str(path)}


# ---------------------------------------------------------------- data
def select(cfg: RunConfig, scores: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """This config's rows: its teacher at teacher_nfe, and the current checkpoint of each training run
    (name x train seed, by fingerprint) at its NFEs and schedules; its evaluation seeds only."""
    import pandas as pd

    ev = cfg.evaluate
    want = {("teacher", cfg.fingerprint("teacher"), None, "fixed", ev.teacher_nfe)}
    want |= {(r.name, cfg.fingerprint("train", r), r.seed, s, n)
             for r in cfg.train_runs(methods) for s in ev.schedules for n in ev.nfes}
    seeds = [None if pd.isna(t) else int(t) for t in scores.train_seed]
    keep = [(r, f, t, s, n) in want and e in ev.seeds for r, f, t, s, n, e in
            zip(scores.run, scores.fingerprint, seeds, scores.schedule, scores.nfe, scores.seed)]
    return scores[keep].copy()


def run_infos(cfg: RunConfig, methods: list[str]) -> list[RunInfo]:
    """Per run name: method, options, export tags, the discriminator at the end and the EMA distance
    (means over the training seeds that have them)."""
    out: dict[str, RunInfo] = {}
    ema: dict[str, list[float]] = {}
    d_stats: dict[str, list[dict[str, float]]] = {}
    for run in cfg.train_runs(methods):
        info = out.setdefault(run.name, RunInfo(run.name, run.method, dict(run.options)))
        d = cfg.train_dir(run)
        meta = meta_if_any(export_dir(cfg, run))
        if meta.get("x0_source") == "teacher_samples" and "reflow on teacher samples" not in info.tags:
            info.tags.append("reflow on teacher samples")
        if isinstance(meta.get(EMA_DISTANCE), (int, float)):
            ema.setdefault(run.name, []).append(float(meta[EMA_DISTANCE]))
        stats = final_d_stats(d / LOSSES)
        if stats is not None:
            d_stats.setdefault(run.name, []).append(stats)
    for name, info in out.items():
        info.ema_distance = float(np.mean(ema[name])) if name in ema else None
        if name in d_stats:
            keys = set.intersection(*(set(x) for x in d_stats[name]))
            info.d_stats = {k: float(np.mean([x[k] for x in d_stats[name]])) for k in D_KEYS if k in keys}
    return list(out.values())


D_KEYS = ("d_loss", "d_acc_real", "d_acc_fake", "d_acc_pair")


def final_d_stats(losses: Path) -> dict[str, float] | None:
    """The discriminator at the end of a training run: the mean of d_loss and its accuracies over the last
    quarter of the logged lines (one logged step is a single batch: too noisy alone), or None if it logs none."""
    rows = []
    try:
        lines = losses.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                      # a torn last line of a killed run
        if "d_acc_real" in rec and "d_acc_fake" in rec:
            rows.append(rec)
    if not rows:
        return None
    tail = rows[-max(1, len(rows) // 4):]
    return {k: float(np.mean([r[k] for r in tail])) for k in D_KEYS if all(k in r for r in tail)}


def ordered_metrics(rows: pd.DataFrame) -> list[str]:
    present = set(rows.metric)
    return [m for m in registered() if m in present] + sorted(present - set(registered()))


def highlights(cfg: RunConfig, summary: pd.DataFrame, runs: list[RunInfo], metrics: list[str]) -> str:
    """Each metric at the headline NFE (one step per window if evaluated) on the fixed grid, runs ranked,
    teacher last."""
    nfes = cfg.evaluate.nfes
    n = cfg.schedule.windows if cfg.schedule.windows in nfes else max(nfes)
    names = [r.name for r in runs]
    out = []
    for metric in metrics:
        cls = registered().get(metric)
        s = summary[(summary.metric == metric) & (summary.nfe == n) & (summary.schedule == "fixed")
                    & summary.run.isin(names)]
        s = s.sort_values("mean", ascending=cls is None or cls.better == "lower")
        parts = [f"{r.run} {sc.cell(metric, r)}" for _, r in s.iterrows()]
        t = summary[(summary.metric == metric) & (summary.run == "teacher")]
        if len(t):
            parts.append(f"teacher ({cfg.evaluate.teacher_nfe} steps) {sc.cell(metric, t.iloc[0])}")
        if parts:
            out.append(f"- **{title(metric)}** at {n} NFE: " + " · ".join(parts))
    return "\n".join(out)


# ---------------------------------------------------------------- figures
def plot_metrics(cfg: RunConfig, summary: pd.DataFrame, runs: list[RunInfo], metrics: list[str], out: Path) -> Path:
    """One panel per metric: value vs NFE (log2 axis) per run and schedule, spread as error bars, teacher dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.curves import save_figure

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        s = summary[summary.metric == metric]
        for i, run in enumerate(runs):
            for schedule, style in (("fixed", "-"), ("diffusers", ":")):
                r = s[(s.run == run.name) & (s.schedule == schedule)].sort_values("nfe")
                if len(r):
                    ax.errorbar(r.nfe, r["mean"], yerr=r["std"], marker="o", capsize=3, linestyle=style,
                                label=run.name + (" (diffusers grid)" if schedule == "diffusers" else ""),
                                color=colors[i % len(colors)])
        t = s[s.run == "teacher"]
        if len(t):
            ax.axhline(t["mean"].iloc[0], color="black", linestyle="--", linewidth=1,
                       label=f"teacher ({cfg.evaluate.teacher_nfe} steps)")
        ax.set_title(title(metric), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.evaluate.nfes, [str(n) for n in cfg.evaluate.nfes])
        ax.set_xlabel("NFE (student sampling steps)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out)


def comparison_grid(cfg: RunConfig, methods: list[str], nfe: int, out: Path, columns: int = 10) -> Path | None:
    """Teacher row + one row per run (its first training seed, fixed grid) at `nfe`: the same prompts and
    noise in every column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.curves import save_figure
    from pipeline.datasets import generate_prompts

    grids = cfg.stage_dir("evaluate") / "grids"
    seed, ev, prompts = cfg.evaluate.seeds[0], cfg.evaluate, generate_prompts(cfg)
    rows = [(f"teacher\n{ev.teacher_nfe} steps",
             grids / f"{sc.teacher_unit_key(cfg.fingerprint('teacher'), ev.teacher_nfe, seed)}.npz")]
    firsts = {}
    for r in cfg.train_runs(methods):
        firsts.setdefault(r.name, r)
    rows += [(f"{name}\n{nfe} NFE", grids / f"{sc.student_unit_key(cfg.train_dir(r).name, 'fixed', nfe, seed)}.npz")
             for name, r in firsts.items()]
    rows = [(label, p) for label, p in rows if p.is_file()]
    if len(rows) < 2:
        return None
    strips = []
    for _, p in rows:
        with np.load(p) as f:
            imgs = f["images"][:columns]
        pad = np.full((imgs.shape[1], 2, imgs.shape[3]), 255, np.uint8)
        strips.append(np.concatenate([np.concatenate([im, pad], 1) for im in imgs], 1))
    shown = min(columns, len(imgs))
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * shown + 1.5, 1.0 * len(rows) + 0.3), squeeze=False)
    for ax, (label, _), strip in zip(axes[:, 0], rows, strips):
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    width = strips[0].shape[1] / shown          # one image plus its 2-pixel gap
    for i in range(shown):                      # sample i asks for prompt i mod P (the evaluate stage's rule)
        axes[0, 0].text((i + 0.45) * width, -2, prompt_label(prompts[i % len(prompts)]), ha="center",
                        va="bottom", fontsize=7)
    return save_figure(fig, out)


def prompt_label(prompt: str, width: int = 12) -> str:
    """A column title: the digit's name for digit prompts, else the prompt cut to `width` characters."""
    from pipeline.digits import DIGIT_PROMPTS, NAMES

    if prompt in DIGIT_PROMPTS:
        return NAMES[DIGIT_PROMPTS.index(prompt)]
    return prompt if len(prompt) <= width else prompt[:width - 1] + "…"


# ---------------------------------------------------------------- timings and config
def stage_seconds(out_dir: Path) -> float | None:
    """Sum of the unit times recorded in a stage directory's completion records."""
    recs = list((Path(out_dir) / "_records").glob("*.json"))
    if not recs:
        return None
    total = 0.0
    for p in recs:
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        total += float(rec.get("seconds", 0.0)) if rec.get("status") == "done" else 0.0
    return total


def timings_table(cfg: RunConfig, methods: list[str]) -> str:
    """Seconds per stage (completion records), then sampling time per 1000 samples per checkpoint and NFE
    (the evaluate units' records, so the teacher has its row even when it has no score rows)."""
    lines = []
    stages = [("teacher", cfg.stage_dir("teacher"), cfg.teacher.kind),
              ("generate", cfg.stage_dir("generate"), "teacher trajectories")]
    stages += [("train", cfg.train_dir(r), r.label) for r in cfg.train_runs(methods)]
    stages += [("evaluate", cfg.stage_dir("evaluate") / "teacher", "teacher samples + scores"),
               ("evaluate", cfg.stage_dir("evaluate") / "students", "student samples + scores")]
    for name, d, what in stages:
        sec = stage_seconds(d)
        if sec is not None:
            lines.append(f"| {name} | {what} | {sec:.1f} |")
    if lines:
        lines = ["Time spent in each stage's units (seconds, summed over units):", "",
                 "| stage | work | seconds |", "|---|---|---:|"] + lines
    ev, root = cfg.evaluate, cfg.stage_dir("evaluate")
    units = [("teacher", "fixed", ev.teacher_nfe, root / "teacher",
              sc.teacher_unit_key(cfg.fingerprint("teacher"), ev.teacher_nfe, s)) for s in ev.seeds]
    units += [(r.name, sched, n, root / "students", sc.student_unit_key(cfg.train_dir(r).name, sched, n, s))
              for r in cfg.train_runs(methods) for sched in ev.schedules for n in ev.nfes for s in ev.seeds]
    per: dict[tuple[str, str], dict[int, list[float]]] = {}
    for name, sched, n, d, key in units:
        rec = read_record(d, key)
        if rec and rec.get("status") == "done" and rec.get("n"):
            acc = per.setdefault((name, sched), {}).setdefault(n, [0.0, 0.0])
            acc[0] += float(rec.get("sampling_seconds", 0.0))
            acc[1] += float(rec["n"])
    if per:
        cols = sorted({n for v in per.values() for n in v})
        lines += ["", "Generation time per 1000 samples in seconds (this machine; teacher with CFG):", "",
                  "| checkpoint | " + " | ".join(f"{n} steps" for n in cols) + " |", "|---|" + "---:|" * len(cols)]
        for (name, sched), v in per.items():
            cells = [f"{1000 * v[n][0] / v[n][1]:.1f}" if n in v else "" for n in cols]
            label = name + (" · diffusers' default grid" if sched == "diffusers" else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_summary(cfg: RunConfig, metrics: list[str], rows: pd.DataFrame | None = None) -> str:
    ev, sched = cfg.evaluate, cfg.schedule
    teacher = {"embedded": "embedded tiny SD3 transformer on MNIST", "sd3": f"SD3 from {cfg.teacher.path}",
               "byo": f"bring-your-own `{cfg.teacher.factory}`",
               "exact": f"exact benchmark: Gaussian mixture ({cfg.teacher.exact.classes} classes x "
                        f"{cfg.teacher.exact.modes_per_class} modes) with a closed-form velocity, ODE endpoints "
                        f"by {cfg.teacher.exact.exact_steps}-step RK4"}[cfg.teacher.kind]
    items = [("teacher", teacher),
             ("schedule", f"fixed grid, shift {sched.shift:g}, teacher {sched.teacher_steps} steps, "
                          f"{sched.windows} windows"),
             ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
                          f"training seeds {list(cfg.train.seeds)}"),
             ("evaluation", f"{ev.n_samples} samples per (checkpoint, grid, NFE, seed), evaluation seeds "
                            f"{list(ev.seeds)}, student grids: {', '.join(ev.schedules)}; teacher CFG {ev.guidance:g}, "
                            f"students guidance-free")]
    if rows is not None:
        items.append(("evaluation prompts", prompts_summary(cfg, rows)))
    items += [(registered()[m].title, registered()[m].details(cfg)) for m in metrics
              if m in registered() and registered()[m].details(cfg)]
    return "\n".join(f"- **{k}**: {v}" for k, v in items)


# ---------------------------------------------------------------- the report
def write_report(cfg: RunConfig, rows: pd.DataFrame, out: Path, methods: list[str]) -> Path:
    """Write report.md, report.html, plots/metrics.png and grids/nfe<N>.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = sc.summarize(rows)
    metrics = ordered_metrics(rows)
    infos = run_infos(cfg, methods)
    shown = [r for r in infos if (summary.run == r.name).any()]
    missing = [r.name for r in infos if r not in shown]
    ev = cfg.evaluate
    md = [f"# flowsteer report: `{cfg.root}`", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M')}. Teacher at {ev.teacher_nfe} steps with CFG against the "
          f"distilled students ({', '.join(r.name for r in shown) or 'none yet'}) at "
          f"{', '.join(map(str, ev.nfes))} NFE, on the same prompts and the same initial noise.", ""]
    if missing:
        md += [f"> Not evaluated yet: {', '.join(missing)} (run `flowsteer train` and `flowsteer evaluate`).", ""]
    warned = sorted({m for _, r in summary.iterrows() if sc.too_few(r.metric, r.n, r.features)
                     for m in [r.metric]})
    if warned:
        md += [f"> {sc.WARN} marks a value from too few samples to mean much ("
               + "; ".join(f"{registered()[m].title} needs {registered()[m].min_samples_for(ev.features)}"
                           for m in warned if m in registered())
               + f" per value, this run has {int(rows.n.min())}): raise `evaluate.n_samples`.", ""]
    head = metrics[0] if metrics else None          # the first metric in the registry's order (FID)
    if head and shown:
        md += [f"## Ablation ladder: {title(head)}", "", ladder_table(cfg, rows, shown, head), ""]
    if shown:
        from pipeline.trajectory_tables import trajectory_section

        md += trajectory_section(cfg, rows, shown)
    if metrics and shown:
        md += ["## Highlights", "", highlights(cfg, summary, shown, metrics), ""]
    md += ["## Run", "", config_summary(cfg, metrics, rows), "", "## Metrics", "",
           "| metric | better | what it measures | prompts | samples per value | needs |", "|---|---|---|---|---:|---|"]
    for m in metrics:
        mine = rows[rows.metric == m]
        where = f"{prompt_set_text(mine)} | {int(mine.n.min())}"
        cls = registered().get(m)
        md.append(f"| {cls.title} | {cls.better} | {cls.description} | {where} | {cls.needs_text()} |" if cls
                  else f"| {m} | ? | | {where} | |")
    md += ["", "## Ablation", "", spread_note(rows) + " Bold: the best student at that NFE, when it is ahead of "
           "the runner-up by more than their spread. The teacher, the reference, is given under each table.", ""]
    for m in metrics:
        md += [f"### {title(m)}", "", metric_table(cfg, summary, shown, m), ""]
    if metrics:
        plot = plot_metrics(cfg, summary, shown, metrics, out / "plots" / "metrics.png")
        md += ["## Metric vs NFE", "", f"![metrics vs NFE]({plot.relative_to(out).as_posix()})", ""]
    from pipeline.curves import curves_section

    curves = curves_section(cfg, metrics, out, title)
    if curves:
        md += ["## Metrics during training", "", curves, ""]
    names = [r.name for r in shown]
    grids = [(n, comparison_grid(cfg, names, n, out / "grids" / f"nfe{n}.png")) for n in ev.nfes]
    grids = [(n, p) for n, p in grids if p is not None]
    if grids:
        md += ["## Samples", "", "Each column is one prompt and one initial noise, shared by every row "
               f"(evaluation seed {ev.seeds[0]}, each run's first training seed); the top row is the teacher.", ""]
        for n, p in grids:
            md += [f"### {n} NFE", "", f"![samples at {n} NFE]({p.relative_to(out).as_posix()})", ""]
    md += ["## Timings", "", timings_table(cfg, names) or "No completion records with timings yet.", "",
           "## Full config", "", "<details><summary>run config (YAML)</summary>", "", "```yaml",
           yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), "```", "", "</details>", ""]
    text = "\n".join(md)
    atomic_write_bytes(out / "report.md", text.encode())
    atomic_write_bytes(out / "report.html", to_html(text, f"flowsteer report: {cfg.root}").encode())
    return out / "report.md"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.5}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid
#ccc;padding:.3em .7em}th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}img{max-width:100%}
code,pre{background:#f6f8fa}pre{padding:.8em;overflow:auto}blockquote{color:#8a5300;border-left:4px solid
#f0b400;margin:0;padding:.2em 1em;background:#fff8e1}h1{border-bottom:2px solid #eee}"""


def to_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
