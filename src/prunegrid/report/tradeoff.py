"""Trade-off curves: every method as accuracy against compression and measured speed-up, next to its controls.

Blalock, Gonzalez Ortiz, Frankle & Guttag ("What is the State of Neural Network Pruning?", MLSys 2020)
ask for curves, not points: several strengths per method, compression ratio and speed-up, mean ± std
over seeds, random baselines, one code path for every method. Liu, Sun, Zhou, Huang & Darrell
("Rethinking the Value of Network Pruning", ICLR 2019) add Scratch-E, the pruned architecture trained
from scratch for the same epochs.

The rows are the grid's own per-seed rows (:func:`prunegrid.report.grid.rows`), grouped by the run
tags the pipeline sets (``method``, ``strength``, ``control``), so every figure comes from the same
measurements as the grid. Per method × control × strength, :func:`table` gives:

- ``compression_ratio`` = dense non-zero parameters / the model's non-zero parameters, and
  ``macs_ratio`` = dense FLOPs / the model's FLOPs (the MACs ratio: a multiply-add counts 2 in both),
  each against the same seed's ``none`` cell;
- ``infer_speedup`` (eager PyTorch) and ``infer_speedup_onnx`` (ONNX Runtime): the run's own
  interleaved speed-ups against the dense baseline, as in the grid;
- ``acc`` mean ± std, ``acc_delta_pt`` against the equal-budget reference, ``n_seeds``;
- for a method's own rows, ``vs_random_pt`` and ``vs_scratch_pt``: its accuracy minus its control's at
  the same strength, paired by seed (mean, ``_std``), and ``no_better_than_random`` where that
  difference is within its spread (mean minus std at or below zero).

:func:`largest_within` gives, per method, the largest compression whose accuracy is within a given
number of points of the equal-budget reference. :func:`figures` draws both curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter

from prunegrid import tracking
from prunegrid.budget import BASELINE, is_baseline_family
from prunegrid.plots import close, plt

JOIN = ["backbone", "dataset", "loss", "seed"]
CURVE = ["backbone", "dataset", "loss", "method", "control", "strength_knob", "strength"]
TAGS = {"method": tracking.TAG_METHOD, "strength_knob": tracking.TAG_STRENGTH_KNOB,
        "strength": tracking.TAG_STRENGTH, "control": tracking.TAG_CONTROL}
MEASURED = ["acc", "acc_delta_pt", "compression_ratio", "macs_ratio", "infer_speedup", "infer_speedup_onnx"]
NONE = "none"
FILE = "tradeoff.csv"
FIGURES = (("compression_ratio", "tradeoff_compression.png", "compression ratio (dense / non-zero parameters)"),
           ("infer_speedup", "tradeoff_speedup.png", "measured speed-up, batch 1, eager PyTorch (x)"))
DASHES = {"random": "--", "scratch": ":"}


def with_tags(seed_rows: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The per-seed grid rows with the method tags of their runs (runs logged without them: the
    method is the prune label, with no strength and no control)."""
    have = [t for t in TAGS.values() if t in runs]
    tags = runs[["run_id", *have]].rename(columns={v: k for k, v in TAGS.items()})
    out = seed_rows.merge(tags, on="run_id", how="left")
    for col in TAGS:
        out[col] = out[col].fillna("") if col in out else ""
    out["method"] = out["method"].where(out["method"] != "", out["prune"])
    out["control"] = out["control"].where(out["control"] != "", NONE)
    return out


def _per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    base = rows[rows["prune"] == BASELINE].set_index(JOIN)[["params_nonzero", "flops"]].add_prefix("dense_")
    out = rows.merge(base, left_on=JOIN, right_index=True, how="left")
    out["compression_ratio"] = out["dense_params_nonzero"] / out["params_nonzero"]
    out["macs_ratio"] = out["dense_flops"] / out["flops"]
    out["strength_value"] = pd.to_numeric(out["strength"], errors="coerce")
    for col in MEASURED:
        if col not in out:
            out[col] = np.nan
    return out


def _paired(per_seed: pd.DataFrame, control: str) -> pd.DataFrame:
    """Per seed: a method's accuracy minus its ``control``'s at the same strength, in points."""
    keys = [k for k in CURVE if k != "control"] + ["seed"]
    own = per_seed[per_seed["control"] == NONE].set_index(keys)["acc"]
    other = per_seed[per_seed["control"] == control].set_index(keys)["acc"]
    diff = (100 * (own - other)).dropna().rename("diff").reset_index()
    return diff


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method × control × strength (methods whose YAML names a strength), with the
    columns the module docstring lists, ordered by method, control and strength."""
    per_seed = _per_seed(rows)
    curves = per_seed[(per_seed["strength_knob"] != "") & ~per_seed["prune"].map(is_baseline_family)]
    if curves.empty:
        return pd.DataFrame(columns=[*CURVE, "n_seeds"])
    g = curves.groupby(CURVE, sort=False)
    out = g[MEASURED].mean()
    for col in MEASURED:
        out[f"{col}_std"] = g[col].std(ddof=1)
    out["n_seeds"] = g.size()
    out["ref_prune"] = g["ref_prune"].agg(lambda s: "/".join(dict.fromkeys(s)))
    out["prune"] = g["prune"].agg(lambda s: "/".join(dict.fromkeys(s)))
    out = out.reset_index()
    for control, col in (("random", "vs_random_pt"), ("scratch", "vs_scratch_pt")):
        diff = _paired(curves, control)
        if diff.empty:
            out[col], out[f"{col}_std"] = np.nan, np.nan
            continue
        agg = diff.groupby([k for k in CURVE if k != "control"])["diff"].agg(["mean", "std"])
        agg = agg.rename(columns={"mean": col, "std": f"{col}_std"}).reset_index().assign(control=NONE)
        out = out.merge(agg, on=CURVE, how="left")
    spread = out["vs_random_pt_std"].fillna(0.0)
    out["no_better_than_random"] = (out["vs_random_pt"] - spread <= 0).where(out["vs_random_pt"].notna())
    out["_s"] = pd.to_numeric(out["strength"], errors="coerce")
    out["_c"] = out["control"].map(lambda c: (c != NONE, c))
    return out.sort_values(["backbone", "dataset", "loss", "method", "_c", "_s"]).drop(columns=["_s", "_c"]) \
        .reset_index(drop=True)


def largest_within(curves: pd.DataFrame, points: float = 1.0) -> pd.DataFrame:
    """Per backbone × dataset × loss × method (its own rows, no control): the largest compression ratio
    whose mean accuracy is at most ``points`` below its equal-budget reference (``NaN``: none is)."""
    own = curves[curves["control"] == NONE]
    out = []
    for keys, g in own.groupby(["backbone", "dataset", "loss", "method"], sort=False):
        ok = g[g["acc_delta_pt"] >= -points]
        best = ok.loc[ok["compression_ratio"].idxmax()] if len(ok) else None
        out.append({**dict(zip(["backbone", "dataset", "loss", "method"], keys)),
                    "strength": best["strength"] if best is not None else "",
                    "compression_ratio": best["compression_ratio"] if best is not None else np.nan,
                    "acc_delta_pt": best["acc_delta_pt"] if best is not None else np.nan})
    return pd.DataFrame(out)


def _dense(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["prune"] == BASELINE].groupby(["backbone", "dataset", "loss"])["acc"].agg(["mean", "std"])


def figure(curves: pd.DataFrame, rows: pd.DataFrame, x: str, xlabel: str):
    """Accuracy against ``x`` (log scale): one line per method through its strengths (band: ± std over
    seeds), its controls dashed (random) or dotted (Scratch-E) in its colour, and the dense baseline as a
    horizontal band (mean ± std). One panel per backbone × dataset × loss."""
    groups = list(curves.groupby(["backbone", "dataset", "loss"], sort=False)) or [(("", "", ""), curves)]
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 5.5), squeeze=False)
    dense = _dense(rows)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(curves["method"]))}
    for ax, (keys, part) in zip(axes[0], groups):
        if keys in dense.index:
            m, s = dense.loc[keys, "mean"], dense.loc[keys, "std"]
            s = 0.0 if pd.isna(s) else s
            ax.axhspan(m - s, m + s, color="grey", alpha=0.25, label=f"dense baseline {m:.3f} ± {s:.3f}")
            ax.axhline(m, color="grey", lw=1)
        for (method, control), g in part.groupby(["method", "control"], sort=False):
            g = g[pd.to_numeric(g[x], errors="coerce") > 0].sort_values(x)
            if g.empty:
                continue
            name = method if control == NONE else f"{method} ({'Scratch-E' if control == 'scratch' else control})"
            std = g["acc_std"].fillna(0.0)
            ax.plot(g[x], g["acc"], DASHES.get(control, "-"), marker="o" if control == NONE else "x",
                    color=colours[method], label=name, lw=1.6 if control == NONE else 1.2)
            ax.fill_between(g[x], g["acc"] - std, g["acc"] + std, color=colours[method],
                            alpha=0.18 if control == NONE else 0.08, lw=0)
            if control == NONE:
                for _, r in g.iterrows():
                    ax.annotate(f"{r['strength_knob'][:1]}{r['strength']}", (r[x], r["acc"]),
                                textcoords="offset points", xytext=(3, 4), fontsize=7, color=colours[method])
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}x")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set(xlabel=xlabel, ylabel="test accuracy (mean ± std over seeds)",
               title=f"{' / '.join(k for k in keys if k)}: accuracy vs {xlabel.split(' (')[0]}")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def write(rows: pd.DataFrame, runs: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """``tradeoff.csv`` and the two figures under ``out``; returns the table and the files written."""
    tagged = with_tags(rows, runs)
    curves = table(tagged)
    curves.to_csv(out / FILE, index=False)
    paths = [out / FILE]
    for x, name, xlabel in FIGURES:
        fig = figure(curves, tagged, x, xlabel)
        fig.savefig(out / name, dpi=90)
        close(fig)
        paths.append(out / name)
    return curves, paths


def markdown(curves: pd.DataFrame) -> list[str]:
    """The trade-off section of ``grid.md``: one line per method × control × strength."""
    if curves.empty:
        return []
    lines = ["", "## Trade-off curves", "",
             "Compression = dense / non-zero parameters; MACs ratio = dense / model MACs; speed-ups measured "
             "(interleaved, batch 1). vs random / vs Scratch-E: the method's accuracy minus its control's at the "
             "same strength, paired by seed (points).", "",
             "| method | control | strength | n | compression | MACs ratio | eager speed-up | ONNX speed-up | "
             "test acc | Δ vs ref (pt) | vs random (pt) | vs Scratch-E (pt) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pm(r, c, f="{:.2f}"):
        v, s = r.get(c), r.get(f"{c}_std")
        if v is None or pd.isna(v):
            return "-"
        return f.format(v) + ("" if s is None or pd.isna(s) else f" ± {f.format(s)}")

    for _, r in curves.iterrows():
        rnd = pm(r, "vs_random_pt", "{:+.1f}")
        flag = r.get("no_better_than_random")
        if isinstance(flag, (bool, np.bool_)) and flag:
            rnd += " (no better than random)"
        lines.append(f"| {r['method']} | {r['control']} | {r['strength_knob']}={r['strength']} | {r['n_seeds']} | "
                     f"{pm(r, 'compression_ratio')} | {pm(r, 'macs_ratio')} | {pm(r, 'infer_speedup')} | "
                     f"{pm(r, 'infer_speedup_onnx')} | {pm(r, 'acc', '{:.4f}')} | {pm(r, 'acc_delta_pt', '{:+.1f}')} | "
                     f"{rnd} | {pm(r, 'vs_scratch_pt', '{:+.1f}')} |")
    return lines
