"""Report stage: <root>/report/report.md and report.html with the ablation table, plots and image grids.

Reads only files on disk: the evaluate stage's scores.parquet and grids, the run's completion records
(timings). One unit (so `flowsteer status` shows it), redone on every run: it takes seconds.
"""
from __future__ import annotations

import functools
import html
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes
from pipeline.runner import Job, Unit, drop_record
from schemas.config import RunConfig

# metric -> (title, better, what it measures)
METRICS = {
    "fid": ("FID", "lower", "Frechet distance between Gaussians fitted to features of the generated samples and "
            "of the reference images (Heusel et al. 2017); computed by clean-fid. Sample quality and diversity."),
    "prompt_accuracy": ("Prompt accuracy", "higher", "Share of samples the digit classifier reads as the "
                        "prompted digit (chance 0.10). Prompt alignment for the embedded default."),
    "clip_score": ("CLIP score", "higher", "100 x cosine(CLIP image, CLIP prompt), clipped at 0 (Hessel et al. "
                   "2021). Prompt alignment for real teachers."),
    "fidelity_mse": ("Trajectory fidelity (MSE)", "lower", "Mean squared distance between the student's output "
                     "and the teacher's output from the same noise and prompt, in the ODE's space: how "
                     "closely the student follows the teacher's trajectory (0 = identical)."),
}
FEATURES = {"classifier": "the digit classifier's 128-d penultimate features",
            "inception": "clean-fid's Inception-v3 pool features (standard FID)",
            "pixels": "raw pixels (average-pooled to <= 16x16)"}
REFERENCES = {"digits": "the 5000 real MNIST digits", "folder": "the configured reference folder",
              "teacher": "the teacher's own samples from the same noise"}


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
        self.cfg = RunConfig.model_validate(cfg_json)
        self.methods = [r.label for r in self.cfg.train_runs(methods)]   # the checkpoints' labels in scores

    def run(self, unit: Unit) -> dict:
        scores = pd.read_parquet(scores_path(self.cfg))
        path = write_report(self.cfg, select(self.cfg, scores, self.methods), report_dir(self.cfg), self.methods)
        return {"report": str(path)}


# ---------------------------------------------------------------- data
def select(cfg: RunConfig, scores: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """This config's rows: its teacher at teacher_nfe and its methods' current checkpoints at its NFEs and seeds."""
    ev = cfg.evaluate
    want = {("teacher", cfg.fingerprint("teacher"), ev.teacher_nfe)}
    runs = {r.label: r for r in cfg.train_runs()}
    want |= {(m, cfg.fingerprint("train", runs[m]), n) for m in methods if m in runs for n in ev.nfes}
    keep = [(c, f, n) in want and s in ev.seeds
            for c, f, n, s in zip(scores.checkpoint, scores.fingerprint, scores.nfe, scores.seed)]
    return scores[keep].copy()


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation over seeds and number of seeds per (checkpoint, nfe, metric)."""
    g = rows.groupby(["checkpoint", "nfe", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def fmt(mean: float, std: float, seeds: int, metric: str) -> str:
    """mean (± std over seeds when there are several), with digits suited to the metric's scale."""
    def num(v: float) -> str:
        if metric == "fidelity_mse":
            return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return f"{v:.3f}" if metric == "prompt_accuracy" else f"{v:.2f}"
    return f"{num(mean)} ± {num(std)}" if seeds > 1 else num(mean)


def ordered_metrics(summary: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(summary.metric))
    return [m for m in METRICS if m in present] + [m for m in present if m not in METRICS]


def ablation_table(cfg: RunConfig, summary: pd.DataFrame, methods: list[str], metric: str) -> str:
    """Markdown: one row per method, one column per NFE, the best student per NFE in bold; the teacher below."""
    nfes = list(cfg.evaluate.nfes)
    lower = METRICS.get(metric, ("", "lower", ""))[1] == "lower"
    s = summary[summary.metric == metric]
    best = {}
    for n in nfes:
        col = s[(s.nfe == n) & (s.checkpoint != "teacher")]["mean"]
        if col.nunique() > 1:       # bold only when the students differ
            best[n] = col.min() if lower else col.max()
    lines = ["| method | " + " | ".join(f"{n} NFE" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for m in methods:
        cells = []
        for n in nfes:
            r = s[(s.checkpoint == m) & (s.nfe == n)]
            if not len(r):
                cells.append("–")
                continue
            r = r.iloc[0]
            text = fmt(r["mean"], r["std"], int(r["seeds"]), metric)
            cells.append(f"**{text}**" if n in best and np.isclose(r["mean"], best[n]) else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    t = s[s.checkpoint == "teacher"]
    if len(t):
        r, ev = t.iloc[0], cfg.evaluate
        lines += ["", f"Teacher, {ev.teacher_nfe} steps with CFG {ev.guidance:g} ({2 * ev.teacher_nfe} network "
                      f"passes): **{fmt(r['mean'], r['std'], int(r['seeds']), metric)}**"]
    return "\n".join(lines)


def highlights(cfg: RunConfig, summary: pd.DataFrame, methods: list[str], metrics: list[str]) -> str:
    """Each metric at the headline NFE (one step per window if evaluated), students ranked, teacher last."""
    nfes = cfg.evaluate.nfes
    n = cfg.schedule.windows if cfg.schedule.windows in nfes else max(nfes)
    out = []
    for metric in metrics:
        title, better, _ = METRICS.get(metric, (metric, "lower", ""))
        s = summary[(summary.metric == metric) & (summary.nfe == n) & summary.checkpoint.isin(methods)]
        s = s.sort_values("mean", ascending=better == "lower")
        parts = [f"{r.checkpoint} {fmt(r['mean'], r['std'], int(r.seeds), metric)}" for _, r in s.iterrows()]
        t = summary[(summary.metric == metric) & (summary.checkpoint == "teacher")]
        if len(t):
            parts.append(f"teacher ({cfg.evaluate.teacher_nfe} steps) {fmt(t['mean'].iloc[0], 0, 1, metric)}")
        if parts:
            out.append(f"- **{title}** at {n} NFE ({better} is better): " + " · ".join(parts))
    return "\n".join(out)


# ---------------------------------------------------------------- figures
def plot_metrics(cfg: RunConfig, summary: pd.DataFrame, methods: list[str], metrics: list[str], out: Path) -> Path:
    """One panel per metric: value vs NFE (log2 axis) per method, seed spread as error bars, teacher dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        s = summary[summary.metric == metric]
        for i, m in enumerate(methods):
            r = s[s.checkpoint == m].sort_values("nfe")
            if len(r):
                ax.errorbar(r.nfe, r["mean"], yerr=r["std"], marker="o", capsize=3, label=m,
                            color=colors[i % len(colors)])
        t = s[s.checkpoint == "teacher"]
        if len(t):
            ax.axhline(t["mean"].iloc[0], color="black", linestyle="--", linewidth=1,
                       label=f"teacher ({cfg.evaluate.teacher_nfe} steps)")
        title, better, _ = METRICS.get(metric, (metric, "", ""))
        ax.set_title(f"{title} ({better} is better)" if better else title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.evaluate.nfes, [str(n) for n in cfg.evaluate.nfes])
        ax.set_xlabel("NFE (student sampling steps)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, out)
    plt.close(fig)
    return out


def comparison_grid(cfg: RunConfig, methods: list[str], nfe: int, out: Path, columns: int = 10) -> Path | None:
    """Teacher row + one row per method at `nfe`: the same prompts and noise in every column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import generate_prompts

    grids = cfg.stage_dir("evaluate") / "grids"
    seed, ev, prompts = cfg.evaluate.seeds[0], cfg.evaluate, generate_prompts(cfg)
    rows = [(f"teacher\n{ev.teacher_nfe} steps",
             grids / f"teacher-{cfg.fingerprint('teacher')}_nfe{ev.teacher_nfe}_seed{seed}.npz")]
    runs = {r.label: r for r in cfg.train_runs()}
    rows += [(f"{m}\n{nfe} NFE", grids / f"{m.replace('/', '-')}-{cfg.fingerprint('train', runs[m])}_nfe{nfe}_seed{seed}.npz")
             for m in methods if m in runs]
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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, out)
    plt.close(fig)
    return out


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


def timings_table(cfg: RunConfig, methods: list[str], rows: pd.DataFrame) -> str:
    lines = []
    stages = [("teacher", cfg.stage_dir("teacher"), cfg.teacher.kind),
              ("generate", cfg.stage_dir("generate"), "teacher trajectories")]
    stages += [("train", cfg.train_dir(r), r.label) for r in cfg.train_runs() if r.label in methods]
    stages += [("evaluate", cfg.stage_dir("evaluate") / "teacher", "teacher samples + scores"),
               ("evaluate", cfg.stage_dir("evaluate") / "students", "student samples + scores")]
    for name, d, what in stages:
        sec = stage_seconds(d)
        if sec is not None:
            lines.append(f"| {name} | {what} | {sec:.1f} |")
    if lines:
        lines = ["Time spent in each stage's units (seconds, summed over units):", "",
                 "| stage | work | seconds |", "|---|---|---:|"] + lines
    per = rows.drop_duplicates("unit").groupby(["checkpoint", "nfe"], sort=False)[["sampling_seconds", "n"]].sum()
    if len(per):
        cols = sorted({int(n) for _, n in per.index})
        lines += ["", "Generation time per 1000 samples in seconds (this machine; teacher with CFG):", "",
                  "| checkpoint | " + " | ".join(f"{n} steps" for n in cols) + " |", "|---|" + "---:|" * len(cols)]
        present = {c for c, _ in per.index}
        for c in [c for c in ["teacher", *methods] if c in present]:
            cells = [f"{1000 * per.loc[(c, n), 'sampling_seconds'] / max(per.loc[(c, n), 'n'], 1):.1f}"
                     if (c, n) in per.index else "" for n in cols]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_summary(cfg: RunConfig, rows: pd.DataFrame) -> str:
    ev, sc = cfg.evaluate, cfg.schedule
    teacher = {"embedded": "embedded tiny SD3 transformer on MNIST", "sd3": f"SD3 from {cfg.teacher.path}",
               "byo": f"bring-your-own `{cfg.teacher.factory}`"}[cfg.teacher.kind]
    feats = rows.features.iloc[0] if len(rows) else ev.features
    ref = rows.reference.iloc[0] if len(rows) else ""
    items = [("teacher", teacher), ("schedule", f"fixed grid, shift {sc.shift:g}, teacher {sc.teacher_steps} "
                                                f"steps, {sc.windows} windows"),
             ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}"),
             ("evaluation", f"{ev.n_samples} samples per (checkpoint, NFE, seed), seeds {list(ev.seeds)}, "
                            f"teacher CFG {ev.guidance:g}; students guidance-free"),
             ("FID features", FEATURES.get(feats, feats)), ("FID reference", REFERENCES.get(ref, ref))]
    return "\n".join(f"- **{k}**: {v}" for k, v in items)


# ---------------------------------------------------------------- the report
def write_report(cfg: RunConfig, rows: pd.DataFrame, out: Path, methods: list[str]) -> Path:
    """Write report.md, report.html, plots/metrics.png and grids/nfe<N>.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    metrics = ordered_metrics(summary)
    shown = [m for m in methods if (summary.checkpoint == m).any()]
    missing = [m for m in methods if m not in shown]
    md = [f"# flowsteer report: `{cfg.root}`", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M')}. Teacher at {cfg.evaluate.teacher_nfe} steps with CFG "
          f"against the distilled students ({', '.join(shown) or 'none yet'}) at "
          f"{', '.join(map(str, cfg.evaluate.nfes))} NFE, on the same prompts and the same initial noise.", ""]
    if missing:
        md += [f"> Not evaluated yet: {', '.join(missing)} (run `flowsteer train` and `flowsteer evaluate`).", ""]
    if metrics and shown:
        md += ["## Highlights", "", highlights(cfg, summary, shown, metrics), ""]
    md += ["## Run", "", config_summary(cfg, rows), "", "## Metrics", "",
           "| metric | better | what it measures |", "|---|---|---|"]
    md += [f"| {METRICS.get(m, (m,))[0]} | {METRICS.get(m, (m, '?'))[1]} | {METRICS.get(m, (m, '', ''))[2]} |"
           for m in metrics]
    seeds = int(rows.seed.nunique()) if len(rows) else 0
    md += ["", "## Ablation", "", ("Mean ± standard deviation over " f"{seeds} seeds. " if seeds > 1 else
                                   "One seed (add seeds to `evaluate.seeds` for a spread). ")
           + "Bold: the best student at that NFE. The teacher, the reference, is given under each table.", ""]
    for m in metrics:
        title, better, _ = METRICS.get(m, (m, "", ""))
        md += [f"### {title} ({better} is better)" if better else f"### {title}", "",
               ablation_table(cfg, summary, shown, m), ""]
    if metrics:
        plot = plot_metrics(cfg, summary, shown, metrics, out / "plots" / "metrics.png")
        md += ["## Metric vs NFE", "", f"![metrics vs NFE]({plot.relative_to(out).as_posix()})", ""]
    grids = [(n, comparison_grid(cfg, shown, n, out / "grids" / f"nfe{n}.png")) for n in cfg.evaluate.nfes]
    grids = [(n, p) for n, p in grids if p is not None]
    if grids:
        md += ["## Samples", "", "Each column is one prompt and one initial noise, shared by every row "
               f"(evaluation seed {cfg.evaluate.seeds[0]}); the top row is the teacher.", ""]
        for n, p in grids:
            md += [f"### {n} NFE", "", f"![samples at {n} NFE]({p.relative_to(out).as_posix()})", ""]
    md += ["## Timings", "", timings_table(cfg, shown, rows), "",
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


def _save_figure(fig, out: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (pipeline/files.py)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    atomic_write_bytes(out, buf.getvalue())
