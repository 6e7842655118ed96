"""Every backbone YAML builds, runs forward and one training step at its smallest input."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from prunegrid.config import build, compose, options
from prunegrid.errors import ConfigError
from prunegrid.models.net import Net


def make(option: str, input_size: int | None = None, num_classes: int = 3, **over):
    cfg = compose([f"backbone={option}", *[f"backbone.{k}={v}" for k, v in over.items()]])
    size = input_size or int(cfg.backbone.min_input_size)
    return build(cfg.backbone, num_classes=num_classes, input_size=size), size


@pytest.mark.parametrize("option", options("backbone", "classification"))
def test_forward_and_one_training_step_at_smallest_input(option):
    torch.manual_seed(0)
    net, size = make(option)
    assert isinstance(net, Net) and len(net.unit_names()) >= 2
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    net.train()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    before = [p.detach().clone() for p in net.head.parameters()]
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.head.parameters()))
    assert net.eval()(x).shape == (2, 3)


@pytest.mark.parametrize("option", options("backbone", "classification"))
def test_too_small_input_is_a_one_line_error(option):
    cfg = compose([f"backbone={option}"])
    too_small = max(1, int(cfg.backbone.min_input_size) // 4)
    with pytest.raises(ConfigError, match=r"input_size=\d+ is too small for backbone") as err:
        build(cfg.backbone, num_classes=3, input_size=too_small)
    assert "\n" not in str(err.value)


def test_freeze_all_but_last_stage():
    net, _ = make("resnet18", 32, freeze=-1)
    frozen = {n for s in net.stages[:-1] for n in s}
    for name, unit in net.features.named_children():
        assert all(p.requires_grad == (name not in frozen) for p in unit.parameters())
    assert all(p.requires_grad for p in net.head.parameters())


def test_head_has_dropout_and_classes():
    net, _ = make("resnet18", 32, dropout=0.45, num_classes=7)
    drops = [m for m in net.head.modules() if isinstance(m, nn.Dropout)]
    assert drops and drops[-1].p == 0.45
    assert net.head[-1].out_features == 7


def test_pretrained_offline_names_the_fix(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="backbone.pretrained=false.*backbone.weights_path") as err:
        make("resnet18", 32, pretrained=True)
    assert "\n" not in str(err.value)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    net, _ = make("resnet18", 32, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(net.features.stem[0].weight, ref.conv1.weight)
    with pytest.raises(ConfigError, match="does not exist"):
        make("resnet18", 32, weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="does not fit resnet50"):
        make("resnet50", 32, weights_path=str(tmp_path / "r18.pth"))
