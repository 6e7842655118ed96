"""ResNet18 vs SE-ResNet18 vs stage-shared SE-ResNet18 (BaiNa & Joe (explainable channel attention)) on Fashion-MNIST, same budget.

Each backbone runs as a normal ``prune=none`` cell through ``prunegrid.pipeline.run`` (same
data subset, epochs, seed, optimizer and measurement code) into a temporary MLflow store; the
table shows test accuracy, parameters, mean epoch time and batch-1 latency. The three final
models then explain the same test images with Grad-CAM, drawn into one image (rows: input,
resnet18, se_resnet18, sse_resnet18), and the maps' agreement with resnet18's is reported.
The paper (garbage images, 128 px, 100 epochs) reports 77.59% -> 83.33% (+5.7 points) from SE.

    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_se.py [--subset 12000] [--epochs 2]

Writes ``reports/bench/se.json`` and ``reports/bench/gradcam_se.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from prunegrid import measure, pipeline, tracking
from prunegrid.config import build, compose
from prunegrid.explain.gradcam import agreement, display_images, fixed_images, gradcam, target_layer

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("resnet18", "se_resnet18", "sse_resnet18")
OUT = ROOT / "reports" / "bench"


def run_cell(backbone: str, store: Path, args) -> tuple[dict, str]:
    cfg = compose([
        f"backbone={backbone}", f"tracking.uri=sqlite:///{store}/mlflow.db", f"paths.output_dir={store}/{backbone}",
        f"paths.data_dir={ROOT / 'data'}", f"dataset.subset={args.subset}", f"trainer.max_epochs={args.epochs}",
        f"seed={args.seed}", "trainer.enable_progress_bar=false", "explain.enabled=false",
    ])
    metrics = pipeline.run(cfg)
    runs = tracking.load_runs(cfg.tracking.uri)
    run_id = runs[runs.backbone == backbone].sort_values("start_time").run_id.iloc[-1]
    return metrics, run_id


def cam_figure(models: dict, args, path: Path) -> dict[str, dict[str, float]]:
    """One PNG: the inputs, then each model's Grad-CAM of the true class; agreement with resnet18."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from prunegrid.plots import close, plt

    cfg = compose([f"paths.data_dir={ROOT / 'data'}", f"dataset.subset={args.subset}"])
    data = build(cfg.dataset, seed=args.seed)
    data.setup()
    x, labels, _ = fixed_images(data.full_test, data.transform(False), args.images, seed=0)
    rgb = display_images(x)
    maps, preds, layers = {}, {}, {}
    for name, net in models.items():
        layers[name], layer = target_layer(net, None, int(cfg.dataset.input_size))
        maps[name], logits = gradcam(net, x, layer, labels)
        preds[name] = logits.argmax(1).tolist()
    n = len(labels)
    fig, axes = plt.subplots(1 + len(models), n, figsize=(1.7 * n, 1.9 * (1 + len(models))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(rgb[j], interpolation="nearest")
        axes[0, j].set_title(data.classes[labels[j]], fontsize=7)
        for i, name in enumerate(models, start=1):
            axes[i, j].imshow(show_cam_on_image(rgb[j].astype(np.float32), maps[name][j], use_rgb=True))
            ok = preds[name][j] == labels[j]
            axes[i, j].set_title(f"pred {data.classes[preds[name][j]]}", fontsize=6, color="green" if ok else "red")
    for i, name in enumerate(models, start=1):
        axes[i, 0].text(-0.15, 0.5, f"{name}\n{layers[name]}", transform=axes[i, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Grad-CAM of the true class, Fashion-MNIST test images (32 px)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    close(fig)
    ref = maps[BACKBONES[0]]
    out = {}
    for name in models:
        iou, r = agreement(maps[name], ref)
        out[name] = {"cam_iou_vs_resnet18": iou, "cam_pearson_vs_resnet18": r, "target_layer": layers[name]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=12000, help="images per split at most")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--images", type=int, default=8, help="test images in the Grad-CAM figure")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows, models = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-se-") as tmp:
        store = Path(tmp)
        from mlflow.tracking import MlflowClient

        for backbone in BACKBONES:
            m, run_id = run_cell(backbone, store, args)
            model_file = MlflowClient(f"sqlite:///{store}/mlflow.db").download_artifacts(
                run_id, f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}", str(store / f"dl_{backbone}"))
            models[backbone] = measure.load_model(model_file)
            rows.append({"backbone": backbone, "test_acc": m["test/acc"], "params": int(m["model/params"]),
                         "flops": int(m["model/flops"]), "epoch_s": m["time/epoch_s"], "train_s": m["time/train_s"],
                         "infer_ms": m["time/infer_ms"], "infer_ms_batch": m["time/infer_ms_batch"]})
        cams = cam_figure(models, args, OUT / "gradcam_se.png")
    for r in rows:
        r.update(cams[r["backbone"]])
    base = rows[0]
    for r in rows:
        r["acc_delta_pt"] = 100 * (r["test_acc"] - base["test_acc"])

    print(f"\nSE benchmark: Fashion-MNIST, subset={args.subset}, {args.epochs} epoch(s), 32 px, seed {args.seed}")
    header = f"{'backbone':<13} {'test acc':>8} {'d acc pt':>8} {'params':>11} {'epoch s':>8} {'infer ms':>8} " \
             f"{'cam IoU':>7} {'cam r':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backbone']:<13} {r['test_acc']:>8.4f} {r['acc_delta_pt']:>+8.2f} {r['params']:>11,} "
              f"{r['epoch_s']:>8.1f} {r['infer_ms']:>8.2f} {r['cam_iou_vs_resnet18']:>7.3f} "
              f"{r['cam_pearson_vs_resnet18']:>6.3f}")
    print("paper (BaiNa & Joe (explainable channel attention), garbage classification, ResNet50): 77.59% -> 83.33% with SE (+5.74 pt)")
    result = {"dataset": "fashion_mnist", "subset": args.subset, "epochs": args.epochs, "input_size": 32,
              "seed": args.seed, "rows": rows, "paper_delta_pt": 5.74, "wall_s": time.perf_counter() - t0}
    (OUT / "se.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT / 'se.json'} and {OUT / 'gradcam_se.png'} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
