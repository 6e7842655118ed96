"""Channel pruning, network slimming and INT8 quantization against ``none``: resnet18, Fashion-MNIST, 32 px.

A quick check of the issue's targets (the full grid of every method is ``bench_methods.py``):
trains the ``none`` cell briefly, lightens its saved model with ``channel`` (half the channels,
then fine-tuning) and ``quant_int8`` (as the grid does, ``prune.baseline_ckpt``), trains a
``slimming`` cell from scratch, all through ``prunegrid.pipeline.run`` in one process and one
temporary MLflow store. Accuracy is each run's ``test/acc`` (the quantized model itself is
tested). Latency: the saved final models are reloaded and timed round-robin (batch 1, 1 thread,
``measure.latency_ms``; median of round medians) so all see the same CPU load. A reloaded
``quant_int8`` model runs as TorchScript (how it is saved), the in-run figure as an FX graph.

Targets: channel at ratio 0.5 >= 1.8x faster with accuracy within 1.5 points; quant_int8
>= 1.5x faster within 0.5 point. Writes ``reports/bench/channel_quant.json``.

    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_channel_quant.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prunegrid import measure, tracking  # noqa: E402
from prunegrid.config import compose  # noqa: E402
from prunegrid.pipeline import run  # noqa: E402

OUT = ROOT / "reports" / "bench" / "channel_quant.json"
TARGETS = {"channel": (1.8, 1.5), "quant_int8": (1.5, 0.5)}  # min speedup at batch 1, max accuracy drop (points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", type=int, default=6000, help="images per split")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-slimming", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 batches per fit")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="bench-channel-quant-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    common = [f"tracking.uri={uri}", f"paths.output_dir={tmp}/out", f"paths.data_dir={ROOT / 'data'}",
              "backbone=resnet18", f"dataset.subset={args.subset}", f"trainer.max_epochs={args.epochs}",
              "trainer.enable_progress_bar=false", "explain.enabled=false"]
    if args.quick:
        common += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    client = MlflowClient(uri)

    def cell(label: str, *extra: str) -> dict:
        t0 = time.perf_counter()
        metrics = run(compose(common + list(extra)))
        run_id = tracking.load_runs(uri).sort_values("start_time").iloc[-1]["run_id"]
        pt = client.download_artifacts(run_id, f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}",
                                       str(tmp / "models" / label))
        print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
        return {"label": label, "run_id": run_id, "model_path": pt, "wall_s": time.perf_counter() - t0,
                "metrics": {k: float(v) for k, v in metrics.items() if not k.startswith("test/f1_")
                            and not k.startswith(("test/precision_", "test/recall_"))}}

    t_all = time.perf_counter()
    cells = [cell("none", "prune=none")]
    base_pt = cells[0]["model_path"]
    cells.append(cell("channel", "prune=channel", f"prune.baseline_ckpt={base_pt}"))
    cells.append(cell("quant_int8", "prune=quant_int8", f"prune.baseline_ckpt={base_pt}"))
    if not args.no_slimming:
        cells.append(cell("slimming", "prune=slimming"))

    print("re-timing the saved models round-robin ...", flush=True)
    models = {c["label"]: measure.load_model(c["model_path"]) for c in cells}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for label, net in models.items():
                times[label].append(measure.latency_ms(net, 32, 1, warmup=10, repeats=args.repeats, threads=1))
    base = cells[0]
    for c in cells:
        m = c["metrics"]
        c["infer_ms"] = statistics.median(times[c["label"]])
        c["speedup"] = statistics.median(times["none"]) / c["infer_ms"]
        c["speedup_in_run"] = m["baseline/infer_ms"] / m["time/infer_ms"] if m.get("time/infer_ms") else None
        c["acc_delta_pt"] = 100 * (m["test/acc"] - base["metrics"]["test/acc"])
        if c["label"] in TARGETS:
            min_x, max_drop = TARGETS[c["label"]]
            c["target"] = {"min_speedup": min_x, "max_acc_drop_pt": max_drop,
                           "speed_met": c["speedup"] >= min_x, "acc_met": c["acc_delta_pt"] >= -max_drop}

    cols = ["method", "test_acc", "d_acc_pt", "params", "MFLOPs", "size_mb", "infer_ms", "speedup", "in_run_ms",
            "in_run_x", "target"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in cells:
        m, t = c["metrics"], c.get("target")
        verdict = "-" if not t else ("met" if t["speed_met"] and t["acc_met"] else
                                     "MISSED (" + ", ".join(k for k in ("speed", "acc") if not t[f"{k}_met"]) + ")")
        lines.append(f"| {c['label']} | {m['test/acc']:.4f} | {c['acc_delta_pt']:+.2f} | {m['model/params']:,.0f} | "
                     f"{m['model/flops'] / 1e6:.1f} | {m['model/size_mb']:.2f} | {c['infer_ms']:.2f} | "
                     f"{c['speedup']:.2f} | {m['time/infer_ms']:.2f} | {c['speedup_in_run'] or 0:.2f} | {verdict} |")
    print(f"\n## resnet18, fashion_mnist 32 px, subset {args.subset}, {args.epochs} epoch(s); batch-1 latency, 1 thread\n")
    print("\n".join(lines))
    extra = {k: v for c in cells for k, v in c["metrics"].items() if k.split("/")[0] in ("channel", "slimming",
                                                                                             "quant_int8")}
    print("\n" + "\n".join(f"  {k} = {v:.4g}" for k, v in sorted(extra.items())))

    result = {"machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads(),
                          "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine},
              "settings": vars(args) | {"out": str(args.out)}, "total_s": time.perf_counter() - t_all,
              "cells": [{k: v for k, v in c.items() if k != "model_path"} for c in cells]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
