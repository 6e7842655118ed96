"""The focal loss against its formula -alpha (1 - p_t)^gamma log p_t."""

from __future__ import annotations

import math

import pytest
import torch

from prunegrid.errors import ConfigError
from prunegrid.losses import CrossEntropy, FocalLoss


def test_focal_matches_formula_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([0, 2])
    expected = []
    for row, t in zip(logits.tolist(), target.tolist()):
        z = sum(math.exp(v) for v in row)
        pt = math.exp(row[t]) / z
        expected.append(-0.5 * (1 - pt) ** 2 * math.log(pt))
    got = FocalLoss(alpha=0.5, gamma=2.0)(logits, target)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_focal_gamma_zero_is_cross_entropy():
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert FocalLoss(1.0, 0.0)(logits, target).item() == pytest.approx(CrossEntropy()(logits, target).item(), rel=1e-5)


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    y = torch.tensor([0])
    ratio_focal = FocalLoss()(easy, y) / FocalLoss()(hard, y)
    ratio_ce = CrossEntropy()(easy, y) / CrossEntropy()(hard, y)
    assert ratio_focal < ratio_ce


def test_bad_loss_options():
    with pytest.raises(ConfigError):
        FocalLoss(alpha=0)
    with pytest.raises(ConfigError):
        CrossEntropy(label_smoothing=1.5)
