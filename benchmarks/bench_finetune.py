"""How long should a pruned network be fine-tuned? The fine-tune length, chosen by measurement.

For each seed, trains the default grid's baseline (``prune=none`` under ``conf/grid.yaml``'s
overrides) through the real pipeline (:func:`prunegrid.pipeline.run`), then, from that saved model,
fine-tunes for F epochs, for each F: the method (``channel`` by default, at its YAML's strength) and
its equal-budget reference (``prune=none``, the baseline trained on for the same F epochs with the same
fine-tuning recipe). Reports, per F and over seeds, the validation accuracy of both, the method's gap
to its reference, the gain of one more epoch, and the fine-tune's wall time. The choice reads the
validation split only: the smallest F after which one more epoch gains the method less than the seed
spread of its validation accuracy (diminishing returns). Test accuracy, read once at the end of each
run, is printed beside it, never used to choose. Writes ``reports/bench/finetune.json``.

    .venv/bin/python benchmarks/bench_finetune.py [--seeds 0 1 2] [--epochs 1 2 3] [--method channel]
                                                  [--workdir DIR]

On a slow machine the whole study takes hours: with ``--workdir`` the baselines (``base-s<seed>.pt``) and
every finished cell (``cells.json``) are kept there, and a re-run skips what is done. The JSON is
rewritten after every cell, marked ``complete: false`` until the last.
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

from omegaconf import OmegaConf  # noqa: E402

from prunegrid.config import compose  # noqa: E402
from prunegrid.pipeline import run  # noqa: E402


def grid_overrides() -> str:
    return OmegaConf.load(ROOT / "conf" / "grid.yaml").grid.overrides


def one(tmp: Path, seed: int, extra: list[str]) -> dict:
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = compose([f"tracking.uri={uri}", f"paths.output_dir={tmp}/out", f"paths.checkpoint_dir={tmp}/ckpt",
                   f"paths.data_dir={ROOT / 'data'}", f"seed={seed}", "trainer.enable_progress_bar=false",
                   "measure.repeats=3", "measure.memory=false", "tracking.log_model=false",
                   "tracking.system_metrics=false", "explain.enabled=false", *extra])
    m = run(cfg).metrics
    return {"seed": seed, "val_acc": m["val/final_acc"], "test_acc": m["test/acc"], "train_s": m["time/train_s"],
            "epochs": m["budget/epochs"], **{k: v for k, v in m.items() if k.startswith("recovery/")}}


def mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def choose(epochs: list[int], method_val: dict[int, list[float]]) -> int:
    """The smallest F after which one more epoch gains the method less than its seed spread (validation)."""
    for f, nxt in zip(epochs, epochs[1:]):
        gain = statistics.mean(method_val[nxt]) - statistics.mean(method_val[f])
        spread = max(mean_std(method_val[f])[1], mean_std(method_val[nxt])[1])
        if gain <= spread:
            return f
    return epochs[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--method", default="channel")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "finetune.json"))
    p.add_argument("--workdir", default=None, help="keep baselines and finished cells here; a re-run resumes")
    p.add_argument("extra", nargs="*", help="Hydra overrides for every run (after the grid's)")
    args = p.parse_args()
    base = [*shlex.split(grid_overrides()), *args.extra]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prunegrid-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "cells.json"
    done: dict[str, dict] = json.loads(done_file.read_text()) if done_file.is_file() else {}

    def cell(name: str, seed: int, overrides: list[str]) -> dict:
        if name not in done:
            done[name] = one(work, seed, overrides)
            done_file.write_text(json.dumps(done, indent=1))
        return done[name]

    runs: dict[str, dict[int, list[dict]]] = {k: {f: [] for f in args.epochs} for k in ("none", args.method)}
    baselines = []
    for seed in args.seeds:
        ckpt = work / f"base-s{seed}.pt"
        if ckpt.is_file() and f"base-s{seed}" not in done:
            done[f"base-s{seed}"] = {"seed": seed, "note": "baseline model found in the work folder"}
        b = cell(f"base-s{seed}", seed, [*base, "prune=none", f"paths.model_out={ckpt}"])
        baselines.append(b)
        print(f"seed {seed} baseline: {b.get('epochs', float('nan')):.0f} epochs, val acc "
              f"{b.get('val_acc', float('nan')):.4f}", flush=True)
        for f in args.epochs:
            for prune in runs:
                r = cell(f"{prune}-F{f}-s{seed}", seed, [*base, f"prune={prune}", f"prune.finetune_epochs={f}",
                                                         f"++prune.baseline_ckpt={ckpt}"])
                runs[prune][f].append(r)
                print(f"seed {seed} {prune} F={f}: val acc {r['val_acc']:.4f}, test acc {r['test_acc']:.4f}, "
                      f"{r['train_s']:.0f} s", flush=True)
        write(args, runs, baselines, base, complete=False)
    write(args, runs, baselines, base, complete=True)


def write(args, runs: dict, baselines: list[dict], base: list[str], complete: bool) -> None:
    """Print the table and write the JSON from the cells finished so far."""
    val = {k: {f: [r["val_acc"] for r in rs] for f, rs in v.items()} for k, v in runs.items()}
    if not all(val[args.method].values()):
        return
    chosen = choose(args.epochs, val[args.method])
    print(f"\n{'F':>3} {'none val':>17} {args.method + ' val':>17} {'gap (pt)':>12} {'+1 epoch (pt)':>14} "
          f"{'fit s':>6} {'none test':>17} {args.method + ' test':>17}")
    summary = {}
    for i, f in enumerate(args.epochs):
        gaps = [100 * (m - n) for m, n in zip(val[args.method][f], val["none"][f])]
        gain = (100 * (statistics.mean(val[args.method][args.epochs[i + 1]]) - statistics.mean(val[args.method][f]))
                if i + 1 < len(args.epochs) else None)
        row = {"none_val": mean_std(val["none"][f]), "method_val": mean_std(val[args.method][f]),
               "gap_pt": mean_std(gaps), "next_epoch_gain_pt": gain,
               "method_train_s": mean_std([r["train_s"] for r in runs[args.method][f]]),
               "none_test": mean_std([r["test_acc"] for r in runs["none"][f]]),
               "method_test": mean_std([r["test_acc"] for r in runs[args.method][f]])}
        summary[f] = row
        g = "-" if gain is None else f"{gain:+.2f}"
        print(f"{f:>3} {row['none_val'][0]:>8.4f} ± {row['none_val'][1]:.4f} {row['method_val'][0]:>8.4f} ± "
              f"{row['method_val'][1]:.4f} {row['gap_pt'][0]:>+6.2f} ± {row['gap_pt'][1]:.2f} {g:>14} "
              f"{row['method_train_s'][0]:>6.0f} {row['none_test'][0]:>8.4f} ± {row['none_test'][1]:.4f} "
              f"{row['method_test'][0]:>8.4f} ± {row['method_test'][1]:.4f}")
    print(f"chosen fine-tune length for {args.method}: {chosen} epoch(s) (validation split)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"complete": complete, "method": args.method, "chosen": chosen, "summary": summary, "runs": runs,
                               "baselines": baselines, "seeds": args.seeds, "overrides": base,
                               "host": platform.node()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
