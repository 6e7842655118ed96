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
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from prunegrid import measure, tracking
from prunegrid.budget import BASELINE
from prunegrid.errors import ConfigError, one_line

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
def _output_shapes(net: nn.Module, modules: dict[str, nn.Module], input_size: int) -> dict[str, tuple[int, ...]]:
    """Output shape of each of ``modules`` (by name) for one input of ``input_size`` pixels."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left unchanged
            shapes.setdefault(name, tuple(output.shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    was = net.training
    net.eval()
    try:
        p = next(net.parameters(), None)
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size, device=p.device if p is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
        net.train(was)
    return shapes


def _unit_sizes(net: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Output shape of each feature unit for one input of ``input_size`` pixels."""
    return _output_shapes(net, dict(net.features.named_children()), input_size)


def map_size(net: nn.Module, module: nn.Module, input_size: int) -> tuple[int, int] | None:
    """Height and width of ``module``'s output for one input of ``input_size`` pixels (``None``: not a map)."""
    shape = _output_shapes(net, {"m": module}, input_size).get("m", ())
    return (shape[2], shape[3]) if len(shape) == 4 else None


def target_layer(net: nn.Module, path: str | None = None, input_size: int | None = None, *, min_map: int = 1,
                 size: tuple[int, int] | None = None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads: ``path`` (dotted, e.g. ``features.layer4_1``) if given; else, with
    ``input_size``, the last feature unit whose map is exactly ``size`` (when given) or at least
    ``min_map`` pixels a side and larger than 1x1; else ``net.cam_layer()`` (the last non-identity
    unit, so rebuilt and pruned nets work)."""
    if path:
        try:
            return path, net.get_submodule(path)
        except AttributeError:
            units = ", ".join(f"features.{n}" for n in getattr(getattr(net, "features", None), "_modules", {}))
            raise ConfigError(f"explain.target_layer={path} is not a module of this model; "
                              f"use a dotted path such as one of: {units or 'features.<unit>'}") from None
    if not hasattr(net, "cam_layer"):
        raise ConfigError("this model has no cam_layer(); set explain.target_layer to a dotted module path")
    last = net.cam_layer()
    names = {id(u): n for n, u in net.features.named_children()}
    if input_size is not None:
        sizes = _unit_sizes(net, input_size)
        units = [(n, u, sizes.get(n, ())) for n, u in reversed(list(net.features.named_children()))
                 if not isinstance(u, nn.Identity)]
        maps = [(n, u, shape[2:]) for n, u, shape in units if len(shape) == 4]
        for want in ([lambda hw: hw == tuple(size)] if size else
                     [lambda hw: min(hw) >= min_map and hw[0] * hw[1] > 1, lambda hw: hw[0] * hw[1] > 1]):
            for name, unit, hw in maps:
                if want(tuple(hw)):
                    return f"features.{name}", unit
    return f"features.{names.get(id(last), '?')}", last


def cam_layers(net: nn.Module, base: nn.Module | None, input_size: int, path: str | None = None,
               min_map: int = 4) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module] | None, str]:
    """The layers whose Grad-CAM maps are compared: the baseline's (at least ``min_map`` a side) and
    the model's at the same spatial size. Returns the model's layer, the baseline's layer (``None``
    when agreement is skipped) and a status (``ok: ...`` or ``skipped: <why>``)."""
    if base is None:
        return target_layer(net, path, input_size, min_map=min_map), None, "skipped: no baseline model"
    b_name, b_layer = target_layer(base, path, input_size, min_map=min_map)
    b_hw = map_size(base, b_layer, input_size)
    if b_hw is None or min(b_hw) < min_map:
        own = target_layer(net, path, input_size, min_map=min_map)
        got = "no spatial map" if b_hw is None else f"{b_hw[0]}x{b_hw[1]} maps"
        return own, None, (f"skipped: the baseline's {b_name} gives {got} at {input_size} px, under explain.min_map="
                           f"{min_map}; set explain.target_layer to an earlier unit")
    name, layer = target_layer(net, path, input_size, size=b_hw)
    hw = map_size(net, layer, input_size)
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
def _full_test(data: Any):
    """The test split before the DataModule's ``dataset.subset`` cap (the same for every subset/seed)."""
    test = data.splits.test
    if isinstance(test, Subset) and getattr(data, "subset", None) is not None and hasattr(data, "_cap"):
        again = data._cap(test.dataset, 3)  # the DataModule's own (seeded) cap of the test split
        if isinstance(again, Subset) and list(again.indices) == list(test.indices):
            return test.dataset
    return test


def fixed_images(data: Any, n: int, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """``n`` test images picked with ``seed`` (evaluation transform), their labels and indices."""
    if n < 1:
        raise ConfigError(f"explain.n_images={n} must be 1 or more (or set explain.enabled=false)")
    data.setup()
    test = _full_test(data)
    n = min(n, len(test))
    idx = sorted(np.random.default_rng(seed).choice(len(test), size=n, replace=False).tolist())
    tf = data.transform(False)
    pairs = [test[i] for i in idx]
    return torch.stack([tf(img) for img, _ in pairs]), [int(y) for _, y in pairs], idx


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
def _find_baseline_run(client, cell: dict[str, str]):
    """The latest FINISHED ``prune=none`` run of the same backbone, dataset, loss and seed."""
    from mlflow.entities import ViewType

    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exp_ids:
        return None
    keys = {**{k: cell[k] for k in ("backbone", "dataset", "loss", "seed")}, "prune": BASELINE_PRUNE}
    filt = " and ".join(f"tags.{k} = '{v}'" for k, v in keys.items()) + " and attributes.status = 'FINISHED'"
    runs = client.search_runs(exp_ids, filter_string=filt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def baseline_model(c: Any, tr: tracking.Tracker) -> tuple[nn.Module | None, str]:
    """The ``prune=none`` cell's final model and where it came from (or ``None`` and why not):
    the method's ``baseline_ckpt`` file if it has one, else the matching run's ``model/model.pt``."""
    ckpt = getattr(c.method, "baseline_ckpt", None)
    if ckpt and Path(ckpt).is_file():
        return measure.load_model(ckpt), f"ok: baseline {ckpt}"
    run = _find_baseline_run(tr.client, c.cell)
    if run is None:
        cell = c.cell
        return None, (f"skipped: no FINISHED prune=none run of {cell['backbone']}/{cell['dataset']}/{cell['loss']}"
                      f"/seed {cell['seed']} in {tr.uri}; run that cell first")
    with tempfile.TemporaryDirectory(prefix="prunegrid-cam-") as tmp:
        artifact = f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}"
        try:
            path = tr.client.download_artifacts(run.info.run_id, artifact, tmp)
        except Exception as exc:
            return None, f"skipped: baseline run {run.info.run_id} has no {artifact} ({type(exc).__name__})"
        return measure.load_model(path), f"ok: baseline run {run.info.run_id}"


def explain_run(c: Any, net: nn.Module, tr: tracking.Tracker) -> dict[str, float]:
    """Draw ``gradcam.png`` for the run's fixed test images and log the agreement metrics."""
    ecfg = c.cfg.explain
    if not any(p.is_floating_point() for p in net.parameters()):
        raise ConfigError("Grad-CAM needs a float model with gradients; this model has no float parameters (int8?)")
    x, labels, _ = fixed_images(c.data, int(ecfg.get("n_images", 8)), int(ecfg.get("seed", 0)))
    path = ecfg.get("target_layer")
    if c.cell["prune"] == BASELINE_PRUNE:
        base, source = net, "baseline cell (agreement with itself)"
    else:
        base, source = baseline_model(c, tr)
    (name, layer), base_layer, status = cam_layers(net, base, c.input_size, path, int(ecfg.get("min_map", 4)))
    if base is None:
        status = source
    elif status.startswith("ok"):
        status = f"{status}; {source.removeprefix('ok: ')}"
    maps, logits = gradcam(net, x, layer, labels)
    preds = logits.argmax(1).tolist()

    classes = list(c.data.classes)
    rgb = display_images(x, bool(getattr(c.data, "normalize", True)))
    fig = figure(rgb, maps, [f"true: {classes[y]}" for y in labels], [f"pred: {classes[p]}" for p in preds],
                 suptitle=f"{tracking.run_name(c.cell)}\nGrad-CAM of the true class at {name}",
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


def log_run_explanations(c: Any, net: nn.Module, tr: tracking.Tracker) -> dict[str, float]:
    """Pipeline hook: :func:`explain_run` unless ``explain.enabled=false``. A failure here does not
    fail the trained run: it is logged as the ``explain_status`` tag and a warning."""
    ecfg = c.cfg.get("explain")
    if ecfg is None or not ecfg.get("enabled", True):
        return {}
    try:
        return explain_run(c, net, tr)
    except Exception as exc:
        detail = one_line(exc)
        log.warning("Grad-CAM step failed: %s", detail)
        tr.set_tags({tracking.TAG_EXPLAIN_STATUS: detail})
        return {}
