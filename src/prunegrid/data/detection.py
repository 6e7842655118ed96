"""Object detection data: YOLO-layout folders and COCO JSON sets, and one DataModule over them.

A source returns :class:`~prunegrid.data.sources.Splits` whose items are ``(PIL RGB image, labels)``
with ``labels`` a float32 array (n, 5) of ``[class, cx, cy, w, h]``, the box normalised to [0, 1]
(YOLO's convention). Each split dataset also has ``.files`` (the image paths) and ``.labels``.

- :func:`yolo_folder`: ``root/images/<split>/*.jpg`` with ``root/labels/<split>/<stem>.txt`` (one
  ``class cx cy w h`` line per box; no label file = no objects), class names and split folders from an
  ultralytics-style ``data.yaml`` (COCO128's layout).
- :func:`coco_json`: COCO ``instances_*.json`` files (absolute ``[x, y, w, h]`` boxes); category ids become
  0..K-1 in id order.

A missing validation split is carved out of train by :class:`DetectionDataModule` (seeded, like
:class:`~prunegrid.data.ImageDataModule`); a missing test split is an error unless ``test_from_val``,
in which case the test split is the validation split (a source then returns ``test=None``).

Batches are ``(images (B, 3, S, S) float32 in [0, 1], targets (N, 6) float32)``, each target row
``[index of the image in the batch, class, cx, cy, w, h]`` (YOLOv5's ``collate_fn``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from prunegrid.data.datamodule import SplitLoaders
from prunegrid.data.sources import IMAGE_EXTENSIONS, Splits
from prunegrid.errors import ConfigError

SPLITS = ("train", "val", "test")
COORD_TOLERANCE = 1e-3  # normalised coordinates a little outside [0, 1] (rounding) are clipped, not refused


def _empty() -> np.ndarray:
    return np.zeros((0, 5), dtype=np.float32)


class DetectionImages(Dataset):
    """Image files with their boxes: item ``(PIL RGB image, float32 array (n, 5) [class, cx, cy, w, h])``."""

    def __init__(self, files: Sequence[Path], labels: Sequence[np.ndarray]):
        if len(files) != len(labels):
            raise ValueError("one labels array per image")
        self.files, self.labels = [Path(f) for f in files], [np.asarray(lb, dtype=np.float32).reshape(-1, 5)
                                                             for lb in labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:
            raise ConfigError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:100]}); "
                              "fix or remove it (and its label file)") from exc
        return img, self.labels[i].copy()


class DetectionSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that keeps ``.files`` and ``.labels`` of the picked images."""

    @property
    def files(self) -> list[Path]:
        parent = self.dataset.files
        return [parent[i] for i in self.indices]

    @property
    def labels(self) -> list[np.ndarray]:
        parent = self.dataset.labels
        return [parent[i] for i in self.indices]


# ----------------------------------------------------------------------------------------------- sources

def _root(root: str | None, what: str, missing_hint: str | None) -> Path:
    hint = f"; {missing_hint}" if missing_hint else ""
    if not root:
        raise ConfigError(f"{what} needs dataset.root=DIR{hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"dataset.root={root} does not exist or is not a directory{hint}")
    return path


def _names(raw: Any, where: str) -> list[str]:
    """``names:`` as a list, or as a ``{0: name, 1: name}`` mapping with indices 0..K-1."""
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(raw))):
            raise ConfigError(f"names in {where} must map the indices 0..{len(raw) - 1} to class names "
                              f"(got keys {list(raw)[:5]}); fix {where}")
        return [str(raw.get(k, raw.get(str(k)))) for k in keys]
    if isinstance(raw, (list, tuple)) and raw:
        return [str(n) for n in raw]
    raise ConfigError(f"{where} has no class names; add `names: [name0, name1, ...]` (or a {{0: name}} mapping)")


def _label_file(image: Path) -> Path:
    """``.../images/<split>/a.jpg`` -> ``.../labels/<split>/a.txt`` (ultralytics' rule: the last ``images``
    folder of the path becomes ``labels``); with no ``images`` folder, the ``.txt`` next to the image."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def read_yolo_labels(path: Path, num_classes: int) -> np.ndarray:
    """The boxes of one YOLO label file (n, 5); a missing file has none. A polygon line
    (``class x1 y1 x2 y2 ...``, YOLO segmentation) counts as the box around its points."""
    if not path.is_file():
        return _empty()
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        fix = "fix or remove the line (expected `class cx cy w h` with coordinates in [0, 1])"
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"bad label line {lineno} in {path}: '{line.strip()[:60]}' is not numbers; {fix}") from None
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise ConfigError(f"bad label line {lineno} in {path}: {len(values)} values; {fix}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise ConfigError(f"class {parts[0]} out of range on line {lineno} of {path}: the data set has "
                              f"{num_classes} classes (0..{num_classes - 1}); fix the label or the names in data.yaml")
        coords = np.asarray(values[1:], dtype=np.float64)
        if (coords < -COORD_TOLERANCE).any() or (coords > 1 + COORD_TOLERANCE).any():
            raise ConfigError(f"bad label line {lineno} in {path}: coordinates outside [0, 1] (not normalised?); {fix}")
        coords = coords.clip(0, 1)
        if len(values) == 5:
            cx, cy, w, h = coords
        else:
            xs, ys = coords[0::2], coords[1::2]
            cx, cy, w, h = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, xs.max() - xs.min(), ys.max() - ys.min()
        if w <= 0 or h <= 0:
            raise ConfigError(f"bad label line {lineno} in {path}: the box has no width or height; {fix}")
        rows.append([cls, cx, cy, w, h])
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def _split_images(spec: Any, base: Path, key: str, where: str) -> list[Path]:
    """The images of a split given as a folder, a ``.txt`` list of images, or a list of those."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for s in specs:
        p = Path(str(s)).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file() and p.suffix == ".txt":  # a list of images, relative to the list's folder
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    f = f if f.is_absolute() else (p.parent / f).resolve()
                    if not f.is_file():
                        raise ConfigError(f"image {f} listed in {p} does not exist; fix the list")
                    files.append(f)
        else:
            raise ConfigError(f"{key} split {p} ({where}) does not exist; fix `{key}:` or dataset.source.{key}")
    if not files:
        raise ConfigError(f"no images in the {key} split {', '.join(str(s) for s in specs)} ({where}); "
                          f"add images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) or fix `{key}:`")
    return files


def _same(a: Any, b: Any, base: Path) -> bool:
    norm = lambda s: sorted(str((base / str(x)).resolve()) for x in (s if isinstance(s, (list, tuple)) else [s]))  # noqa: E731
    return norm(a) == norm(b)


def yolo_folder(root: str | None, data_yaml: str = "data.yaml", train: Any = None, val: Any = None,
                test: Any = None, names: list[str] | None = None, test_from_val: bool = False,
                val_same_as_train: str = "carve", missing_hint: str | None = None) -> Splits:
    """A YOLO-layout data set: ``root/images/<split>/*`` and ``root/labels/<split>/<stem>.txt``.

    Args:
        root: the data set folder (``data.yaml``'s ``path``; split folders are relative to it).
        data_yaml: the ultralytics-style YAML (relative to ``root``, or absolute): ``names`` (a list or a
            ``{0: name}`` mapping), ``train`` / ``val`` / ``test`` (a folder of images, a ``.txt`` list of
            images, or a list of those). Missing file: ``images/{train,val,test}`` and ``names`` below.
        train / val / test: override the YAML's split (e.g. ``images/train2017``).
        names: class names, instead of (or without) the YAML's.
        test_from_val: with no test split, test on the validation split (the source returns ``test=None``).
        val_same_as_train: when ``val`` is the train folder itself (COCO128's data.yaml): ``carve`` a seeded
            validation share out of train instead (the DataModule's ``val_fraction``), or ``keep`` it.
        missing_hint: appended to the error for a missing ``root`` (how to build or fetch it).
    """
    base = _root(root, "a YOLO folder data set", missing_hint)
    yaml_path = Path(data_yaml).expanduser()
    yaml_path = yaml_path if yaml_path.is_absolute() else base / yaml_path
    meta: dict[str, Any] = {}
    if yaml_path.is_file():
        import yaml

        try:
            meta = yaml.safe_load(yaml_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {yaml_path} ({type(exc).__name__}); fix its YAML") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{yaml_path} must be a mapping with names: and train:/val:/test:")
    where = str(yaml_path) if meta else f"dataset.root={root}"
    if names is not None:
        classes = _names(list(names), "dataset.source.names")
    elif "names" in meta:
        classes = _names(meta["names"], str(yaml_path))
    else:
        raise ConfigError(f"no class names for {base}: {yaml_path} is missing or has no `names:`; add it "
                          "(ultralytics style, e.g. the data set's own YAML) or set dataset.source.names=[...]")
    specs = {"train": train, "val": val, "test": test}
    for key in SPLITS:
        if specs[key] is None:
            specs[key] = meta.get(key) if meta else None
        if specs[key] is None and not meta and (base / "images" / key).is_dir():
            specs[key] = f"images/{key}"
    if specs["train"] is None:
        raise ConfigError(f"no train split for {base}: set `train:` in {yaml_path} or dataset.source.train=images/<folder>")
    if val_same_as_train not in ("carve", "keep"):
        raise ConfigError(f"dataset.source.val_same_as_train={val_same_as_train} must be carve or keep")
    if specs["val"] is not None and val_same_as_train == "carve" and _same(specs["val"], specs["train"], base):
        specs["val"] = None  # COCO128: val = train would validate on training images
    if specs["test"] is None and not test_from_val:
        raise ConfigError(f"no test split for {base}: set `test:` in {yaml_path.name} or dataset.source.test=images/<folder>, "
                          "or dataset.source.test_from_val=true to test on the validation split")
    out: dict[str, DetectionImages | None] = {}
    for key in SPLITS:
        if specs[key] is None:
            out[key] = None
            continue
        files = _split_images(specs[key], base, key, where)
        out[key] = DetectionImages(files, [read_yolo_labels(_label_file(f), len(classes)) for f in files])
    return Splits(out["train"], out["test"], classes, val=out["val"])


def _coco_split(ann_file: Path, images_dir: Path) -> tuple[list[dict], list[Path], list[list[list[float]]]]:
    """Categories, image paths, and per image the boxes ``[category_id, cx, cy, w, h]`` (normalised)."""
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read COCO annotations {ann_file} ({type(exc).__name__}); fix the file or the path") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{ann_file} has no `{key}` list; is it a COCO instances file?")
    if not data["categories"]:
        raise ConfigError(f"{ann_file} has no categories; a COCO detection file lists them with ids and names")
    images, index = [], {}
    for img in data["images"]:
        try:
            index[img["id"]] = len(images)
            images.append((images_dir / img["file_name"], float(img["width"]), float(img["height"])))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"an image entry of {ann_file} lacks id/file_name/width/height: {str(img)[:80]}") from None
    cat_ids = {c["id"] for c in data["categories"]}
    boxes: list[list[list[float]]] = [[] for _ in images]
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in index:
            raise ConfigError(f"annotation {ann.get('id')} of {ann_file} names image_id {ann.get('image_id')}, "
                              "which is not in `images`; fix the file")
        if ann.get("category_id") not in cat_ids:
            raise ConfigError(f"annotation {ann.get('id')} of {ann_file} has category_id {ann.get('category_id')}, "
                              f"not in `categories`; fix the file")
        i = index[ann["image_id"]]
        _, width, height = images[i]
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"annotation {ann.get('id')} of {ann_file} has no bbox [x, y, w, h]; fix the file") from None
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, width), min(y + h, height)
        if x2 <= x1 or y2 <= y1:
            continue  # empty (or wholly outside the image) after clipping
        boxes[i].append([ann["category_id"], (x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
                         (x2 - x1) / width, (y2 - y1) / height])
    return data["categories"], [p for p, _, _ in images], boxes


def coco_json(root: str | None, train: str | None = "annotations/instances_train.json", val: str | None = None,
              test: str | None = None, images: str | dict[str, str] = "images", test_from_val: bool = False,
              missing_hint: str | None = None) -> Splits:
    """A COCO JSON data set: one ``instances`` file per split (paths relative to ``root``).

    Args:
        train / val / test: annotation files (``images``, ``annotations`` with absolute ``[x, y, w, h]``
            ``bbox``, ``categories`` with ``id`` and ``name``); ``val: null`` = carved out of train by the
            DataModule; ``test: null`` needs ``test_from_val``.
        images: the images folder (relative to ``root``) holding each image's ``file_name``, or a mapping
            ``{train: ..., val: ..., test: ...}`` of one folder per split.
    Category ids map to 0..K-1 in id order, named by ``categories``; ``iscrowd`` annotations are skipped;
    boxes are clipped to the image.
    """
    base = _root(root, "a COCO JSON data set", missing_hint)
    specs = {"train": train, "val": val, "test": test}
    if not train:
        raise ConfigError("dataset.source.train must name the training annotations (a COCO instances JSON under root)")
    if not test and not test_from_val:
        raise ConfigError(f"no test split for {base}: set dataset.source.test=annotations/<file>.json, "
                          "or dataset.source.test_from_val=true to test on the validation split")
    out: dict[str, DetectionImages | None] = {}
    categories: list[dict] | None = None
    classes: list[str] = []
    remap: dict[Any, int] = {}
    for key in SPLITS:
        if not specs[key]:
            out[key] = None
            continue
        ann_file = Path(specs[key]).expanduser()
        ann_file = ann_file if ann_file.is_absolute() else base / ann_file
        if not ann_file.is_file():
            raise ConfigError(f"COCO annotations {ann_file} not found; fix dataset.source.{key}")
        folder = images.get(key) if isinstance(images, dict) else images
        if not folder:
            raise ConfigError(f"dataset.source.images has no folder for the {key} split")
        images_dir = Path(folder).expanduser()
        images_dir = images_dir if images_dir.is_absolute() else base / images_dir
        if not images_dir.is_dir():
            raise ConfigError(f"images folder {images_dir} ({key} split) does not exist; fix dataset.source.images")
        cats, files, boxes = _coco_split(ann_file, images_dir)
        ordered = sorted(cats, key=lambda c: c["id"])
        if categories is None:
            categories = ordered
            remap = {c["id"]: i for i, c in enumerate(ordered)}
            classes = [str(c.get("name", c["id"])) for c in ordered]
        elif [c["id"] for c in ordered] != [c["id"] for c in categories]:
            raise ConfigError(f"{ann_file} has other category ids than the train split's; the splits must share categories")
        if not files:
            raise ConfigError(f"{ann_file} lists no images; fix the file or dataset.source.{key}")
        labels = [np.asarray([[remap[b[0]], *b[1:]] for b in bs], dtype=np.float32).reshape(-1, 5) for bs in boxes]
        out[key] = DetectionImages(files, labels)
    return Splits(out["train"], out["test"], classes, val=out["val"])


# ----------------------------------------------------------------------------------------------- the DataModule

class DetectionTransform:
    """``(PIL image, labels (n, 5))`` -> ``(float32 tensor (3, S, S) in [0, 1], float32 tensor (n, 5))``.

    A plain resize to ``S x S`` (normalised boxes are unchanged by it); with ``hflip``, a random horizontal
    flip (torch's RNG, seeded like :class:`~prunegrid.data.ImageDataModule`'s flip) that mirrors ``cx``.
    Called with an image only, it returns the tensor only.
    """

    def __init__(self, size: int, hflip: bool = False):
        self.size, self.hflip = size, hflip
        self.steps = v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize((size, size), antialias=True),
                                 v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, img, labels: np.ndarray | None = None):
        x = self.steps(img).as_subclass(torch.Tensor)
        y = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.float32).reshape(-1, 5)).clone()
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
            if y is not None and len(y):
                y[:, 1] = 1.0 - y[:, 1]
        return x if y is None else (x, y)


class DetectionTransformed(Dataset):
    def __init__(self, base: Dataset, transform: DetectionTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, labels = self.base[i]
        return self.transform(img, labels)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """YOLOv5's ``collate_fn``: stacked images, and the boxes of all images as (N, 6) rows
    ``[index in the batch, class, cx, cy, w, h]`` (N may be 0)."""
    images = torch.stack([x for x, _ in batch])
    targets = [torch.cat([torch.full((len(y), 1), float(i)), y.reshape(-1, 5).float()], 1) for i, (_, y) in enumerate(batch)]
    return images, (torch.cat(targets, 0) if targets else torch.zeros((0, 6)))


class DetectionDataModule(SplitLoaders):
    """Train / val / test loaders of a detection source, with :class:`~prunegrid.data.ImageDataModule`'s
    interface (``setup``, ``splits``, ``classes``, ``num_classes``, ``full_test``, ``dataset``, ``loader``).

    Args:
        source: callable returning :class:`~prunegrid.data.sources.Splits` of detection items, or the Splits.
        input_size: side of the square input (plain resize).
        subset: cap on images per split (seeded random pick); ``None`` = all.
        val_fraction: share of train carved out for validation when the source has no val split (seeded).
        hflip: random horizontal flip of the training split (boxes mirrored).
        normalize: must stay ``False``: YOLO takes [0, 1] pixels.
        root: where the data lives (the source reads it; kept for the run's ``data_md5`` tag).
    """

    collate_fn = staticmethod(collate)

    def __init__(self, source: Callable[[], Splits] | Splits, input_size: int = 128, subset: int | None = None,
                 val_fraction: float = 0.1, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 0, hflip: bool = True, seed: int = 0, root: str | None = None,
                 normalize: bool = False):
        super().__init__()
        if input_size < 1:
            raise ConfigError(f"dataset.input_size={input_size} must be a positive number of pixels")
        if subset is not None and subset < 1:
            raise ConfigError(f"dataset.subset={subset} must be a positive number of images (or null for all)")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction={val_fraction} must be in (0, 1)")
        if normalize:
            raise ConfigError("dataset.normalize=true is not supported for detection: YOLO takes [0, 1] pixels; "
                              "set dataset.normalize=false")
        self.source, self.input_size, self.subset = source, input_size, subset
        self.val_fraction, self.batch_size = val_fraction, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed, self.hflip, self.normalize = num_workers, seed, hflip, False
        self.root = root
        self.splits: Splits | None = None
        self.classes: list[str] = []
        self.full_test: Dataset | None = None

    def transform(self, train: bool) -> DetectionTransform:
        return DetectionTransform(self.input_size, hflip=train and self.hflip)

    def _cap(self, ds: Dataset, offset: int) -> Dataset:
        if self.subset is None or len(ds) <= self.subset:
            return ds
        idx = np.random.default_rng(self.seed + offset).permutation(len(ds))[: self.subset]
        return DetectionSubset(ds, sorted(idx.tolist()))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = self.source() if callable(self.source) else self.source
        train = raw.train
        if raw.val is None:
            if len(train) < 2:
                raise ConfigError(f"the training split has {len(train)} image(s): too few to carve out a validation "
                                  "split; add images or give the data set a val split")
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = min(len(train) - 1, max(1, int(round(len(train) * self.val_fraction))))
            val = DetectionSubset(train, sorted(order[:n_val].tolist()))
            train = DetectionSubset(train, sorted(order[n_val:].tolist()))
        else:
            val = raw.val
        train, capped_val = self._cap(train, 1), self._cap(val, 2)
        if raw.test is None:  # the source was told to test on the validation split: the same images
            full_test, test = val, capped_val
        else:
            full_test, test = raw.test, self._cap(raw.test, 3)
        val = capped_val
        self.classes = list(raw.classes)
        self.full_test = full_test
        self.splits = Splits(train, test, self.classes, val=val, bad_images=raw.bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _split(self, split: str) -> Dataset:
        self.setup()
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'; one of {', '.join(SPLITS)}")
        return {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[split]

    def dataset(self, split: str, train_transform: bool | None = None) -> Dataset:
        """The images of a split as ``(tensor (3, S, S), labels (n, 5))``, augmented only for ``train``."""
        augment = split == "train" if train_transform is None else train_transform
        return DetectionTransformed(self._split(split), self.transform(augment))

    def labels(self, split: str) -> list[np.ndarray]:
        """The boxes (n, 5) of every image of a split, without reading the images."""
        return [lb.copy() for lb in self._split(split).labels]

