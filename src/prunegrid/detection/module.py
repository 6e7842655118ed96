"""The detection LightningModule, NMS and the detection metrics.

Like :class:`~prunegrid.models.module.Classifier`, it wraps a plain ``nn.Module`` and knows
nothing about pruning. It logs ``train/loss`` (with its ``box``/``obj``/``cls`` parts),
``val/loss``, ``val/map50`` and ``val/map`` every epoch, and on the test split mAP50, mAP50-95
and per-class AP (torchmetrics' ``MeanAveragePrecision``, COCO's 101-point interpolation, on
``faster-coco-eval``), and precision and recall at the chosen confidence (``conf``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from torch import nn

from prunegrid.detection.boxes import non_max_suppression, xywh2xyxy
from prunegrid.models.module import TaskModule

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # its summary table, every validation
MAP_CONF = 0.001  # the confidence floor of mAP (YOLOv5's val.py): the whole precision-recall curve counts


def targets_of(targets: torch.Tensor, n_images: int, size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Ground truth per image in pixels (``xyxy``) from ``[image, class, cx, cy, w, h]`` rows."""
    h, w = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=targets.device)
    out = []
    for i in range(n_images):
        t = targets[targets[:, 0] == i]
        out.append({"boxes": xywh2xyxy(t[:, 2:6] * scale), "labels": t[:, 1].long()})
    return out


def precision_recall(dets: list[torch.Tensor], gts: list[dict[str, torch.Tensor]], num_classes: int,
                     conf: float, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall of the detections scoring at least ``conf``: each detection,
    highest score first, matches the unmatched ground-truth box of its class with the highest IoU
    of at least ``iou`` (a true positive) or is a false positive. NaN where a class has no
    detection (precision) or no ground truth (recall)."""
    tp, fp, npos = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for d, g in zip(dets, gts):
        d = d[d[:, 4] >= conf]
        d = d[d[:, 4].argsort(descending=True)]
        for c in g["labels"].tolist():
            npos[c] += 1
        used = torch.zeros(len(g["labels"]), dtype=torch.bool)
        ious = torchvision.ops.box_iou(d[:, :4], g["boxes"]) if len(d) and len(g["boxes"]) else None
        for k in range(len(d)):
            c = int(d[k, 5])
            if ious is not None:
                cand = ious[k].clone()
                cand[(g["labels"] != c) | used] = -1
                j = int(cand.argmax())
                if cand[j] >= iou:
                    used[j] = True
                    tp[c] += 1
                    continue
            fp[c] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fp), tp / npos


class DetectionMetrics:
    """mAP (torchmetrics' ``MeanAveragePrecision``) and precision/recall at ``conf`` over batches."""

    def __init__(self, num_classes: int, conf: float = 0.25, backend: str = "faster_coco_eval"):
        from torchmetrics.detection import MeanAveragePrecision

        self.num_classes, self.conf = num_classes, conf
        self.map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=True,
                                        backend=backend)
        self.map.warn_on_many_detections = False  # NMS keeps up to max_det; COCO's mAP reads the best 100
        self.dets: list[torch.Tensor] = []
        self.gts: list[dict[str, torch.Tensor]] = []

    def update(self, dets: list[torch.Tensor], gts: list[dict[str, torch.Tensor]]) -> None:
        dets = [d.detach().cpu() for d in dets]
        gts = [{k: v.detach().cpu() for k, v in g.items()} for g in gts]
        self.map.update([{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()} for d in dets], gts)
        self.dets += dets
        self.gts += gts

    def compute(self) -> dict[str, Any]:
        """``map50``, ``map`` (50-95), ``ap50`` per class (COCO's precision at IoU 0.5 averaged
        over its 101 recall points; NaN for a class absent from the split), and ``precision`` /
        ``recall`` per class at ``conf``."""
        r = self.map.compute()
        prec = r["precision"]  # [IoU thresholds, recall points, classes, areas, max detections]
        ap50 = np.full(self.num_classes, np.nan)
        for k, c in enumerate(r["classes"].reshape(-1).tolist()):
            curve = prec[0, :, k, 0, -1]
            if (curve > -1).any():
                ap50[int(c)] = float(curve[curve > -1].mean())
        p, rcl = precision_recall(self.dets, self.gts, self.num_classes, self.conf)
        return {"map50": float(r["map_50"]), "map": float(r["map"]), "ap50": ap50, "precision": p, "recall": rcl}

    def reset(self) -> None:
        self.map.reset()
        self.dets, self.gts = [], []


class Detector(TaskModule):
    """A YOLO-style detector (``net(x)``: raw maps in training, decoded boxes in eval), its loss
    (``loss(preds, targets, net.head)``) and optimizer/scheduler factories.

    Args:
        conf: the confidence at which test precision and recall are read (and detections are kept
            in deployment, ``measure``); mAP reads every detection above 0.001.
        iou: the NMS IoU threshold.
        max_det: detections kept per image.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 num_classes: int, conf: float = 0.25, iou: float = 0.6, max_det: int = 300,
                 backend: str = "faster_coco_eval"):
        super().__init__(net, loss, optimizer, scheduler, num_classes)
        self.conf, self.iou, self.max_det, self.backend = conf, iou, max_det, backend
        self.val_metrics: DetectionMetrics | None = None
        self.test_metrics: DetectionMetrics | None = None
        self.test_results: dict[str, Any] = {}
        self._test_loss_sum, self._test_n = 0.0, 0

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss, parts = self.loss_fn(self.net(images), targets, self.net.head)
        bs = len(images)
        self.log("train/loss", loss / bs, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        for name, value in zip(("box", "obj", "cls"), parts):
            self.log(f"train/{name}_loss", value, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch, metrics: DetectionMetrics) -> torch.Tensor:
        images, targets = batch
        pred, raw = self.net(images, raw=True)
        loss, _ = self.loss_fn(raw, targets, self.net.head)
        dets = non_max_suppression(pred, MAP_CONF, self.iou, self.max_det)
        metrics.update(dets, targets_of(targets, len(images), tuple(images.shape[2:])))
        return loss / len(images)

    def on_validation_epoch_start(self):
        self.val_metrics = DetectionMetrics(self.num_classes, self.conf, self.backend)

    def validation_step(self, batch, batch_idx):
        loss = self._eval_step(batch, self.val_metrics)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))

    def on_validation_epoch_end(self):
        res = self.val_metrics.compute()
        self.log_dict({"val/map50": res["map50"], "val/map": res["map"]}, prog_bar=True)

    def on_test_epoch_start(self):
        self.test_metrics = DetectionMetrics(self.num_classes, self.conf, self.backend)
        self._test_loss_sum, self._test_n = 0.0, 0

    def test_step(self, batch, batch_idx):
        loss = self._eval_step(batch, self.test_metrics)
        self._test_loss_sum += float(loss) * len(batch[0])
        self._test_n += len(batch[0])

    def on_test_epoch_end(self):
        res = self.test_metrics.compute()
        res["loss"] = self._test_loss_sum / max(1, self._test_n)
        self.test_results = res
        self.log_dict({"test/map50": res["map50"], "test/map": res["map"], "test/loss": res["loss"]})

    @staticmethod
    def test_metrics_of(res: dict[str, Any], classes: list[str]) -> dict[str, float]:
        """``test/map50``, ``test/map``, ``test/loss``, precision and recall at ``conf`` (means over
        the classes that have them) and per class ``test/ap50_<class>``, ``test/precision_<class>``,
        ``test/recall_<class>`` (a class with no value is left out)."""
        from prunegrid import tracking

        m = {"test/map50": float(res["map50"]), "test/map": float(res["map"]), "test/loss": float(res["loss"])}
        for kind in ("precision", "recall"):
            values = np.asarray(res[kind], dtype=float)
            m[f"test/{kind}"] = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        for kind in ("ap50", "precision", "recall"):
            for key, value in zip(tracking.class_keys(kind, classes), np.asarray(res[kind], dtype=float).tolist()):
                if np.isfinite(value):
                    m[key] = float(value)
        return m

    @staticmethod
    def log_reports(tr, res: dict[str, Any], classes: list[str], history: Any) -> None:
        """Training curves and a per-class table (AP50, precision, recall at ``conf``)."""
        from prunegrid import plots, tracking

        fig = plots.curves_figure(history, "map50")
        tr.log_figure(fig, tracking.ARTIFACT_CURVES)
        plots.close(fig)
        width = max(len(c) for c in classes)
        lines = [f"{'class':<{width}}  {'AP50':>7}  {'P':>7}  {'R':>7}"]
        for c, ap, p, r in zip(classes, res["ap50"], res["precision"], res["recall"]):
            lines.append(f"{c:<{width}}  {ap:7.4f}  {p:7.4f}  {r:7.4f}")
        lines.append(f"{'all':<{width}}  {res['map50']:7.4f}  mAP50-95 {res['map']:.4f}")
        tr.log_text("\n".join(lines) + "\n", tracking.ARTIFACT_DETECTION_REPORT)

    def deployment_metrics(self, model_path, data, input_size: int, deploy: Any, threads: int | None) -> dict[str, float]:
        """The whole detector on the first ``deploy.images`` test images, in a fresh process
        (:func:`prunegrid.detection.deploy.measure_detector`): ``time/detect_ms`` (median per
        image, with ``_q25``/``_q75``), ``time/detect_fps``, and memory sampled every
        ``deploy.interval_s`` while the sequence runs for at least ``deploy.min_seconds``:
        ``memory/detect_peak_mb`` (the sampled peak RSS of the whole process, as pidstat reports
        it), ``memory/detect_increase_mb`` (that peak over the process's RSS before the model was
        loaded), ``memory/detect_mean_mb``, ``memory/detect_samples`` and the exact
        ``memory/detect_exact_peak_mb``."""
        from prunegrid.detection.deploy import measure_detector

        deploy = deploy or {}
        files = list(data.splits.test.files)[: int(deploy.get("images", 50))]
        r = measure_detector(model_path, files, input_size, conf=self.conf, iou=self.iou, max_det=self.max_det,
                             threads=threads or 1, warmup=int(deploy.get("warmup", 3)),
                             interval_s=float(deploy.get("interval_s", 1.0)),
                             min_seconds=float(deploy.get("min_seconds", 5.0)))
        m = {f"time/{k}": r[k] for k in ("detect_ms", "detect_ms_q25", "detect_ms_q75", "detect_fps")}
        m.update({f"memory/{k}": r[k] for k in ("detect_peak_mb", "detect_mean_mb", "detect_samples",
                                                 "detect_exact_peak_mb", "detect_increase_mb")})
        m["deploy/boxes_per_image"] = r["detect_boxes_per_image"]
        return m
