"""fp32 against bf16 mixed precision (and channels_last): training speed and final accuracy.

Trains the default cell (resnet18, Fashion-MNIST, the main recipe) through the real pipeline
(:func:`prunegrid.pipeline.run`) once per variant and seed, for a fixed number of epochs with early
stopping off, so every variant gets the same budget. The variants run interleaved (seed 0: every
variant, then seed 1: every variant, ...) in one process, so load on a shared machine spreads over
all of them. Reports fit throughput (training images per second of fit wall time, validation
included), its ratio to fp32 seed by seed, and validation and test accuracy (mean ± std over seeds).
``trainer.precision=auto`` picks bf16 only where the CPU flags allow it; this measures whether it pays.
Writes ``reports/bench/precision.json``.

    .venv/bin/python benchmarks/bench_precision.py [--seeds 0 1] [--subset 5000] [--epochs 3]
        [--variants fp32 fp32_cl bf16 bf16_cl]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunegrid import hardware  # noqa: E402
from prunegrid.config import compose  # noqa: E402
from prunegrid.pipeline import run  # noqa: E402

CL = "trainer.callbacks.channels_last={_target_:prunegrid.hardware.ChannelsLast}"
VARIANTS = {"fp32": ["trainer.precision=32-true"], "fp32_cl": ["trainer.precision=32-true", CL],
            "bf16": ["trainer.precision=bf16-mixed"], "bf16_cl": ["trainer.precision=bf16-mixed", CL]}


def one(tmp: Path, variant: str, seed: int, subset: int, epochs: int) -> dict[str, float]:
    cfg = compose([f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"paths.output_dir={tmp}/out",
                   f"paths.checkpoint_dir={tmp}/ckpt", f"paths.data_dir={ROOT / 'data'}", f"seed={seed}",
                   f"dataset.subset={subset}", f"trainer.max_epochs={epochs}", "trainer.callbacks.early_stopping=null",
                   "trainer.enable_progress_bar=false", "measure.repeats=3", "measure.memory=false",
                   "tracking.log_model=false", "tracking.system_metrics=false", "explain.enabled=false",
                   *VARIANTS[variant]])
    m = run(cfg).metrics
    return {"img_s": m["budget/images"] / m["time/train_s"], "train_s": m["time/train_s"],
            "val_acc": m["val/final_acc"], "test_acc": m["test/acc"], "epochs": m["budget/epochs"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--subset", type=int, default=5000, help="dataset.subset: images per split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "precision.json"))
    args = p.parse_args()

    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="prunegrid-precision-") as tmp:
        for seed in args.seeds:
            for v in args.variants:
                runs[v].append(one(Path(tmp), v, seed, args.subset, args.epochs))
                print(f"seed {seed} {v}: {runs[v][-1]['img_s']:.0f} img/s, val acc {runs[v][-1]['val_acc']:.4f}",
                      flush=True)

    ref = args.variants[0]
    rows = {}
    print(f"\n{'variant':<9} {'img/s':>14} {'x ' + ref:>14} {'val acc':>16} {'test acc':>16}")
    for v, rs in runs.items():
        speed = mean_std([r["img_s"] for r in rs])
        ratio = mean_std([r["img_s"] / b["img_s"] for r, b in zip(rs, runs[ref])])
        val, test = mean_std([r["val_acc"] for r in rs]), mean_std([r["test_acc"] for r in rs])
        rows[v] = {"img_s": speed, "ratio": ratio, "val_acc": val, "test_acc": test}
        print(f"{v:<9} {speed[0]:>7.0f} ± {speed[1]:<4.0f} {ratio[0]:>7.2f} ± {ratio[1]:<4.2f} "
              f"{val[0]:>8.4f} ± {val[1]:.4f} {test[0]:>8.4f} ± {test[1]:.4f}")
    flags = sorted(f for f in hardware.cpu_flags() if f in hardware.BF16_FLAGS)
    auto = hardware.resolve_precision("auto")
    print(f"{len(args.seeds)} seeds x {args.epochs} epochs of {args.subset} images per split; CPU bf16 flags: "
          f"{', '.join(flags) or 'none'}; trainer.precision=auto resolves to {auto} here")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": rows, "runs": runs, "seeds": args.seeds, "subset": args.subset,
                               "epochs": args.epochs, "bf16_flags": flags, "auto": auto,
                               "host": platform.node(), "cpu": platform.processor()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
