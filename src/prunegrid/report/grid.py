"""The comparison grid of CONTRACT.md: per-seed rows, seed means with spread, budgets, plots.

Runs are read only through :func:`prunegrid.tracking.load_runs`. A cell is chosen by its config, not
its tags alone (:func:`latest_per_cell`): each seed takes its latest FINISHED run of the config of the
cell's latest run, sweep trials stay out unless asked for, and every run left out is named in the notes. Relative columns compare a row
with rows of the same backbone, dataset, loss and seed:

- ``acc_delta_pt = 100 * (acc - ref.acc)`` against the row's **equal-budget reference**
  ``ref_prune`` (tag of the run): ``prune=none`` trained for the same total epochs (``none`` for
  methods that add no epochs, ``none_ftF`` for methods that fine-tune ``F`` epochs after the
  baseline's). ``ref_budget_epochs`` shows the reference's budget next to ``budget_epochs``.
- ``acc_delta_pt_vs_base = 100 * (acc - none.acc)``: against the plain baseline, for context.
- ``params_reduction_pct = 100 * (1 - params_nonzero / none.params_nonzero)``: non-zero
  parameters, so unstructured sparsity counts; ``params`` (dense) shows whether tensors shrank.
- ``flops_reduction_pct = 100 * (1 - flops / none.flops)``
- ``epoch_speedup = none.epoch_s / epoch_s`` (the epochs this run trained last), only when both runs
  ran on the same host (tag ``host``).
- ``infer_speedup`` (eager PyTorch) and ``infer_speedup_onnx`` (ONNX Runtime): the run's own
  ``speedup/infer*`` metric, the median of round-by-round ratios of the dense baseline's time to
  the model's, timed in interleaved rounds in the same process, with its quartiles
  (``infer_speedup_q25``, ``infer_speedup_q75``). ``_mt`` and ``_batch`` variants are batch 1 on all
  cores and the benchmark batch. Speed-ups never compare across runtimes. Runs logged before
  these metrics existed fall back to ``baseline/infer_ms / infer_ms`` (no quartiles).

Timings across machines (a grid on a Ray cluster): every speed-up is a ratio timed in one process on one
host; a relative column that compares two runs (``epoch_speedup``, the latency fall-back) is left empty
when their hosts differ; a cell whose seeds ran on several hosts gets no mean of its absolute times
(:data:`HOST_TIMES`); the latency Pareto front is drawn per host, and the markdown names the hosts.

``grid.csv`` has one row per cell over seeds: each numeric column is the mean, ``<col>_std`` its
standard deviation, with ``n_seeds``; ``grid_seeds.csv`` has the per-seed rows. The markdown
marks a delta smaller than its spread "within noise", a speed-up whose interval includes 1.0
"not measurably faster" (the interval spans the runs' interquartile range of paired ratios and the
mean ± std over seeds), one wholly below 1.0 "measurably slower", rows whose baseline hit the epoch
cap, and unequal budgets. The ``none`` cell's speed-up against the identical dense baseline is each host's and
runtime's noise sentinel: off 1.00 by more than 5 %, every speed-up of that host and runtime is marked
"unreliable: timing noise" with the sentinel's figure (:func:`sentinels`).

Figures (:mod:`prunegrid.report.figures`): the accuracy trade-offs with their Pareto front
(``pareto_params`` / ``pareto_latency`` in ``grid.csv``), the relative bars, and the per-epoch curves
(``learning_curves.csv``, ``learning_curves/learning_curves_<backbone>.png``). In MLflow (:mod:`prunegrid.report.publish`,
unless ``mlflow_write=False``): a grid parent run per experiment holding the selected cells and the
report's files, and each method's best model by ``val/final_acc`` registered as
``prunegrid-<experiment>@best-<prune>``. Parent runs are never cells (:func:`tracking.load_cell_runs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from prunegrid import tracking
from prunegrid.budget import BASELINE, TAG_REF_PRUNE, is_baseline_family
from prunegrid.errors import ConfigError
import prunegrid.report.figures as figures
import prunegrid.report.html as page_html
import prunegrid.report.publish as publish
import prunegrid.report.tradeoff as trade

KEYS = list(tracking.CELL_TAGS)
GROUP_KEYS = KEYS[:4]
JOIN = ["backbone", "dataset", "loss", "seed"]
BASE_COLUMNS = KEYS + list(tracking.GRID_METRICS)
BUDGET = ["budget_epochs", "budget_images", "converged", "ref_prune", "ref_budget_epochs"]
RELATIVE = ["params_reduction_pct", "flops_reduction_pct", "acc_delta_pt", "acc_delta_pt_vs_base", "epoch_speedup",
            "infer_speedup"]
RELATIVE_TITLES = {"params_reduction_pct": "non-zero parameters removed (%)", "flops_reduction_pct": "FLOPs removed (%)",
                   "acc_delta_pt": "accuracy vs equal-budget reference (pt)",
                   "acc_delta_pt_vs_base": "accuracy vs plain baseline (pt)",
                   "epoch_speedup": "training epoch speed-up (x)", "infer_speedup": "inference speed-up, eager (x)"}
OPTIONAL = list(tracking.GRID_OPTIONAL_METRICS)
HOST = tracking.TAG_HOST
# Absolute times, which only compare on one machine: not averaged over seeds that ran on different hosts.
HOST_TIMES = ["train_s", "epoch_s", "infer_ms", "infer_ms_onnx", "infer_ms_iqr", "infer_ms_onnx_iqr", "train_total_s",
              "detect_ms"]
# A detector's primary metric (task=detection), compared like acc: with the equal-budget reference and the baseline.
DETECTION_RELATIVE = ["map50_delta_pt", "map50_delta_pt_vs_base"]
CROSS_HOST = "timed on several hosts: no mean of absolute times"
SPEEDUPS = list(tracking.GRID_SPEEDUPS)  # infer_speedup, infer_speedup_mt, ..., infer_speedup_onnx_batch
QUARTILES = ("_q25", "_q75")
FILES = ("grid.csv", "grid_seeds.csv", "grid.md", "grid.json", "learning_curves.csv", "acc_vs_params.png",
         "acc_vs_latency.png", "relative.png", "grid.html")
CURVES_FILE = "learning_curves.csv"  # per-epoch metrics; "curves" alone would clash with the trade-off curves
CURVES_DIR = "learning_curves"  # learning_curves/learning_curves_<backbone>.png: one folder, so dvc.yaml declares them whatever the backbones
TRADEOFFS = (("params_nonzero", "acc_vs_params.png", "non-zero parameters", True),
             ("infer_ms", "acc_vs_latency.png", "latency, batch 1, eager PyTorch (ms)", False))
SENTINEL_TOLERANCE = 0.05  # the none cell timed against itself may read 0.95x-1.05x before a host's timing is noise
UNRELIABLE = "unreliable: timing noise"
NOISE, NOT_FASTER, SLOWER, CAP, UNEQUAL = ("within noise", "not measurably faster", "measurably slower",
                                          "hit the epoch cap", "unequal budget")


class ReportError(ConfigError):
    """Nothing to report (no runs, no baseline, bad filter)."""


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    num, den = num.astype(float), den.astype(float)
    return (num / den).where((den > 0) & (num > 0))


def latest_per_cell(runs: pd.DataFrame, include_sweeps: bool = False) -> pd.DataFrame:
    """One run per cell and seed, chosen by the cell's config, with the runs left out named in ``other_runs``.

    Only FINISHED runs with the cell tags count; runs that group others (tag ``prunegrid.kind`` = ``grid``
    or ``sweep``) never do, and sweep trials (tag ``sweep_trial``, or nested under a sweep's parent run)
    only with ``include_sweeps``. Tags alone do not make a cell: the latest run of a (backbone, prune,
    dataset, loss) fixes its config (``cell_config``: every param but the seed and where the run writes),
    and each seed takes its latest FINISHED run of that config. Older runs of the config, runs of another
    config and the sweep trials left out are listed by id in ``other_runs`` (the grid's notes)."""
    if runs.empty:
        return runs
    if "kind" in runs:
        runs = runs[~runs["kind"].isin(tracking.PARENT_KINDS)]
    runs = runs[runs.get("status", "FINISHED") == "FINISHED"]
    runs = runs[[all(str(v) for v in row) for row in runs[KEYS].itertuples(index=False)]] if len(runs) else runs
    runs = runs.sort_values("start_time", kind="stable").copy()
    if "cell_config" not in runs:
        runs["cell_config"] = ""
    trial = runs.get(tracking.TAG_SWEEP_TRIAL, pd.Series("", index=runs.index)).fillna("").astype(str) != ""
    left_out = runs[trial] if not include_sweeps else runs.iloc[:0]
    runs = runs[~trial] if not include_sweeps else runs
    chosen, notes_of = [], {}
    for key, group in runs.groupby(GROUP_KEYS, sort=False):
        config = group["cell_config"].iloc[-1]
        notes = []
        for _, seed in group.groupby("seed", sort=False):
            same = seed[seed["cell_config"] == config]
            if same.empty:
                notes.append(f"seed {seed['seed'].iloc[0]} left out, only runs of another config: "
                             + _ids(seed, group.iloc[-1]))
                continue
            pick = same.iloc[-1]
            chosen.append(pick.name)
            older, other = same.iloc[:-1], seed[seed["cell_config"] != config]
            if len(older):
                notes.append(f"older runs of seed {pick['seed']}: {_ids(older)}")
            if len(other):
                notes.append(f"seed {pick['seed']}, runs of another config: {_ids(other, pick)}")
        trials = left_out[(left_out[GROUP_KEYS] == pd.Series(key, index=GROUP_KEYS)).all(axis=1)]
        if len(trials):
            notes.append(f"sweep trials left out: {_ids(trials)}")
        notes_of[key] = "; ".join(notes)
    out = runs.loc[chosen].copy()
    out["other_runs"] = [notes_of[tuple(r)] for r in out[GROUP_KEYS].itertuples(index=False)]
    return out.reset_index(drop=True)


def _ids(runs: pd.DataFrame, against: pd.Series | None = None, most: int = 4) -> str:
    """``ab12cd34, ef56...`` (short run ids, the first ``most``); with ``against``, each with the params
    its config differs in."""
    def one(r: pd.Series) -> str:
        text = str(r["run_id"])[:8]
        if r.get(tracking.TAG_SWEEP_TRIAL):
            text += f" (trial {r[tracking.TAG_SWEEP_TRIAL]})"
        if against is not None and isinstance(r.get("cell_params"), dict) and isinstance(against.get("cell_params"), dict):
            a, b = r["cell_params"], against["cell_params"]
            differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if differ:
                text += f" ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''} differ)"
        return text
    shown = [one(r) for _, r in runs.iloc[::-1].head(most).iterrows()]
    return ", ".join(shown) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def _ref_of(prune: str, tag) -> str:
    if isinstance(tag, str) and tag:
        return tag
    return prune if is_baseline_family(prune) else BASELINE


def rows(runs: pd.DataFrame, include_sweeps: bool = False) -> pd.DataFrame:
    """Per-seed grid rows: CONTRACT columns, budget columns, relative columns, optional columns, ``run_id``
    and ``other_runs`` (:func:`latest_per_cell`)."""
    cells = latest_per_cell(runs, include_sweeps)
    if cells.empty:
        raise ReportError("no FINISHED runs with the cell tags (backbone, prune, dataset, loss, seed); run the grid first")
    out = cells[KEYS + ["run_id", "experiment_id"]].copy()
    out[HOST] = cells[HOST].fillna("") if HOST in cells else ""
    for col, key in {**tracking.GRID_METRICS, **tracking.GRID_OPTIONAL_METRICS, **tracking.GRID_BUDGET_METRICS}.items():
        out[col] = pd.to_numeric(cells[key], errors="coerce") if key in cells else np.nan
    tags = cells[TAG_REF_PRUNE] if TAG_REF_PRUNE in cells else pd.Series("", index=cells.index)
    out["ref_prune"] = [_ref_of(p, t) for p, t in zip(out["prune"], tags)]
    same = cells[tracking.BASELINE_INFER_MS] if tracking.BASELINE_INFER_MS in cells else pd.Series(np.nan, cells.index)
    out["_baseline_infer_ms"] = pd.to_numeric(same, errors="coerce")

    base = out[out["prune"] == BASELINE].set_index(JOIN)
    b = out[JOIN].merge(base[["params_nonzero", "flops", "acc", "map50", "epoch_s", "infer_ms", HOST]].add_prefix("b_"),
                        left_on=JOIN, right_index=True, how="left")
    b.index = out.index
    refs = out.set_index(JOIN + ["prune"])[["acc", "map50", "budget_epochs"]].add_prefix("r_")
    r = out[JOIN + ["ref_prune"]].merge(refs, left_on=JOIN + ["ref_prune"], right_index=True, how="left")
    r.index = out.index

    out["ref_budget_epochs"] = r["r_budget_epochs"]
    out["params_reduction_pct"] = 100 * (1 - _ratio(out["params_nonzero"], b["b_params_nonzero"]))
    out["flops_reduction_pct"] = 100 * (1 - _ratio(out["flops"], b["b_flops"]))
    out["acc_delta_pt"] = 100 * (out["acc"] - r["r_acc"])
    out["acc_delta_pt_vs_base"] = 100 * (out["acc"] - b["b_acc"])
    out["map50_delta_pt"] = 100 * (out["map50"] - r["r_map50"])
    out["map50_delta_pt_vs_base"] = 100 * (out["map50"] - b["b_map50"])
    same_host = b["b_" + HOST] == out[HOST]
    out["epoch_speedup"] = _ratio(b["b_epoch_s"], out["epoch_s"]).where(same_host)
    base_ms = out["_baseline_infer_ms"].where(out["_baseline_infer_ms"] > 0, b["b_infer_ms"].where(same_host))
    for col, key in tracking.GRID_SPEEDUPS.items():
        for q in ("", *QUARTILES):
            out[col + q] = pd.to_numeric(cells[key + q], errors="coerce") if key + q in cells else np.nan
    out["infer_speedup"] = out["infer_speedup"].fillna(_ratio(base_ms, out["infer_ms"]))

    speedups = [c + q for c in SPEEDUPS for q in ("", *QUARTILES) if c + q not in RELATIVE and out[c + q].notna().any()]
    optional = [c for c in OPTIONAL + DETECTION_RELATIVE + ["train_total_s"] if out[c].notna().any()]
    out["other_runs"] = cells["other_runs"]
    out = out[BASE_COLUMNS + BUDGET + RELATIVE + speedups + optional + [HOST, "run_id", "other_runs", "experiment_id"]]
    return _ordered(out, ["_s"], _s=pd.to_numeric(out["seed"], errors="coerce"))


def _ordered(table: pd.DataFrame, extra: list[str], **cols) -> pd.DataFrame:
    """Baseline first, then its references, then the methods alphabetically."""
    names = set(table["prune"])
    refs = sorted((p for p in names if is_baseline_family(p) and p != BASELINE), key=lambda p: (len(p), p))
    order = {p: i for i, p in enumerate([BASELINE, *refs, *sorted(names - {BASELINE, *refs})])}
    table = table.assign(_o=table["prune"].map(order), **cols)
    return (table.sort_values(["backbone", "dataset", "loss", "_o", *extra])
            .drop(columns=["_o", *extra]).reset_index(drop=True))


def _numeric(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in KEYS + ["run_id", "experiment_id", "ref_prune", HOST, "other_runs"]]


def seed_means(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, prune, dataset, loss): ``n_seeds``, ``seeds``, ``ref_prune``, and for
    every numeric column its mean (same name) and standard deviation over seeds (``<col>_std``)."""
    num = _numeric(grid)
    g = grid.groupby(GROUP_KEYS, sort=False)
    mean, std = g[num].mean(), g[num].std(ddof=1)
    out = pd.DataFrame(index=mean.index)
    out["n_seeds"] = g.size()
    out["seeds"] = g["seed"].agg(lambda s: " ".join(map(str, s)))
    out["ref_prune"] = g["ref_prune"].agg(lambda s: "/".join(dict.fromkeys(s)))
    hosts = g[HOST].nunique() if HOST in grid else pd.Series(1, index=mean.index)
    for c in num:
        out[c] = mean[c].where(hosts <= 1) if c in HOST_TIMES else mean[c]
        out[f"{c}_std"] = std[c].where(hosts <= 1) if c in HOST_TIMES else std[c]
    if HOST in grid:
        out[HOST] = g[HOST].agg(lambda s: "/".join(dict.fromkeys(s)))
    if "other_runs" in grid:
        out["other_runs"] = g["other_runs"].agg(lambda s: "; ".join(dict.fromkeys(x for x in s if x)))
    return _ordered(out.reset_index(), [])


def select(runs: pd.DataFrame, run_ids: Iterable[str] | None = None, grid: dict | None = None) -> pd.DataFrame:
    """Keep the given run ids and/or the cells of a grid (``params.yaml``'s ``grid`` section)."""
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    if grid is not None and not runs.empty:
        prunes = [BASELINE, *[r["prune"] for r in grid.get("references", [])],
                  *grid.get("methods", {}).get("from_baseline", []), *grid.get("methods", {}).get("scratch", []),
                  *(item["label"] for item in (grid.get("tradeoff") or {}).values())]
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
    if col in ("params", "params_nonzero", "flops", "budget_images"):
        return f"{v:,.0f}"
    if col in ("acc", "f1_macro", "cam_agreement", "converged", "map50", "map"):
        return f"{v:.4f}" if col != "converged" else f"{v:.2f}"
    if col.endswith("_pct") or col.startswith(("acc_delta_pt", "map50_delta_pt")):
        return f"{v:+.1f}"
    if "speedup" in col:
        return f"{v:.2f}x"
    if col.endswith("budget_epochs"):
        return f"{v:.3g}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _pm(col: str, mean, std) -> str:
    text = _fmt(col, mean)
    if text and std is not None and not (isinstance(std, float) and np.isnan(std)):
        text += f" ± {_fmt(col, std).lstrip('+').rstrip('x')}"
    return text


def _speedup_text(r: pd.Series, col: str) -> str:
    """``1.23x ± 0.05 [1.10, 1.35]``: mean over seeds ± std, [mean first quartile, mean third quartile]."""
    text = _pm(col, r.get(col), r.get(f"{col}_std"))
    q25, q75 = r.get(f"{col}_q25", np.nan), r.get(f"{col}_q75", np.nan)
    if text and np.isfinite(q25) and np.isfinite(q75):
        text += f" [{q25:.2f}, {q75:.2f}]"
    return text


def speedup_interval(r: pd.Series, col: str) -> tuple[float, float]:
    """The interval a speed-up is judged by: the run's interquartile range of paired ratios (mean
    over seeds) widened to the mean ± std over seeds."""
    m, sd = r.get(col, np.nan), r.get(f"{col}_std", np.nan)
    lo = [v for v in (r.get(f"{col}_q25", np.nan), m - sd if np.isfinite(sd) else np.nan, m) if np.isfinite(v)]
    hi = [v for v in (r.get(f"{col}_q75", np.nan), m + sd if np.isfinite(sd) else np.nan, m) if np.isfinite(v)]
    return (min(lo), max(hi)) if lo and hi else (np.nan, np.nan)


def speed_mark(r: pd.Series, col: str) -> str | None:
    """``not measurably faster`` when the interval includes 1.0, ``measurably slower`` when it lies below."""
    if col not in r or not np.isfinite(r[col]):
        return None
    lo, hi = speedup_interval(r, col)
    if hi < 1.0:
        return SLOWER
    return NOT_FASTER if lo <= 1.0 else None


def _deployment(col: str) -> str:
    runtime = "onnx" if "_onnx" in col else "eager"
    where = {"_mt": ", batch 1 all cores", "_batch": ", benchmark batch"}
    return runtime + next((v for k, v in where.items() if col.endswith(k)), "")


def _link(run_id: str, exp_id: str, ui: str | None) -> str:
    if not ui:
        return run_id
    from prunegrid.ui import experiment_url

    return f"[{run_id[:8]}]({experiment_url(ui, exp_id, run_id)})"


def sentinels(means: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """The noise sentinel of each dataset, host and runtime: the ``none`` cell's speed-up against the dense
    baseline it is identical to (``infer_speedup``, ``infer_speedup_onnx``), which reads 1.00x on a quiet host.
    Keys ``(dataset, host, column)``; only sentinels off 1.00 by more than :data:`SENTINEL_TOLERANCE`."""
    out = {}
    baseline_rows = means[means["prune"] == BASELINE]
    for _, r in baseline_rows.iterrows():
        for col in ("infer_speedup", "infer_speedup_onnx"):
            v = r.get(col, np.nan)
            if isinstance(v, (int, float)) and np.isfinite(v) and abs(v - 1.0) > SENTINEL_TOLERANCE:
                out[(str(r["dataset"]), str(r.get(HOST, "")), col)] = float(v)
    return out


def unreliable(r: pd.Series, noisy: dict[tuple[str, str, str], float], col: str) -> str | None:
    """``unreliable: timing noise (sentinel 0.75x)`` when the row's host and runtime failed the sentinel."""
    v = noisy.get((str(r["dataset"]), str(r.get(HOST, "")), col))
    return None if v is None else f"{UNRELIABLE} ({_deployment(col)}: sentinel {v:.2f}x)"


def notes(r: pd.Series, noisy: dict[tuple[str, str, str], float] | None = None) -> list[str]:
    """The honesty marks of one seed-mean row; ``noisy``: :func:`sentinels` of the table."""
    out = [m for col in ("infer_speedup", "infer_speedup_onnx") if (m := unreliable(r, noisy or {}, col))]
    n = int(r["n_seeds"])
    own_ref = r["prune"] == r["ref_prune"]
    if not own_ref:
        detection = not np.isfinite(r.get("acc", np.nan)) and np.isfinite(r.get("map50", np.nan))
        key, what = ("map50_delta_pt", "mAP50") if detection else ("acc_delta_pt", "accuracy")
        d, sd = r.get(key, np.nan), r.get(f"{key}_std", np.nan)
        if n < 2:
            out.append("one seed: no spread")
        elif np.isfinite(d) and np.isfinite(sd) and abs(d) <= sd:
            out.append(f"{what} {NOISE}")
        if np.isfinite(r["budget_epochs"]) and np.isfinite(r["ref_budget_epochs"]) \
                and r["budget_epochs"] != r["ref_budget_epochs"]:
            out.append(UNEQUAL)
    if "/" in str(r.get(HOST, "")):
        out.append(CROSS_HOST)
    if not is_baseline_family(r["prune"]):
        for col in ("infer_speedup", "infer_speedup_onnx"):
            mark = speed_mark(r, col)
            if mark:
                out.append(f"{mark} ({_deployment(col)})")
    front = [what for col, what in (("pareto_params", "params"), ("pareto_latency", "latency"))
             if isinstance(r.get(col), (bool, np.bool_)) and r.get(col)]
    if front:
        out.append(f"Pareto front ({', '.join(front)})")
    if np.isfinite(r.get("converged", np.nan)) and r["converged"] < 1:
        out.append(f"{CAP} ({int(round((1 - r['converged']) * n))}/{n} seeds)")
    if r.get("other_runs"):
        out.append(f"not used: {r['other_runs']}")
    return out


SUMMARY = ["n_seeds", "budget_epochs", "ref_prune", "ref_budget_epochs", "converged", "acc", "acc_delta_pt",
           "acc_delta_pt_vs_base", "map50", "map50_delta_pt", "map50_delta_pt_vs_base", "map", "params_nonzero", "params_reduction_pct", "flops_reduction_pct", "epoch_speedup",
           "infer_ms", "infer_speedup", "infer_ms_onnx", "infer_speedup_onnx", "train_s", "train_total_s", "size_mb",
           "infer_peak_mb", "train_peak_mb", "detect_ms", "detect_peak_mb", "cam_agreement"]


def _summary_value(r: pd.Series, c: str) -> str:
    if c in ("n_seeds", "ref_prune"):
        return str(r[c])
    if c in SPEEDUPS:
        return _speedup_text(r, c)
    if c in ("infer_ms", "infer_ms_onnx") and np.isfinite(r.get(f"{c}_iqr", np.nan)):
        return f"{_pm(c, r[c], r.get(f'{c}_std'))} (IQR {r[f'{c}_iqr']:.2g})"
    return _pm(c, r[c], r.get(f"{c}_std"))


def speedup_table(means: pd.DataFrame) -> list[str]:
    """Markdown lines: every speed-up of every method with its spread and mark, one runtime per column."""
    cols = [c for c in SPEEDUPS if c in means.columns and means[c].notna().any()]
    rows_ = means[means["prune"] != BASELINE]
    if not cols or rows_.empty:
        return []
    lines = ["", "## Speed-ups by runtime and deployment", "",
             "Round-by-round ratio of the dense baseline's latency to the model's, timed interleaved in one process "
             "and one runtime: mean over seeds ± std [mean first quartile, mean third quartile]. Edge: batch 1 on "
             "`measure.threads`; all cores: batch 1 on every core; batch: `measure.batch_size` on every core. "
             "Reference rows (`none_ftF`: the baseline's architecture) show the measurement's noise.", "",
             "| " + " | ".join(GROUP_KEYS[:2] + [_deployment(c) for c in cols] + ["notes"]) + " |",
             "|" + "---|" * (len(cols) + 3)]
    noisy = sentinels(means)
    for _, r in rows_.iterrows():
        marks = [m for c in ("infer_speedup", "infer_speedup_onnx") if (m := unreliable(r, noisy, c))]
        marks += [] if is_baseline_family(r["prune"]) else [
            f"{m} ({_deployment(c)})" for c in cols if (m := speed_mark(r, c))]
        lines.append("| " + " | ".join([str(r["backbone"]), str(r["prune"])] + [_speedup_text(r, c) for c in cols]
                                       + ["; ".join(marks)]) + " |")
    return lines


def markdown(grid: pd.DataFrame, means: pd.DataFrame, ui: str | None = None, extra: list[str] = ()) -> str:
    """The summary, the speed-ups, ``extra`` lines (the MLflow sections), then every seed's row."""
    cols = [c for c in SUMMARY if c in means.columns]
    lines = ["# Comparison grid", "",
             "Mean ± std over seeds, one row per cell. `acc_delta_pt` compares with the equal-budget reference "
             "`ref_prune` (a `prune=none` model trained for the same total epochs, same seed); "
             "`acc_delta_pt_vs_base` with the plain baseline. Size, FLOPs and speed columns compare with the `none` "
             "cell; `infer_speedup` (eager PyTorch) and `infer_speedup_onnx` (ONNX Runtime) time the model against "
             "the dense baseline in interleaved rounds in one process, batch 1 on `measure.threads` threads, shown as "
             "mean ± std over seeds [first, third quartile of the paired ratios]; `infer_ms` shows its interquartile "
             "range. `infer_peak_mb` is the memory the model adds when loaded and run in a fresh process. Detection "
             "cells (`task=detection`) have `map50` (test mAP at IoU 0.5) where classifiers have `acc`, compared the "
             "same way (`map50_delta_pt`, `map50_delta_pt_vs_base`), and the whole detector's `detect_ms` (reading, "
             "resizing, model, NMS per image, absolute: compare on one host) and `detect_peak_mb` (its process's RSS "
             "sampled every second, as pidstat reports it). Differences "
             f"inside their spread are marked \"{NOISE}\", speed-ups whose interval includes 1.0 \"{NOT_FASTER}\", "
             f"below 1.0 \"{SLOWER}\"; `converged` is the share of seeds whose baseline training was ended by early "
             "stopping (the rest hit the epoch cap); \"Pareto front\" marks the cells no other cell beats on both "
             "accuracy and non-zero parameters (params) or latency (`infer_ms`). See `prunegrid.report.grid`.", "",
             "| " + " | ".join(GROUP_KEYS + cols + ["notes"]) + " |", "|" + "---|" * (len(GROUP_KEYS) + len(cols) + 1)]
    hosts = sorted({h for v in means.get(HOST, pd.Series(dtype=str)) for h in str(v).split("/") if h})
    if len(hosts) > 1:
        lines[2:2] = [f"Timed on {len(hosts)} hosts ({', '.join(hosts)}). Absolute times (`infer_ms`, `train_s`, ...) "
                      "are figures of their own host and are not compared across hosts: the latency Pareto front is "
                      "drawn per host, `epoch_speedup` is empty where a method and its baseline ran on different "
                      "hosts, and every speed-up is a ratio timed in one process on one host.", ""]
    noisy = sentinels(means)
    if noisy:
        lines[2:2] = ["The `none` cell timed against itself (the noise sentinel) read " + ", ".join(
            f"{v:.2f}x in {_deployment(col)} on {host or 'its host'} ({ds})" for (ds, host, col), v in noisy.items())
            + f": off 1.00 by more than {SENTINEL_TOLERANCE:.0%}, so every speed-up of that host and runtime is marked "
            f"\"{UNRELIABLE}\".", ""]
    for _, r in means.iterrows():
        vals = [_summary_value(r, c) for c in cols]
        lines.append("| " + " | ".join([str(r[k]) for k in GROUP_KEYS] + vals + ["; ".join(notes(r, noisy))]) + " |")
    lines += speedup_table(means)
    lines += list(extra)
    per = [c for c in grid.columns if c not in ("experiment_id", "other_runs")]
    lines += ["", "## Per seed", "", "| " + " | ".join(per) + " |", "|" + "---|" * len(per)]
    for _, r in grid.iterrows():
        cells = [_link(r["run_id"], r["experiment_id"], ui) if c == "run_id" else _fmt(c, r[c]) for c in per]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(r: pd.Series, table: pd.DataFrame) -> str:
    return figures.label(r, table)


def _std(means: pd.DataFrame, col: str) -> np.ndarray:
    return means[f"{col}_std"].fillna(0.0).to_numpy() if f"{col}_std" in means else np.zeros(len(means))


def mark_fronts(means: pd.DataFrame) -> pd.DataFrame:
    """``pareto_params`` / ``pareto_latency``: the cell is on the Pareto front of accuracy against non-zero
    parameters / latency among the cells of its dataset and loss (costs must be positive)."""
    means = means.copy()
    for (x, *_), col in zip(TRADEOFFS, ("pareto_params", "pareto_latency")):
        means[col] = False
        by = ["dataset", "loss"] + ([HOST] if col == "pareto_latency" and HOST in means else [])
        for _, g in means.groupby(by, sort=False):
            cost = pd.to_numeric(g[x], errors="coerce")
            score = g["acc"].fillna(g["map50"]) if "map50" in g else g["acc"]
            means.loc[g.index, col] = figures.pareto_mask(cost.where(cost > 0), score)
    return means


def _scored(means: pd.DataFrame) -> pd.DataFrame:
    """``means`` with a detection cell's ``map50`` (and its std) in the ``acc`` columns the trade-off
    figures draw: each dataset's own primary metric, fronts drawn per dataset and loss."""
    if "map50" not in means or means["map50"].isna().all():
        return means
    out = means.copy()
    detection = out["acc"].isna() & out["map50"].notna()
    out.loc[detection, "acc"] = out.loc[detection, "map50"]
    if "acc_std" in out and "map50_std" in out:
        out.loc[detection, "acc_std"] = out.loc[detection, "map50_std"]
    return out


def plots(means: pd.DataFrame, out: Path) -> list[Path]:
    """The trade-offs (accuracy vs non-zero params and vs latency: one point per cell, error bars over
    seeds, the Pareto front as a line) and bars of the relative columns with their spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = _scored(means)
    paths = [figures.save(figures.tradeoff_figure(scored, x, xlabel, log=log,
                                                  by=HOST if x == "infer_ms" and HOST in means else None), out / name)
             for x, name, xlabel, log in TRADEOFFS]
    labels = [_label(r, means) for _, r in means.iterrows()]
    ncols = 3
    nrows = -(-len(RELATIVE) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.25 * max(map(len, labels), default=0)),
                             sharey=False, squeeze=False)
    for ax in axes.flat[len(RELATIVE):]:
        ax.set_visible(False)
    for ax, col in zip(axes.flat, RELATIVE):
        vals = means[col].fillna(0.0)
        ax.bar(range(len(means)), vals, yerr=_std(means, col), capsize=3,
               color=["tab:gray" if is_baseline_family(p) else "tab:blue" for p in means["prune"]])
        ax.set_xticks(range(len(means)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(RELATIVE_TITLES.get(col, col), fontsize=10)
        ax.axhline(1.0 if col.endswith("speedup") else 0.0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "relative.png", dpi=90)
    plt.close(fig)
    paths.append(out / "relative.png")
    return paths


def _json_value(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def to_json(grid: pd.DataFrame, means: pd.DataFrame) -> dict:
    """``{"cells": {cell name without seed: mean row}, "seeds": {run name: per-seed row}}``."""
    return {"cells": {"-".join(str(r[k]) for k in GROUP_KEYS): {k: _json_value(v) for k, v in r.items()
                                                                if k not in GROUP_KEYS}
                      for _, r in means.iterrows()},
            "seeds": {tracking.run_name(dict(r[KEYS])): {k: _json_value(v) for k, v in r.items() if k not in KEYS}
                      for _, r in grid.iterrows()}}


def console(means: pd.DataFrame) -> str:
    cols = ["n_seeds", "budget_epochs", "ref_prune", "acc", "acc_delta_pt", "map50", "map50_delta_pt",
            "params_reduction_pct", "infer_speedup",
            "infer_speedup_onnx"]
    cols = [c for c in cols if c in means.columns and (c in ("n_seeds", "ref_prune") or means[c].notna().any())]
    shown = means[GROUP_KEYS[:2] + cols].copy()
    for c in cols:
        if c not in ("n_seeds", "ref_prune"):
            shown[c] = [_summary_value(r, c) for _, r in means.iterrows()]
    return shown.to_string(index=False)


def mlflow_markdown(parents: dict[str, str], experiments: dict[str, str], regs: list, ui: str | None) -> list[str]:
    """The grid parent run(s) and the registered models, for ``grid.md``."""
    lines = []
    if parents:
        lines += ["", "## Grid run in MLflow", "",
                  "Every cell run of this grid is nested under its experiment's grid run (tag `prunegrid.kind=grid`), "
                  "which holds this report's tables and figures as artifacts:", ""]
        lines += [f"- {experiments[e]}: {_link(r, e, ui)}" for e, r in parents.items()]
    return lines + publish.registry_markdown(regs)


def write_curves(uri: str, table: pd.DataFrame, out: Path) -> list[Path]:
    """``learning_curves.csv`` (every epoch metric of every selected run, by cell and seed) and
    ``learning_curves/learning_curves_<backbone>.png`` (one figure per backbone, one line per cell)."""
    history = tracking.metric_histories(uri, list(table["run_id"]))
    curves = figures.curves_table(history, table)
    curves.to_csv(out / CURVES_FILE, index=False)
    folder = out / CURVES_DIR
    folder.mkdir(exist_ok=True)
    for old in folder.glob(f"{CURVES_DIR}_*.png"):
        old.unlink()
    paths = [out / CURVES_FILE]
    for backbone in dict.fromkeys(curves["backbone"]):
        paths.append(figures.save(figures.curves_figure(curves, backbone), folder / f"{CURVES_DIR}_{backbone}.png"))
    return paths


def method_of(runs: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Each prune label's method and strength, from its runs' tags: ``channel-r0.7`` -> (``channel``, ``ratio 0.7``)."""
    out = {}
    for _, r in runs.iterrows():
        label = str(r["prune"])
        if label in out:
            continue
        knob, value = str(r.get(tracking.TAG_STRENGTH_KNOB) or ""), str(r.get(tracking.TAG_STRENGTH) or "")
        out[label] = (str(r.get(tracking.TAG_METHOD) or "") or label, f"{knob} {value}".strip() if value else "")
    return out


def write_html(table: pd.DataFrame, means: pd.DataFrame, runs: pd.DataFrame, out: Path, ui: str | None) -> Path:
    """``grid.html`` (:mod:`prunegrid.report.html`) from the tables and the figures already written under ``out``."""
    noisy = sentinels(means)
    figs = [out / name for _, name, *_ in TRADEOFFS] + [out / name for _, name, _ in trade.FIGURES] + [out / "relative.png"]
    return page_html.write(means, table, figs, ["; ".join(notes(r, noisy)) for _, r in means.iterrows()],
                           method_of(runs), out, ui)


def build(uri: str | None = None, experiments: list[str] | None = None, out: str | Path = "reports",
          run_ids: Iterable[str] | None = None, grid: dict | None = None, ui: str | None = None,
          mlflow_write: bool = True, log=print, include_sweeps: bool = False) -> pd.DataFrame:
    """Read the runs, write ``grid.csv`` (seed means), ``grid_seeds.csv``, ``grid.md``, ``grid.json``,
    ``learning_curves.csv``, ``tradeoff.csv`` and the figures under ``out``; return the per-seed rows. With ``mlflow_write``, also
    nest the selected runs under a grid parent run per experiment (which gets the files as artifacts)
    and register each method's best model (:mod:`prunegrid.report.publish`)."""
    uri = tracking.resolve_uri(uri)
    runs = tracking.load_cell_runs(uri, experiments)
    if runs.empty:
        where = f"experiments {', '.join(experiments)}" if experiments else "any experiment"
        raise ReportError(f"no FINISHED runs in {uri} ({where}); run the grid first (`dvc repro`) or pass --tracking-uri")
    runs = select(runs, run_ids, grid)
    if runs.empty:
        raise ReportError(f"none of the selected runs is in {uri}; check --tracking-uri / --experiment")
    table = rows(runs, include_sweeps)
    means = mark_fronts(seed_means(table))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = table[["run_id", "experiment_id", "prune"]].merge(
        runs.drop(columns=["experiment_id", "prune"]), on="run_id", how="left")
    client = tracking.open_client(uri) if mlflow_write else None
    names = ({e: client.get_experiment(e).name for e in dict.fromkeys(table["experiment_id"])}
             if mlflow_write else {})
    parents = publish.start_parents(uri, names, grid) if mlflow_write else {}
    status = "FAILED"
    try:
        if parents:
            publish.nest(uri, parents, cells, log)
        if mlflow_write:
            publish.log_deltas(uri, table)
        regs = publish.register_best(uri, cells, names, log) if mlflow_write else []
        files = [out / n for n in FILES[:4]]
        means.to_csv(out / "grid.csv", index=False)
        table.drop(columns=["experiment_id"]).to_csv(out / "grid_seeds.csv", index=False)
        curves, trade_files = trade.write(table, runs, out)
        (out / "grid.md").write_text(markdown(table, means, ui, [*trade.markdown(curves),
                                                                 *mlflow_markdown(parents, names, regs, ui)]))
        (out / "grid.json").write_text(json.dumps(to_json(table.drop(columns=["experiment_id"]), means), indent=1))
        files += trade_files + write_curves(uri, table, out) + plots(means, out)
        files.append(write_html(table, means, runs, out, ui))
        status = "FINISHED"
    finally:
        if parents:
            publish.finish(uri, parents, files if status == "FINISHED" else [], status)
    return table
