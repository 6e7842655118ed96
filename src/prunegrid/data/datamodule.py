"""One LightningDataModule for every image classification source."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from prunegrid.errors import ConfigError
from prunegrid.data.sources import Splits
from prunegrid.data.synthetic import synthetic_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Transformed(Dataset):
    """Apply a transform to the images of another dataset."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


def _targets(ds: Dataset) -> list[int]:
    if isinstance(ds, Subset):
        parent = _targets(ds.dataset)
        return [parent[i] for i in ds.indices]
    if isinstance(ds, torch.utils.data.ConcatDataset):
        return [t for part in ds.datasets for t in _targets(part)]
    return list(ds.targets)


class Relabeled(Dataset):
    """The images of ``base`` whose label is in ``keep``, relabelled ``0..k-1`` in ``keep``'s order
    (a task made of some classes of a data set, e.g. a transfer-learning source or target)."""

    def __init__(self, base: Dataset, keep: list[int]):
        labels = _targets(base)
        remap = {c: i for i, c in enumerate(keep)}
        self.base = base
        self.indices = [i for i, t in enumerate(labels) if t in remap]
        self.targets = [remap[labels[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _ = self.base[self.indices[i]]
        return img, self.targets[i]


class SplitLoaders(L.LightningDataModule):
    """The loaders of a data module with ``dataset(split)``, ``batch_size``, ``eval_batch_size``,
    ``num_workers`` and ``seed``: shuffled (seeded) for ``train`` only, batched by ``collate_fn``."""

    collate_fn: Callable | None = None

    def loader(self, split: str, shuffle: bool | None = None, batch_size: int | None = None) -> DataLoader:
        shuffle = split == "train" if shuffle is None else shuffle
        bs = batch_size or (self.batch_size if split == "train" else self.eval_batch_size)
        return DataLoader(self.dataset(split), batch_size=bs, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False, collate_fn=self.collate_fn,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class ImageDataModule(SplitLoaders):
    """Train / val / test loaders with the transforms of Kim (ResNet transfer learning).

    Args:
        source: callable returning :class:`~prunegrid.data.sources.Splits` (a source node).
        input_size: side of the square input, in pixels.
        subset: cap on images per split (seeded random pick), for quick runs; ``None`` = all.
        val_fraction: share of the training split carved out for validation (seeded).
        hflip / color_jitter: augmentations of the training split (001: flip, ColorJitter(0.2, 0.2, 0.2, 0.1)).
        normalize: ImageNet mean/std normalisation. Grayscale images become 3 channels.
        synthetic: extra training-only images (e.g. filtered GAN samples): a dataset, a source, or the path
            of an ImageFolder tree whose class folders are named after the classes (``prunegrid.data.gan``).
        classes: keep only these classes (indices or names of the source), relabelled in this order;
            ``None`` = all. Two disjoint sets make a source and a target task of one data set.
        train_per_class: cap on training images per class after validation is carved out (seeded),
            e.g. 800 as in Layer Importance Evaluation's fire data set; ``None`` = no cap.
        root: where the data lives (the source reads it; kept for the run's ``data_md5`` tag).
        skip_bad_images: read by the image_folder source through its YAML; accepted here so the node builds.
    """

    def __init__(self, source: Callable[[], Splits] | Splits, input_size: int = 32, subset: int | None = None,
                 val_fraction: float = 0.1, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, hflip: bool = True, color_jitter: list[float] | None = None,
                 normalize: bool = True, seed: int = 0, synthetic: Any = None, root: str | None = None,
                 skip_bad_images: bool = False, classes: list | None = None, train_per_class: int | None = None):
        super().__init__()
        if input_size < 1:
            raise ConfigError(f"dataset.input_size={input_size} must be a positive number of pixels")
        if subset is not None and subset < 1:
            raise ConfigError(f"dataset.subset={subset} must be a positive number of images (or null for all)")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction={val_fraction} must be in (0, 1)")
        self.source, self.input_size, self.subset = source, input_size, subset
        self.val_fraction, self.batch_size = val_fraction, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed, self.synthetic = num_workers, seed, synthetic
        self.hflip, self.color_jitter, self.normalize = hflip, color_jitter, normalize
        if train_per_class is not None and train_per_class < 1:
            raise ConfigError(f"dataset.train_per_class={train_per_class} must be a positive number of images (or null)")
        if classes is not None and len(classes) < 2:
            raise ConfigError(f"dataset.classes={list(classes)} must name at least 2 classes (or null for all)")
        self.root = root
        self.class_filter = None if classes is None else list(classes)
        self.train_per_class = train_per_class
        self.splits: Splits | None = None
        self.classes: list[str] = []

    def transform(self, train: bool) -> v2.Compose:
        steps: list[Any] = [v2.ToImage(), v2.RGB(), v2.Resize((self.input_size, self.input_size), antialias=True)]
        if train and self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if train and self.color_jitter:
            steps.append(v2.ColorJitter(*self.color_jitter))
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if self.normalize:
            steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        return v2.Compose(steps)

    def _cap(self, ds: Dataset, offset: int) -> Dataset:
        if self.subset is None or len(ds) <= self.subset:
            return ds
        idx = np.random.default_rng(self.seed + offset).permutation(len(ds))[: self.subset]
        return Subset(ds, sorted(idx.tolist()))

    def _keep(self, names: list[str]) -> list[int]:
        keep = []
        for c in self.class_filter:
            if isinstance(c, int) and 0 <= c < len(names):
                keep.append(c)
            elif str(c) in names:
                keep.append(names.index(str(c)))
            else:
                raise ConfigError(f"dataset.classes names unknown class '{c}'; classes are 0..{len(names) - 1} "
                                  f"or {', '.join(names)}")
        if len(set(keep)) != len(keep):
            raise ConfigError(f"dataset.classes={self.class_filter} names a class twice")
        return keep

    def _per_class(self, ds: Dataset) -> Dataset:
        if self.train_per_class is None:
            return ds
        labels = np.asarray(_targets(ds))
        rng = np.random.default_rng(self.seed + 4)
        idx = [i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[: self.train_per_class]]
        return Subset(ds, sorted(int(i) for i in idx))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = self.source() if callable(self.source) else self.source
        if self.class_filter is not None:
            keep = self._keep(list(raw.classes))
            raw = Splits(Relabeled(raw.train, keep), Relabeled(raw.test, keep), [raw.classes[k] for k in keep],
                         val=None if raw.val is None else Relabeled(raw.val, keep), bad_images=raw.bad_images)
        train = raw.train
        if raw.val is None:
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, int(round(len(train) * self.val_fraction)))
            val = Subset(train, sorted(order[:n_val].tolist()))
            train = Subset(train, sorted(order[n_val:].tolist()))
        else:
            val = raw.val
        train = self._per_class(train)
        train, val, test = self._cap(train, 1), self._cap(val, 2), self._cap(raw.test, 3)
        if self.synthetic is not None:
            extra = self.synthetic() if callable(self.synthetic) else self.synthetic
            if isinstance(extra, (str, Path)):
                extra = synthetic_folder(extra, list(raw.classes))
            train = torch.utils.data.ConcatDataset([train, extra])
        self.classes = list(raw.classes)
        self.full_test = raw.test  # before dataset.subset's cap: Grad-CAM's fixed images, the same for any subset
        self.splits = Splits(train, test, self.classes, val=val, bad_images=raw.bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str, train_transform: bool | None = None) -> Dataset:
        """The images of a split with its transform (training augmentation only for ``train``)."""
        self.setup()
        base = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[split]
        augment = split == "train" if train_transform is None else train_transform
        return Transformed(base, self.transform(augment))


    def targets(self, split: str) -> list[int]:
        self.setup()
        return _targets({"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[split])
