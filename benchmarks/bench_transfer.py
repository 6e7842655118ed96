"""The papers' transfer-learning protocol, offline: Layer Importance Evaluation on pretrained backbones.

Layer Importance Evaluation (Jin & Song) ranks the layers of ImageNet-pretrained backbones and
finds the top layers early in the network, so cutting after them removes most parameters (ResNet50
25.6M -> 3.4M). ImageNet weights cannot be downloaded here, so a source task stands in for them:

1. ``pretrain``: each backbone trains on Fashion-MNIST classes 0-4 (``fashion_mnist_0to4``), as the
   grid's ``pretrain`` stage does (:func:`prunegrid.pretrain.pretrain`);
2. per seed, on the target task (classes 5-9, 800 training images per class, ``fashion_mnist_5to9``),
   with the ResNet recipe's freezing (all stages but the last frozen, ``backbone.freeze=-1``):
   the baseline (``prune=none``, early stopping under a cap), its equal-budget reference
   (``none_ft1``: the baseline trained one more epoch) and ``layer_importance`` (ranked on the
   trained baseline, rebuilt, fine-tuned one epoch).

It prints, per backbone: the stages of the top-6 layers, the parameter reduction, ``acc_delta_pt``
against the equal-budget reference (mean ± std over seeds) and the epoch and inference speed-ups
(inference: the rebuilt model against the dense baseline timed in the same process). Targets from
the paper: at least 85 % fewer parameters within 1 point of accuracy. Writes
``reports/bench/transfer.json``.

    .venv/bin/python benchmarks/bench_transfer.py [--backbones resnet18 resnet50] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mlflow.tracking import MlflowClient  # noqa: E402

from prunegrid import pretrain  # noqa: E402
from prunegrid.config import compose  # noqa: E402
from prunegrid.pipeline import run  # noqa: E402

SOURCE, TARGET = "fashion_mnist_0to4", "fashion_mnist_5to9"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _cell(common: list[str], *extra: str) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*common, *extra, f"paths.metrics_out={tmp}/m.json"])
        metrics = run(cfg)
        run_id = json.loads(Path(tmp, "m.json").read_text())["run_id"]
    return metrics, run_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--source-subset", type=int, default=6000, help="source-task images per split")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--eval-subset", type=int, default=1000, help="target validation/test images at most")
    p.add_argument("--repeats", type=int, default=10, help="latency repeats (measure.repeats) of the target cells")
    p.add_argument("--cap", type=int, default=3, help="epoch cap of the target baseline (early stopping under it)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for training (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench" / "transfer.json"))
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    uri = f"sqlite:///{work}/mlflow.db"
    base = [f"tracking.uri={uri}", f"paths.data_dir={ROOT / 'data'}", "explain.enabled=false",
            "trainer.enable_progress_bar=false"]
    t0 = time.perf_counter()
    pretrain.pretrain({"backbones": args.backbones, "overrides": f"transfer.source={SOURCE} transfer.dir={work}/pre",
                       "pretrain": {"overrides": " ".join([*base, f"dataset.subset={args.source_subset}",
                                                           "measure.repeats=3", "measure.warmup=1",
                                                           f"trainer.max_epochs={args.pretrain_epochs}",
                                                           f"paths.output_dir={work}/pretrain"])}})
    pretrain_s = time.perf_counter() - t0
    client = MlflowClient(uri)
    results = {}
    for bb in args.backbones:
        seeds = []
        for seed in args.seeds:
            common = [*base, f"backbone={bb}", f"dataset={TARGET}", f"dataset.subset={args.eval_subset}",
                      f"transfer.source={SOURCE}", f"transfer.dir={work}/pre", "backbone.freeze=-1",
                      f"trainer.max_epochs={args.cap}", "trainer.callbacks.early_stopping.patience=1", f"seed={seed}",
                      f"measure.repeats={args.repeats}",
                      f"paths.output_dir={work}/{bb}-{seed}"]
            ckpt = work / f"{bb}-{seed}-none.pt"
            none, _ = _cell(common, "prune=none", f"paths.model_out={ckpt}")
            ref, _ = _cell(common, "prune=none", "prune.finetune_epochs=1", f"prune.baseline_ckpt={ckpt}")
            li, li_id = _cell(common, "prune=layer_importance", f"prune.baseline_ckpt={ckpt}")
            ranking = Path(client.download_artifacts(li_id, "layer_importance/ranking.csv", str(work / li_id)))
            import pandas as pd

            table = pd.read_csv(ranking)
            top = table[table["selected"]]
            seeds.append({
                "seed": seed, "top_layers": list(top["layer"]), "top_stages": [int(s) for s in top["stage"]],
                "top_share": float(top["share"].sum()),
                "params_none": none["model/params"], "params_li": li["model/params"],
                "params_reduction_pct": 100 * (1 - li["model/params"] / none["model/params"]),
                "acc_none": none["test/acc"], "acc_ref": ref["test/acc"], "acc_li": li["test/acc"],
                "acc_delta_pt": 100 * (li["test/acc"] - ref["test/acc"]),
                "acc_delta_pt_vs_base": 100 * (li["test/acc"] - none["test/acc"]),
                "budget_epochs": li["budget/epochs"], "ref_budget_epochs": ref["budget/epochs"],
                "baseline_converged": none["train/converged"],
                "epoch_speedup": ref["time/epoch_s"] / li["time/epoch_s"],
                "infer_speedup": li["baseline/infer_ms"] / li["time/infer_ms"],
                "infer_ms_none": li["baseline/infer_ms"], "infer_ms_li": li["time/infer_ms"],
            })
            print(f"{bb} seed {seed}: top stages {seeds[-1]['top_stages']}, params "
                  f"-{seeds[-1]['params_reduction_pct']:.1f}%, acc {li['test/acc']:.4f} vs ref {ref['test/acc']:.4f}",
                  flush=True)
        summary = {k: _mean_std([s[k] for s in seeds]) for k in
                   ("params_reduction_pct", "acc_delta_pt", "acc_delta_pt_vs_base", "epoch_speedup", "infer_speedup",
                    "acc_ref", "acc_li", "top_share")}
        results[bb] = {"seeds": seeds, "summary": summary,
                       "targets": {"params_reduction_ge_85": summary["params_reduction_pct"][0] >= 85,
                                   "acc_within_1pt": abs(summary["acc_delta_pt"][0]) <= 1.0}}

    print(f"\nTransfer protocol: pretrain on {SOURCE} ({args.source_subset} images/split, {args.pretrain_epochs} "
          f"epochs, {pretrain_s:.0f} s), target {TARGET} (800/class), freeze=-1, {len(args.seeds)} seeds")
    header = ("backbone", "top-6 stages (per seed)", "params red. %", "acc_delta_pt vs none_ft1", "vs none",
              "epoch x", "infer x", "targets")
    print(" | ".join(header))
    for bb, r in results.items():
        s = r["summary"]
        fmt = lambda k, f="{:+.1f}": f"{f.format(s[k][0])} ± {abs(s[k][1]):.2f}"
        print(" | ".join([bb, "; ".join(str(x["top_stages"]) for x in r["seeds"]),
                          fmt("params_reduction_pct", "{:.1f}"), fmt("acc_delta_pt"), fmt("acc_delta_pt_vs_base"),
                          fmt("epoch_speedup", "{:.2f}"), fmt("infer_speedup", "{:.2f}"),
                          ", ".join(f"{k}={'met' if v else 'missed'}" for k, v in r["targets"].items())]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "pretrain_s": pretrain_s,
                               "wall_s": time.perf_counter() - t0, "results": results}, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
