"""``reports/grid.html``: the comparison grid as one self-contained web page.

No network: the CSS and the sorting script are inline and every figure is embedded as a PNG data URI,
so the file opens from disk, from the MLflow UI's artifact view (it is logged on the grid's parent
run) or from a CI artifact alike. It holds:

- the summary, one row per cell, with what people compare first: backbone, method and strength,
  test accuracy ± std over seeds, the delta against the equal-budget reference ± std, the compression
  ratio (dense / non-zero parameters), the measured eager and ONNX Runtime speed-ups, the model's own
  memory and the report's notes (:func:`prunegrid.report.grid.notes`). Click a column header to sort.
- the trade-off, Pareto and relative figures;
- the per-seed rows, folded away (``<details>``);
- a link from each seed to its MLflow run when a UI address is given (``--ui``), none otherwise.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

FILE = "grid.html"
# (column, header, format): the summary's columns, in the order people compare them
SUMMARY = (("acc", "test acc", "{:.4f}"), ("acc_delta_pt", "Δ vs reference (pt)", "{:+.2f}"),
           ("compression_ratio", "compression", "{:.2f}x"), ("infer_speedup", "eager speed-up", "{:.2f}x"),
           ("infer_speedup_onnx", "ONNX Runtime speed-up", "{:.2f}x"), ("infer_peak_mb", "model memory (MB)", "{:.1f}"),
           ("params_nonzero", "non-zero params", "{:,.0f}"), ("flops_reduction_pct", "FLOPs cut (%)", "{:+.1f}"))
SEED_COLUMNS = ("backbone", "prune", "seed", "acc", "acc_delta_pt", "ref_prune", "budget_epochs", "params_nonzero",
                "infer_ms", "infer_speedup", "infer_speedup_onnx", "infer_peak_mb", "train_s")
FIGURE_TITLES = {"acc_vs_params.png": "Accuracy vs non-zero parameters (Pareto front)",
                 "acc_vs_latency.png": "Accuracy vs latency (Pareto front)",
                 "tradeoff_compression.png": "Trade-off: accuracy vs compression",
                 "tradeoff_speedup.png": "Trade-off: accuracy vs measured speed-up",
                 "relative.png": "Relative to the baseline and the reference"}

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d1d1f;max-width:1500px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}p.lead{color:#555;margin:0 0 16px;max-width:1100px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid #e3e3e6;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f5f5f7;position:sticky;top:0;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.text,th.text{text-align:left}td.notes{white-space:normal;min-width:260px;color:#555;font-size:12px}
tr.reference td{color:#666;background:#fafafa}.pm{color:#888;font-size:12px}
figure{display:inline-block;margin:0 16px 16px 0;vertical-align:top}figure img{max-width:720px;width:100%;border:1px solid #e3e3e6}
figcaption{font-size:13px;color:#555;margin-bottom:4px}details summary{cursor:pointer;font-weight:600;margin:8px 0}
a{color:#0b63c5}
"""

SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var v = row.cells[col].getAttribute("data-v");
        var n = parseFloat(v);
        return v === null || v === "" ? null : (isNaN(n) ? v : n);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null) return 1;
        if (y === null) return -1;
        var c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _cell(value, fmt: str, std=None, css: str = "") -> str:
    v = _num(value)
    if v is None:
        return f'<td class="{css}" data-v=""></td>'
    text = fmt.format(v)
    s = _num(std)
    if s is not None:
        text += f' <span class="pm">± {fmt.format(s).lstrip("+").rstrip("x")}</span>'
    return f'<td class="{css}" data-v="{v!r}">{text}</td>'


def _text(value, css: str = "text") -> str:
    value = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
    return f'<td class="{css}" data-v="{html.escape(value)}">{html.escape(value)}</td>'


def run_link(ui: str | None, experiment_id: str, run_id: str, text: str) -> str:
    """``text`` linked to the run's page in the MLflow UI at ``ui``; plain text when ``ui`` is unset."""
    if not ui:
        return html.escape(text)
    from prunegrid.ui import experiment_url

    return f'<a href="{html.escape(experiment_url(ui, experiment_id, run_id))}">{html.escape(text)}</a>'


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    title = FIGURE_TITLES.get(path.name, path.stem.replace("_", " "))
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>')


def compression(means: pd.DataFrame) -> pd.Series:
    """Dense over non-zero parameters, from the report's ``params_reduction_pct`` (1.00x for the baseline)."""
    kept = 1 - pd.to_numeric(means["params_reduction_pct"], errors="coerce") / 100
    return (1 / kept).where(kept > 0)


def page(means: pd.DataFrame, grid: pd.DataFrame, figures: list[Path], notes: list[str], method_of: dict[str, tuple[str, str]],
         ui: str | None = None, title: str = "Comparison grid") -> str:
    """The page's HTML. ``notes``: each summary row's notes; ``method_of``: prune label -> (method, strength)."""
    from prunegrid.budget import is_baseline_family

    means = means.assign(compression_ratio=compression(means))
    head = ['<th class="text">backbone</th>', '<th class="text">method</th>', '<th class="text">strength</th>',
            '<th>seeds</th>', *[f"<th>{html.escape(h)}</th>" for _, h, _ in SUMMARY],
            '<th class="text">runs</th>', '<th class="text">notes</th>']
    body = []
    for (_, r), note in zip(means.iterrows(), notes):
        method, strength = method_of.get(str(r["prune"]), (str(r["prune"]), ""))
        label = method if method == r["prune"] else f"{method} ({r['prune']})"
        seeds = grid[(grid["backbone"] == r["backbone"]) & (grid["prune"] == r["prune"])
                     & (grid["dataset"] == r["dataset"]) & (grid["loss"] == r["loss"])]
        links = " ".join(run_link(ui, str(s["experiment_id"]), str(s["run_id"]), f"s{s['seed']}")
                         for _, s in seeds.iterrows())
        cls = ' class="reference"' if is_baseline_family(str(r["prune"])) else ""
        cells = [_text(r["backbone"]), _text(label), _text(strength), _cell(r.get("n_seeds"), "{:.0f}")]
        cells += [_cell(r.get(c), f, r.get(f"{c}_std")) for c, _, f in SUMMARY]
        cells += [f'<td class="text">{links}</td>', _text(note, "text notes")]
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")

    seed_cols = [c for c in SEED_COLUMNS if c in grid.columns]
    seed_rows = []
    for _, s in grid.iterrows():
        cells = [_text(s[c]) if c in ("backbone", "prune", "ref_prune", "seed") else
                 _cell(s[c], dict((k, f) for k, _, f in SUMMARY).get(c, "{:.4g}")) for c in seed_cols]
        cells.append(f'<td class="text">{run_link(ui, str(s["experiment_id"]), str(s["run_id"]), str(s["run_id"])[:8])}</td>')
        seed_rows.append("<tr>" + "".join(cells) + "</tr>")
    datasets = ", ".join(dict.fromkeys(map(str, means["dataset"])))
    losses = ", ".join(dict.fromkeys(map(str, means["loss"])))
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="lead">{html.escape(datasets)} · {html.escape(losses)}. Mean ± std over seeds. Δ vs reference '
        "compares equal training budgets: each method against <code>prune=none</code> trained for the same total "
        "epochs with the same seed (<code>none_ftF</code> for a method that fine-tunes F epochs). Speed-ups are the "
        "dense baseline's latency over the model's, timed in interleaved rounds in one process and one runtime "
        "(batch 1). Model memory is what loading and running the saved model adds in a fresh process. "
        "Click a column to sort.</p>",
        '<table class="sortable" id="summary"><thead><tr>' + "".join(head) + "</tr></thead><tbody>",
        *body, "</tbody></table>",
        "<h2>Figures</h2>", '<div id="figures">', *[_figure(f) for f in figures if f.is_file()], "</div>",
        '<details id="per-seed"><summary>Per seed</summary>',
        '<table class="sortable"><thead><tr>' + "".join(
            f'<th class="{"text" if c in ("backbone", "prune", "ref_prune", "seed") else ""}">{html.escape(c)}</th>'
            for c in seed_cols) + '<th class="text">run</th></tr></thead><tbody>',
        *seed_rows, "</tbody></table></details>",
        f"<script>{SCRIPT}</script>", "</body></html>", ""])


def write(means: pd.DataFrame, grid: pd.DataFrame, figures: list[Path], notes: list[str],
          method_of: dict[str, tuple[str, str]], out: Path, ui: str | None = None) -> Path:
    path = Path(out) / FILE
    path.write_text(page(means, grid, figures, notes, method_of, ui), encoding="utf-8")
    return path
