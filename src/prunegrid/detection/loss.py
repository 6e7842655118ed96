"""YOLOv5's training loss and label assignment (``ComputeLoss`` of YOLOv5 v7.0).

Each ground-truth box is assigned to every anchor whose width and height ratios to it are
within ``anchor_t`` (4.0), at its own grid cell and the two neighbouring cells nearest its
centre (offset 0.5), on every level. The loss is CIoU for the boxes, BCE for objectness (the
target is the detached IoU, levels weighted 4.0 / 1.0 / 0.4) and BCE for classes, weighted by the
``hyp.scratch-low`` gains ``box`` 0.05, ``obj`` 1.0 and ``cls`` 0.5, scaled as YOLOv5's
``train.py`` scales them for the number of levels, classes and the input size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunegrid.errors import ConfigError


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching ``(cx, cy, w, h)`` rows (Zheng et al., 2020)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloLoss(nn.Module):
    """``loss(preds, targets, detect)``: YOLOv5's loss of one batch.

    ``preds``: Detect's raw maps; ``targets``: ``(N, 6)`` rows ``[image, class, cx, cy, w, h]``
    (normalised); ``detect``: the model's Detect layer (anchors, strides). Returns the loss
    (times the batch size, as YOLOv5) and the detached ``(box, obj, cls)`` parts.
    """

    def __init__(self, box: float = 0.05, obj: float = 1.0, cls: float = 0.5, anchor_t: float = 4.0,
                 label_smoothing: float = 0.0, balance: tuple[float, ...] = (4.0, 1.0, 0.4)):
        super().__init__()
        if min(box, obj, cls) < 0 or anchor_t <= 1:
            raise ConfigError("loss gains box/obj/cls must be >= 0 and loss.anchor_t > 1")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        self.gains = {"box": box, "obj": obj, "cls": cls}
        self.anchor_t, self.balance = anchor_t, tuple(balance)
        self.cp, self.cn = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, preds: list[torch.Tensor], targets: torch.Tensor, detect: nn.Module):
        nl, nc = detect.nl, detect.nc
        imgsz = float(preds[0].shape[2] * detect.stride[0])
        box_gain = self.gains["box"] * 3 / nl
        cls_gain = self.gains["cls"] * nc / 80 * 3 / nl
        obj_gain = self.gains["obj"] * (imgsz / 640) ** 2 * 3 / nl
        dev = preds[0].device
        lcls, lbox, lobj = (torch.zeros(1, device=dev) for _ in range(3))
        tcls, tbox, indices, anchors = self.build_targets(preds, targets.to(dev), detect)
        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=dev)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox[i]).squeeze(-1)
                lbox += (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).type(tobj.dtype)
                if nc > 1:
                    t = torch.full_like(pcls, self.cn)
                    t[range(n), tcls[i]] = self.cp
                    lcls += self.bce(pcls, t)
            lobj += self.bce(pi[..., 4], tobj) * self.balance[i]
        lbox, lobj, lcls = lbox * box_gain, lobj * obj_gain, lcls * cls_gain
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls).sum() * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, preds, targets, detect):
        na, nt = detect.na, targets.shape[0]
        dev = targets.device
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=dev)
        ai = torch.arange(na, device=dev).float().view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=dev).float() * g
        for i in range(detect.nl):
            anchors, shape = detect.anchors[i], preds[i].shape
            gain[2:6] = torch.tensor(shape, device=dev)[[3, 2, 3, 2]].float()
            t = targets * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                j = torch.max(r, 1 / r).max(2)[0] < self.anchor_t
                t = t[j]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                j = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[j]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
            else:
                t = targets[0]
                offsets = 0
            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            gi, gj = gij.T
            gj, gi = gj.clamp_(0, shape[2] - 1), gi.clamp_(0, shape[3] - 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch
