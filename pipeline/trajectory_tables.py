"""The report's trajectory ladder: the robust trajectory metrics (pipeline/metrics/trajectory.py) per ladder step,
and "what exceeds the spread", written from the numbers (docs/metrics.md).

Each family is a target: the exact ODE endpoint (`exact_*`, exact teacher) and the teacher's own output
(`fidelity_*` + `mode_switch`). A step "separates" on a metric at an NFE when it moves that metric by more than
the sum of both rows' standard deviations (scores.separated), the rule of every table in the report.
"""
from __future__ import annotations

import pandas as pd

from pipeline.metrics import registered
from pipeline.scores import separated, summarize
from pipeline.report_tables import LADDER_NFES, _row, arrowed_cells, ladder_rows, ladder_table, spread_note

FAMILIES = {   # target -> (median, upper quantile, switch rate, error without switches, mean)
    "exact": ("exact_median", "exact_p90", "exact_switch", "exact_kept", "exact_mean"),
    "teacher": ("fidelity_median", "fidelity_p90", "mode_switch", "fidelity_kept", "fidelity_mse"),
}
TARGET_WORDS = {"exact": "the exact ODE endpoint", "teacher": "the teacher's output"}
SHORT = {"median": "median", "p90": "p90", "switch": "switches", "kept": "no-switch mean", "mean": "mean"}


def families(rows: pd.DataFrame) -> list[str]:
    present = set(rows.metric)
    return [f for f, names in FAMILIES.items() if names[0] in present]


def _short(metric: str) -> str:
    return SHORT[metric.split("_")[-1] if metric != "mode_switch" and metric != "fidelity_mse" else
                 {"mode_switch": "switch", "fidelity_mse": "mean"}[metric]]


def robust_table(cfg, summary: pd.DataFrame, runs, family: str, nfe: int, schedules) -> str:
    """One NFE: a row per ladder step, a column per statistic (mean last, labelled), arrows vs the step above."""
    names = [m for m in FAMILIES[family] if (summary.metric == m).any()]
    lines = ["| ladder step | " + " | ".join(_short(m) for m in names) + " |", "|---|" + "---:|" * len(names)]
    above: dict[str, object] = {}
    for run, schedule, label in ladder_rows(runs, schedules):
        cells = arrowed_cells({m: _row(summary, run.name, schedule, nfe, m) for m in names}, above)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exceeds_spread(cfg, summary: pd.DataFrame, runs, family: str, nfes, schedules) -> str:
    """Per ladder step, the (metric, NFE) cells where it moves past the spread of the step above, or that
    it stays within it everywhere."""
    names = [m for m in FAMILIES[family] if (summary.metric == m).any()]
    steps = ladder_rows(runs, schedules)
    out = []
    for (prev_run, prev_sched, _), (run, sched, label) in zip(steps, steps[1:]):
        moves = []
        for n in nfes:
            for m in names:
                a, b = _row(summary, run.name, sched, n, m), _row(summary, prev_run.name, prev_sched, n, m)
                if a is not None and b is not None and separated(a, b):
                    better = (a["mean"] < b["mean"]) == (registered()[m].better == "lower")
                    fmt = registered()[m].format
                    moves.append(f"{_short(m)} at {n} NFE {fmt(b['mean'])} -> {fmt(a['mean'])} "
                                 f"({'better' if better else 'worse'})")
        out.append(f"- **{label}** vs {prev_run.name}: " + ("; ".join(moves) if moves else "within the spread "
                                                             "on every statistic and NFE"))
    return "\n".join(out)


def trajectory_section(cfg, rows: pd.DataFrame, runs) -> list[str]:
    """Markdown lines: for each target, the median ladder over NFEs, the robust table at each NFE, and what
    exceeds the spread; nothing when no robust metric was computed."""
    summary = summarize(rows)
    schedules = set(rows.schedule)
    nfes = [n for n in LADDER_NFES if n in cfg.evaluate.nfes] or list(cfg.evaluate.nfes)
    md = []
    for family in families(rows):
        median = FAMILIES[family][0]
        md += [f"## Ablation ladder: distance to {TARGET_WORDS[family]}", "",
               f"Per-sample squared error to {TARGET_WORDS[family]} from the same noise and prompt: its median "
               f"(a typical sample), 90th percentile, the share of samples that land in another mode "
               f"(switches), the mean over the samples that do not switch, and the plain mean, which mixes "
               f"the two (a switch costs one or two orders of magnitude more than a follow).", "",
               ladder_table(cfg, rows, runs, median), ""]
        for n in nfes:
            md += [f"### All statistics at {n} NFE", "", robust_table(cfg, summary, runs, family, n, schedules), ""]
        md += ["### What exceeds the spread", "", spread_note(rows) + " A step is listed with every statistic "
               "it moves by more than the sum of both standard deviations.", "",
               exceeds_spread(cfg, summary, runs, family, nfes, schedules), ""]
    return md
