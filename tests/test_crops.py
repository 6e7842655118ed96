"""Letterboxed crops from detection boxes (Kim (ResNet transfer learning)) on real images built here: Fashion-MNIST
tiles pasted at known boxes on larger canvases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prunegrid.config import build, compose
from prunegrid.data import crops
from prunegrid.errors import ConfigError

BG = np.array([40, 90, 160], dtype=np.float64)
CLASSES = {0: ("/m/t0", "Tshirt", "top"), 1: ("/m/t1", "Trouser", "legwear"), 7: ("/m/t7", "Sneaker", "shoe")}


def tint(tile: np.ndarray) -> np.ndarray:
    """Grey tile -> RGB on the canvas colour, so corners are not trivially black."""
    t = tile.astype(np.float64)[..., None] / 255.0
    return np.clip(BG + t * (255 - BG), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scene(tmp_path_factory, fashion_dir):
    """Six PNG canvases with two tiles each at known boxes (some stretched), plus bad inputs."""
    from prunegrid.data.sources import fashion_mnist

    test = fashion_mnist(str(fashion_dir), download=False).test
    tiles = {k: [] for k in CLASSES}
    for i in range(500):
        img, label = test[i]
        if label in tiles and len(tiles[label]) < 4:
            tiles[label].append(img.squeeze(0).numpy())
    root = tmp_path_factory.mktemp("scene")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    labels = [0, 1, 7, 0, 1, 7, 0, 1, 7, 0, 1, 7]
    for n in range(6):
        W, H = 240, 180
        canvas = np.clip(BG + rng.normal(0, 3, (H, W, 3)), 0, 255).astype(np.uint8)
        for j, (x0, y0, w, h) in enumerate([(10, 20, 84, 56), (130, 60, 56, 112)]):
            label = labels[2 * n + j]
            tile = tiles[label][(2 * n + j) % 4]
            big = np.asarray(Image.fromarray(tile).resize((w, h), Image.BILINEAR))
            canvas[y0:y0 + h, x0:x0 + w] = tint(big)
            row = len(rows)
            rows.append({"ImageID": f"img{n}", "Source": "xclick", "LabelName": CLASSES[label][0], "Confidence": 1,
                         "XMin": x0 / W, "XMax": (x0 + w) / W, "YMin": y0 / H, "YMax": (y0 + h) / H})
            truth[row] = (CLASSES[label][2], tile)
        Image.fromarray(canvas).save(images / f"img{n}.png")
    bad = {
        "box_outside": {"ImageID": "img0", "LabelName": "/m/t0", "XMin": 0.5, "XMax": 1.4, "YMin": 0.1, "YMax": 0.5},
        "unknown_class": {"ImageID": "img0", "LabelName": "/m/nope", "XMin": 0.1, "XMax": 0.5, "YMin": 0.1, "YMax": 0.5},
        "unmapped": {"ImageID": "img1", "LabelName": "/m/other", "XMin": 0.1, "XMax": 0.5, "YMin": 0.1, "YMax": 0.5},
        "too_small": {"ImageID": "img1", "LabelName": "/m/t1", "XMin": 0.0, "XMax": 0.03, "YMin": 0.0, "YMax": 0.5},
        "corrupt": {"ImageID": "broken", "LabelName": "/m/t1", "XMin": 0.1, "XMax": 0.5, "YMin": 0.1, "YMax": 0.5},
        "missing": {"ImageID": "gone", "LabelName": "/m/t7", "XMin": 0.1, "XMax": 0.5, "YMin": 0.1, "YMax": 0.5},
    }
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_rows = {}
    for key, r in bad.items():
        bad_rows[key] = len(rows)
        rows.append({"Source": "xclick", "Confidence": 1, **r})
    pd.DataFrame(rows).to_csv(root / "detections.csv", index=False)
    desc = [(v[0], v[1]) for v in CLASSES.values()] + [("/m/other", "Lamp")]
    (root / "classes.csv").write_text("".join(f"{a},{b}\n" for a, b in desc))
    return {"root": root, "images": images, "truth": truth, "bad": bad_rows}


def options(**kw) -> crops.CropOptions:
    base = dict(classes={"top": ["Tshirt"], "legwear": ["trouser"], "shoe": ["/m/t7"]}, size=64, min_box=12,
                corner=0.1, test_fraction=0.25, seed=3, ext="png", workers=1, image_ext=".png", progress=False)
    return crops.CropOptions(**{**base, **kw})


def run(scene, out, **kw):
    return crops.make_crops(scene["root"] / "detections.csv", scene["root"] / "classes.csv", scene["images"], out,
                            options(**kw))


def test_crops_recover_class_content_and_fill(scene, tmp_path):
    out = tmp_path / "out"
    summary = run(scene, out, workers=2)
    assert summary["written"] == len(scene["truth"])
    man = pd.read_csv(out / "manifest.csv").set_index("row")
    for row, (cls, tile) in scene["truth"].items():
        m = man.loc[row]
        assert m["status"] == "written" and m["class"] == cls and m["file"].split("/")[1] == cls
        img = np.asarray(Image.open(out / m["file"]).convert("RGB")).astype(np.float64)
        assert img.shape == (64, 64, 3)
        x, y, w, h = (int(m[k]) for k in ("paste_x", "paste_y", "paste_w", "paste_h"))
        assert max(w, h) == 64
        assert abs(w / h - m["box_w"] / m["box_h"]) < 0.05
        region = img[y:y + h, x:x + w]
        back = np.asarray(Image.fromarray(region.astype(np.uint8)).resize((28, 28), Image.BILINEAR)).astype(float)
        expect = tint(tile).astype(float)
        corr = np.corrcoef(back[..., 2].ravel(), expect[..., 2].ravel())[0, 1]
        assert corr > 0.9, f"row {row}: crop does not match its tile (r={corr:.2f})"
        k = max(1, round(0.1 * min(h, w)))
        corners = np.concatenate([region[:k, :k], region[:k, -k:], region[-k:, :k], region[-k:, -k:]]).reshape(-1, 3)
        fill = np.median(corners, axis=0).astype(int)
        assert tuple(fill) == (m["fill_r"], m["fill_g"], m["fill_b"])
        outside = np.ones((64, 64), bool)
        outside[y:y + h, x:x + w] = False
        if outside.any():
            assert (img[outside] == fill).all()


def test_corner_median_matches_numpy():
    img = np.zeros((20, 30, 3), np.uint8)
    img[:2, :2] = (10, 20, 30)
    img[:2, -2:] = (10, 20, 30)
    img[-2:, :2] = (50, 60, 70)
    img[-2:, -2:] = (200, 200, 200)
    assert crops.corner_median(img, 0.1) == (30, 40, 50)


def test_placement_reproducible_with_seed(scene, tmp_path):
    run(scene, tmp_path / "a")
    run(scene, tmp_path / "b", workers=2)
    run(scene, tmp_path / "c", seed=4)
    cols = ["paste_x", "paste_y", "split"]
    a, b, c = (pd.read_csv(tmp_path / d / "manifest.csv")[cols] for d in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert not a[["paste_x", "paste_y"]].equals(c[["paste_x", "paste_y"]])
    for f in pd.read_csv(tmp_path / "a" / "manifest.csv")["file"].dropna():
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_bad_rows_and_images_are_counted_not_fatal(scene, tmp_path):
    out = tmp_path / "out"
    summary = run(scene, out)
    assert summary["bad_box"] == 1 and summary["unknown_class"] == 1 and summary["bad_image"] == 1
    assert summary["missing_image"] == 1 and summary["too_small"] == 1 and summary["unmapped"] == 1
    assert summary["written"] == len(scene["truth"])
    man = pd.read_csv(out / "manifest.csv").set_index("row")
    expect = {"box_outside": "bad_box", "unknown_class": "unknown_class", "unmapped": "unmapped",
              "too_small": "too_small", "corrupt": "bad_image", "missing": "missing_image"}
    for key, status in expect.items():
        assert man.loc[scene["bad"][key], "status"] == status
    assert json.loads((out / "summary.json").read_text())["bad_image"] == 1
    splits = man[man["status"] == "written"].groupby("split")["image_id"].nunique()
    assert splits.sum() == 6 and splits["test"] >= 1
    assert not set(man.loc[man["split"] == "train", "image_id"]) & set(man.loc[man["split"] == "test", "image_id"])


def test_rerun_skips_finished(scene, tmp_path):
    out = tmp_path / "out"
    first = run(scene, out)
    files = sorted(out.rglob("*.png"))
    stamps = [f.stat().st_mtime_ns for f in files]
    files[0].unlink()
    second = run(scene, out)
    assert second["written"] == 1 and second["skipped_existing"] == first["written"] - 1
    assert [f.stat().st_mtime_ns for f in files[1:]] == stamps[1:]
    assert pd.read_csv(out / "manifest.csv")["file"].notna().sum() == first["written"]


def test_output_loads_as_image_folder(scene, tmp_path):
    out = tmp_path / "out"
    run(scene, out)
    cfg = compose(["dataset=image_folder", f"dataset.root={out}", "dataset.num_workers=0"])
    dm = build(cfg.dataset, seed=0)
    dm.setup()
    assert dm.classes == ["legwear", "shoe", "top"]
    x, _ = dm.dataset("test")[0]
    assert x.shape == (3, 64, 64)
    n = len(dm.splits.train) + len(dm.splits.val) + len(dm.splits.test)
    assert n == len(scene["truth"])


def test_cli_and_config(scene, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--detections", str(scene["root"] / "detections.csv"), "--classes", str(scene["root"] / "classes.csv"),
            "--images", str(scene["images"]), "--out", str(out)]
    cls = "classes={top: [Tshirt], legwear: [Trouser], shoe: [Sneaker]}"
    rc = crops.main(args + [cls, "size=32", "min_box=12", "image_ext=.png", "workers=1", "progress=false"])
    assert rc == 0
    line = capsys.readouterr().out
    assert f"{len(scene['truth'])} written" in line and "bad_image 1" in line
    assert crops.main(args + ["size=2"]) == 2
    assert "size=2" in capsys.readouterr().err
    opts = crops.load_options(crops.DEFAULT_CONFIG)
    assert set(opts.classes) == {"person", "animal", "object"} and opts.size == 224
    with pytest.raises(ConfigError, match="not in the class descriptions"):
        crops.target_lookup(options(classes={"x": ["Zebra"]}), {"/m/a": "Dog"})
