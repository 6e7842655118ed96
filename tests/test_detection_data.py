"""The detection data side: YOLO folders, COCO JSON, the DataModule's batches, the offline fashion_det set.

Expected boxes are written by hand here (the label files, the COCO boxes and their normalised values),
never read back from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunegrid.config import build, compose
from prunegrid.data import DetectionDataModule, coco_json, yolo_folder
from prunegrid.errors import ConfigError
from tests.conftest import ROOT

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


def _half_image(path: Path, size=(40, 20)) -> None:
    """Left half black, right half white: a flip shows in the pixels."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:, size[0] // 2:] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def yolo_root(tmp_path) -> Path:
    """train: a (2 boxes), b (no label file), c (1 box); val: v (1 box); test: t (empty label file)."""
    root = tmp_path / "yolo"
    for split, stem in (("train", "a"), ("train", "b"), ("train", "c"), ("val", "v"), ("test", "t")):
        _half_image(root / "images" / split / f"{stem}.png")
    _write(root / "labels/train/a.txt", "1 0.25 0.5 0.2 0.4\n0 0.75 0.25 0.1 0.1\n")
    _write(root / "labels/train/c.txt", "2 0.5 0.5 1.0 1.0\n")
    _write(root / "labels/val/v.txt", "0 0.5 0.5 0.5 0.5\n")
    _write(root / "labels/test/t.txt", "")
    _write(root / "data.yaml", "train: images/train\nval: images/val\ntest: images/test\n"
                               "names:\n  0: cat\n  1: dog\n  2: bird\n")
    return root


A = [[1, 0.25, 0.5, 0.2, 0.4], [0, 0.75, 0.25, 0.1, 0.1]]
C = [[2, 0.5, 0.5, 1.0, 1.0]]


def f32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, len(rows[0]) if rows else 6)


def test_yolo_folder_source(yolo_root):
    s = yolo_folder(str(yolo_root))
    assert s.classes == ["cat", "dog", "bird"]
    assert [f.name for f in s.train.files] == ["a.png", "b.png", "c.png"]
    assert [f.name for f in s.val.files] == ["v.png"] and [f.name for f in s.test.files] == ["t.png"]
    img, labels = s.train[0]
    assert img.mode == "RGB" and img.size == (40, 20)
    assert labels.dtype == np.float32 and labels.shape == (2, 5)
    np.testing.assert_array_equal(labels, np.array(A, dtype=np.float32))
    assert s.train[1][1].shape == (0, 5) and s.test[0][1].shape == (0, 5)


def test_datamodule_exact_targets_and_batch_index(yolo_root):
    dm = DetectionDataModule(lambda: yolo_folder(str(yolo_root)), input_size=16, batch_size=2, hflip=False)
    dm.setup()
    assert dm.num_classes == 3 and dm.normalize is False
    assert len(dm.splits.train) == 3 and len(dm.splits.val) == 1 and len(dm.splits.test) == 1
    batches = list(dm.loader("train", shuffle=False))
    (x1, t1), (x2, t2) = batches
    assert x1.shape == (2, 3, 16, 16) and x1.dtype == torch.float32 and x2.shape == (1, 3, 16, 16)
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0
    # a (image 0 of the batch): 2 boxes; b (image 1): none; c is image 0 of the second batch
    assert torch.equal(t1, f32([[0, *A[0]], [0, *A[1]]]))
    assert torch.equal(t2, f32([[0, *C[0]]]))
    _, t3 = next(iter(dm.loader("train", shuffle=False, batch_size=3)))  # c is image 2 of this batch
    assert torch.equal(t3, f32([[0, *A[0]], [0, *A[1]], [2, *C[0]]]))
    # unflipped: left column dark, right column bright (plain resize of the 40x20 image)
    assert float(x1[0, :, :, 0].mean()) < 0.1 and float(x1[0, :, :, -1].mean()) > 0.9
    x, t = next(iter(dm.loader("test")))
    assert x.shape == (1, 3, 16, 16) and t.shape == (0, 6) and t.dtype == torch.float32


def test_a_batch_of_images_without_boxes(yolo_root):
    dm = DetectionDataModule(lambda: yolo_folder(str(yolo_root)), input_size=8, hflip=False)
    x, t = dm.loader("train", shuffle=False, batch_size=1).__iter__().__next__()
    assert t.shape == (2, 6)
    items = list(dm.loader("train", shuffle=False, batch_size=1))
    assert items[1][1].shape == (0, 6)  # b: no label file


def test_flip_mirrors_cx(yolo_root):
    dm = DetectionDataModule(lambda: yolo_folder(str(yolo_root)), input_size=16, hflip=True)
    ds = dm.dataset("train")
    torch.manual_seed(0)
    seen = set()
    for _ in range(24):
        x, y = ds[0]
        flipped = float(x[:, :, 0].mean()) > 0.9  # the white half moved to the left
        seen.add(flipped)
        expected = [[1, 0.75, 0.5, 0.2, 0.4], [0, 0.25, 0.25, 0.1, 0.1]] if flipped else A
        assert torch.equal(y, f32(expected))
    assert seen == {True, False}
    # through the training loader: every box agrees with its image's pixels
    for x, t in dm.train_dataloader():
        for row in t[t[:, 1] == 2]:  # c's full-image box: cx stays 0.5 either way
            assert float(row[2]) == 0.5
        for row in t[t[:, 1] == 1]:
            img = x[int(row[0])]
            assert float(row[2]) == (0.75 if float(img[:, :, 0].mean()) > 0.9 else 0.25)
    # evaluation splits are never flipped
    for _ in range(8):
        x, _ = dm.dataset("val")[0]
        assert float(x[:, :, 0].mean()) < 0.1


def test_missing_val_is_carved_and_test_reuses_val(tmp_path):
    """COCO128's layout: one folder, data.yaml's val = train, no test."""
    root = tmp_path / "coco128"
    for i in range(10):
        _half_image(root / "images/train2017" / f"{i:03d}.png", size=(8, 8))
        _write(root / "labels/train2017" / f"{i:03d}.txt", f"{i % 2} 0.5 0.5 0.25 0.25\n")
    _write(root / "data.yaml", "path: ../datasets/coco128\ntrain: images/train2017\nval: images/train2017\ntest:\n"
                               "names: [person, bicycle]\n")
    with pytest.raises(ConfigError, match=r"no test split .*dataset\.source\.test=.*test_from_val=true") as err:
        yolo_folder(str(root))
    assert "\n" not in str(err.value)
    dm = DetectionDataModule(lambda: yolo_folder(str(root), test_from_val=True), val_fraction=0.2, seed=3,
                             input_size=8)
    dm.setup()
    assert dm.classes == ["person", "bicycle"]
    train, val = {f.name for f in dm.splits.train.files}, {f.name for f in dm.splits.val.files}
    assert len(train) == 8 and len(val) == 2 and not train & val
    assert train | val == {f"{i:03d}.png" for i in range(10)}
    assert [f.name for f in dm.splits.test.files] == sorted(val)
    again = DetectionDataModule(lambda: yolo_folder(str(root), test_from_val=True), val_fraction=0.2, seed=3)
    again.setup()
    assert {f.name for f in again.splits.val.files} == val


def test_subset_cap_is_seeded(yolo_root):
    picks = []
    for _ in range(2):
        dm = DetectionDataModule(lambda: yolo_folder(str(yolo_root)), subset=2, seed=5)
        dm.setup()
        assert len(dm.splits.train) == 2 and len(dm.full_test) == 1
        picks.append([f.name for f in dm.splits.train.files])
    assert picks[0] == picks[1]


def test_coco_json_boxes_and_category_remap(tmp_path):
    root = tmp_path / "coco"
    for split, name, size in (("train", "x.png", (200, 100)), ("train", "y.png", (50, 50)), ("val", "v.png", (100, 100))):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 20, 30)).save(root / "images" / split / name)
    cats = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # ids not in order: dog (3) -> 0, cat (7) -> 1
    train = {"images": [{"id": 11, "file_name": "x.png", "width": 200, "height": 100},
                        {"id": 12, "file_name": "y.png", "width": 50, "height": 50}],
             "annotations": [{"id": 1, "image_id": 11, "category_id": 7, "bbox": [20, 10, 40, 30], "iscrowd": 0},
                             {"id": 2, "image_id": 11, "category_id": 3, "bbox": [100, 50, 100, 50]},
                             {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 200, 100], "iscrowd": 1},
                             {"id": 4, "image_id": 11, "category_id": 7, "bbox": [180, 0, 40, 20]}],  # past the edge
             "categories": cats}
    val = {"images": [{"id": 1, "file_name": "v.png", "width": 100, "height": 100}],
           "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]}], "categories": cats}
    _write(root / "annotations/train.json", json.dumps(train))
    _write(root / "annotations/val.json", json.dumps(val))
    s = coco_json(str(root), train="annotations/train.json", val="annotations/val.json",
                  images={"train": "images/train", "val": "images/val"}, test_from_val=True)
    assert s.classes == ["dog", "cat"] and s.test is None
    assert [f.name for f in s.train.files] == ["x.png", "y.png"]
    img, labels = s.train[0]
    assert img.size == (200, 100)
    expected = np.array([[1, 0.2, 0.25, 0.2, 0.3],       # (20+40/2)/200, (10+30/2)/100, 40/200, 30/100
                         [0, 0.75, 0.75, 0.5, 0.5],      # (100+50)/200, (50+25)/100, 100/200, 50/100
                         [1, 0.95, 0.1, 0.1, 0.2]],      # clipped to x 180..200: 190/200, 10/100, 20/200, 20/100
                        dtype=np.float32)
    np.testing.assert_array_equal(labels, expected)
    assert s.train[1][1].shape == (0, 5)  # y: no annotations
    np.testing.assert_array_equal(s.val[0][1], np.array([[0, 0.25, 0.4, 0.3, 0.4]], dtype=np.float32))
    dm = DetectionDataModule(s, input_size=32, hflip=False)
    x, t = next(iter(dm.loader("test")))
    assert x.shape == (1, 3, 32, 32) and torch.equal(t, f32([[0, 0, 0.25, 0.4, 0.3, 0.4]]))
    with pytest.raises(ConfigError, match="no test split"):
        coco_json(str(root), train="annotations/train.json", images="images/train")


def test_one_line_errors(tmp_path, yolo_root):
    def one_line(fn, pattern):
        with pytest.raises(ConfigError, match=pattern) as err:
            fn()
        assert "\n" not in str(err.value)
        return str(err.value)

    one_line(lambda: yolo_folder(str(tmp_path / "nowhere"), missing_hint="run make-it"),
             r"dataset\.root=.*nowhere does not exist.*run make-it")
    _write(yolo_root / "labels/train/c.txt", "2 0.5 0.5 1.0\n")
    msg = one_line(lambda: yolo_folder(str(yolo_root)), r"bad label line 1 in .*c\.txt")
    assert "class cx cy w h" in msg
    _write(yolo_root / "labels/train/c.txt", "0 0.5 0.5 1.0 x\n")
    one_line(lambda: yolo_folder(str(yolo_root)), r"bad label line 1 in .*c\.txt.*not numbers")
    _write(yolo_root / "labels/train/c.txt", "0 0.5 0.5 0.2 0.2\n3 0.5 0.5 1.0 1.0\n")
    one_line(lambda: yolo_folder(str(yolo_root)), r"class 3 out of range on line 2 of .*c\.txt.*3 classes")
    _write(yolo_root / "labels/train/c.txt", "0 50 40 10 10\n")
    one_line(lambda: yolo_folder(str(yolo_root)), r"c\.txt: coordinates outside \[0, 1\]")
    empty = tmp_path / "empty"
    (empty / "images/train").mkdir(parents=True)
    _write(empty / "data.yaml", "train: images/train\ntest: images/train\nnames: [a]\n")
    one_line(lambda: yolo_folder(str(empty)), r"no images in the train split")
    one_line(lambda: coco_json(str(tmp_path), train="nope.json", test_from_val=True), r"nope\.json not found")


def test_missing_fashion_det_names_its_build_command(tmp_path):
    cfg = compose(["task=detection", "dataset=fashion_det", f"dataset.root={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"dvc repro prep/dvc\.yaml:fashion_det.*python -m prunegrid\.data\.detection_set"):
        build(cfg.dataset, seed=0)


def test_detection_side_is_not_imported_with_prunegrid_data():
    code = "import sys, prunegrid.data; assert 'prunegrid.data.detection' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------- the offline set

TINY = ["--size", "64", "--train", "6", "--val", "3", "--test", "3"]


@pytest.fixture(scope="module")
def fashion_det(tmp_path_factory, fashion_dir) -> tuple[Path, Path]:
    from prunegrid.data import detection_set

    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp("fashion_det") / name
        detection_set.main(["--out", str(out), *TINY, "--fashion-root", str(fashion_dir)])
        outs.append(out)
    return outs[0], outs[1]


def _boxes(label_file: Path) -> np.ndarray:
    rows = [[float(v) for v in line.split()] for line in label_file.read_text().splitlines()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def test_fashion_det_layout_and_labels(fashion_det):
    out, _ = fashion_det
    counts = {"train": 6, "val": 3, "test": 3}
    total = 0
    for split, n in counts.items():
        images = sorted((out / "images" / split).glob("*.png"))
        labels = sorted((out / "labels" / split).glob("*.txt"))
        assert len(images) == n and [p.stem for p in images] == [p.stem for p in labels]
        for img, lab in zip(images, labels):
            assert Image.open(img).size == (64, 64) and Image.open(img).mode == "RGB"
            b = _boxes(lab)
            assert len(b) <= 4
            total += len(b)
            assert ((b[:, 0] >= 0) & (b[:, 0] <= 9) & (b[:, 0] == b[:, 0].round())).all()
            assert (b[:, 1:] >= 0).all() and (b[:, 1:] <= 1).all()
            assert (b[:, 1] - b[:, 3] / 2 >= -1e-6).all() and (b[:, 1] + b[:, 3] / 2 <= 1 + 1e-6).all()
            assert (b[:, 3] >= 4 / 64).all() and (b[:, 3] <= 56 / 64 + 1e-6).all()  # an item's box fits its square
    assert total >= 12  # 12 canvases with at least 1 item each (a rare skip aside)
    import yaml

    meta = yaml.safe_load((out / "data.yaml").read_text())
    assert [meta["names"][i] for i in range(10)] == FASHION_NAMES
    assert (meta["train"], meta["val"], meta["test"]) == ("images/train", "images/val", "images/test")


def test_fashion_det_boxes_cover_the_pasted_items(fashion_det):
    out, _ = fashion_det
    inside, outside = [], []
    for img_path in sorted((out / "images").rglob("*.png")):
        img = np.asarray(Image.open(img_path), dtype=np.float64).max(-1)  # brightest channel
        mask = np.zeros(img.shape, bool)
        for _, cx, cy, w, h in _boxes(out / "labels" / img_path.parent.name / f"{img_path.stem}.txt"):
            x1, y1 = round((cx - w / 2) * 64), round((cy - h / 2) * 64)
            x2, y2 = round((cx + w / 2) * 64), round((cy + h / 2) * 64)
            inside.append(img[y1:y2, x1:x2].mean())
            mask[y1:y2, x1:x2] = True
        if (~mask).any():
            outside.append(img[~mask])
    background = np.concatenate(outside)
    assert 15 < background.mean() < 140 and background.std() > 3  # textured, not black
    assert np.mean(inside) > background.mean() + 30


def test_scaled_item_box_is_tight_not_the_square():
    from prunegrid.data.detection_set import scaled_item

    item = np.zeros((28, 28), dtype=np.uint8)
    item[5:15, 10:20] = 255           # a 10x10 block at rows 5-14, cols 10-19
    img, box = scaled_item(item, 56)  # x2: the block spans 20..40 x 10..30, give or take the resampling halo
    assert img.shape == (56, 56)
    assert all(abs(a - b) <= 1 for a, b in zip(box, (20, 10, 40, 30))), box


def test_fashion_det_is_deterministic(fashion_det):
    a, b = fashion_det
    for split in ("train", "val", "test"):
        for lab in sorted((a / "labels" / split).glob("*.txt")):
            assert lab.read_bytes() == (b / "labels" / split / lab.name).read_bytes()
        for img in sorted((a / "images" / split).glob("*.png")):
            assert np.array_equal(np.asarray(Image.open(img)), np.asarray(Image.open(b / "images" / split / img.name)))
    assert (a / "data.yaml").read_bytes() == (b / "data.yaml").read_bytes()


def test_fashion_det_item_pools_are_disjoint(fashion_dir):
    from prunegrid.data.detection_set import Options, pools

    p = pools(Options(out="unused", fashion_root=str(fashion_dir)))
    assert len(p["train"][0]) == 50000 and len(p["val"][0]) == 10000 and len(p["test"][0]) == 10000
    train_keys = {x.tobytes() for x in p["train"][0][:2000]}
    assert not any(x.tobytes() in train_keys for x in p["val"][0][:2000] if x.any())


def test_fashion_det_through_hydra(fashion_det):
    out, _ = fashion_det
    cfg = compose(["task=detection", "dataset=fashion_det", f"dataset.root={out}", "dataset.input_size=64", "dataset.batch_size=6",
                   "dataset.hflip=false"])
    dm = build(cfg.dataset, seed=0)
    assert isinstance(dm, DetectionDataModule)
    dm.setup()
    assert dm.classes == FASHION_NAMES and dm.num_classes == 10
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (6, 3, 3)
    x, t = next(iter(dm.loader("train", shuffle=False)))
    n_boxes = sum(len(_boxes(p)) for p in sorted((out / "labels/train").glob("*.txt")))
    assert x.shape == (6, 3, 64, 64) and t.shape == (n_boxes, 6)
    first = _boxes(out / "labels/train/train_00000.txt")
    assert torch.equal(t[: len(first), 0], torch.zeros(len(first)))
    assert torch.allclose(t[: len(first), 1:], torch.tensor(first, dtype=torch.float32))


def test_builder_bad_options_exit_2(tmp_path, fashion_dir):
    from prunegrid.data import detection_set

    with pytest.raises(SystemExit) as exc:
        detection_set.main(["--out", str(tmp_path / "x"), "--min-objects", "5", "--max-objects", "2",
                            "--fashion-root", str(fashion_dir)])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not a build")
    with pytest.raises(SystemExit) as exc:
        detection_set.main(["--out", str(tmp_path / "mine"), *TINY, "--fashion-root", str(fashion_dir)])
    assert exc.value.code == 2 and (tmp_path / "mine" / "keep.txt").is_file()
