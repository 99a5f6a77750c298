"""Markdown tables of summarized scores (pipeline/scores.py): the ablation ladder that opens the report,
one table per metric with the teacher under it, and one checkpoint's scores for its model card.

Spread and significance: a value is the mean over every (training seed, evaluation seed) pair, ± their
standard deviation; two values differ "by more than the spread" when |mean_a - mean_b| > std_a + std_b
(`scores.separated`). Only such differences are marked; with one value per row there is no spread and no mark
(docs/metrics.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.metrics import registered
from pipeline.methods import ladder_rank
from pipeline.scores import WARN, cell, separated, summarize

if TYPE_CHECKING:          # pandas loads where a table is built, not when `flowsteer status` imports the stages
    import pandas as pd

LADDER_NFES = (1, 2, 4)


@dataclass
class RunInfo:
    """What the report knows of one training run name (over its seeds), besides its scores."""
    name: str
    method: str
    options: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)       # e.g. "reflow on teacher samples"
    d_stats: dict | None = None         # the discriminator at the end: d_loss, d_acc_real/_fake/_pair (report.py)
    ema_distance: float | None = None                   # EMA vs raw weights' distance from the teacher

    @property
    def label(self) -> str:
        text = self.name if self.name == self.method else f"{self.name} ({self.method})"
        return text + "".join(f", {t}" for t in self.tags)

    @property
    def default_grid(self) -> bool:
        """Trained on diffusers' default grid (a `grid: diffusers` variant, the ladder's first row)."""
        return str(self.options.get("grid", "")) == "diffusers"


def title(metric: str) -> str:
    cls = registered().get(metric)
    return f"{cls.title} ({cls.better} is better)" if cls else metric


def _row(summary: pd.DataFrame, run: str, schedule: str, nfe: int, metric: str):
    r = summary[(summary.run == run) & (summary.schedule == schedule) & (summary.nfe == nfe)
                & (summary.metric == metric)]
    return r.iloc[0] if len(r) else None


def teacher_line(cfg, summary: pd.DataFrame, metric: str) -> str:
    ev = cfg.evaluate
    head = f"Teacher, {ev.teacher_nfe} steps with CFG {ev.guidance:g} ({2 * ev.teacher_nfe} network passes)"
    r = _row(summary, "teacher", "fixed", ev.teacher_nfe, metric)
    if r is not None:
        return f"{head}: **{cell(metric, r)}**"
    cls = registered().get(metric)
    return f"{head}: {cls.teacher_note(cfg) if cls else 'not scored'}."


def teacher_cell(cfg, summary: pd.DataFrame, metric: str) -> str:
    """The teacher's value of `metric` for a table cell beside the students' ("–" where it has none)."""
    r = _row(summary, "teacher", "fixed", cfg.evaluate.teacher_nfe, metric)
    return cell(metric, r) if r is not None else "–"


def spread_note(rows: pd.DataFrame) -> str:
    students = rows[rows.run != "teacher"]
    t = int(students.train_seed.nunique()) if len(students) else 0
    e = int(rows.seed.nunique()) if len(rows) else 0
    if t * e <= 1:
        return ("One training seed and one evaluation seed: no spread, so no difference is marked as significant "
                "(add `train.seeds` and `evaluate.seeds`).")
    return (f"Mean ± standard deviation over {t} training seed{'s' * (t > 1)} × {e} evaluation "
            f"seed{'s' * (e > 1)}.")


# ---------------------------------------------------------------- the ladder
def ladder_rows(runs: list[RunInfo], schedules) -> list[tuple[RunInfo, str, str]]:
    """(run, schedule, row label) in ladder order: PeRFlow on diffusers' default grid, + fixed schedule,
    + OTA, + adversarial (FlowSteer), its options, then SCFlow and AYF: each method's declared `ladder_rank`,
    methods without one last (config order within a method). Without a run trained on the default grid, the
    first run sampled on that grid stands for the first row."""
    ordered = [r for _, r in sorted(enumerate(runs), key=lambda ir: (ladder_rank(ir[1].method),
                                                                        not ir[1].default_grid, ir[0]))]
    rows = []
    if ordered and "diffusers" in schedules and not any(r.default_grid for r in ordered):
        rows.append((ordered[0], "diffusers", f"{ordered[0].label}, sampled on diffusers' default grid"))
    for r in ordered:
        on_default = r.default_grid and "diffusers" in schedules
        rows.append((r, "diffusers" if on_default else "fixed",
                     r.label + (", diffusers' default grid" if on_default else "")))
    return rows


def d_cells(stats: dict | None) -> str:
    """The ladder's three discriminator cells (– where the row has no discriminator or a key is missing)."""
    stats = stats or {}
    loss = f"{stats['d_loss']:.2f}" if "d_loss" in stats else "–"
    acc = (f"{stats['d_acc_real']:.2f} / {stats['d_acc_fake']:.2f}"
           if "d_acc_real" in stats and "d_acc_fake" in stats else "–")
    pair = f"{stats['d_acc_pair']:.2f}" if "d_acc_pair" in stats else "–"
    return f" {loss} | {acc} | {pair} |"


def arrowed_cells(found: dict, above: dict) -> list[str]:
    """A ladder row's cells, one per column of `found` (column -> summary row, None where missing: "–"):
    mean ± std, with ↓ / ↑ where the value is separated from the row above in that column (`above`, which
    this updates to this row)."""
    cells = []
    for col, r in found.items():
        if r is None:
            cells.append("–")
            continue
        text, prev = cell(r["metric"], r), above.get(col)
        if prev is not None and separated(r, prev):
            text += " ↓" if r["mean"] < prev["mean"] else " ↑"
        cells.append(text)
        above[col] = r
    return cells


def ladder_table(cfg, rows: pd.DataFrame, runs: list[RunInfo], metric: str) -> str:
    """Table-5 style: a row per ladder step, 1 / 2 / 4 NFE (those evaluated), mean ± std, an arrow where a
    step moves the value by more than the spread, the discriminator's final accuracy beside adversarial rows."""
    summary = summarize(rows)
    nfes = [n for n in LADDER_NFES if n in cfg.evaluate.nfes] or list(cfg.evaluate.nfes)
    steps = ladder_rows(runs, set(rows.schedule))
    with_d = any(r.d_stats for r, _, _ in steps)
    lines = ["| ladder step | " + " | ".join(f"{n} NFE" for n in nfes) + " |"
             + (" D loss | D acc real / fake | D acc pairs |" if with_d else ""),
             "|---|" + "---:|" * len(nfes) + ("---:|" * 3 if with_d else "")]
    above: dict[int, object] = {}
    for run, schedule, label in steps:
        cells = arrowed_cells({n: _row(summary, run.name, schedule, n, metric) for n in nfes}, above)
        d = d_cells(run.d_stats)
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + (d if with_d else ""))
    lines += ["", teacher_line(cfg, summary, metric), "",
              spread_note(rows) + " ↓ / ↑: lower / higher than the step above by more than the sum of both "
              "standard deviations; an unmarked step is within the spread."]
    if with_d:
        lines.append("D: the discriminator over the last quarter of its logged steps, mean over training seeds: "
                     "hinge loss (2.0 = real and fake scored alike), accuracy on real / fake states (share scored "
                     "> 0 / < 0) and on pairs (share of rows whose real state outscores its fake); 0.5 = chance.")
    ema = [f"{r.name} {r.ema_distance:.2f}" for r, _, _ in steps if r.ema_distance is not None]
    if ema:
        lines.append("EMA vs raw weights: the exported EMA's distance from the teacher relative to the raw "
                     "weights' at the last step (1 = as far; mean over training seeds): "
                     + " · ".join(dict.fromkeys(ema)) + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------- one table per metric
def metric_table(cfg, summary: pd.DataFrame, runs: list[RunInfo], metric: str) -> str:
    """A row per (run, schedule), a column per NFE; bold: the best mean at an NFE when it is ahead of the
    runner-up by more than the spread (or, with no spread measured, simply the best)."""
    nfes = list(cfg.evaluate.nfes)
    lower = registered()[metric].better == "lower" if metric in registered() else True
    schedules = [s for s in ("fixed", "diffusers") if ((summary.schedule == s) & (summary.run != "teacher")).any()]
    keys = [(r, s) for r in runs for s in schedules]
    best = {}
    for n in nfes:
        col = [x for x in (_row(summary, r.name, s, n, metric) for r, s in keys) if x is not None]
        col.sort(key=lambda x: x["mean"] if lower else -x["mean"])
        if len(col) > 1 and not np.isclose(col[0]["mean"], col[1]["mean"]) and separated(col[0], col[1]) is not False:
            best[n] = col[0]["mean"]
    teacher = teacher_cell(cfg, summary, metric)
    lines = ["| run | " + " | ".join(f"{n} NFE" for n in nfes) + f" | teacher ({cfg.evaluate.teacher_nfe} steps) |",
             "|---|" + "---:|" * (len(nfes) + 1)]
    for r, s in keys:
        cells = []
        for n in nfes:
            x = _row(summary, r.name, s, n, metric)
            text = "–" if x is None else cell(metric, x)
            cells.append(f"**{text}**" if x is not None and n in best and np.isclose(x["mean"], best[n]) else text)
        label = r.label + (" · diffusers' default grid" if s == "diffusers" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {teacher} |")
    return "\n".join(lines + ["", teacher_line(cfg, summary, metric)])


# ---------------------------------------------------------------- one checkpoint (model card)
def prompt_set_text(rows: pd.DataFrame) -> str:
    """Which prompts the rows were sampled from, e.g. "`coco_val` (held-out)" or "the generate prompts"."""
    import pandas as pd

    sets = [s for s in dict.fromkeys(rows.get("prompt_set", pd.Series(dtype=str)).dropna())]
    if not sets:
        return "the generate prompts"
    return ", ".join(s if s.startswith("generate prompts") else f"`{s}` (held-out)" for s in sets)


def prompts_summary(cfg, rows: pd.DataFrame) -> str:
    """The evaluation prompt set: held-out, or (the default) the prompts the students were distilled on."""
    import pandas as pd

    text = prompt_set_text(rows)
    if cfg.evaluate.prompts is None:
        return (f"{text}: the prompts the students were distilled on, not held out (set `evaluate.prompts` "
                f"to score on unseen prompts)")
    hashes = ", ".join(dict.fromkeys(rows.get("prompt_hash", pd.Series(dtype=str)).dropna()))
    return f"{text} from `{cfg.evaluate.prompts}`" + (f", sha256 {hashes}" if hashes else "")


def scores_markdown(rows: pd.DataFrame, teacher: pd.DataFrame | None = None, teacher_label: str = "teacher"
                    ) -> str | None:
    """One checkpoint's rows as a small markdown table: a line per (schedule, NFE), a column per metric,
    mean ± std over evaluation seeds, and the teacher's line (`teacher` rows) under them; None when there are
    no rows."""
    if not len(rows):
        return None
    s = summarize(rows, by=("schedule", "nfe", "metric"))
    metrics = [m for m in registered() if m in set(s.metric)] + sorted(set(s.metric) - set(registered()))
    lines = ["| checkpoint | schedule | NFE | " + " | ".join(title(m) for m in metrics) + " |",
             "|---|---|---:|" + "---:|" * len(metrics)]
    groups = [("this student", grp) for _, grp in s.groupby(["schedule", "nfe"], sort=True)]
    if teacher is not None and len(teacher):
        t = summarize(teacher, by=("schedule", "nfe", "metric"))
        groups += [(teacher_label, grp) for _, grp in t.groupby(["schedule", "nfe"], sort=True)]
    for who, grp in groups:
        by_metric = {r.metric: r for _, r in grp.iterrows()}
        first = grp.iloc[0]
        lines.append(f"| {who} | {first.schedule} | {int(first.nfe)} | "
                     + " | ".join(cell(m, by_metric[m]) if m in by_metric else "–" for m in metrics) + " |")
    seeds = int(rows.seed.nunique())
    lines += ["", f"Prompts: {prompt_set_text(rows)}; {int(rows.n.min())} samples per value, {seeds} evaluation "
                  f"seed{'s' * (seeds > 1)}{' (mean ± std)' if seeds > 1 else ''}; {WARN}: too few samples for the "
                  f"value to mean much."]
    return "\n".join(lines)


def checkpoint_scores(cfg, run) -> str | None:
    """The evaluate scores of one trained student (a schemas.config.TrainRun) as a markdown table, for its
    model card (export/README.md); None until `flowsteer evaluate` has scored this checkpoint."""
    import pandas as pd

    path = cfg.stage_dir("evaluate") / "scores.parquet"
    if not path.is_file():
        return None
    rows = pd.read_parquet(path)
    if "run" not in rows.columns:
        return None
    ev = cfg.evaluate
    keep = ((rows.fingerprint == cfg.fingerprint("train", run)) & (rows.run == run.name)
            & (rows.train_seed == run.seed) & rows.seed.isin(ev.seeds))
    teacher = ((rows.run == "teacher") & (rows.fingerprint == cfg.fingerprint("teacher"))
               & (rows.nfe == ev.teacher_nfe) & rows.seed.isin(ev.seeds))
    return scores_markdown(rows[keep], rows[teacher],
                           f"teacher ({ev.teacher_nfe} steps, CFG {ev.guidance:g})")
