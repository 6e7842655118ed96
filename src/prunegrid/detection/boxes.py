"""Box post-processing shared by the detection LightningModule and the deployed detector: centre
boxes to corners and class-wise NMS on Detect's decoded output. Only torch and torchvision, so the
deployment process loads it without the training stack."""

from __future__ import annotations

import torch
import torchvision


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[..., 0], y[..., 1] = x[..., 0] - x[..., 2] / 2, x[..., 1] - x[..., 3] / 2
    y[..., 2], y[..., 3] = x[..., 0] + x[..., 2] / 2, x[..., 1] + x[..., 3] / 2
    return y


def non_max_suppression(pred: torch.Tensor, conf: float = 0.25, iou: float = 0.45,
                        max_det: int = 300) -> list[torch.Tensor]:
    """Per image, ``(n, 6)`` detections ``[x1, y1, x2, y2, score, class]`` from Detect's decoded
    output: score = objectness x class probability of the best class, kept above ``conf``, then
    class-wise NMS at ``iou`` (``torchvision.ops.batched_nms``), at most ``max_det``."""
    out = []
    for p in pred:
        p = p[p[:, 4] > conf]
        if not len(p):
            out.append(torch.zeros((0, 6), device=pred.device))
            continue
        scores, cls = (p[:, 5:] * p[:, 4:5]).max(1)
        keep = scores > conf
        boxes, scores, cls = xywh2xyxy(p[keep, :4]), scores[keep], cls[keep]
        idx = torchvision.ops.batched_nms(boxes, scores, cls, iou)[:max_det]
        out.append(torch.cat((boxes[idx], scores[idx, None], cls[idx, None].float()), 1))
    return out
