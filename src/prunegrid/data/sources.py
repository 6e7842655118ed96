"""Data sources: each returns the raw train and test sets and the class names.

A source is the ``source`` node of a ``conf/dataset/*.yaml``. Samples are ``(image, label)``
with the image a uint8 tensor (C, H, W) or (H, W), or a PIL image; the DataModule turns them
into normalised 3-channel tensors.
"""

from __future__ import annotations

import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from prunegrid.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    classes: list[str]
    val: Dataset | None = None
    bad_images: int = 0


class TensorImages(Dataset):
    """Images held in memory as a uint8 tensor (N, H, W) or (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (img.unsqueeze(0) if img.ndim == 2 else img), int(self.labels[i])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class ImageFiles(Dataset):
    """Image files with labels, read with PIL as RGB."""

    def __init__(self, samples: Sequence[tuple[Path, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), label
        except Exception as exc:
            raise DataError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:100]}); fix or remove it, "
                            "or set dataset.skip_bad_images=true") from exc

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str, download: bool = True) -> Splits:
    """Fashion-MNIST from a directory of the original ``*-ubyte.gz`` files (e.g. Debian's
    ``dataset-fashion-mnist``), or through torchvision's download when they are missing."""
    root_path = Path(root).expanduser()
    files = [root_path / f for pair in FASHION_MNIST_FILES.values() for f in pair]
    if not all(f.is_file() for f in files):
        if not download:
            raise DataError(f"Fashion-MNIST files not found in {root_path}; run `python -m prunegrid.data.fetch` "
                            "or set dataset.source.download=true")
        import torchvision

        try:
            tr = torchvision.datasets.FashionMNIST(str(root_path / "torchvision"), train=True, download=True)
            te = torchvision.datasets.FashionMNIST(str(root_path / "torchvision"), train=False, download=True)
        except Exception as exc:
            raise DataError(f"cannot download Fashion-MNIST into {root_path} ({type(exc).__name__}); "
                            "run `python -m prunegrid.data.fetch` to copy a local copy") from exc
        return Splits(TensorImages(tr.data, tr.targets), TensorImages(te.data, te.targets), list(FASHION_MNIST_CLASSES))
    out = {}
    for split, (img_f, lab_f) in FASHION_MNIST_FILES.items():
        images = torch.from_numpy(_read_idx(root_path / img_f).copy())
        labels = torch.from_numpy(_read_idx(root_path / lab_f).astype(np.int64))
        out[split] = TensorImages(images, labels)
    return Splits(out["train"], out["test"], list(FASHION_MNIST_CLASSES))


def cifar10(root: str, download: bool = True) -> Splits:
    """CIFAR-10 through torchvision (its download, or a local ``cifar-10-batches-py`` dir in ``root``)."""
    import torchvision

    root_path = Path(root).expanduser()
    try:
        tr = torchvision.datasets.CIFAR10(str(root_path), train=True, download=download)
        te = torchvision.datasets.CIFAR10(str(root_path), train=False, download=download)
    except Exception as exc:
        raise DataError(f"CIFAR-10 not available in {root_path} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}); "
                        "put cifar-10-batches-py there or allow dataset.source.download=true with internet") from exc
    to_t = lambda d: TensorImages(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
    return Splits(to_t(tr), to_t(te), list(tr.classes))


def _class_tree(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s); an image folder needs at least 2 (root/<class>/*.jpg)")
    samples = []
    for idx, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {root / cls} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
                            "add images or remove the folder")
        samples += [(p, idx) for p in files]
    return classes, samples


def _check_images(samples: list[tuple[Path, int]], skip_bad: bool) -> tuple[list[tuple[Path, int]], int]:
    """Decode every image once before training (``Image.verify`` alone passes a truncated JPEG):
    a bad one stops the run in one line naming it, or with ``skip_bad`` is skipped and counted."""
    from tqdm import tqdm

    good = []
    for path, label in tqdm(samples, desc="checking images", unit="img", leave=False, file=sys.stderr,
                            disable=len(samples) < 2000):
        try:
            with Image.open(path) as im:
                im.load()
            good.append((path, label))
        except Exception as exc:
            if not skip_bad:
                raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {str(exc)[:100]}); fix or remove "
                                "it, or set dataset.skip_bad_images=true to skip and count bad files") from exc
    return good, len(samples) - len(good)


def image_folder(root: str | None, test_fraction: float = 0.2, seed: int = 0,
                 skip_bad_images: bool = False) -> Splits:
    """Any ``root/<class>/*.jpg`` tree, split train/test by ``test_fraction`` (seeded, per class),
    or a tree already split into ``root/train/<class>`` and ``root/test/<class>``."""
    if not root:
        raise DataError("dataset=image_folder needs dataset.root=DIR (a folder of class folders)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset.root={root} does not exist or is not a directory")
    if not 0 < test_fraction < 1:
        raise DataError(f"dataset.source.test_fraction={test_fraction} must be in (0, 1)")
    if (root_path / "train").is_dir() and (root_path / "test").is_dir():
        classes, train = _class_tree(root_path / "train")
        test_classes, test = _class_tree(root_path / "test")
        if test_classes != classes:
            raise DataError(f"{root_path}/train and {root_path}/test have different class folders")
    else:
        classes, samples = _class_tree(root_path)
        rng = np.random.default_rng(seed)
        train, test = [], []
        for idx in range(len(classes)):
            own = [s for s in samples if s[1] == idx]
            order = rng.permutation(len(own))
            n_test = max(1, int(round(len(own) * test_fraction))) if len(own) > 1 else 0
            test += [own[i] for i in order[:n_test]]
            train += [own[i] for i in order[n_test:]]
    train, bad_tr = _check_images(train, skip_bad_images)
    test, bad_te = _check_images(test, skip_bad_images)
    return Splits(ImageFiles(train), ImageFiles(test), classes, bad_images=bad_tr + bad_te)
