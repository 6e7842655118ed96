"""Wall time of the quick grid on Ray with 1 and with 2 workers on this machine, and their ratio.

For each worker count W, a fresh copy of the project (code, conf, dvc.yaml, the data) runs
``python -m prunegrid.grid run --executor ray +experiment=quick`` on a Ray started for it with every
core of the machine (``executor.num_cpus``): each cell's task asks for cores/W CPUs, so W cells run at
once and each trains with cores/W threads (Ray sets ``OMP_NUM_THREADS``). Same grid, same cells, the
same machine; runs one after the other. The wall time covers everything the command does: Ray's start,
the cells, the per-stage ``dvc commit`` and the report. Timing noise: this machine is shared, so run it
when nothing else runs (``flock /tmp/prunegrid-cpu.lock``) and read the ratio, not the seconds.

With 2 cores, two workers have one core each: what they can gain is the part of a cell that does not
use both cores (process start-up, data loading, MLflow, the one-thread latency rounds). Where the ratio
is within the spread of repeated runs, the script says there is no measurable gain.

    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_ray_grid.py [--workers 1 2] [--repeats 1]

Writes ``reports/bench/ray_grid.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "ray_grid.json"


def project_copy(dst: Path, overrides: list[str]) -> Path:
    """The project as a new user clones it (code, conf, pipeline), with the data restored and DVC set up."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("train.py", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "data" / "fashion_mnist", dst / "data" / "fashion_mnist")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "hydra.enabled", "true"],
                [sys.executable, "-m", "dvc", "config", "hydra.config_name", "grid"],
                [sys.executable, "-m", "dvc", "config", "hydra.plugins_path", "src"],
                [sys.executable, "-m", "prunegrid.grid", *overrides],  # params.yaml: dvc.yaml's matrix reads it
                [sys.executable, "-m", "dvc", "add", "-q", "data"]):
        res = subprocess.run(cmd, cwd=dst, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"bench_ray_grid: {' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    return dst


def one_run(workers: int, cores: int, overrides: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-ray-grid-w{workers}-"))
    project = project_copy(tmp / "project", overrides)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "prunegrid.grid", "run", "--executor", "ray", f"executor.num_cpus={cores}",
           f"executor.cpus_per_cell={cores / workers:g}", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench_ray_grid: the grid with {workers} worker(s) failed:\n{res.stderr[-3000:]}")
    cells = sorted((project / "metrics").glob("*.json"))
    times = [json.loads(p.read_text()).get("time/train_s", float("nan")) for p in cells]
    shutil.rmtree(tmp, ignore_errors=True)
    return {"workers": workers, "cpus_per_cell": cores / workers, "wall_s": wall, "cells": len(cells),
            "train_s_sum": sum(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="runs per worker count (alternating)")
    ap.add_argument("--grid", nargs="*", default=["+experiment=quick"], help="overrides of conf/grid.yaml")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    runs = []
    for r in range(args.repeats):
        for w in (args.workers if r % 2 == 0 else list(reversed(args.workers))):
            run = one_run(w, cores, args.grid)
            print(f"  {w} worker(s), {run['cpus_per_cell']:g} CPU each: {run['cells']} cells in {run['wall_s']:.0f} s",
                  flush=True)
            runs.append(run)
    walls = {w: [r["wall_s"] for r in runs if r["workers"] == w] for w in args.workers}
    med = {w: statistics.median(v) for w, v in walls.items()}
    base = args.workers[0]
    print(f"\nquick grid on Ray, {cores} cores ({platform.processor() or platform.machine()}), "
          f"grid overrides {' '.join(args.grid)}")
    print(f"{'workers':>8} {'CPU/cell':>9} {'wall s (runs)':>24} {'ratio vs ' + str(base):>12}")
    for w in args.workers:
        print(f"{w:>8} {cores / w:>9g} {', '.join(f'{v:.0f}' for v in walls[w]):>24} {med[base] / med[w]:>12.2f}")
    spread = max((max(v) - min(v)) / statistics.median(v) for v in walls.values()) if args.repeats > 1 else None
    ratio = med[base] / med[args.workers[-1]]
    if spread is not None and abs(ratio - 1) <= spread:
        verdict = f"no measurable gain: the ratio {ratio:.2f} is within the run-to-run spread ({spread:.0%})"
    elif args.repeats == 1:
        verdict = (f"ratio {ratio:.2f} from one run each (no spread measured; use --repeats 2+); with {cores} cores "
                   "there is little to gain beyond overlapping the single-threaded parts of cells")
    else:
        verdict = f"{'faster' if ratio > 1 else 'slower'} with {args.workers[-1]} workers: ratio {ratio:.2f}"
    print(verdict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores, "grid": args.grid, "runs": runs, "median_wall_s": med,
                                    "ratio": ratio, "spread": spread, "verdict": verdict,
                                    "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
