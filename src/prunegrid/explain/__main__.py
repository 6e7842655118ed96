"""``python -m prunegrid.explain --run-id RUN IMAGE [IMAGE ...]``: Grad-CAM of a logged run's model on your images.

Reads the run's ``config.yaml`` artifact (input size, normalisation, ``explain.target_layer``) and
its final model ``model/model.pt``, explains each image's predicted class and writes one PNG
(BaiNa & Joe (explainable channel attention)'s heatmaps, for images the run never saw).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError, DataError


def classes_from_report(text: str, n: int) -> list[str]:
    """Class names in label order from the run's ``classification_report.txt`` (``class i`` if unreadable)."""
    names = []
    for line in text.splitlines():
        parts = line.strip().rsplit(None, 4)
        if len(parts) == 5 and all(re.fullmatch(r"[0-9.]+", p) for p in parts[1:]):
            names.append(parts[0])
        if len(names) == n:
            return names
    return [f"class {i}" for i in range(n)]


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m prunegrid.explain",
                       description="Draw Grad-CAM heatmaps of a logged run's model on the images you name.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    p.add_argument("--run-id", required=True, help="MLflow run id of a prunegrid run (it must have model/model.pt)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--out", default=None, help="output PNG (default: gradcam_<run id prefix>.png)")
    p.add_argument("--target-layer", default=None,
                   help="dotted module path to explain, e.g. features.layer4_1 (default: the run's explain.target_layer, "
                        "else the last unit with a map larger than 1x1)")
    return p


def explain_images(run_id: str, images: list[str], out: str | None = None, tracking_uri: str | None = None,
                   target: str | None = None) -> Path:
    """Heatmaps of ``images`` for the model of run ``run_id``, written to one PNG; returns its path."""
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf
    from PIL import Image

    from prunegrid import measure, tracking
    from prunegrid.data.datamodule import ImageDataModule
    from prunegrid.explain.gradcam import display_images, figure, gradcam, target_layer
    from prunegrid.plots import close

    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file {missing[0]} does not exist; give existing image paths")
    uri = tracking.resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"tracking store {uri} does not exist; give --tracking-uri of the store holding the run")
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run {run_id} not found in {uri}; check --run-id or --tracking-uri") from None
    with tempfile.TemporaryDirectory(prefix="prunegrid-explain-") as tmp:
        try:
            cfg = OmegaConf.load(client.download_artifacts(run_id, tracking.ARTIFACT_CONFIG, tmp))
            model_path = client.download_artifacts(run_id, f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}", tmp)
        except Exception:
            raise ConfigError(f"run {run_id} has no {tracking.ARTIFACT_CONFIG} and model/{tracking.MODEL_FILE} "
                              "artifacts; pick a FINISHED prunegrid run") from None
        net = measure.load_model(model_path)
        try:
            report = Path(client.download_artifacts(run_id, tracking.ARTIFACT_REPORT, tmp)).read_text()
        except Exception:
            report = ""
    input_size = int(cfg.dataset.input_size)
    normalize = bool(cfg.dataset.get("normalize", True))
    tf = ImageDataModule(source=None, input_size=input_size, normalize=normalize, hflip=False).transform(False)
    loaded = []
    for p in images:
        try:
            with Image.open(p) as im:
                loaded.append(tf(im.convert("RGB")))
        except Exception as exc:
            raise DataError(f"cannot read image {p} ({type(exc).__name__}); give an image file PIL can open") from None
    x = torch.stack(loaded)
    path = target or (cfg.get("explain") or {}).get("target_layer")
    name, layer = target_layer(net, path, input_size)
    maps, logits = gradcam(net, x, layer, None)
    probs = logits.softmax(1)
    n_classes = int(logits.shape[1])
    classes = classes_from_report(report, n_classes)
    preds = probs.argmax(1).tolist()
    fig = figure(display_images(x, normalize), maps, [Path(p).name[:28] for p in images],
                 [f"pred: {classes[k]} ({probs[i, k]:.2f})" for i, k in enumerate(preds)],
                 suptitle=f"run {run.info.run_name or run_id}\nGrad-CAM of the predicted class at {name}")
    out_path = Path(out or f"gradcam_{run_id[:8]}.png")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with guard():
        out = explain_images(args.run_id, args.images, args.out, args.tracking_uri, args.target_layer)
        print(f"prunegrid: Grad-CAM of {len(args.images)} image(s) for run {args.run_id} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
