"""Letterboxed crops from detection boxes, as an ImageFolder tree (Kim (ResNet transfer learning), "ResNet transfer
learning for surveillance": the Open Images V7 person / animal / object data pipeline).

The paper reads ``detections.csv`` (image id, class id, box), keeps the wanted classes, skips
boxes too small to recognise, crops, resizes keeping the aspect ratio so that the long side is
224, fills the rest of a 224x224 canvas with the median colour of the crop's corners, pastes the
crop at a random position (so the model cannot learn a fixed border), runs in parallel with
``multiprocessing``, and lays the result out for ``torchvision.datasets.ImageFolder`` split 8:2.

Here every crop's position comes from a generator seeded by ``seed`` and the crop's own row, so
results do not depend on the number of workers or on the order of processing; the 8:2 split is
made over *source images* (seeded), so crops of one photo never straddle train and test.
Re-running skips crops whose output file exists. Bad input is counted, never fatal: a row whose
class is not in the class descriptions (``unknown_class``), a malformed or out-of-image box
(``bad_box``), a missing (``missing_image``) or unreadable (``bad_image``) source image.

    python -m prunegrid.data.crops --config conf/crops/person_animal_object.yaml \\
        --detections DIR/detections.csv --classes DIR/class-descriptions-boxable.csv \\
        --images DIR/images --out data/crops [key=value ...]

Output: ``OUT/train/<class>/*.jpg``, ``OUT/test/<class>/*.jpg`` (loads with
``dataset=image_folder dataset.root=OUT``), ``OUT/manifest.csv`` (one row per detection row
considered, with its status) and ``OUT/summary.json`` (the counts).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from PIL import Image

from prunegrid.errors import ConfigError, DataError

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "conf" / "crops" / "person_animal_object.yaml"
BOX_COLUMNS = ("XMin", "XMax", "YMin", "YMax")
REQUIRED_COLUMNS = ("ImageID", "LabelName", *BOX_COLUMNS)
MANIFEST_COLUMNS = ("row", "image_id", "label_name", "source_class", "class", "split", "xmin", "xmax", "ymin",
                    "ymax", "box_w", "box_h", "paste_x", "paste_y", "paste_w", "paste_h", "fill_r", "fill_g",
                    "fill_b", "status", "file")
# Statuses that make a file, and those that are counted as problems in the summary line.
WRITTEN, EXISTING = "written", "exists"
PROBLEMS = ("unknown_class", "bad_box", "missing_image", "bad_image")


@dataclass
class CropOptions:
    """The options of ``conf/crops/*.yaml`` (see that file for their meaning)."""

    classes: dict[str, list[str]]
    size: int = 224
    min_box: int = 32
    corner: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    ext: str = "jpg"
    quality: int = 95
    workers: int = 2
    image_ext: str = ".jpg"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.classes or not all(isinstance(v, (list, tuple)) and v for v in self.classes.values()):
            raise ConfigError("crops.classes must map each target class to a non-empty list of source class names")
        if self.size < 8:
            raise ConfigError(f"crops size={self.size} must be at least 8 pixels")
        if self.min_box < 1:
            raise ConfigError(f"crops min_box={self.min_box} must be a positive number of pixels")
        if not 0 < self.corner <= 0.5:
            raise ConfigError(f"crops corner={self.corner} must be in (0, 0.5] (share of the crop's short side)")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"crops test_fraction={self.test_fraction} must be in (0, 1)")
        if self.ext.lower() not in ("jpg", "jpeg", "png"):
            raise ConfigError(f"crops ext={self.ext} must be jpg or png")


def load_options(config: str | Path | None = None, overrides: Iterable[str] = ()) -> CropOptions:
    """Options from a crops YAML plus ``key=value`` overrides (OmegaConf dotlist)."""
    path = Path(config) if config else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"crops config {path} not found; pass --config conf/crops/<name>.yaml")
    extra = OmegaConf.from_dotlist(list(overrides))
    cfg = OmegaConf.merge(OmegaConf.load(path), extra)
    if "classes" in extra:
        cfg.classes = extra.classes  # a new class map replaces the YAML's, it does not add to it
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("_target_", "name", "detections", "class_descriptions", "images", "out"):
        data.pop(key, None)
    known = set(CropOptions.__dataclass_fields__) - {"extra"}
    opts = CropOptions(**{k: v for k, v in data.items() if k in known},
                       extra={k: v for k, v in data.items() if k not in known})
    if opts.extra:
        raise ConfigError(f"unknown crops option(s) {sorted(opts.extra)}; valid: {sorted(known)}")
    opts.check()
    return opts


def corner_median(img: np.ndarray, corner: float) -> tuple[int, ...]:
    """Median colour of the four ``k x k`` corner regions, ``k = corner * short side`` (at least 1 px).

    Kim (ResNet transfer learning) fills the letterbox with ``np.median`` over the corner colours.
    """
    h, w = img.shape[:2]
    k = max(1, int(round(corner * min(h, w))))
    patches = [img[:k, :k], img[:k, w - k:], img[h - k:, :k], img[h - k:, w - k:]]
    pixels = np.concatenate([p.reshape(-1, img.shape[2]) for p in patches])
    return tuple(int(v) for v in np.median(pixels, axis=0).astype(int))


def letterbox(crop: Image.Image, size: int, corner: float, rng: np.random.Generator):
    """Resize ``crop`` so its long side is ``size`` (aspect kept), paste it at a random position of a
    ``size x size`` canvas filled with its corner median. Returns (canvas, (x, y, w, h), fill)."""
    cw, ch = crop.size
    ratio = size / max(cw, ch)
    nw, nh = min(size, max(1, round(cw * ratio))), min(size, max(1, round(ch * ratio)))
    resized = crop.resize((nw, nh), Image.BILINEAR)
    fill = corner_median(np.asarray(resized), corner)
    canvas = Image.new("RGB", (size, size), fill)
    x, y = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    canvas.paste(resized, (x, y))
    return canvas, (x, y, nw, nh), fill


def crop_rng(seed: int, image_id: str, row: int) -> np.random.Generator:
    """A generator per crop, so placement does not depend on workers or processing order."""
    return np.random.default_rng([int(seed), zlib.crc32(f"{image_id}:{row}".encode()), int(row)])


def read_class_descriptions(path: str | Path) -> dict[str, str]:
    """``LabelName -> display name`` from Open Images' ``class-descriptions-boxable.csv`` (no header),
    or a CSV with ``LabelName,DisplayName`` header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class descriptions CSV {path} not found; pass --classes class-descriptions-boxable.csv")
    df = pd.read_csv(path, header=None, dtype=str, usecols=[0, 1], names=["LabelName", "DisplayName"])
    if len(df) and df.iloc[0, 0] == "LabelName":
        df = df.iloc[1:]
    return dict(zip(df["LabelName"].str.strip(), df["DisplayName"].str.strip()))


def read_detections(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"detections CSV {path} not found; pass --detections detections.csv (Open Images layout)")
    df = pd.read_csv(path, dtype={"ImageID": str, "LabelName": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"detections CSV {path} lacks column(s) {missing}; it needs {', '.join(REQUIRED_COLUMNS)}")
    df = df[list(REQUIRED_COLUMNS)].copy()
    for c in BOX_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df.insert(0, "row", np.arange(len(df)))
    return df


def target_lookup(opts: CropOptions, descriptions: dict[str, str]) -> dict[str, str]:
    """``LabelName -> target class``; source names are display names (case-insensitive) or LabelNames."""
    by_name = {v.lower(): k for k, v in descriptions.items()}
    out: dict[str, str] = {}
    for target, sources in opts.classes.items():
        if "/" in target or target.startswith("."):
            raise ConfigError(f"target class '{target}' cannot be a folder name; use letters, digits, _ or -")
        for s in sources:
            label = s if s in descriptions else by_name.get(str(s).lower())
            if label is None:
                raise ConfigError(f"source class '{s}' (for {target}) is not in the class descriptions CSV; "
                                  "fix the name in the crops YAML")
            out[label] = target
    return out


def plan(df: pd.DataFrame, descriptions: dict[str, str], lookup: dict[str, str], opts: CropOptions) -> pd.DataFrame:
    """Attach target class, split, status (``todo`` or the reason to skip) and output file to each row."""
    df = df.copy()
    df["source_class"] = df["LabelName"].map(descriptions).fillna("")
    df["class"] = df["LabelName"].map(lookup).fillna("")
    status = np.where(df["LabelName"].isin(descriptions.keys()), "unmapped", "unknown_class").astype(object)
    wanted = df["class"] != ""
    box = df[list(BOX_COLUMNS)]
    bad = box.isna().any(axis=1) | (box < -1e-6).any(axis=1) | (box > 1 + 1e-6).any(axis=1) \
        | (df["XMax"] <= df["XMin"]) | (df["YMax"] <= df["YMin"])
    status[wanted.to_numpy()] = "todo"
    status[(wanted & bad).to_numpy()] = "bad_box"
    df["status"] = status
    images = sorted(df.loc[df["status"] == "todo", "ImageID"].unique())
    order = np.random.default_rng(opts.seed).permutation(len(images))
    n_test = int(round(len(images) * opts.test_fraction))
    test_ids = {images[i] for i in order[:n_test]}
    df["split"] = np.where(df["ImageID"].isin(test_ids), "test", "train")
    df.loc[df["status"] != "todo", "split"] = ""
    ext = "jpg" if opts.ext.lower() == "jpeg" else opts.ext.lower()
    df["file"] = [f"{s}/{c}/{i}_{r:07d}.{ext}" if st == "todo" else ""
                  for s, c, i, r, st in zip(df["split"], df["class"], df["ImageID"], df["row"], df["status"])]
    return df


def _process_image(job: tuple) -> list[dict[str, Any]]:
    """Crop every planned box of one source image (runs in a worker process)."""
    image_path, rows, out, opts = job
    results: list[dict[str, Any]] = []
    pending = [r for r in rows if not (out / r["file"]).is_file()]
    results += [{"row": r["row"], "status": EXISTING} for r in rows if (out / r["file"]).is_file()]
    if not pending:
        return results
    if not image_path.is_file():
        return results + [{"row": r["row"], "status": "missing_image"} for r in pending]
    try:
        with Image.open(image_path) as im:
            img = im.convert("RGB")
    except Exception:
        return results + [{"row": r["row"], "status": "bad_image"} for r in pending]
    width, height = img.size
    for r in pending:
        x0, x1 = round(r["XMin"] * width), round(r["XMax"] * width)
        y0, y1 = round(r["YMin"] * height), round(r["YMax"] * height)
        res = {"row": r["row"], "box_w": x1 - x0, "box_h": y1 - y0}
        if min(x1 - x0, y1 - y0) < opts.min_box:
            results.append({**res, "status": "too_small"})
            continue
        canvas, (px, py, pw, ph), fill = letterbox(img.crop((x0, y0, x1, y1)), opts.size, opts.corner,
                                                   crop_rng(opts.seed, r["ImageID"], r["row"]))
        dest = out / r["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.stem + ".part" + dest.suffix)
        canvas.save(tmp, quality=opts.quality) if dest.suffix == ".jpg" else canvas.save(tmp)
        tmp.replace(dest)
        results.append({**res, "status": WRITTEN, "paste_x": px, "paste_y": py, "paste_w": pw, "paste_h": ph,
                        "fill_r": fill[0], "fill_g": fill[1], "fill_b": fill[2]})
    return results


def make_crops(detections: str | Path, class_descriptions: str | Path, images: str | Path, out: str | Path,
               opts: CropOptions) -> dict[str, Any]:
    """Run the whole job; returns the summary (also written to ``OUT/summary.json``)."""
    opts.check()
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"images dir {images} not found; pass --images DIR holding <ImageID>{opts.image_ext}")
    descriptions = read_class_descriptions(class_descriptions)
    df = plan(read_detections(detections), descriptions, target_lookup(opts, descriptions), opts)
    out.mkdir(parents=True, exist_ok=True)
    todo = df[df["status"] == "todo"]
    jobs = [(images / f"{image_id}{opts.image_ext}", group.to_dict("records"), out, opts)
            for image_id, group in todo.groupby("ImageID", sort=True)]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="crops", unit="img", disable=not opts.progress, file=sys.stderr)
    results: list[dict[str, Any]] = []
    if opts.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=opts.workers) as pool:
            for res in pool.map(_process_image, jobs, chunksize=max(1, len(jobs) // (opts.workers * 8))):
                results += res
                bar.update()
    else:
        for job in jobs:
            results += _process_image(job)
            bar.update()
    bar.close()
    if results:
        upd = pd.DataFrame(results).set_index("row")
        df = df.set_index("row")
        for col in upd.columns:
            df.loc[upd.index, col] = upd[col]
        df = df.reset_index()
    df.loc[~df["status"].isin((WRITTEN, EXISTING)), "file"] = ""
    df.loc[df["file"] == "", "split"] = ""
    manifest = df.rename(columns={"ImageID": "image_id", "LabelName": "label_name", "XMin": "xmin", "XMax": "xmax",
                                  "YMin": "ymin", "YMax": "ymax"})
    manifest = manifest.reindex(columns=list(MANIFEST_COLUMNS))
    manifest.to_csv(out / "manifest.csv", index=False)
    counts = Counter(df["status"])
    made = df[df["status"].isin((WRITTEN, EXISTING))]
    summary = {
        "rows": int(len(df)),
        "written": int(counts.get(WRITTEN, 0)),
        "skipped_existing": int(counts.get(EXISTING, 0)),
        "too_small": int(counts.get("too_small", 0)),
        "unmapped": int(counts.get("unmapped", 0)),
        **{p: int(counts.get(p, 0)) for p in PROBLEMS},
        "per_split_class": {f"{s}/{c}": int(n) for (s, c), n in made.groupby(["split", "class"]).size().items()},
        "options": {k: v for k, v in vars(opts).items() if k != "extra"},
    }
    for split in ("train", "test"):
        missing = sorted(set(opts.classes) - set(made.loc[made["split"] == split, "class"]))
        if missing and len(made):
            summary.setdefault("warnings", []).append(f"{split} has no crops of {missing}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def from_config(detections: str, class_descriptions: str, images: str, out: str, **options: Any) -> dict[str, Any]:
    """The ``_target_`` of ``conf/crops/*.yaml``: the paths plus the flat options of :class:`CropOptions`."""
    opts = CropOptions(**options)
    return make_crops(detections, class_descriptions, images, out, opts)


def summary_line(s: dict[str, Any]) -> str:
    problems = ", ".join(f"{p} {s[p]}" for p in PROBLEMS)
    return (f"crops: {s['written']} written, {s['skipped_existing']} already there, {s['too_small']} too small, "
            f"{s['unmapped']} other classes; problems: {problems}")


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 after one line ``prunegrid: error: ...`` (returned; a usage error raises ``SystemExit(2)``)."""
    from prunegrid.cli import ArgumentParser, error_line, is_user_error, key_value

    p = ArgumentParser(prog="python -m prunegrid.data.crops", description=__doc__.split("\n\n")[0],
                       epilog="Options of the YAML can be overridden as key=value (e.g. size=224 min_box=48).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="crops YAML (classes map and options)")
    p.add_argument("--detections", help="detections CSV: ImageID, LabelName, XMin, XMax, YMin, YMax (fractions)")
    p.add_argument("--classes", dest="class_descriptions", help="class descriptions CSV (LabelName,DisplayName)")
    p.add_argument("--images", help="directory of source images <ImageID>.jpg")
    p.add_argument("--out", help="output directory (ImageFolder tree train/ test/, manifest.csv, summary.json)")
    p.add_argument("overrides", nargs="*", type=key_value, help="key=value overrides of the YAML options")
    args = p.parse_args(argv)
    try:
        raw = OmegaConf.load(args.config) if Path(args.config).is_file() else OmegaConf.create()
        paths = {k: getattr(args, k) or raw.get(k) for k in ("detections", "class_descriptions", "images", "out")}
        missing = [k for k, v in paths.items() if not v]
        if missing:
            raise ConfigError(f"missing {', '.join('--' + ('classes' if m == 'class_descriptions' else m) for m in missing)}")
        try:
            opts = load_options(args.config, args.overrides)
        except (TypeError, ValueError) as exc:  # a value of the wrong type (size=abc): the checks compare numbers
            raise ConfigError(f"an option has a value of the wrong type ({exc}); check {args.config} and the "
                              "key=value overrides") from None
        summary = make_crops(paths["detections"], paths["class_descriptions"], paths["images"], paths["out"], opts)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        return error_line(exc)
    print(summary_line(summary))
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
