"""Metric-vs-training-step curves from `evaluate --follow` (pipeline/follow.py): TensorBoard scalars and the
report's figure, both rebuilt from `<evaluate dir>/curves.parquet` (the follow job's score rows), so reruns
never duplicate a point.

TensorBoard: `<evaluate dir>/follow/tb/<run label>/`, tags `eval/<metric>/<schedule>_nfe<N>` (mean over the
evaluation seeds) at the checkpoint's training step; point TensorBoard at the run root to see them beside the
training losses (`<train dir>/tb/`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

CURVES = "curves.parquet"


def curves_path(cfg) -> Path:
    return cfg.stage_dir("evaluate") / CURVES


def tb_root(cfg) -> Path:
    return cfg.stage_dir("evaluate") / "follow" / "tb"


def means(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over evaluation seeds per (run, train seed, step, schedule, NFE, metric)."""
    keys = ["run", "train_seed", "step", "schedule", "nfe", "metric"]
    return rows.groupby(keys, dropna=False)["value"].mean().reset_index().sort_values(keys)


def write_tensorboard(cfg, rows: pd.DataFrame) -> Path:
    """Every curve point as a TensorBoard scalar, one event dir per training run (written whole, then renamed)."""
    from torch.utils.tensorboard import SummaryWriter

    from pipeline.files import atomic_path

    out = tb_root(cfg)
    with atomic_path(out) as tmp:
        for (run, seed), grp in means(rows).groupby(["run", "train_seed"], dropna=False):
            writer = SummaryWriter(str(tmp / f"{run}-s{int(seed)}"))
            for r in grp.itertuples():
                writer.add_scalar(f"eval/{r.metric}/{r.schedule}_nfe{int(r.nfe)}", float(r.value), int(r.step))
            writer.close()
    return out


def plot_curves(rows: pd.DataFrame, metrics: list[str], titles: dict[str, str], nfe: int, out: Path) -> Path | None:
    """One panel per metric: value vs training step per run (fixed grid, `nfe` steps), mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = means(rows[(rows.schedule == "fixed") & (rows.nfe == nfe)])
    metrics = [x for x in metrics if (m.metric == x).any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        s = m[m.metric == metric]
        for run, grp in s.groupby("run"):
            g = grp.groupby("step")["value"].mean()
            ax.plot(g.index, g.values, marker="o", label=run)
        ax.set_title(titles.get(metric, metric), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """A matplotlib figure laid out and written as a PNG, atomically (pipeline/files.py), then closed."""
    import io

    import matplotlib.pyplot as plt

    from pipeline.files import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def curves_section(cfg, metrics: list[str], out: Path, title) -> str:
    """The report's section: each metric vs training step (`title(metric)` heads a panel), "" without curves."""
    from pipeline.report_tables import prompt_set_text

    path = curves_path(cfg)
    rows = pd.read_parquet(path) if path.is_file() else None
    if rows is None or not len(rows):
        return ""
    nfes = sorted(set(rows.nfe))
    nfe = cfg.schedule.windows if cfg.schedule.windows in nfes else max(nfes)
    names = list(dict.fromkeys([*metrics, *rows.metric]))
    plot = plot_curves(rows, names, {m: title(m) for m in names}, nfe, out / "plots" / "curves.png")
    if plot is None:
        return ""
    return (f"Every checkpoint training committed, scored while it trained (`flowsteer evaluate --follow`), "
            f"{nfe} NFE on the fixed grid, {prompt_set_text(rows)}; TensorBoard: "
            f"`{cfg.stage_dir('evaluate') / 'follow' / 'tb'}`.\n\n"
            f"![metrics vs training step]({plot.relative_to(out).as_posix()})")
