"""Data sources and the DataModule: splits, transforms and bad input."""

from __future__ import annotations

import shutil

import pytest
import torch

from prunegrid.data import ImageDataModule
from prunegrid.data.sources import fashion_mnist, image_folder
from prunegrid.errors import DataError


def test_fashion_mnist_from_debian_files(fashion_dir):
    s = fashion_mnist(str(fashion_dir), download=False)
    assert len(s.train) == 60000 and len(s.test) == 10000 and len(s.classes) == 10
    img, label = s.train[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and 0 <= label < 10


def test_datamodule_splits_and_transform(fashion_dir):
    dm = ImageDataModule(lambda: fashion_mnist(str(fashion_dir), download=False), input_size=32, subset=100,
                         val_fraction=0.1, batch_size=8, seed=1)
    dm.setup()
    assert len(dm.splits.train) == 100 and len(dm.splits.val) == 100 and len(dm.splits.test) == 100
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert -3 < float(x.mean()) < 3
    train_idx = set(dm.splits.train.dataset.indices[i] for i in dm.splits.train.indices)
    val_idx = set(dm.splits.val.dataset.indices[i] for i in dm.splits.val.indices)
    assert not train_idx & val_idx


def test_image_folder_split_is_seeded(image_tree):
    a, b = image_folder(str(image_tree), seed=3), image_folder(str(image_tree), seed=3)
    assert [p for p, _ in a.test.samples] == [p for p, _ in b.test.samples]
    assert len(a.test) == 12 and len(a.train) == 48 and a.classes == ["sneaker", "t_shirt", "trouser"]


def test_image_folder_pre_split(tmp_path, image_tree):
    for split in ("train", "test"):
        shutil.copytree(image_tree, tmp_path / split)
    s = image_folder(str(tmp_path))
    assert len(s.train) == 60 and len(s.test) == 60


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"))


def test_fewer_than_two_classes(tmp_path, image_tree):
    shutil.copytree(image_tree / "sneaker", tmp_path / "only" / "sneaker")
    with pytest.raises(DataError, match="at least 2"):
        image_folder(str(tmp_path / "only"))


def test_empty_class(tmp_path, image_tree):
    shutil.copytree(image_tree, tmp_path / "t")
    (tmp_path / "t" / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*has no images"):
        image_folder(str(tmp_path / "t"))


def test_bad_image_named_or_skipped(tmp_path, image_tree):
    shutil.copytree(image_tree, tmp_path / "t")
    bad = tmp_path / "t" / "sneaker" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png.*skip_bad_images=true") as err:
        image_folder(str(tmp_path / "t"))
    assert "\n" not in str(err.value)
    s = image_folder(str(tmp_path / "t"), skip_bad_images=True)
    assert s.bad_images == 1 and len(s.train) + len(s.test) == 60


def test_bad_numbers():
    from prunegrid.errors import ConfigError

    with pytest.raises(ConfigError):
        ImageDataModule(lambda: None, subset=0)
    with pytest.raises(ConfigError):
        ImageDataModule(lambda: None, val_fraction=1.5)


def test_class_subset_relabels_and_caps_per_class(fashion_dir):
    """A task of some classes (transfer source / target): labels 0..k-1 in the given order, capped per class."""
    dm = ImageDataModule(lambda: fashion_mnist(str(fashion_dir), download=False), classes=[9, "Sneaker", 5],
                         train_per_class=40, seed=0)
    dm.setup()
    assert dm.classes == ["Ankle boot", "Sneaker", "Sandal"]
    train = dm.targets("train")
    assert sorted(set(train)) == [0, 1, 2] and [train.count(c) for c in range(3)] == [40, 40, 40]
    test = dm.targets("test")
    assert len(test) == 3000 and sorted(set(test)) == [0, 1, 2]      # 1,000 test images per class
    raw = fashion_mnist(str(fashion_dir), download=False)
    img, label = dm.splits.test[0]
    first_boot = next(i for i in range(len(raw.test)) if raw.test[i][1] in (9, 7, 5))
    assert label == {9: 0, 7: 1, 5: 2}[raw.test[first_boot][1]]
    assert torch.equal(img, raw.test[first_boot][0])
    for bad in ([3], [0, 0], [0, "Spaceship"]):
        with pytest.raises(Exception, match="dataset.classes"):
            ImageDataModule(lambda: raw, classes=bad).setup()
