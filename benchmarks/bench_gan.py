"""Does GAN augmentation with quality filtering (Jin & Song (Layer Importance Evaluation)) help a small real training set?

1. Export a low-data Fashion-MNIST ImageFolder tree: ``train/`` = ``--real-per-class`` real images
   per class (seeded pick from the 60k training split), ``test/`` = the official 10k test split
   (``--test-cap`` of them, seeded, are used for the accuracy).
2. Run ``prunegrid.data.gan`` on that tree's training split (the DataModule's ``train`` after the
   10 % validation carve-out, so the GAN sees exactly the real images the classifier trains on and
   never val/test), generating ``--per-class`` images per class (default 100: the paper's 400 next to
   800 real is a 1:2 ratio; here about 1:1 before filtering) and keeping those the filter
   classifier assigns to their class with p >= ``--min-confidence``.
3. Train resnet18 (32 px, same seed, epochs, optimizer, scheduler, early stopping) with
   ``prunegrid.pipeline.run`` twice: real images only, and real + kept synthetic images
   (``dataset.synthetic=OUT``); print both test accuracies, the Inception Score (computed with the
   filter classifier's softmax, not InceptionV3) and the rejected share; write ``reports/bench/gan.json``.

    flock /tmp/prunegrid-cpu.lock .venv/bin/python benchmarks/bench_gan.py [--gan-epochs 300] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prunegrid import pipeline
from prunegrid.config import compose
from prunegrid.data import gan
from prunegrid.data.sources import fashion_mnist
from prunegrid.data.synthetic import class_dirnames

ROOT = Path(__file__).resolve().parents[1]


def export(dest: Path, real_per_class: int, seed: int) -> None:
    """ImageFolder tree: train/ with ``real_per_class`` images per class, test/ with the official test split."""
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return
    splits = fashion_mnist(str(ROOT / "data" / "fashion_mnist"), download=False)
    rng = np.random.default_rng(seed)
    labels = splits.train.labels.numpy()
    folders = class_dirnames(splits.classes)
    for c, folder in enumerate(folders):
        d = dest / "train" / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(np.flatnonzero(labels == c))[:real_per_class]:
            Image.fromarray(splits.train.images[i].numpy()).save(d / f"{i:05d}.png")
    for i in range(len(splits.test)):
        img, label = splits.test[i]
        d = dest / "test" / folders[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(0).numpy()).save(d / f"{i:05d}.png")


def train(root: Path, out: Path, uri: str, epochs: int, seed: int, synthetic: Path | None, test_cap: int) -> dict:
    cfg = compose([
        "dataset=image_folder", f"dataset.root={root}", "dataset.input_size=32", "dataset.num_workers=0", f"dataset.subset={test_cap}",
        "dataset.batch_size=64", "dataset.color_jitter=null", f"dataset.synthetic={synthetic or 'null'}",
        "backbone=resnet18", f"seed={seed}", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        f"tracking.uri={uri}", "tracking.experiment=bench_gan", f"paths.output_dir={out}",
        "measure.warmup=2", "measure.repeats=5",
        "trainer.callbacks.early_stopping=null", "explain.enabled=false",  # same epochs for both runs
    ])
    t0 = time.perf_counter()
    m = pipeline.run(cfg)
    return {"test_acc": m["test/acc"], "test_f1_macro": m.get("test/f1_macro"), "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-per-class", type=int, default=100)
    p.add_argument("--gan-epochs", type=int, default=80)
    p.add_argument("--per-class", type=int, default=100,
                   help="generated per class (paper: 400 next to 800 real; here ~the real count)")
    p.add_argument("--min-confidence", type=float, default=0.9)
    p.add_argument("--classifier-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=8, help="resnet18 epochs, both runs")
    p.add_argument("--test-cap", type=int, default=2000, help="test images (seeded pick of the 10k), dataset.subset")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench_gan"))
    p.add_argument("--json", default=str(ROOT / "reports" / "bench" / "gan.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    uri = f"sqlite:///{work}/mlflow.db"
    root = work / f"fmnist_{args.real_per_class}pc"
    t0 = time.perf_counter()
    export(root, args.real_per_class, args.seed)
    syn = work / "synthetic"
    shutil.rmtree(syn, ignore_errors=True)
    opts = gan.load_options(None, [
        f"out={syn}", f"epochs={args.gan_epochs}", f"per_class={args.per_class}", "batch_size=64",
        f"min_confidence={args.min_confidence}", f"classifier_epochs={args.classifier_epochs}", f"seed={args.seed}",
        "progress=false", f"threads={args.threads}", "dataset=image_folder", f"dataset.root={root}", "dataset.num_workers=0",
        f"tracking.uri={uri}", "tracking.experiment=bench_gan",
    ])
    opts.data = [o for o in opts.data if o != "dataset=fashion_mnist"]
    g0 = time.perf_counter()
    s = gan.augment(opts)
    gan_s = time.perf_counter() - g0
    print(gan.summary_line(s))
    real = train(root, work / "real", uri, args.epochs, args.seed, None, args.test_cap)
    aug = train(root, work / "augmented", uri, args.epochs, args.seed, syn, args.test_cap) if s["kept"] else None
    result = {
        "real_per_class": args.real_per_class, "real_train_images": s["train_images"], "gan_epochs": args.gan_epochs,
        "generated": s["generated"], "kept": s["kept"], "rejected_share": s["rejected_share"],
        "inception_score_kept": s["inception_score"], "inception_score_all": s["inception_score_all"],
        "inception_score_real": s["inception_score_real"], "is_note": s["note"],
        "classifier": s["classifier"], "classifier_heldout_acc": s["classifier_val_acc"], "gan_s": gan_s,
        "resnet18_epochs": args.epochs, "test_images": args.test_cap, "threads": args.threads, "acc_real": real["test_acc"], "acc_augmented": aug and aug["test_acc"],
        "f1_real": real["test_f1_macro"], "f1_augmented": aug and aug["test_f1_macro"],
        "train_s_real": real["wall_s"], "train_s_augmented": aug and aug["wall_s"],
        "total_s": time.perf_counter() - t0, "gan_target_s": 900, "gan_run_id": s.get("run_id"),
        "tracking_uri": uri, "seed": args.seed,
    }
    result["helped"] = bool(aug and aug["test_acc"] > real["test_acc"])
    rows = [("real only", f"{real['test_acc']:.4f}", f"{real['wall_s']:.0f}"),
            ("real + kept synthetic", f"{aug['test_acc']:.4f}" if aug else "n/a (none kept)",
             f"{aug['wall_s']:.0f}" if aug else "-")]
    print(f"\nresnet18, {s['train_images']} real training images, {args.epochs} epochs, seed {args.seed}")
    print(f"{'train set':<24}{'test acc':>18}{'run s':>8}")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>18}{r[2]:>8}")
    print(f"GAN: {gan_s:.0f} s (target < 900 s), kept {s['kept']}/{s['generated']} (rejected {s['rejected_share']:.1%}), "
          f"IS kept {s['inception_score']:.2f} / all {s['inception_score_all']:.2f} / real {s['inception_score_real']:.2f} "
          f"(filter classifier softmax)")
    print(f"augmentation helped: {result['helped']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
