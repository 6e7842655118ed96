"""Benchmark: ``prune=none`` vs ``prune=layer_importance`` (Jin & Song (Layer Importance Evaluation)) on Fashion-MNIST.

For each backbone the ``none`` cell is trained first; the ``layer_importance`` cell then starts
from that cell's saved model (``prune.baseline_ckpt``, downloaded from its MLflow run), so both
share one baseline, one budget and one seed. Prints the grid rows and the ranking table, and
writes ``reports/bench/layer_importance.json``.

Targets (the issue, from the paper and raised): parameters down >= 85%, accuracy within
1.0 point of the baseline, training epoch >= 3x faster, inference >= 2x faster.

Run (heavy; one benchmark at a time on the shared CPU):
    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_layer_importance.py
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from prunegrid import tracking
from prunegrid.config import compose
from prunegrid.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"params_reduction_pct": 85.0, "acc_delta_pt": -1.0, "epoch_speedup": 3.0, "infer_speedup": 2.0}


def _run(overrides: list[str], uri: str, backbone: str, prune: str) -> tuple[dict, str]:
    t0 = time.perf_counter()
    metrics = run(compose(overrides))
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.backbone = '{backbone}' and tags.prune = '{prune}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics, runs[0].info.run_id


def row(backbone: str, prune: str, m: dict, base: dict) -> dict:
    r = {"backbone": backbone, "prune": prune, "acc": m["test/acc"], "params": int(m["model/params"]),
         "flops": int(m["model/flops"]), "epoch_s": m["time/epoch_s"], "infer_ms": m["time/infer_ms"],
         "infer_ms_batch": m["time/infer_ms_batch"], "wall_s": m["wall_s"]}
    r["params_reduction_pct"] = 100 * (1 - m["model/params"] / base["model/params"])
    r["flops_reduction_pct"] = 100 * (1 - m["model/flops"] / base["model/flops"])
    r["acc_delta_pt"] = 100 * (m["test/acc"] - base["test/acc"])
    r["epoch_speedup"] = base["time/epoch_s"] / m["time/epoch_s"] if m["time/epoch_s"] else float("nan")
    r["infer_speedup"] = base["time/infer_ms"] / m["time/infer_ms"]
    # the same ratio measured back to back in one process (the dense backbone vs the rebuilt one)
    r["infer_speedup_same_run"] = m["baseline/infer_ms"] / m["time/infer_ms"]
    r.update({k: v for k, v in m.items() if k.startswith("layer_importance/")})
    return r


def targets(r: dict) -> dict[str, bool]:
    return {"params_down_85pct": r["params_reduction_pct"] >= TARGETS["params_reduction_pct"],
            "acc_within_1pt": r["acc_delta_pt"] >= TARGETS["acc_delta_pt"],
            "epoch_3x": r["epoch_speedup"] >= TARGETS["epoch_speedup"],
            "infer_2x": r["infer_speedup"] >= TARGETS["infer_speedup"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--subset", type=int, default=12000, help="images per split (dataset.subset)")
    ap.add_argument("--epochs", type=int, default=1, help="baseline epochs")
    ap.add_argument("--finetune", type=int, default=1, help="fine-tune epochs after the rebuild")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both cells")
    ap.add_argument("--out", default=str(ROOT / "reports/bench/layer_importance.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-li-"))
    uri = f"sqlite:///{work}/mlflow.db"
    common = [f"tracking.uri={uri}", f"paths.data_dir={ROOT / 'data'}", f"seed={args.seed}",
              f"dataset.subset={args.subset}", f"dataset.input_size={args.input_size}",
              f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false", *args.extra]
    rows, rankings = [], {}
    for bb in args.backbones:
        base, base_id = _run([*common, f"backbone={bb}", "prune=none", f"paths.output_dir={work}/{bb}-none"],
                             uri, bb, "none")
        ckpt = MlflowClient(uri).download_artifacts(base_id, f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}",
                                                    str(work / bb))
        li, li_id = _run([*common, f"backbone={bb}", "prune=layer_importance", f"prune.baseline_ckpt={ckpt}",
                          f"prune.finetune_epochs={args.finetune}", f"paths.output_dir={work}/{bb}-li"],
                         uri, bb, "layer_importance")
        rows += [row(bb, "none", base, base), row(bb, "layer_importance", li, base)]
        rankings[bb] = pd.read_csv(MlflowClient(uri).download_artifacts(li_id, "layer_importance/ranking.csv",
                                                                        str(work / bb)))

    cols = ["backbone", "prune", "acc", "acc_delta_pt", "params", "params_reduction_pct", "flops",
            "flops_reduction_pct", "epoch_s", "epoch_speedup", "infer_ms", "infer_speedup", "infer_speedup_same_run"]
    table = pd.DataFrame(rows)
    print("\n" + table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    verdict = {}
    for r in rows:
        if r["prune"] == "layer_importance":
            verdict[r["backbone"]] = targets(r)
            print(f"targets {r['backbone']}: " + ", ".join(f"{k} {'MET' if v else 'MISSED'}"
                                                           for k, v in verdict[r["backbone"]].items()))
    show = ["rank", "position", "layer", "type", "S_w", "S_a", "P", "share", "cumulative_share", "selected"]
    for bb, rk in rankings.items():
        print(f"\nranking {bb} (top 10 of {len(rk)}):\n" + rk[show].head(10).to_string(index=False,
                                                                                     float_format=lambda v: f"{v:.4g}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "layer_importance", "settings": vars(args) | {"torch": torch.__version__,
                                                                   "machine": platform.machine(),
                                                                   "threads": torch.get_num_threads()},
        "targets": TARGETS, "rows": rows, "targets_met": verdict,
        "rankings_top10": {bb: rk[show].head(10).to_dict(orient="records") for bb, rk in rankings.items()},
    }, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
