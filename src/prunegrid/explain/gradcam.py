"""Grad-CAM heatmaps for every run, and how far a lightened model still looks where its baseline looks.

BaiNa & Joe (explainable channel attention) ("SE channel attention with Grad-CAM") shows Grad-CAM heatmaps (Selvaraju et al.,
ICCV 2017) of the last conv stage to see which image regions a classifier uses. Here every run
draws them for the same fixed test images (picked by ``explain.seed`` from the whole test split,
so runs of a dataset with any ``dataset.subset`` share them) into one artifact ``gradcam.png``,
and logs ``explain/cam_agreement``: the mean IoU of the top-20% heat regions between this run's
maps and the maps of its ``prune=none`` cell (same backbone, dataset, loss and seed), plus
``explain/cam_pearson``, the mean Pearson correlation of the maps. Heatmaps come from the
maintained ``grad-cam`` package (``pytorch_grad_cam``); both models explain the *true* class, so
two models are compared on the same question.

Agreement is only computed where it means something: on maps of at least ``explain.min_map``
pixels a side (default 4: a 2x2 map has four cells, and any two of them "agree"), taken at the
same spatial stage in both models. The baseline's layer is the last unit whose map is at least
``min_map`` a side; the method's is its last unit with a map of exactly that size (a pruned or
rebuilt model may have other unit names). Otherwise agreement is skipped and the
``cam_agreement_status`` tag says why.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from prunegrid import measure, tracking
from prunegrid.budget import BASELINE
from prunegrid.errors import ConfigError, one_line
from prunegrid.models.net import FLOAT, Contract, Net

log = logging.getLogger("prunegrid")

BASELINE_PRUNE = BASELINE
TOP_FRACTION = 0.2


# -- pure agreement measures ------------------------------------------------------------------
def top_region(cam: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Boolean mask of the ``fraction`` hottest pixels of a heatmap (ties broken by position)."""
    flat = np.asarray(cam, dtype=np.float64).ravel()
    k = max(1, int(math.ceil(fraction * flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(np.shape(cam))


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Intersection over union of the top-``fraction`` regions of two heatmaps of one image."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"heatmaps differ in shape: {np.shape(a)} vs {np.shape(b)}")
    ma, mb = top_region(a, fraction), top_region(b, fraction)
    return float((ma & mb).sum() / (ma | mb).sum())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two heatmaps; a flat map correlates 1 with an equal map, else 0."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"heatmaps differ in shape: {np.shape(a)} vs {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    if den == 0.0:
        return 1.0 if np.allclose(x, y) else 0.0
    return float((x * y).sum() / den)


def agreement(maps_a: Sequence[np.ndarray], maps_b: Sequence[np.ndarray],
              fraction: float = TOP_FRACTION) -> tuple[float, float]:
    """Mean top-region IoU and mean Pearson correlation over pairs of heatmaps of the same images."""
    if len(maps_a) != len(maps_b) or len(maps_a) == 0:
        raise ValueError(f"need the same non-zero number of heatmaps, got {len(maps_a)} and {len(maps_b)}")
    ious = [top_iou(a, b, fraction) for a, b in zip(maps_a, maps_b)]
    rs = [pearson(a, b) for a, b in zip(maps_a, maps_b)]
    return float(np.mean(ious)), float(np.mean(rs))


# -- target layer and heatmaps ----------------------------------------------------------------
def _contract(net: Net, input_size: int | None = None) -> Contract:
    """The net's declared contract, at ``input_size`` when given (re-declared if it was another size)."""
    if not isinstance(net, Net) or net.contract is None:
        raise ConfigError("Grad-CAM needs a prunegrid Net with a declared contract (a model saved by this prunegrid)")
    if input_size is not None and net.contract.input_size != input_size:
        net.declare(input_size)
    return net.contract


def _layer(net: Net, unit: str) -> tuple[str, nn.Module]:
    return f"features.{unit}", net.unit(unit)


def target_layer(net: Net, path: str | None = None, input_size: int | None = None, *, min_map: int = 1,
                 size: tuple[int, int] | None = None) -> tuple[str, nn.Module]:
    """The unit Grad-CAM reads, from the net's contract: ``path`` (``features.<unit>``) if given; else
    the last unit (not an identity) whose map is exactly ``size`` (when given) or at least ``min_map``
    pixels a side and larger than 1x1; else the contract's ``cam_layer``."""
    c = _contract(net, input_size)
    if path:
        unit = c.unit_of(path) if path.count(".") == 1 else None
        if unit is None:
            units = ", ".join(f"features.{n}" for n in c.names())
            raise ConfigError(f"explain.target_layer={path} is not a unit of this model; use one of: {units}")
        return _layer(net, unit)
    maps = [(u.name, u.map_size) for u in reversed(c.units)
            if u.map_size and not isinstance(net.unit(u.name), nn.Identity)]
    for want in ([lambda hw: hw == tuple(size)] if size else
                 [lambda hw: min(hw) >= min_map and hw[0] * hw[1] > 1, lambda hw: hw[0] * hw[1] > 1]):
        for name, hw in maps:
            if want(tuple(hw)):
                return _layer(net, name)
    return _layer(net, c.unit_of(c.cam_layer))


def map_size(net: Net, path: str) -> tuple[int, int] | None:
    """Height and width of a unit's declared output map (``None``: not a spatial map)."""
    c = net.contract
    return c.unit(c.unit_of(path)).map_size


def cam_layers(net: Net, base: Net | None, input_size: int, path: str | None = None,
               min_map: int = 4) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module] | None, str]:
    """The layers whose Grad-CAM maps are compared: the baseline's (at least ``min_map`` a side) and
    the model's at the same spatial size, read from both contracts. Returns the model's layer, the
    baseline's layer (``None`` when agreement is skipped) and a status (``ok: ...`` or ``skipped: <why>``)."""
    if base is None:
        return target_layer(net, path, input_size, min_map=min_map), None, "skipped: no baseline model"
    b_name, b_layer = target_layer(base, path, input_size, min_map=min_map)
    b_hw = map_size(base, b_name)
    if b_hw is None or min(b_hw) < min_map:
        own = target_layer(net, path, input_size, min_map=min_map)
        got = "no spatial map" if b_hw is None else f"{b_hw[0]}x{b_hw[1]} maps"
        return own, None, (f"skipped: the baseline's {b_name} gives {got} at {input_size} px, under explain.min_map="
                           f"{min_map}; set explain.target_layer to an earlier unit")
    name, layer = target_layer(net, path, input_size, size=b_hw)
    hw = map_size(net, name)
    if hw != b_hw:
        return (name, layer), None, (f"skipped: this model has no unit with {b_hw[0]}x{b_hw[1]} maps "
                                     f"(the stage of the baseline's {b_name})")
    return (name, layer), (b_name, b_layer), f"ok: {name} vs baseline {b_name}, {hw[0]}x{hw[1]} maps"


def gradcam(net: nn.Module, images: torch.Tensor, layer: nn.Module,
            targets: Sequence[int] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] at the input size, and the logits (one forward and
    backward pass). ``targets``: the class to explain per image (``None``: the predicted one).
    The net's train/eval mode is restored and its parameter gradients cleared afterwards."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was = net.training
    try:
        with GradCAM(model=net, target_layers=[layer]) as cam:
            cam.compute_input_gradient = True  # gradients reach the target layer even when its weights are frozen
            tgt = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
            maps = cam(input_tensor=images, targets=tgt)
            logits = cam.outputs.detach().cpu()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was)
    return np.asarray(maps, dtype=np.float32), logits


# -- fixed images -----------------------------------------------------------------------------
def fixed_images(test: Any, transform: Any, n: int, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """``n`` images of a test split picked with ``seed``, with ``transform`` applied, their labels and
    indices. Given the whole test split (``ImageDataModule.full_test``), every run of a dataset gets
    the same images, whatever its ``dataset.subset`` and seed."""
    if n < 1:
        raise ConfigError(f"explain.n_images={n} must be 1 or more (or set explain.enabled=false)")
    n = min(n, len(test))
    idx = sorted(np.random.default_rng(seed).choice(len(test), size=n, replace=False).tolist())
    pairs = [test[i] for i in idx]
    return torch.stack([transform(img) for img, _ in pairs]), [int(y) for _, y in pairs], idx


def display_images(x: torch.Tensor, normalized: bool = True) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1]: the network inputs with the ImageNet normalisation undone."""
    from prunegrid.data.datamodule import IMAGENET_MEAN, IMAGENET_STD

    x = x.detach().cpu().float()
    if normalized:
        x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def figure(rgb: np.ndarray, maps: np.ndarray, titles_top: Sequence[str], titles_bottom: Sequence[str],
           suptitle: str = "", colors: Sequence[str] | None = None, ncols: int = 4):
    """Pairs of panels per image: the image (top title) and its Grad-CAM overlay (bottom title)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from prunegrid.plots import plt

    n = len(rgb)
    ncols = max(1, min(ncols, n))
    nrows = 2 * math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, col = 2 * (i // ncols), i % ncols
        axes[r, col].imshow(rgb[i], interpolation="nearest")
        axes[r, col].set_title(titles_top[i], fontsize=8)
        axes[r + 1, col].imshow(show_cam_on_image(rgb[i].astype(np.float32), maps[i], use_rgb=True),
                                interpolation="bilinear")
        axes[r + 1, col].set_title(titles_bottom[i], fontsize=8, color=(colors[i] if colors else "black"))
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


# -- the per-run step ---------------------------------------------------------------------------
def _find_baseline_run(uri: str, cell: dict[str, str]):
    """The latest FINISHED ``prune=none`` run of the same backbone, dataset, loss and seed."""
    keys = {**{k: cell[k] for k in ("backbone", "dataset", "loss", "seed")}, "prune": BASELINE_PRUNE}
    filt = " and ".join(f"tags.{k} = '{v}'" for k, v in keys.items()) + " and attributes.status = 'FINISHED'"
    runs = tracking.search_runs(uri, search_all_experiments=True, filter_string=filt, max_results=1,
                                order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0] if runs else None


def baseline_model(cell: dict[str, str], baseline_ckpt: str | None, tr: tracking.Tracker) -> tuple[nn.Module | None, str]:
    """The ``prune=none`` cell's final model and where it came from (or ``None`` and why not):
    the method's ``baseline_ckpt`` file if it has one, else the matching run's ``model/model.pt``."""
    if baseline_ckpt and Path(baseline_ckpt).is_file():
        return measure.load_model(baseline_ckpt), f"ok: baseline {baseline_ckpt}"
    run = _find_baseline_run(tr.uri, cell)
    if run is None:
        return None, (f"skipped: no FINISHED prune=none run of {cell['backbone']}/{cell['dataset']}/{cell['loss']}"
                      f"/seed {cell['seed']} in {tr.uri}; run that cell first")
    with tempfile.TemporaryDirectory(prefix="prunegrid-cam-") as tmp:
        artifact = f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}"
        try:
            path = tr.client.download_artifacts(run.info.run_id, artifact, tmp)
        except Exception as exc:
            return None, f"skipped: baseline run {run.info.run_id} has no {artifact} ({type(exc).__name__})"
        return measure.load_model(path), f"ok: baseline run {run.info.run_id}"


@dataclass
class Images:
    """The fixed test images a run explains: the network inputs, their labels, the class names, and
    whether the inputs carry the ImageNet normalisation (to undo it for display)."""

    x: torch.Tensor
    labels: list[int]
    classes: list[str]
    normalized: bool = True


def explain_run(net: Net, images: Images, *, cell: dict[str, str], input_size: int, ecfg: Any,
                tr: tracking.Tracker, baseline_ckpt: str | None = None, stand_in: str | None = None) -> dict[str, float]:
    """Draw ``gradcam.png`` for the run's fixed test images and log the agreement metrics.

    ``stand_in``: ``net`` is not the run's final model but the one the method says to explain in its
    place (``PruningMethod.explained``: the float model an INT8 model was quantized from); the
    figure says so, and no agreement is computed, since it would not be the final model's.
    """
    if FLOAT not in _contract(net).capabilities:
        raise ConfigError("Grad-CAM needs a float model with gradients; this model has no float parameters (int8?)")
    x, labels = images.x, images.labels
    path = ecfg.get("target_layer")
    if stand_in:
        base, source = None, f"skipped: the figure explains {stand_in}"
    elif cell["prune"] == BASELINE_PRUNE:
        base, source = net, "baseline cell (agreement with itself)"
    else:
        base, source = baseline_model(cell, baseline_ckpt, tr)
    (name, layer), base_layer, status = cam_layers(net, base, input_size, path, int(ecfg.get("min_map", 4)))
    if base is None:
        status = source
    elif status.startswith("ok"):
        status = f"{status}; {source.removeprefix('ok: ')}"
    maps, logits = gradcam(net, x, layer, labels)
    preds = logits.argmax(1).tolist()

    classes = images.classes
    fig = figure(display_images(x, images.normalized), maps, [f"true: {classes[y]}" for y in labels],
                 [f"pred: {classes[p]}" for p in preds],
                 suptitle=f"{tracking.run_name(cell)}\nGrad-CAM of the true class at {name}"
                          + (f"\nof {stand_in}" if stand_in else ""),
                 colors=["green" if p == y else "red" for p, y in zip(preds, labels)])
    tr.log_figure(fig, tracking.ARTIFACT_GRADCAM)
    from prunegrid.plots import close

    close(fig)

    tr.set_tags({tracking.TAG_CAM_AGREEMENT_STATUS: status})
    if base_layer is None:
        log.warning("explain/cam_agreement %s", status)
        return {}
    base_maps = maps if base is net else gradcam(base, x, base_layer[1], labels)[0]
    iou, r = agreement(maps, base_maps)
    metrics = {tracking.CAM_AGREEMENT: iou, tracking.CAM_PEARSON: r}
    tr.log_metrics(metrics)
    return metrics


def log_run_explanations(net: Net, *, test: Any, transform: Any, classes: list[str], normalized: bool,
                         cell: dict[str, str], input_size: int, ecfg: Any, tr: tracking.Tracker,
                         baseline_ckpt: str | None = None, stand_in: str | None = None) -> dict[str, float]:
    """Pipeline step: :func:`explain_run` on the fixed images of ``test`` (the whole test split)
    unless ``explain.enabled=false``. A failure here does not fail the trained run: it is logged as
    the ``explain_status`` tag and a warning."""
    if ecfg is None or not ecfg.get("enabled", True):
        return {}
    try:
        x, labels, _ = fixed_images(test, transform, int(ecfg.get("n_images", 8)), int(ecfg.get("seed", 0)))
        return explain_run(net, Images(x, labels, list(classes), normalized), cell=cell, input_size=input_size,
                           ecfg=ecfg, tr=tr, baseline_ckpt=baseline_ckpt, stand_in=stand_in)
    except Exception as exc:
        detail = one_line(exc)
        log.warning("Grad-CAM step failed: %s", detail)
        tr.set_tags({tracking.TAG_EXPLAIN_STATUS: detail})
        return {}
