"""The comparison grid of CONTRACT.md: one row per cell, relative columns, seed means, plots.

Runs are read only through :func:`prunegrid.tracking.load_runs`. For each cell (backbone,
prune, dataset, loss, seed) the latest FINISHED run is kept. Relative columns compare a row
with the ``prune=none`` row of the same backbone, dataset, loss and seed:

- ``params_reduction_pct = 100 * (1 - params_nonzero / none.params_nonzero)``: non-zero
  parameters, so unstructured sparsity counts; ``params`` (dense) shows whether the tensors
  actually shrank.
- ``flops_reduction_pct = 100 * (1 - flops / none.flops)``
- ``acc_delta_pt = 100 * (acc - none.acc)``, in percentage points.
- ``epoch_speedup = none.epoch_s / epoch_s`` (the epochs this run trained: a method that starts
  from the baseline model and fine-tunes reports its fine-tuning epochs; none: blank).
- ``infer_speedup = baseline_infer_ms / infer_ms``, where ``baseline_infer_ms`` is the dense
  backbone timed in the same process right before (``baseline/infer_ms``, DESIGN.md "Honest
  measurement"); runs without it use the none cell's ``infer_ms``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from prunegrid import tracking
from prunegrid.errors import ConfigError

KEYS = list(tracking.CELL_TAGS)
GROUP_KEYS = KEYS[:4]
BASE_COLUMNS = KEYS + list(tracking.GRID_METRICS)
RELATIVE = ["params_reduction_pct", "flops_reduction_pct", "acc_delta_pt", "epoch_speedup", "infer_speedup"]
OPTIONAL = list(tracking.GRID_OPTIONAL_METRICS)
BASELINE = "none"
FILES = ("grid.csv", "grid.md", "grid.json", "acc_vs_params.png", "acc_vs_latency.png", "relative.png")


class ReportError(ConfigError):
    """Nothing to report (no runs, no baseline, bad filter)."""


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    num, den = num.astype(float), den.astype(float)
    return (num / den).where((den > 0) & (num > 0))


def latest_per_cell(runs: pd.DataFrame) -> pd.DataFrame:
    """The latest FINISHED run of each cell (runs without the cell tags are ignored)."""
    if runs.empty:
        return runs
    runs = runs[runs.get("status", "FINISHED") == "FINISHED"]
    runs = runs[[all(str(v) for v in row) for row in runs[KEYS].itertuples(index=False)]] if len(runs) else runs
    runs = runs.sort_values("start_time").drop_duplicates(KEYS, keep="last")
    return runs.reset_index(drop=True)


def rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The grid rows: CONTRACT columns + relative columns + optional columns + ``run_id``."""
    cells = latest_per_cell(runs)
    if cells.empty:
        raise ReportError("no FINISHED runs with the cell tags (backbone, prune, dataset, loss, seed); run the grid first")
    out = cells[KEYS + ["run_id", "experiment_id"]].copy()
    for col, key in {**tracking.GRID_METRICS, **tracking.GRID_OPTIONAL_METRICS}.items():
        out[col] = pd.to_numeric(cells[key], errors="coerce") if key in cells else np.nan
    same = cells[tracking.BASELINE_INFER_MS] if tracking.BASELINE_INFER_MS in cells else pd.Series(np.nan, cells.index)
    out["_baseline_infer_ms"] = pd.to_numeric(same, errors="coerce")

    join = ["backbone", "dataset", "loss", "seed"]
    base = out[out["prune"] == BASELINE].set_index(join)
    ref = out[join].merge(base[["params_nonzero", "flops", "acc", "epoch_s", "infer_ms"]].add_prefix("b_"),
                          left_on=join, right_index=True, how="left")
    ref.index = out.index
    out["params_reduction_pct"] = 100 * (1 - _ratio(out["params_nonzero"], ref["b_params_nonzero"]))
    out["flops_reduction_pct"] = 100 * (1 - _ratio(out["flops"], ref["b_flops"]))
    out["acc_delta_pt"] = 100 * (out["acc"] - ref["b_acc"])
    out["epoch_speedup"] = _ratio(ref["b_epoch_s"], out["epoch_s"])
    base_ms = out["_baseline_infer_ms"].where(out["_baseline_infer_ms"] > 0, ref["b_infer_ms"])
    out["infer_speedup"] = _ratio(base_ms, out["infer_ms"])

    columns = BASE_COLUMNS + RELATIVE + [c for c in OPTIONAL if out[c].notna().any()] + ["run_id", "experiment_id"]
    out = out[columns]
    order = {p: i for i, p in enumerate(sorted(set(out["prune"]) - {BASELINE}), start=1)} | {BASELINE: 0}
    out = out.assign(_o=out["prune"].map(order), _s=pd.to_numeric(out["seed"], errors="coerce"))
    return out.sort_values(["backbone", "dataset", "loss", "_o", "_s"]).drop(columns=["_o", "_s"]).reset_index(drop=True)


def seed_means(grid: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of every numeric column, per (backbone, prune, dataset, loss)."""
    num = [c for c in grid.columns if c not in KEYS + ["run_id", "experiment_id"]]
    g = grid.groupby(GROUP_KEYS, sort=False)[num]
    mean, std = g.mean(), g.std(ddof=1)
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    out.insert(0, "n_seeds", grid.groupby(GROUP_KEYS, sort=False).size())
    return out[["n_seeds"] + [f"{c}_{s}" for c in num for s in ("mean", "std")]].reset_index()


def select(runs: pd.DataFrame, run_ids: Iterable[str] | None = None, grid: dict | None = None) -> pd.DataFrame:
    """Keep the given run ids and/or the cells of a grid (``params.yaml``'s ``grid`` section)."""
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    if grid is not None and not runs.empty:
        prunes = [BASELINE, *grid.get("methods", {}).get("from_baseline", []), *grid.get("methods", {}).get("scratch", [])]
        keep = (runs["backbone"].isin(grid["backbones"]) & runs["prune"].isin(prunes)
                & runs["dataset"].isin(grid["datasets"]) & runs["loss"].isin(grid["losses"])
                & runs["seed"].isin([str(s) for s in grid["seeds"]]))
        runs = runs[keep]
    return runs


def run_ids_from(folder: str | Path) -> list[str]:
    """Run ids recorded in the per-cell metrics JSON files that ``dvc.yaml``'s stages write."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ReportError(f"no per-cell metrics JSON in {folder}; run `dvc repro` (or drop --runs-from)")
    ids = []
    for f in files:
        try:
            ids.append(str(json.loads(f.read_text())["run_id"]))
        except (ValueError, KeyError) as exc:
            raise ReportError(f"{f} has no run_id ({type(exc).__name__}); re-run its stage with `dvc repro -f`") from exc
    return ids


# -- output ------------------------------------------------------------------------------------
def _fmt(col: str, v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, str):
        return v
    if col in ("params", "params_nonzero", "flops"):
        return f"{v:,.0f}"
    if col in ("acc", "f1_macro", "cam_agreement"):
        return f"{v:.4f}"
    if col.endswith("_pct") or col == "acc_delta_pt":
        return f"{v:+.1f}"
    if col.endswith("speedup"):
        return f"{v:.2f}x"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _link(run_id: str, exp_id: str, ui: str | None) -> str:
    return f"[{run_id[:8]}]({ui.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id})" if ui else run_id


def markdown(grid: pd.DataFrame, means: pd.DataFrame | None, ui: str | None = None) -> str:
    cols = [c for c in grid.columns if c != "experiment_id"]
    lines = ["# Comparison grid", "",
             "One row per cell (latest FINISHED MLflow run). Relative columns compare with the `prune=none` cell of "
             "the same backbone, dataset, loss and seed (see `prunegrid.report.grid`).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in grid.iterrows():
        cells = [_link(r["run_id"], r["experiment_id"], ui) if c == "run_id" else _fmt(c, r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    if means is not None:
        num = [c[:-5] for c in means.columns if c.endswith("_mean")]
        lines += ["", "## Mean ± std over seeds", "", "| " + " | ".join(GROUP_KEYS + ["n_seeds"] + num) + " |",
                  "|" + "---|" * (len(GROUP_KEYS) + 1 + len(num))]
        for _, r in means.iterrows():
            vals = [f"{_fmt(c, r[c + '_mean'])} ± {_fmt(c, r[c + '_std']).lstrip('+')}"
                    if not np.isnan(r[c + "_std"]) else _fmt(c, r[c + "_mean"]) for c in num]
            lines.append("| " + " | ".join([str(r[k]) for k in GROUP_KEYS] + [str(r["n_seeds"])] + vals) + " |")
    return "\n".join(lines) + "\n"


def _label(r: pd.Series, grid: pd.DataFrame) -> str:
    parts = [r["prune"]]
    for k in ("backbone", "dataset", "loss", "seed"):
        if grid[k].nunique() > 1:
            parts.append(str(r[k]) if k != "seed" else f"s{r[k]}")
    return "/".join(parts)


def plots(grid: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy vs non-zero params and vs latency (one labelled point per cell); relative bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = [_label(r, grid) for _, r in grid.iterrows()]
    for x, name, xlabel in (("params_nonzero", "acc_vs_params.png", "non-zero parameters"),
                            ("infer_ms", "acc_vs_latency.png", "latency, batch 1 (ms)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for prune, g in grid.groupby("prune", sort=False):
            ax.scatter(g[x], g["acc"], label=prune, s=40)
        for lab, xv, yv in zip(labels, grid[x], grid["acc"]):
            if np.isfinite(xv) and np.isfinite(yv):
                ax.annotate(lab, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if x == "params_nonzero" and (grid[x] > 0).all():
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"Accuracy vs {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        paths.append(out / name)

    fig, axes = plt.subplots(1, len(RELATIVE), figsize=(3.2 * len(RELATIVE), 4), sharey=False)
    for ax, col in zip(axes, RELATIVE):
        vals = grid[col].fillna(0.0)
        ax.bar(range(len(grid)), vals, color=["tab:gray" if p == BASELINE else "tab:blue" for p in grid["prune"]])
        ax.set_xticks(range(len(grid)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
        ax.axhline(1.0 if col.endswith("speedup") else 0.0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "relative.png", dpi=90)
    plt.close(fig)
    paths.append(out / "relative.png")
    return paths


def _json_value(v):
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def to_json(grid: pd.DataFrame, means: pd.DataFrame | None) -> dict:
    """``{"cells": {cell name: row}, "mean": {cell without seed: mean/std}}`` (``mean`` with several seeds)."""
    data = {"cells": {tracking.run_name(dict(r[KEYS])): {k: _json_value(v) for k, v in r.items() if k not in KEYS}
                      for _, r in grid.iterrows()}}
    if means is not None:
        data["mean"] = {"-".join(str(r[k]) for k in GROUP_KEYS): {k: _json_value(v) for k, v in r.items()
                                                                  if k not in GROUP_KEYS}
                        for _, r in means.iterrows()}
    return data


def console(grid: pd.DataFrame) -> str:
    cols = KEYS + ["acc", "params_nonzero", "flops", "infer_ms", "epoch_s"] + RELATIVE
    shown = grid[cols].copy()
    for c in cols[5:]:
        shown[c] = [_fmt(c, v) for v in shown[c]]
    return shown.to_string(index=False)


def build(uri: str | None = None, experiments: list[str] | None = None, out: str | Path = "reports",
          run_ids: Iterable[str] | None = None, grid: dict | None = None, ui: str | None = None) -> pd.DataFrame:
    """Read the runs, write ``grid.csv``, ``grid.md``, ``grid.json`` and the plots under ``out``."""
    uri = tracking.resolve_uri(uri)
    runs = tracking.load_runs(uri, experiments)
    if runs.empty:
        where = f"experiments {', '.join(experiments)}" if experiments else "any experiment"
        raise ReportError(f"no FINISHED runs in {uri} ({where}); run the grid first (`dvc repro`) or pass --tracking-uri")
    runs = select(runs, run_ids, grid)
    if runs.empty:
        raise ReportError(f"none of the selected runs is in {uri}; check --tracking-uri / --experiment")
    table = rows(runs)
    means = seed_means(table) if table.groupby(GROUP_KEYS).size().max() > 1 else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["experiment_id"]).to_csv(out / "grid.csv", index=False)
    if means is not None:
        means.to_csv(out / "grid_mean.csv", index=False)
    (out / "grid.md").write_text(markdown(table, means, ui))
    (out / "grid.json").write_text(json.dumps(to_json(table.drop(columns=["experiment_id"]), means), indent=1))
    plots(table, out)
    return table
