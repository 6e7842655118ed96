"""The default grid's training budget, chosen by measurement: does the baseline converge, and when?

Trains the grid's baseline cell (``prune=none``, the default backbone and dataset) through the real
pipeline (:func:`prunegrid.pipeline.run`) under each candidate budget (a string of Hydra overrides:
images per split, main schedule, epoch cap, early-stopping patience) for each seed, and reports from
the validation split only: the epoch of the best validation loss, the epochs trained, whether early
stopping ended the fit before the cap (``train/converged``), the best validation accuracy, and the
fit's wall time. The test accuracy each run reads once at its end is printed alongside, never used to
choose. Writes ``reports/bench/budget.json``; ``conf/grid.yaml`` cites the budget it chose from it.

    .venv/bin/python benchmarks/bench_budget.py [--seeds 0] [--candidates "dataset.subset=12000 ..." ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mlflow.tracking import MlflowClient  # noqa: E402

from prunegrid.config import compose  # noqa: E402
from prunegrid.pipeline import run  # noqa: E402

CANDIDATES = [
    "dataset.subset=12000 scheduler=plateau trainer.max_epochs=30 trainer.callbacks.early_stopping.patience=3",
    "dataset.subset=24000 scheduler=plateau trainer.max_epochs=30 trainer.callbacks.early_stopping.patience=3",
]


def one(tmp: Path, candidate: str, seed: int, extra: list[str]) -> dict:
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = compose([f"tracking.uri={uri}", f"paths.output_dir={tmp}/out", f"paths.checkpoint_dir={tmp}/ckpt",
                   f"paths.data_dir={ROOT / 'data'}", f"seed={seed}", "trainer.enable_progress_bar=false",
                   "measure.repeats=3", "measure.memory=false", "tracking.log_model=false",
                   "tracking.system_metrics=false", "explain.enabled=false", *shlex.split(candidate), *extra])
    result = run(cfg)
    client = MlflowClient(uri)
    history = {k: [m.value for m in sorted(client.get_metric_history(result.run_id, k), key=lambda m: m.step)]
               for k in ("val/loss", "val/acc")}
    m = result.metrics
    best = min(range(len(history["val/loss"])), key=history["val/loss"].__getitem__)
    return {"epochs": m["budget/epochs"], "converged": bool(m["train/converged"]), "best_epoch": best + 1,
            "best_val_acc": max(history["val/acc"]), "final_val_acc": m["val/final_acc"], "test_acc": m["test/acc"],
            "train_s": m["time/train_s"], "images": m["budget/images"], "history": history}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--candidates", nargs="+", default=CANDIDATES)
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "budget.json"))
    p.add_argument("extra", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args()

    runs: dict[str, list[dict]] = {c: [] for c in args.candidates}
    with tempfile.TemporaryDirectory(prefix="prunegrid-budget-") as tmp:
        for seed in args.seeds:
            for c in args.candidates:
                r = one(Path(tmp), c, seed, args.extra)
                runs[c].append(r)
                print(f"seed {seed} [{c}]: {r['epochs']:.0f} epochs (best {r['best_epoch']}), converged "
                      f"{r['converged']}, val acc {r['final_val_acc']:.4f}, {r['train_s']:.0f} s", flush=True)

    print(f"\n{'candidate':<100} {'epochs':>7} {'conv':>5} {'val acc':>16} {'fit s':>7} {'test acc':>16}")
    summary = {}
    for c, rs in runs.items():
        def ms(key):
            vals = [float(r[key]) for r in rs]
            return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        conv = sum(r["converged"] for r in rs)
        summary[c] = {"epochs": ms("epochs"), "converged": f"{conv}/{len(rs)}", "val_acc": ms("final_val_acc"),
                      "train_s": ms("train_s"), "test_acc": ms("test_acc")}
        s = summary[c]
        print(f"{c:<100} {s['epochs'][0]:>7.1f} {s['converged']:>5} {s['val_acc'][0]:>8.4f} ± {s['val_acc'][1]:.4f} "
              f"{s['train_s'][0]:>7.0f} {s['test_acc'][0]:>8.4f} ± {s['test_acc'][1]:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs, "seeds": args.seeds, "extra": args.extra,
                               "host": platform.node()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
