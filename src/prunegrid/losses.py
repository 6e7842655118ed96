"""Losses built from ``conf/loss/``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunegrid.errors import ConfigError


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        super().__init__(label_smoothing=label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss ``-alpha * (1 - p_t)^gamma * log(p_t)``, mean over the batch.

    Lin et al., "Focal Loss for Dense Object Detection" (2017), as used with alpha=1, gamma=2
    in Kim (ResNet transfer learning): it down-weights easy examples so training focuses on the hard ones.
    """

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0):
        super().__init__()
        if alpha <= 0 or gamma < 0:
            raise ConfigError(f"focal loss needs alpha > 0 and gamma >= 0 (got alpha={alpha}, gamma={gamma})")
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        return (-self.alpha * (1 - pt) ** self.gamma * log_pt).mean()
