"""Where a cell's time goes outside training: the phase split of real ``train.py`` runs.

Runs ``python train.py`` as a new user would (a fresh process each time, its own MLflow store),
``--repeats`` times per method, and reads back the phase laps every cell logs
(``time/phase_<name>_s``, :class:`prunegrid.measure.Laps`): start-up (interpreter, imports, config
composition), building the data and model, training, the final evaluation, saving, each
measurement (static counts, eager latency, ONNX export and latency, the memory probe), the
deployment probe, the MLflow model, reports, Grad-CAM and outputs. ``exit`` is the wall time the
laps do not cover (closing the run, the summary, interpreter teardown). ``imports`` times
``import prunegrid.pipeline`` alone in a fresh interpreter, the part of start-up that lazy imports
could cut. Prints the median and range per phase and writes ``reports/bench/cell_overhead.json``.

    .venv/bin/python benchmarks/bench_cell_overhead.py [--repeats 2] [--prunes none channel]
        [--subset 1000] [--epochs 1] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "time/phase_"


def cell(tmp: Path, prune: str, subset: int, epochs: int, extra: list[str]) -> dict[str, float]:
    """One ``train.py`` run: its wall time and the phase laps it logged."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    cmd = [sys.executable, str(ROOT / "train.py"), f"prune={prune}", f"dataset.subset={subset}",
           f"trainer.max_epochs={epochs}", f"tracking.uri={uri}", f"paths.data_dir={ROOT / 'data'}",
           f"paths.output_dir={tmp}/out", f"paths.checkpoint_dir={tmp}/ckpt", f"hydra.run.dir={tmp}/hydra",
           "trainer.enable_progress_bar=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"train.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                order_by=["attributes.start_time DESC"], max_results=1)
    laps = {k[len(PREFIX):-2]: v for k, v in run.data.metrics.items() if k.startswith(PREFIX)}
    laps["exit"] = wall - sum(laps.values())
    return {"wall": wall, "train_s (fits only)": run.data.metrics.get("time/train_s", float("nan")), **laps}


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import prunegrid.pipeline"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prunes", nargs="+", default=["none", "channel"])
    p.add_argument("--subset", type=int, default=1000, help="dataset.subset: images per split")
    p.add_argument("--epochs", type=int, default=1, help="trainer.max_epochs")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "cell_overhead.json"))
    p.add_argument("extra", nargs="*", default=["measure.repeats=20"],
                   help="Hydra overrides for every run (default: the grid's measure.repeats=20)")
    args = p.parse_args()

    runs: dict[str, list[dict[str, float]]] = {pr: [] for pr in args.prunes}
    imports = []
    for r in range(args.repeats):
        imports.append(import_seconds())
        for prune in args.prunes:
            with tempfile.TemporaryDirectory(prefix="prunegrid-overhead-") as tmp:
                runs[prune].append(cell(Path(tmp), prune, args.subset, args.epochs, args.extra))
            print(f"repeat {r + 1}/{args.repeats} prune={prune}: {runs[prune][-1]['wall']:.1f} s", flush=True)

    summary = {}
    for prune, rs in runs.items():
        phases = list(dict.fromkeys(k for r in rs for k in r))
        summary[prune] = {k: {"median_s": statistics.median(r.get(k, 0.0) for r in rs),
                              "min_s": min(r.get(k, 0.0) for r in rs), "max_s": max(r.get(k, 0.0) for r in rs)}
                          for k in phases}
        wall = summary[prune]["wall"]["median_s"]
        print(f"\nprune={prune}: {args.subset} images per split, {args.epochs} epoch(s), {args.repeats} runs")
        print(f"{'phase':<22} {'median s':>9} {'range s':>13} {'share':>6}")
        for k in phases:
            s = summary[prune][k]
            share = "" if k in ("wall", "train_s (fits only)") else f"{100 * s['median_s'] / wall:5.1f}%"
            print(f"{k:<22} {s['median_s']:>9.2f} {s['min_s']:>6.2f}-{s['max_s']:<6.2f} {share:>6}")
        outside = wall - summary[prune]["train"]["median_s"]
        print(f"outside training: {outside:.1f} s of {wall:.1f} s ({100 * outside / wall:.0f} %)")
    imp = statistics.median(imports)
    print(f"\nimport prunegrid.pipeline in a fresh interpreter: {imp:.2f} s (runs {', '.join(f'{v:.2f}' for v in imports)})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs, "imports_s": imports, "subset": args.subset,
                               "epochs": args.epochs, "overrides": args.extra, "repeats": args.repeats,
                               "host": platform.node(), "python": platform.python_version()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
