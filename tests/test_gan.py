"""GAN augmentation with quality filtering (Jin & Song (Layer Importance Evaluation)) and ``dataset.synthetic=PATH``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from prunegrid import tracking
from prunegrid.config import build, compose
from prunegrid.data import gan
from prunegrid.data.sources import FASHION_MNIST_CLASSES
from prunegrid.data.synthetic import class_dirnames
from prunegrid.errors import DataError

DATA = ["dataset=fashion_mnist", "dataset.subset=600", "paths.data_dir=data"]


def small(tmp_path, **kw) -> gan.GanOptions:
    base = dict(out=str(tmp_path / "syn"), image_size=16, width=8, latent_dim=16, epochs=2, batch_size=64,
                train_limit=256, per_class=6, min_confidence=0.0, classifier="simple_cnn", classifier_epochs=2,
                seed=0, track=False, progress=False, threads=2, data=list(DATA))
    return gan.GanOptions(**{**base, **kw})


def test_filter_keeps_only_intended_class(tmp_path, fashion_dir):
    opts = small(tmp_path)
    x, y, classes, _ = gan.real_training_images(opts)
    assert x.shape[1:] == (1, 16, 16) and x.min() >= -1 and x.max() <= 1 and len(y) == 256
    G, history = gan.train_gan(x, y, len(classes), opts)
    assert len(history) == 2 and all(np.isfinite([h["loss_g"], h["loss_d"]]).all() for h in history)
    clf, _ = gan.train_classifier(x, y, len(classes), opts)
    fake, labels = gan.generate(G, 6, len(classes), opts.seed)
    assert fake.shape == (60, 1, 16, 16) and labels.bincount().tolist() == [6] * 10
    probs = gan.predict(clf, fake)
    own = probs.gather(1, labels[:, None]).squeeze(1)
    threshold = float(own.median())
    keep = gan.filter_mask(probs, labels, threshold)
    assert 0 < keep.sum() < len(keep)
    out = tmp_path / "kept"
    counts = gan.write_images(fake[keep], labels[keep], classes, out)
    assert sum(counts.values()) == int(keep.sum())
    for c, name in enumerate(classes):
        files = sorted((out / class_dirnames(classes)[c]).glob("*.png"))
        assert len(files) == counts[name]
        if files:
            imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)) for f in files])
            p = gan.predict(clf, (imgs[:, None] / 127.5) - 1)
            assert (p.argmax(1) == c).all(), "a kept image is not assigned to its intended class"
            assert (p[:, c] >= threshold - 0.02).all()
    rejected = ~keep
    assert ((probs[rejected].argmax(1) != labels[rejected]) | (own[rejected] < threshold)).all()


def test_augment_writes_tree_and_logs_mlflow(tmp_path, fashion_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    opts = small(tmp_path, track=True, data=DATA + [f"tracking.uri={uri}"], train_limit=128, classifier_epochs=1)
    s = gan.augment(opts)
    out = tmp_path / "syn"
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted(class_dirnames(FASHION_MNIST_CLASSES))
    assert s["generated"] == 60 and 0 <= s["rejected_share"] <= 1 and s["kept"] == sum(s["kept_per_class"].values())
    assert json.loads((out / gan.ARTIFACT_GAN_SUMMARY).read_text())["kept"] == s["kept"]
    assert "classifier's softmax" in s["note"]
    client = MlflowClient(uri)
    run = client.get_run(s["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "fashion_mnist"
    assert run.data.tags[tracking.TAG_JOB] == gan.JOB_GAN and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(s["run_id"], gan.GAN_LOSS_G)] == [0, 1]
    for key in (gan.GAN_IS_ALL, gan.GAN_REJECTED_SHARE, gan.GAN_KEPT, gan.GAN_IS_REAL):
        assert key in run.data.metrics
    grids = client.list_artifacts(s["run_id"], gan.ARTIFACT_GAN_SAMPLES)
    assert len(grids) == 10 and all(a.path.endswith(".png") for a in grids)


def test_inception_score_bounds():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits[: len(x)]

    confident = torch.eye(4).repeat(25, 1) * 50
    assert gan.inception_score(Fixed(confident), torch.zeros(100, 1, 8, 8), splits=1)[0] == pytest.approx(4, rel=1e-3)
    assert gan.inception_score(Fixed(torch.zeros(100, 4)), torch.zeros(100, 1, 8, 8), splits=1)[0] == pytest.approx(1)


def _noise_tree(root, classes, n=3):
    rng = np.random.default_rng(0)
    for folder in class_dirnames(classes):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"{i}.png")


def test_synthetic_reaches_training_split_only(tmp_path, fashion_dir):
    syn = tmp_path / "syn"
    _noise_tree(syn, FASHION_MNIST_CLASSES[:4])
    plain = build(compose(DATA).dataset, seed=1)
    extra = build(compose(DATA + [f"dataset.synthetic={syn}"]).dataset, seed=1)
    plain.setup()
    extra.setup()
    assert len(extra.splits.train) == len(plain.splits.train) + 12
    for split in ("val", "test"):
        assert len(getattr(extra.splits, split)) == len(getattr(plain.splits, split))
        assert extra.targets(split) == plain.targets(split)
        a, b = plain.dataset(split)[5][0], extra.dataset(split)[5][0]
        assert torch.equal(a, b)
    targets = extra.targets("train")
    assert sorted(targets[-12:]) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for path, label in extra.splits.train.datasets[1].samples:
        assert path.parent.name == class_dirnames(FASHION_MNIST_CLASSES)[label]
    x, label = extra.dataset("train", train_transform=False)[len(targets) - 1]
    from prunegrid.data.datamodule import IMAGENET_MEAN, IMAGENET_STD

    raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert x.shape == (3, 32, 32) and label == 1 and torch.allclose(raw[0], raw[2], atol=1e-5)
    n_val = sum(len(b[1]) for b in extra.loader("val"))
    assert n_val == len(plain.splits.val)


def test_synthetic_class_mismatch_is_one_line_error(tmp_path, fashion_dir):
    syn = tmp_path / "syn"
    _noise_tree(syn, ["T-shirt/top", "Zebra"])
    dm = build(compose(DATA + [f"dataset.synthetic={syn}"]).dataset, seed=1)
    with pytest.raises(DataError, match="Zebra") as err:
        dm.setup()
    assert "\n" not in str(err.value)
    dm = build(compose(DATA + [f"dataset.synthetic={tmp_path}/nowhere"]).dataset, seed=1)
    with pytest.raises(DataError, match="not a directory"):
        dm.setup()


def test_cli_options(tmp_path):
    opts = gan.load_options(None, ["epochs=3", "dataset.subset=50", "per_class=7"])
    assert opts.epochs == 3 and opts.per_class == 7 and "dataset.subset=50" in opts.data
    assert gan.main(["image_size=12"]) == 2
    assert gan.main(["nonsense=1"]) == 2
