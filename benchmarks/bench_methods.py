"""Every lightening method against ``prune=none`` on resnet18 / Fashion-MNIST, measured the same way.

Runs one cell per YAML in ``conf/prune/`` (found by ``prunegrid.config.options("prune")``, so new
methods join without edits) through ``train.py`` -- each in its own process, so peak memory is
that cell's own -- with the same data subset, epochs and seed, into a temporary MLflow store.
Methods that lighten a trained model (``from_baseline: true``) start from the ``none`` cell's
``model.pt``, as the grid does; fine-tuning epochs are each method's YAML defaults.

Prints the grid rows (accuracy and its delta in points, parameters, sparsity, FLOPs, file size,
epoch time, eager and ONNX Runtime latency at batch 1 with speedups, peak memory), the paper's
static vs dynamic L1 comparison (Ju & Kang (on-device lightweight methods)) and the issue's targets; writes
``reports/bench/methods.json``.

    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_methods.py
    .venv/bin/python benchmarks/bench_methods.py --quick      # smoke run, seconds per cell
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

from prunegrid import tracking  # noqa: E402
from prunegrid.pruning import l1  # noqa: E402
from prunegrid.config import compose, options  # noqa: E402

OUT = ROOT / "reports" / "bench" / "methods.json"
# extra rows beyond one per YAML: the paper's literal static order (prune.remove before training)
VARIANTS = {"l1_static_literal": ("l1_static", ["prune.hold_mask=false"])}
TARGETS = {  # method: (min eager speedup at batch 1, max accuracy drop in points)
    "channel": (1.8, 1.5),
    "quant_int8": (1.5, 0.5),
}
COLUMNS = [
    ("acc", "test/acc", "{:.4f}"), ("d_acc_pt", None, "{:+.2f}"), ("params", "model/params", "{:,.0f}"),
    ("nonzero", "model/params_nonzero", "{:,.0f}"), ("sparsity", "model/sparsity", "{:.3f}"),
    ("MFLOPs", "model/flops", None), ("size_mb", "model/size_mb", "{:.2f}"),
    ("zip_mb", tracking.SIZE_COMPRESSED, "{:.2f}"), ("epoch_s", "time/epoch_s", "{:.1f}"),
    ("infer_ms", "rr/infer_ms", "{:.2f}"), ("x_eager", None, "{:.2f}"),
    ("onnx_ms", "rr/infer_ms_onnx", "{:.2f}"), ("x_onnx", None, "{:.2f}"),
    ("cell_ms", "time/infer_ms", "{:.2f}"), ("cell_onnx_ms", tracking.ONNX_METRICS[0], "{:.2f}"),
    ("inf_peak_mb", "memory/infer_peak_mb", "{:.0f}"), ("train_peak_mb", "memory/train_peak_mb", "{:.0f}"),
]


def cell_overrides(args, uri: str, out: Path) -> list[str]:
    over = [f"tracking.uri={uri}", "tracking.experiment=bench_methods", f"paths.output_dir={out}",
            "backbone=resnet18", "dataset=fashion_mnist", f"dataset.subset={args.subset}",
            f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "trainer.enable_progress_bar=false"]
    if args.quick:
        over += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "dataset.batch_size=16", "measure.warmup=1", "measure.repeats=3", "measure.batch_size=4"]
    return over


def run_cell(label: str, prune: str, extra: list[str], args, uri: str, tmp: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), *cell_overrides(args, uri, tmp / label), f"prune={prune}", *extra,
           f"hydra.run.dir={tmp / label / 'hydra'}"]
    before = set(tracking.load_runs(uri, finished_only=False).get("run_id", []))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if proc.returncode else []
    print(f"  {label:<20} {'ok' if proc.returncode == 0 else 'FAILED'} in {wall:.0f} s {' '.join(tail)[:160]}",
          flush=True)
    new = [r for r in tracking.load_runs(uri, finished_only=False).get("run_id", []) if r not in before]
    return {"label": label, "prune": prune, "overrides": extra, "rc": proc.returncode, "wall_s": wall,
            "run_id": new[0] if new else None, "error": " ".join(tail)[:300]}


def baseline_model(client, run_id: str, tmp: Path) -> str:
    path = f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}"
    return client.download_artifacts(run_id, path, str(tmp / "baseline"))


def remeasure(client, rows: list[dict], tmp: Path, rounds: int, repeats: int) -> None:
    """Re-time every final model, eager and ONNX Runtime, round-robin in this one process.

    Each cell's own ``time/infer_ms`` was taken minutes apart on a CPU shared with other jobs;
    interleaving the models over several rounds (median of round medians) exposes them all to
    the same load, so the speedups compare like with like. Same settings: batch 1, 1 thread.
    """
    from prunegrid import measure

    models = {}
    for r in rows:
        if r["status"] != "FINISHED":
            continue
        d = tmp / "remeasure" / r["label"]
        pt = client.download_artifacts(r["run_id"], f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}", str(d))
        onnx = None
        if r["onnx_status"] == "ok":
            onnx = client.download_artifacts(r["run_id"], f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.ONNX_FILE}", str(d))
        models[r["label"]] = (measure.load_model(pt), onnx)
    eager = {k: [] for k in models}
    ort = {k: [] for k, (_, o) in models.items() if o}
    for _ in range(rounds):
        for label, (net, onnx) in models.items():
            eager[label].append(measure.latency_ms(net, 32, 1, warmup=3, repeats=repeats, threads=1))
            if onnx:
                ort[label].append(measure.onnx_latency_ms(onnx, 32, 1, warmup=3, repeats=repeats, threads=1))
    for r in rows:
        if r["label"] in eager:
            r["rr/infer_ms"] = statistics.median(eager[r["label"]])
        if r["label"] in ort:
            r["rr/infer_ms_onnx"] = statistics.median(ort[r["label"]])


def fmt(value, pattern) -> str:
    if value is None or value != value:
        return "-"
    return pattern.format(value) if pattern else f"{value / 1e6:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", type=int, default=2000, help="images per split (train/val share it)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of every cell (dynamic needs >= 2)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin re-timing rounds")
    ap.add_argument("--budget-min", type=float, default=9.0, help="skip the variant rows once this much has run")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every YAML in conf/prune/ + variants")
    ap.add_argument("--no-variants", action="store_true", help="skip the extra l1_static_literal row")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 batches per cell, short latency")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    methods = [m for m in (args.methods or options("prune")) if m != "none"]
    variants = {} if args.no_variants or args.methods else VARIANTS
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    print(f"bench_methods: resnet18 / fashion_mnist, subset {args.subset}, {args.epochs} epochs, seed {args.seed}; "
          f"store {uri}", flush=True)
    t_all = time.perf_counter()
    cells = [run_cell("none", "none", [], args, uri, tmp)]
    client = MlflowClient(uri)
    none_id = cells[0]["run_id"]
    base_ckpt = baseline_model(client, none_id, tmp) if none_id is not None and cells[0]["rc"] == 0 else None
    for label, (prune, extra) in [*((m, (m, [])) for m in methods), *variants.items()]:
        if label in variants and time.perf_counter() - t_all > 60 * args.budget_min:
            print(f"  {label:<20} skipped (time budget)", flush=True)
            continue
        extra = list(extra)
        if compose([f"prune={prune}"]).prune.get("from_baseline") and base_ckpt:
            extra.append(f"prune.baseline_ckpt={base_ckpt}")
        cells.append(run_cell(label, prune, extra, args, uri, tmp))

    runs = tracking.load_runs(uri, finished_only=False).set_index("run_id", drop=False)
    rows = []
    for cell in cells:
        if cell["run_id"] not in runs.index:
            rows.append({"label": cell["label"], "prune": cell["prune"], "status": "NOT STARTED",
                         "status_detail": cell["error"], "wall_s": round(cell["wall_s"], 1), "onnx_status": ""})
            continue
        r = runs.loc[cell["run_id"]]
        rec = {"label": cell["label"], "prune": cell["prune"], "run_id": cell["run_id"], "status": r["status"],
               "status_detail": r.get("status_detail", ""), "wall_s": round(cell["wall_s"], 1),
               "onnx_status": client.get_run(r["run_id"]).data.tags.get(tracking.TAG_ONNX_STATUS, "")}
        rec.update({k: (None if v != v else float(v)) for k, v in r.items()
                    if "/" in k and not k.startswith(("test/f1_", "test/precision_", "test/recall_"))
                    and isinstance(v, (int, float))})
        rows.append(rec)
    print("re-timing every final model round-robin ...", flush=True)
    remeasure(client, rows, tmp, rounds=1 if args.quick else args.rounds, repeats=3 if args.quick else 30)
    base = next((r for r in rows if r["label"] == "none" and r["status"] == "FINISHED"), None)
    for r in rows:
        if base and r.get("test/acc") is not None:
            r["d_acc_pt"] = 100 * (r["test/acc"] - base["test/acc"])
        if base and r.get("rr/infer_ms"):
            r["x_eager"] = base["rr/infer_ms"] / r["rr/infer_ms"]
        if base and r.get("time/infer_ms_batch") and base.get("time/infer_ms_batch"):
            r["x_eager_batch"] = base["time/infer_ms_batch"] / r["time/infer_ms_batch"]
        if r.get("baseline/infer_ms") and r.get("time/infer_ms"):
            r["x_eager_paired"] = r["baseline/infer_ms"] / r["time/infer_ms"]  # dense model timed in the same run
        if base and r.get("rr/infer_ms_onnx") and base.get("rr/infer_ms_onnx"):
            r["x_onnx"] = base["rr/infer_ms_onnx"] / r["rr/infer_ms_onnx"]

    print("\n## Grid rows (resnet18, fashion_mnist; infer_ms / onnx_ms: final models re-timed round-robin, median ms "
          "per image at batch 1, 1 thread; cell_ms / cell_onnx_ms: as logged by each run)\n")
    head = ["method"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [fmt(r.get(key) if key else r.get(name), pat) for name, key, pat in COLUMNS]
        lines.append(f"| {r['label']} | " + " | ".join(vals) + " |")
    print("\n".join(lines))
    for r in rows:
        if r["status"] != "FINISHED" or (r["onnx_status"] not in ("", "ok")):
            print(f"  note {r['label']}: status {r['status']} {r['status_detail'] or ''} onnx: {r['onnx_status']}")

    print("\n## Static vs dynamic L1 (Ju & Kang (on-device lightweight methods)), same final sparsity target\n")
    keys = [("test/acc", "{:.4f}"), ("d_acc_pt", "{:+.2f}"), (l1.L1_CONV_SPARSITY, "{:.3f}"),
            (l1.L1_BN_SPARSITY, "{:.3f}"), ("l1/fit_conv_sparsity", "{:.3f}"), ("rr/infer_ms", "{:.2f}"),
            ("rr/infer_ms_onnx", "{:.2f}"), ("time/infer_ms", "{:.2f}"), (tracking.ONNX_METRICS[0], "{:.2f}"),
            ("memory/infer_peak_mb", "{:.0f}"), ("memory/train_peak_mb", "{:.0f}"), ("time/epoch_s", "{:.1f}")]
    pair = [r for lab in ("none", "l1_static", "l1_dynamic", "l1_static_literal") for r in rows if r["label"] == lab]
    comp = ["| metric | " + " | ".join(r["label"] for r in pair) + " |", "|---|" + "---|" * len(pair)]
    comp += [f"| {k} | " + " | ".join(fmt(r.get(k), p) for r in pair) + " |" for k, p in keys]
    print("\n".join(comp))

    print("\n## Targets\n")
    verdicts = {}
    for method, (min_x, max_drop) in TARGETS.items():
        r = next((x for x in rows if x["label"] == method), None)
        if r is None or r["status"] != "FINISHED" or base is None:
            verdicts[method] = {"held": False, "why": "not run or failed"}
        else:
            drop = -r["d_acc_pt"]
            held = r["x_eager"] >= min_x and drop <= max_drop
            verdicts[method] = {"held": bool(held), "x_eager": r["x_eager"], "x_eager_paired": r.get("x_eager_paired"),
                                "x_eager_batch": r.get("x_eager_batch"), "x_onnx": r.get("x_onnx"),
                                "acc_drop_pt": drop, "need_x": min_x, "max_drop_pt": max_drop}
        v = verdicts[method]
        print(f"- {method}: {'HELD' if v['held'] else 'MISSED'} (need >= {min_x}x eager batch-1 speedup and <= "
              f"{max_drop} pt drop; got " + (f"{v['x_eager']:.2f}x, paired {v['x_eager_paired'] or 0:.2f}x, batch-32 "
              f"{v['x_eager_batch'] or 0:.2f}x, onnx {v['x_onnx'] or 0:.2f}x, drop {v['acc_drop_pt']:+.2f} pt)"
              if "x_eager" in v else v["why"] + ")"))
    total = time.perf_counter() - t_all
    print(f"\ntotal {total / 60:.1f} min")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "setup": {"backbone": "resnet18", "dataset": "fashion_mnist", "subset": args.subset, "epochs": args.epochs,
                  "seed": args.seed, "quick": args.quick, "threads": 1, "machine": platform.machine(),
                  "cpu_count": __import__("os").cpu_count(), "total_s": round(total, 1)},
        "rows": rows, "targets": verdicts, "table_md": "\n".join(lines), "static_vs_dynamic_md": "\n".join(comp),
    }, indent=2, default=float))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
