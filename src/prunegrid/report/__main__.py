"""``python -m prunegrid.report`` / ``prunegrid-report``: write the grid under ``reports/``.

    python -m prunegrid.report [--tracking-uri URI] [--experiment NAME ...] [--out reports]
                               [--runs-from metrics] [--params params.yaml] [--ui URL]
                               [--include-sweeps] [--no-mlflow]

Besides the files, the report nests the selected runs under a grid parent run per experiment (the
files are its artifacts) and registers each method's best model by ``val/final_acc`` as
``prunegrid-<experiment>@best-<prune>``; ``--no-mlflow`` only reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunegrid.cli import ArgumentParser, guard


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="prunegrid-report", description="Write the comparison grid (CSV, Markdown, JSON, plots) "
                       "from the MLflow runs (also: python -m prunegrid.report).")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", action="append", default=None, help="experiment name(s) to read (default: all)")
    p.add_argument("--out", default="reports", help="output folder")
    p.add_argument("--runs-from", default=None, help="only the run ids in this folder's per-cell metrics JSON (dvc.yaml)")
    p.add_argument("--params", default=None, help="only the cells of this params.yaml's `grid` section")
    p.add_argument("--ui", default=os.environ.get("PRUNEGRID_UI_URL") or None,
                   help="MLflow UI address the grid's run links point at, e.g. http://127.0.0.1:5000 (default: "
                        "$PRUNEGRID_UI_URL; unset: bare run ids, no links)")
    p.add_argument("--include-sweeps", action="store_true",
                   help="let sweep trials be grid cells (default: they stay out and are named in the notes)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="only read MLflow: no grid parent run, no nesting, no registered models")
    args = p.parse_args(argv)
    with guard():
        import yaml

        from prunegrid.report import grid as g

        ids = g.run_ids_from(args.runs_from) if args.runs_from else None
        grid = None
        if args.params:
            if not Path(args.params).is_file():
                raise g.ReportError(f"--params {args.params} not found; write it with `python -m prunegrid.grid`")
            grid = (yaml.safe_load(Path(args.params).read_text()) or {}).get("grid")
            if not grid:
                raise g.ReportError(f"{args.params} has no `grid` section; write it with `python -m prunegrid.grid`")
        table = g.build(args.tracking_uri, args.experiment, args.out, ids, grid, args.ui or None,
                        mlflow_write=not args.no_mlflow, include_sweeps=args.include_sweeps)
    print(g.console(g.seed_means(table)))
    print(f"\nprunegrid: {len(table)} runs -> {Path(args.out) / 'grid.md'} (+ grid.html, grid.csv, grid.json, learning_curves.csv, tradeoff.csv, plots)")


if __name__ == "__main__":
    main()
