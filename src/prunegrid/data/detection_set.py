"""Build an offline detection set from real Fashion-MNIST items: the objects are real images, the layout is synthetic.

Each canvas (``size`` x ``size`` RGB) gets a seeded textured background (a low-amplitude colour gradient,
smooth blotches and fine noise) and ``min_objects``..``max_objects`` Fashion-MNIST items. An item is resized
to a random square side in [``min_scale``, ``max_scale``], tinted with a random colour, and pasted at a random
position with its own pixels as the alpha mask; a placement whose box overlaps a box already on the
canvas with IoU >= ``MAX_IOU`` is retried (``TRIES`` times), else the item is skipped. The box is the tight
box of the item's nonzero pixels after scaling (not the padded 28x28 square).

Objects of the train canvases come from Fashion-MNIST's train split, those of the val canvases from a
held-out part of it (``VAL_POOL`` images, a seeded pick), those of the test canvases from Fashion-MNIST's
test split: no item image is on canvases of two splits. Every canvas has its own random stream (seed,
split, index), so a build is deterministic for a seed and a canvas does not change with the split sizes.

Output (YOLO layout, as COCO128 ships it; ``dataset=fashion_det`` reads it)::

    OUT/images/{train,val,test}/<split>_00000.png
    OUT/labels/{train,val,test}/<split>_00000.txt   # class cx cy w h, normalised
    OUT/data.yaml                                  # names (10 classes), split folders, build options
    OUT/summary.json                               # images, boxes and skipped items per split, boxes per class

    python -m prunegrid.data.detection_set --out prepared/fashion_det [--size 128] [--train 1200 --val 200
        --test 200] [--min-objects 1 --max-objects 4] [--min-scale 16 --max-scale 56] [--seed 0]
        [--fashion-root data/fashion_mnist]

``dvc repro prep/dvc.yaml:fashion_det`` runs it with the options of that stage.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prunegrid.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
VAL_POOL = 10000          # Fashion-MNIST train images held out for the val canvases' objects
MAX_IOU = 0.3             # a new box overlaps every placed box less than this
TRIES = 10                # placements tried per item before it is skipped
ALPHA_FLOOR = 10          # scaled item pixels below this (of 255) are transparent: resampling halo, not object
MARKER = "prunegrid.data.detection_set"  # in data.yaml: this folder may be rebuilt in place


@dataclass
class Options:
    out: str
    size: int = 128
    train: int = 1200
    val: int = 200
    test: int = 200
    min_objects: int = 1
    max_objects: int = 4
    min_scale: int = 16
    max_scale: int = 56
    seed: int = 0
    fashion_root: str = "data/fashion_mnist"

    def check(self) -> None:
        if self.size < 16:
            raise ConfigError(f"--size {self.size} must be at least 16 pixels")
        for name in SPLITS:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)} must be a number of canvases >= 0")
        if self.train < 1:
            raise ConfigError(f"--train {self.train} must be at least 1 canvas")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"--min-objects {self.min_objects} / --max-objects {self.max_objects}: "
                              "need 1 <= min-objects <= max-objects")
        if not 4 <= self.min_scale <= self.max_scale <= self.size:
            raise ConfigError(f"--min-scale {self.min_scale} / --max-scale {self.max_scale}: need "
                              f"4 <= min-scale <= max-scale <= --size ({self.size})")


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two boxes ``(x1, y1, x2, y2)`` (x2, y2 exclusive)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim textured canvas (size, size, 3) float: base colour + gradient + smooth blotches + fine noise."""
    base = rng.uniform(25, 85, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-20, 20, 3)
    coarse = rng.uniform(-1, 1, (6, 6, 3))
    blotches = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32))
                                    .resize((size, size), Image.BICUBIC)) for c in range(3)], -1) * 12
    noise = rng.normal(0, 4, (size, size, 3))
    return np.clip(base + ramp + blotches + noise, 0, 255)


def scaled_item(item: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The 28x28 item resized to ``side`` x ``side`` (uint8, pixels under :data:`ALPHA_FLOOR` zeroed) and the
    tight box ``(x1, y1, x2, y2)`` of its nonzero pixels (exclusive ends); an empty item has box ``None``."""
    img = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR)).copy()
    img[img < ALPHA_FLOOR] = 0
    ys, xs = np.nonzero(img)
    if not len(xs):
        return img, None
    return img, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def tint(rng: np.random.Generator) -> np.ndarray:
    """A bright random colour (one channel at least 200), so items stand out of the dim background."""
    colour = rng.uniform(90, 255, 3)
    colour[rng.integers(3)] = rng.uniform(200, 255)
    return colour


def canvas(rng: np.random.Generator, opts: Options, pool_images: np.ndarray, pool_labels: np.ndarray,
           ) -> tuple[np.ndarray, list[list[float]], int]:
    """One canvas (uint8 RGB), its boxes ``[class, cx, cy, w, h]`` and the number of items skipped."""
    size = opts.size
    img = background(rng, size)
    boxes: list[tuple[int, int, int, int]] = []
    rows: list[list[float]] = []
    skipped = 0
    for _ in range(int(rng.integers(opts.min_objects, opts.max_objects + 1))):
        k = int(rng.integers(len(pool_images)))
        side = int(rng.integers(opts.min_scale, opts.max_scale + 1))
        item, tight = scaled_item(pool_images[k], side)
        colour = tint(rng)
        if tight is None:
            skipped += 1
            continue
        for _ in range(TRIES):
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = (x0 + tight[0], y0 + tight[1], x0 + tight[2], y0 + tight[3])
            if all(iou(box, b) < MAX_IOU for b in boxes):
                break
        else:
            skipped += 1
            continue
        alpha = np.clip(item.astype(np.float64) * 2 / 255, 0, 1)[..., None]
        shade = 0.35 + 0.65 * item.astype(np.float64)[..., None] / 255  # keeps the item's texture
        region = img[y0:y0 + side, x0:x0 + side]
        img[y0:y0 + side, x0:x0 + side] = region * (1 - alpha) + colour * shade * alpha
        boxes.append(box)
        rows.append([int(pool_labels[k]), (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size,
                     (box[2] - box[0]) / size, (box[3] - box[1]) / size])
    return np.round(img).astype(np.uint8), rows, skipped


def pools(opts: Options) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, the Fashion-MNIST items (N, 28, 28 uint8) and their classes its canvases draw from."""
    from prunegrid.data.sources import FASHION_MNIST_FILES, fashion_mnist

    root = Path(opts.fashion_root).expanduser()
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise ConfigError(f"Fashion-MNIST file {missing[0]} not found in {root}; restore it with "
                          "`python -m prunegrid.data.fetch`, or pass --fashion-root DIR")
    src = fashion_mnist(str(root), download=False)
    tr_x, tr_y = src.train.images.numpy(), src.train.labels.numpy()
    order = np.random.default_rng([opts.seed, 99]).permutation(len(tr_y))
    val_idx, train_idx = np.sort(order[:VAL_POOL]), np.sort(order[VAL_POOL:])
    return {"train": (tr_x[train_idx], tr_y[train_idx]), "val": (tr_x[val_idx], tr_y[val_idx]),
            "test": (src.test.images.numpy(), src.test.labels.numpy())}


def _prepare_out(out: Path) -> None:
    """Empty ``out`` for a new build; refuse a non-empty folder that is not an earlier build."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; choose a folder")
        marker = out / "data.yaml"
        if any(out.iterdir()) and not (marker.is_file() and MARKER in marker.read_text()):
            raise ConfigError(f"--out {out} is a non-empty folder that is not a detection_set build; "
                              "choose another --out or empty it")
        for name in ("images", "labels", "data.yaml", "summary.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build(opts: Options) -> dict:
    """Write the set under ``opts.out``; return its summary (also written as ``summary.json``)."""
    from tqdm import tqdm

    from prunegrid.data.sources import FASHION_MNIST_CLASSES

    opts.check()
    source = pools(opts)  # before touching --out: a missing Fashion-MNIST leaves it as it was
    out = Path(opts.out)
    _prepare_out(out)
    summary: dict = {"options": _recorded(opts), "splits": {}}
    counts = {s: getattr(opts, s) for s in SPLITS}
    with tqdm(total=sum(counts.values()), desc="fashion_det canvases", unit="img", file=sys.stderr) as bar:
        for split in SPLITS:
            (out / "images" / split).mkdir(parents=True)
            (out / "labels" / split).mkdir(parents=True)
            per_class = [0] * len(FASHION_MNIST_CLASSES)
            n_boxes = n_skipped = 0
            for i in range(counts[split]):
                rng = np.random.default_rng([opts.seed, SPLIT_IDS[split], i])
                img, rows, skipped = canvas(rng, opts, *source[split])
                stem = f"{split}_{i:05d}"
                Image.fromarray(img).save(out / "images" / split / f"{stem}.png")
                (out / "labels" / split / f"{stem}.txt").write_text(
                    "".join(f"{r[0]} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows))
                for r in rows:
                    per_class[r[0]] += 1
                n_boxes, n_skipped = n_boxes + len(rows), n_skipped + skipped
                bar.update(1)
            summary["splits"][split] = {"images": counts[split], "boxes": n_boxes, "skipped_items": n_skipped,
                                        "boxes_per_class": dict(zip(FASHION_MNIST_CLASSES, per_class))}
    _write_yaml(out, opts, list(FASHION_MNIST_CLASSES))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _recorded(opts: Options) -> dict:
    """The build options, without ``out`` (a build is the same wherever it is written)."""
    return {k: v for k, v in asdict(opts).items() if k != "out"}


def _write_yaml(out: Path, opts: Options, names: list[str]) -> None:
    import yaml

    header = (f"# Built by `python -m {MARKER}`: real Fashion-MNIST items (objects) pasted on textured canvases;\n"
              "# the objects are real images, the layout (position, scale, tint, background) is synthetic.\n"
              "# Split folders are relative to this file's folder (ultralytics reads it as is).\n")
    body = {"train": "images/train", "val": "images/val", "test": "images/test", "nc": len(names),
            "names": dict(enumerate(names)), "built_with": _recorded(opts)}
    (out / "data.yaml").write_text(header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))


def main(argv: list[str] | None = None) -> None:
    from prunegrid.cli import ArgumentParser, guard

    d = Options(out="")
    p = ArgumentParser(prog=f"python -m {MARKER}", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (YOLO layout), e.g. prepared/fashion_det")
    p.add_argument("--size", type=int, default=d.size, help="canvas side in pixels (default %(default)s)")
    for split in SPLITS:
        p.add_argument(f"--{split}", type=int, default=getattr(d, split), help=f"{split} canvases (default %(default)s)")
    p.add_argument("--min-objects", type=int, default=d.min_objects, help="items per canvas, at least (default %(default)s)")
    p.add_argument("--max-objects", type=int, default=d.max_objects, help="items per canvas, at most (default %(default)s)")
    p.add_argument("--min-scale", type=int, default=d.min_scale, help="smallest item side in pixels (default %(default)s)")
    p.add_argument("--max-scale", type=int, default=d.max_scale, help="largest item side in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--fashion-root", default=d.fashion_root,
                   help="Fashion-MNIST *-ubyte.gz files (default %(default)s; `python -m prunegrid.data.fetch` restores them)")
    args = p.parse_args(argv)
    with guard():
        summary = build(Options(**vars(args)))
    parts = ", ".join(f"{s} {v['images']} images / {v['boxes']} boxes" for s, v in summary["splits"].items())
    print(f"fashion_det in {args.out}: {parts}")


if __name__ == "__main__":
    main()
