"""Progress of a grid that ``dvc repro`` runs: which cell of how many is running, and an ETA.

``python -m prunegrid.progress init`` (``scripts/grid.sh`` runs it before ``dvc repro``) counts
the cell stages DVC will run (``dvc status``: changed or never run) and writes a small JSON
state file named by ``PRUNEGRID_GRID_PROGRESS``. Every ``train.py`` that DVC starts inherits
that variable: :func:`cell_started` prints ``grid: cell k/N <name>, ETA ...`` (the ETA is the
mean time of the cells finished in this grid times the cells left) and :func:`cell_finished`
records the cell's time. Without the variable (a plain ``train.py``) nothing is printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ENV = "PRUNEGRID_GRID_PROGRESS"
CELL_STAGES = ("train_base", "train_reference", "train_from_base", "train_scratch")


def _path() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def active() -> bool:
    """Whether this process runs inside a counted grid (``PRUNEGRID_GRID_PROGRESS`` names a state file)."""
    path = _path()
    return path is not None and path.is_file()


def _update(fn) -> dict | None:
    path = _path()
    if path is None or not path.is_file():
        return None
    from filelock import FileLock

    with FileLock(f"{path}.lock", timeout=30):
        state = json.loads(path.read_text())
        fn(state)
        path.write_text(json.dumps(state))
    return state


def eta_text(state: dict, now: float | None = None) -> str:
    done = state["done"]
    left = max(state["total"] - len(done), 0)
    if not done:
        return "ETA after the first cell"
    secs = sum(done) / len(done) * left
    finish = time.strftime("%H:%M", time.localtime((now or time.time()) + secs))
    return f"ETA {secs / 60:.0f} min ({finish}) from {len(done)} finished cell(s)"


def cell_started(name: str) -> None:
    state = _update(lambda s: s.update(current=name, started=time.time()))
    if state is not None:
        k = min(len(state["done"]) + 1, state["total"])
        print(f"prunegrid grid: cell {k}/{state['total']} {name}; {eta_text(state)}", file=sys.stderr, flush=True)


def cell_finished(name: str) -> None:
    def done(s: dict) -> None:
        if s.get("current") == name and s.get("started"):
            s["done"].append(time.time() - s["started"])
        s["current"], s["started"] = None, None

    _update(done)


def cells_to_run() -> tuple[int, int]:
    """(cell stages ``dvc repro`` will run, cell stages in ``dvc.yaml``)."""
    import subprocess

    status = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True)
    changed = json.loads(status.stdout or "{}") if status.returncode == 0 else {}
    stages = subprocess.run(["dvc", "stage", "list", "--name-only"], capture_output=True, text=True).stdout.split()
    cells = [s for s in stages if s.split("@")[0] in CELL_STAGES]
    return sum(1 for s in cells if s in changed), len(cells)


def main(argv: list[str] | None = None) -> None:
    from prunegrid.cli import ArgumentParser, guard

    p = ArgumentParser(prog="python -m prunegrid.progress", description="Start counting a grid's cells "
                       f"(the state file is ${ENV}).")
    p.add_argument("command", choices=["init"])
    a = p.parse_args(argv)
    with guard():
        path = _path()
        if path is None:
            p.error(f"set {ENV} to the state file first")
        todo, total = cells_to_run()
        path.write_text(json.dumps({"total": todo, "done": [], "current": None, "started": None}))
        print(f"prunegrid grid: {todo} of {total} cells to run ({total - todo} up to date)")


if __name__ == "__main__":
    main()
