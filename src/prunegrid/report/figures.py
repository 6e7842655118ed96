"""The grid report's figures: the accuracy trade-off with its Pareto front, and per-epoch curves.

- :func:`pareto_mask`: the non-dominated cells (no other cell at least as accurate *and* at most as
  costly, better in one of the two).
- :func:`tradeoff_figure`: accuracy against a cost (non-zero parameters, latency), one point per cell
  (mean over seeds, error bars: std over seeds), the Pareto front of each dataset × loss drawn as a
  line (label ``Pareto front``).
- :func:`curves_table` / :func:`curves_figure`: the epoch metrics of every run (``val/acc``,
  ``val/loss``, ``train/loss``...) by cell and seed, and one figure per backbone with one line per
  cell (mean over seeds, band: min to max over seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from matplotlib.ticker import MaxNLocator

from prunegrid.plots import close, plt

FRONT_LABEL = "Pareto front"
CURVE_PANELS = ("val/acc", "val/loss", "train/loss")
CELL_KEYS = ["backbone", "prune", "dataset", "loss"]


def pareto_mask(x, y) -> np.ndarray:
    """``True`` for the points no other point dominates: another point dominates (x, y) when its
    ``y`` is at least as high and its ``x`` at most as low, one of them strictly. Points with a
    non-finite coordinate are never on the front; identical points are both on it."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    mask = np.zeros(len(x), dtype=bool)
    valid = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    best, last = -np.inf, None
    for i in sorted(valid, key=lambda i: (x[i], -y[i])):  # cheapest first; for equal cost the best first
        if y[i] > best:
            mask[i], best, last = True, y[i], (x[i], y[i])
        elif last == (x[i], y[i]):  # a duplicate of the front point just taken
            mask[i] = True
    return mask


def _std(table: pd.DataFrame, col: str) -> np.ndarray:
    return table[f"{col}_std"].fillna(0.0).to_numpy() if f"{col}_std" in table else np.zeros(len(table))


def label(r: pd.Series, table: pd.DataFrame, keys=("backbone", "dataset", "loss")) -> str:
    """The cell's method, with whatever of ``keys`` varies in ``table``."""
    return "/".join([str(r["prune"]), *(str(r[k]) for k in keys if table[k].nunique() > 1)])


def tradeoff_figure(means: pd.DataFrame, x: str, xlabel: str, log: bool = False, by: str | None = None):
    """Accuracy (``acc``) against ``x``: one point per cell with error bars over seeds, and the
    Pareto front (higher accuracy, lower ``x``) of each dataset × loss as a line labelled
    :data:`FRONT_LABEL`. Cells without a positive ``x`` are left out. ``by`` (a column, e.g. the host
    a latency was timed on): one panel per value, so values of different panels are never compared."""
    shown = means[(pd.to_numeric(means[x], errors="coerce") > 0) & means["acc"].notna()]
    panels = list(shown.groupby(by, sort=True)) if by and shown[by].nunique() > 1 else [(None, shown)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    for ax, (value, part) in zip(axes[0], panels):
        _tradeoff(ax, part, x, xlabel, log, f" (timed on {value})" if value is not None else "")
    fig.tight_layout()
    return fig


def _tradeoff(ax, shown: pd.DataFrame, x: str, xlabel: str, log: bool, where: str) -> None:
    for prune, g in shown.groupby("prune", sort=False):
        ax.errorbar(g[x], g["acc"], xerr=_std(g, x), yerr=_std(g, "acc"), fmt="o", capsize=3, label=prune, zorder=3)
    for _, r in shown.iterrows():
        ax.annotate(label(r, shown), (r[x], r["acc"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    groups = list(shown.groupby(["dataset", "loss"], sort=False))
    for (dataset, loss), g in groups:
        front = g[pareto_mask(g[x], g["acc"])].sort_values([x, "acc"], ascending=[True, False])
        name = FRONT_LABEL if len(groups) == 1 else f"{FRONT_LABEL} ({dataset}/{loss})"
        ax.plot(front[x], front["acc"], "--", color="k", lw=1.2, alpha=0.8, label=name, zorder=2)
    if log and len(shown):
        ax.set_xscale("log")
    metric = "test accuracy" if "map50" not in shown or shown["map50"].isna().all() else \
        "test mAP50" if shown["map50"].notna().all() else "test accuracy (classifiers) / mAP50 (detectors)"
    ax.set(xlabel=xlabel, ylabel=f"{metric} (mean ± std over seeds)",
           title=f"Accuracy vs {xlabel}{where}: Pareto front = no cell both more accurate and cheaper")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def front_points(fig) -> set[tuple[float, float]]:
    """The (x, accuracy) points of the Pareto front lines drawn on ``fig``."""
    return {(float(a), float(b)) for ax in fig.axes for line in ax.get_lines()
            if str(line.get_label()).startswith(FRONT_LABEL) for a, b in zip(line.get_xdata(), line.get_ydata())}


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    close(fig)
    return path


def curves_table(history: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """``history`` (``run_id``, ``epoch``: the logged step, metric columns) joined with each run's cell
    and seed: ``cell`` (backbone-prune-dataset-loss), the cell keys, ``seed``, ``epoch``, ``step``, the
    metrics. ``epoch`` counts the cell's whole training budget: a cell that starts from the baseline
    cell's model logs its fine-tuning from step 0, so its steps are placed after the baseline's epochs
    (``budget_epochs`` minus the epochs the run logged)."""
    info = cells[["run_id", *CELL_KEYS, "seed"]].copy()
    info.insert(0, "cell", info[CELL_KEYS].astype(str).agg("-".join, axis=1))
    table = info.merge(history.rename(columns={"epoch": "step"}), on="run_id", how="inner")
    budget = pd.to_numeric(cells.set_index("run_id")["budget_epochs"], errors="coerce") \
        if "budget_epochs" in cells else pd.Series(dtype=float)
    logged = table.groupby("run_id")["step"].max() + 1
    offset = (budget.reindex(logged.index) - logged).where(lambda d: d > 0, 0).fillna(0).astype(int)
    table["epoch"] = table["step"] + table["run_id"].map(offset).fillna(0).astype(int)
    metrics = [c for c in history.columns if c not in ("run_id", "epoch")]
    table = table[["cell", *CELL_KEYS, "seed", "epoch", "step", *metrics, "run_id"]]
    order = {c: i for i, c in enumerate(dict.fromkeys(cells[CELL_KEYS].astype(str).agg("-".join, axis=1)))}
    return (table.assign(_o=table["cell"].map(order), _s=pd.to_numeric(table["seed"], errors="coerce"))
            .sort_values(["_o", "_s", "epoch"]).drop(columns=["_o", "_s"]).reset_index(drop=True))


def curves_figure(curves: pd.DataFrame, backbone: str, panels=CURVE_PANELS):
    """One backbone's cells on one figure: a panel per metric against epoch, one line per cell (mean
    over seeds at each epoch), shaded from the lowest to the highest seed."""
    data = curves[curves["backbone"] == backbone]
    panels = [p for p in panels if p in data and data[p].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.2), squeeze=False)
    cells = data.drop_duplicates("cell")
    for ax, key in zip(axes[0], panels):
        for _, cell in cells.iterrows():
            g = data[data["cell"] == cell["cell"]].groupby("epoch")[key]
            mean, lo, hi = g.mean(), g.min(), g.max()
            if mean.notna().any():
                line, = ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, label=label(cell, cells, ("dataset", "loss")))
                if (hi > lo).any():
                    ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=line.get_color(), alpha=0.12)
        ax.set(xlabel="epoch (of the cell's whole training budget)", ylabel=key, title=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    n = data.groupby("cell")["seed"].nunique()
    fig.suptitle(f"{backbone}: per-epoch curves of every cell (mean over {n.min()}-{n.max()} seeds, band: min-max)"
                 if len(n) and n.min() != n.max() else
                 f"{backbone}: per-epoch curves of every cell (mean over {n.max() if len(n) else 0} seed(s), band: min-max)",
                 fontsize=10)
    fig.tight_layout()
    return fig
