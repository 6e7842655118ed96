"""Static vs dynamic L1 pruning of YOLOv5n on the offline detection set: the form of Ju & Kang's
Tables 1-2 (mAP50) and Figs. 5-8 (inference time, peak memory sampled every second), over seeds.

For each seed, three cells run through ``train.py task=detection`` (each in its own process, into a
temporary MLflow store): ``none`` (the dense reference), ``l1_static`` and ``l1_dynamic`` (the
paper's Algorithm 1, amounts as the paper achieved on YOLOv5n: Conv2d 0.2, BatchNorm2d 0.1), all
with the same data, input size, epochs and no early stopping (equal budgets). Each cell records
mAP50, mAP50-95, Conv2d/BatchNorm2d sparsity and the whole detector measured in a fresh process
(``time/detect_ms``, RSS sampled every second). Then, per seed, the three final models are timed
again in one process, image by image in turn (the paired ratios that the rules allow to compare),
and their memory is sampled in ``--memory-repeats`` fresh processes each, interleaved.

Prints the table (mean ± std over seeds) and the direction of each static-vs-dynamic difference
next to the paper's; writes ``reports/bench/detection.json`` and ``reports/bench/detection.png``.

    .venv/bin/python benchmarks/bench_detection.py                    # 3 seeds, 128 px, 600 images, 20 epochs
    .venv/bin/python benchmarks/bench_detection.py --quick            # smoke run, a minute
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
sys.path.insert(0, str(ROOT / "src"))

from prunegrid import measure, tracking  # noqa: E402
from prunegrid.detection import deploy  # noqa: E402

OUT = ROOT / "reports" / "bench" / "detection.json"
FIG = ROOT / "reports" / "bench" / "detection.png"
METHODS = ("none", "l1_static", "l1_dynamic")
# Ju & Kang, YOLOv5n: Table 1 (COCO128) and Table 2 (traffic, 5 classes) mAP50; Fig. 5 inference ms; Figs. 7-8 memory
PAPER = {
    "map50": {"coco128": {"l1_static": 0.91, "l1_dynamic": 0.75}, "traffic": {"l1_static": 0.907, "l1_dynamic": 0.906}},
    "detect_ms": {"coco128": {"l1_static": 1012.3, "l1_dynamic": 962.4}, "traffic": {"l1_static": 847.6,
                                                                                   "l1_dynamic": 848.4}},
    "memory": "dynamic used less memory than static in every case (Figs. 7-8, % of system memory)",
}
KEYS = {"map50": "test/map50", "map": "test/map", "conv_sparsity": "l1/conv_sparsity", "bn_sparsity": "l1/bn_sparsity",
        "detect_ms_cell": "time/detect_ms", "detect_peak_mb_cell": "memory/detect_peak_mb",
        "infer_speedup": "speedup/infer", "epoch_s": "time/epoch_s", "params_nonzero": "model/params_nonzero"}


def build_set(args) -> Path:
    root = Path(args.data)
    if not (root / "data.yaml").is_file():
        cmd = [sys.executable, "-m", "prunegrid.data.detection_set", "--out", str(root), "--size", str(args.canvas)]
        if args.quick:
            cmd += ["--train", "32", "--val", "8", "--test", "8"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return root


def run_cell(prune: str, seed: int, args, uri: str, tmp: Path) -> dict:
    label = f"{prune}-s{seed}"
    over = ["task=detection", f"prune={prune}", f"seed={seed}", f"dataset.root={args.data}",
            f"dataset.input_size={args.size}", f"dataset.subset={args.subset}", f"trainer.max_epochs={args.epochs}",
            "trainer.callbacks.early_stopping=null", "trainer.enable_progress_bar=false",
            f"tracking.uri={uri}", "tracking.experiment=bench_detection", "tracking.system_metrics=false",
            "tracking.log_model=false", f"paths.output_dir={tmp / label}", f"paths.checkpoint_dir={tmp / 'ckpt'}",
            f"measure.repeats={args.repeats}", f"task.deploy.images={args.images}",
            f"task.deploy.min_seconds={args.min_seconds}", f"hydra.run.dir={tmp / label / 'hydra'}",
            f"paths.model_out={tmp / label / 'model.pt'}"]
    if prune != "none":
        over += [f"prune.amount={args.conv_amount}", f"prune.bn_amount={args.bn_amount}"]
    if args.quick:
        over += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "measure.warmup=1"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *over], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if proc.returncode else []
    print(f"  {label:<16} {'ok' if proc.returncode == 0 else 'FAILED'} in {wall:.0f} s {' '.join(tail)[:200]}", flush=True)
    if proc.returncode:
        raise SystemExit(f"cell {label} failed: {' '.join(tail)[:300]}")
    runs = tracking.load_runs(uri, finished_only=True)
    run = runs[(runs["prune"] == prune) & (runs["seed"] == str(seed))].iloc[-1]
    row = {"prune": prune, "seed": seed, "run_id": run["run_id"], "wall_s": wall}
    row.update({k: float(run[v]) if v in run and run[v] == run[v] else None for k, v in KEYS.items()})
    row["model"] = str(tmp / label / "model.pt")
    return row


def paired(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Median and quartiles of the per-image ratio a / b (same image, same pass, one process)."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    q25, med, q75 = measure.quartiles(ratios)
    return {"median": med, "q25": q25, "q75": q75}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="input size (a multiple of 32)")
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--subset", type=int, default=600, help="images per split at most")
    p.add_argument("--conv-amount", type=float, default=0.2)
    p.add_argument("--bn-amount", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--data", default=str(ROOT / "prepared" / "fashion_det"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.subset, args.images, args.min_seconds = args.seeds[:2], 1, 16, 8, 1.0
        args.memory_repeats, args.repeats = 1, 3
        args.data = str(Path(tempfile.gettempdir()) / "prunegrid-bench-det-quick")
    data = build_set(args)
    images = sorted((data / "images" / "test").glob("*.png"))[: args.images]
    rows, interleaved = [], []
    with tempfile.TemporaryDirectory(prefix="prunegrid-bench-det-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        for seed in args.seeds:
            cells = {m: run_cell(m, seed, args, uri, tmp) for m in METHODS}
            rows += cells.values()
            paths = [cells[m]["model"] for m in METHODS]
            times = deploy.interleaved_detectors(paths, images, args.size, rounds=3 if not args.quick else 1)
            named = {m: times[cells[m]["model"]] for m in METHODS}
            mem: dict[str, list[float]] = {m: [] for m in METHODS}
            inc: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(args.memory_repeats):
                for m in METHODS:
                    r = deploy.measure_detector(cells[m]["model"], images, args.size, min_seconds=args.min_seconds)
                    mem[m].append(r["detect_peak_mb"])
                    inc[m].append(r["detect_increase_mb"])
            entry = {"seed": seed, "detect_ms": {m: measure.quartiles(named[m])[1] for m in METHODS},
                     "static_over_dynamic_ms": paired(named, "l1_static", "l1_dynamic"),
                     "static_over_none_ms": paired(named, "l1_static", "none"),
                     "dynamic_over_none_ms": paired(named, "l1_dynamic", "none"),
                     "peak_mb": {m: statistics.median(mem[m]) for m in METHODS},
                     "increase_mb": {m: statistics.median(inc[m]) for m in METHODS},
                     "peak_mb_samples": mem}
            interleaved.append(entry)
            print(f"  seed {seed}: static/dynamic detector time {entry['static_over_dynamic_ms']['median']:.3f} "
                  f"[{entry['static_over_dynamic_ms']['q25']:.3f}, {entry['static_over_dynamic_ms']['q75']:.3f}]",
                  flush=True)

    summary = {}
    for m in METHODS:
        mine = [r for r in rows if r["prune"] == m]
        s = {k: mean_std([r[k] for r in mine]) for k in ("map50", "map", "conv_sparsity", "bn_sparsity",
                                                         "infer_speedup", "epoch_s", "detect_ms_cell",
                                                         "detect_peak_mb_cell")}
        s["detect_ms"] = mean_std([e["detect_ms"][m] for e in interleaved])
        s["peak_mb"] = mean_std([e["peak_mb"][m] for e in interleaved])
        s["increase_mb"] = mean_std([e["increase_mb"][m] for e in interleaved])
        summary[m] = s

    def diff(key: str, src: str = "rows") -> dict:
        if src == "rows":
            d = [next(r[key] for r in rows if r["prune"] == "l1_static" and r["seed"] == sd)
                 - next(r[key] for r in rows if r["prune"] == "l1_dynamic" and r["seed"] == sd) for sd in args.seeds]
        else:
            d = [e[src]["l1_static"] - e[src]["l1_dynamic"] for e in interleaved]
        mu, sd = mean_std(d)
        noise = len(d) < 2 or not (abs(mu) > (sd if sd == sd else 0.0))
        return {"static_minus_dynamic": mu, "std": sd, "within_noise": noise,
                "direction": "within noise" if noise else ("static higher" if mu > 0 else "dynamic higher")}

    ratio = [e["static_over_dynamic_ms"] for e in interleaved]
    time_mu, time_sd = mean_std([r["median"] for r in ratio])
    slower = all(r["q25"] > 1 for r in ratio)
    faster = all(r["q75"] < 1 for r in ratio)
    findings = {
        "map50": {**diff("map50"), "paper": "static higher (COCO128 0.91 vs 0.75; traffic 0.907 vs 0.906, equal)"},
        "detect_time": {"static_over_dynamic": time_mu, "std": time_sd,
                        "direction": "static slower" if slower else "static faster" if faster else "within noise",
                        "paper": "static slower on COCO128 (1012.3 vs 962.4 ms); equal on traffic (847.6 vs 848.4)"},
        "peak_memory": {**diff("peak_mb", "peak_mb"), "paper": PAPER["memory"]},
    }
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cores": measure.all_threads(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
              "interleaved": interleaved, "summary": summary, "findings": findings, "paper": PAPER}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))

    print(f"\nYOLOv5n, offline detection set, {args.size} px, {args.epochs} epochs (no early stopping), "
          f"{len(args.seeds)} seeds; amounts conv {args.conv_amount}, BN {args.bn_amount}")
    head = f"{'method':<11} {'mAP50':>15} {'mAP50-95':>15} {'conv sp.':>9} {'BN sp.':>8} {'detect ms':>15} " \
           f"{'peak MB (1 s)':>15} {'+MB over start':>15} {'model x (eager)':>16}"
    print(head)
    for m, s in summary.items():
        f = lambda k, fmt: f"{s[k][0]:{fmt}} ± {s[k][1]:{fmt}}" if s[k][0] == s[k][0] else "-"
        print(f"{m:<11} {f('map50', '.3f'):>15} {f('map', '.3f'):>15} {f('conv_sparsity', '.3f'):>9} "
              f"{f('bn_sparsity', '.3f'):>8} {f('detect_ms', '.2f'):>15} {f('peak_mb', '.0f'):>15} "
              f"{f('increase_mb', '.1f'):>15} {f('infer_speedup', '.2f'):>16}")
    print("\nstatic vs dynamic (ours, mean ± std over seeds) next to the paper:")
    for k, v in findings.items():
        print(f"  {k:<12} {v['direction']:<15} ({', '.join(f'{a}={b:.4g}' for a, b in v.items() if isinstance(b, float))})"
              f"   paper: {v['paper']}")
    figure(summary, Path(args.out).with_suffix(".png"))
    print(f"\nwrote {out} and {Path(args.out).with_suffix('.png')}")


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("map50", "mAP50 (Tables 1-2)"), ("detect_ms", "detector ms / image (Figs. 5-6)"),
              ("peak_mb", "peak RSS, 1 s samples, MB (Figs. 7-8)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, panels):
        names = list(summary)
        ax.bar(names, [summary[m][key][0] for m in names], yerr=[summary[m][key][1] for m in names], capsize=4,
               color=["0.6", "tab:blue", "tab:orange"][: len(names)])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("YOLOv5n: static vs dynamic L1 pruning (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
