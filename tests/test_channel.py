"""``channel`` and ``slimming``: physically smaller dense Nets that keep their shape and still train."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunegrid import measure
from prunegrid.config import build, compose
from prunegrid.errors import ConfigError
from prunegrid.models.net import Net
from prunegrid.pipeline import run
from prunegrid.pruning.channel import prunable_layers, prune_channels
from prunegrid.pruning.slimming import BNSparsity, bn_scales
from tests.conftest import report_accuracy, tiny


def _net(backbone: str) -> nn.Module:
    return build(compose([f"backbone={backbone}"]).backbone, num_classes=10, input_size=32)


def _train_step(net: nn.Module) -> float:
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    net.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in net.parameters()]
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters())), "optimizer step changed nothing"
    return float(loss)


@pytest.mark.parametrize("backbone,importance,global_pruning", [
    ("resnet18", "l1", False), ("resnet18", "taylor", False),
    ("simple_cnn", "l2", True), ("simple_cnn", "bn_scale", True), ("simple_cnn", "taylor", True),
])
def test_pruned_net_is_smaller_keeps_shape_and_trains(backbone, importance, global_pruning):
    torch.manual_seed(0)
    net = _net(backbone)
    for m in net.modules():  # trained-like BN scales: distinct, so a global ranking is meaningful
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    x = torch.randn(2, 3, 32, 32)
    before = measure.static_metrics(net, 32)
    width = net.contract.units[-1].out_shape[0]
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    out = prune_channels(net, importance=importance, ratio=0.5, global_pruning=global_pruning, max_layer_ratio=0.9,
                         input_size=32, batches=batches, loss=nn.CrossEntropyLoss())
    after = measure.static_metrics(out, 32)
    assert out is net and isinstance(net, Net) and net.num_classes == 10 and net.arch
    assert net.eval()(x).shape == (2, 10)
    assert after["model/params"] < 0.6 * before["model/params"]
    assert after["model/flops"] < 0.6 * before["model/flops"]
    declared = net.contract.units[-1].out_shape
    assert declared == tuple(net.features(x).shape[1:]) and declared[0] < width     # the contract was re-declared
    assert all(p.grad is None for p in net.parameters())
    assert torch.isfinite(torch.tensor(_train_step(net)))


def test_uniform_pruning_halves_every_layer_and_protects_classifier():
    net = _net("resnet18")
    widths = {n: m.out_channels for n, m in prunable_layers(net).items() if isinstance(m, nn.Conv2d)}
    prune_channels(net, importance="l1", ratio=0.5, global_pruning=False, max_layer_ratio=0.9, input_size=32)
    for name, m in prunable_layers(net).items():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == widths[name] // 2, name
    assert net.head[-1].out_features == 10 and net.head[-1].in_features == 256


def test_global_pruning_never_empties_a_layer():
    net = _net("simple_cnn")
    net.features.conv1[1].weight.data.fill_(1e-6)  # every channel of conv1 far below the global threshold
    net.features.conv2[1].weight.data.uniform_(0.5, 1.0)
    prune_channels(net, importance="bn_scale", ratio=0.5, global_pruning=True, max_layer_ratio=0.75, input_size=32)
    assert net.features.conv1[0].out_channels == 8  # capped at 1 - 0.75 of 32, not removed (nor skipped)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_frozen_stages_stay_frozen():
    net = _net("resnet18")
    net.freeze(1)
    prune_channels(net, importance="taylor", ratio=0.5, global_pruning=False, max_layer_ratio=0.9, input_size=32,
                   batches=[(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))], loss=nn.CrossEntropyLoss())
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)     # the frozen stem stayed in its residual group
    assert not any(p.requires_grad for p in net.features.stem.parameters())
    assert all(p.requires_grad for p in net.features.layer4_1.parameters())


def test_taylor_importance_reads_the_cells_own_loss():
    calls = []

    def loss(logits, y):
        calls.append(len(y))
        return nn.functional.cross_entropy(logits, y)

    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(3)]
    prune_channels(_net("simple_cnn"), importance="taylor", ratio=0.5, global_pruning=False, max_layer_ratio=0.9,
                   input_size=32, batches=batches, loss=loss)
    assert calls == [2, 2, 2]


def test_bn_sparsity_callback_adds_l1_subgradient_to_every_bn_scale():
    net = _net("simple_cnn")
    bn = net.features.conv1[1]
    bn.weight.data = torch.linspace(-1, 1, bn.num_features)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    grad = bn.weight.grad.clone()
    callback = BNSparsity(0.1, 32)
    callback.attach(net)
    callback.on_after_backward(None, SimpleNamespace(net=net))
    assert torch.allclose(bn.weight.grad - grad, 0.1 * torch.sign(bn.weight.detach()))
    assert bn_scales(net)[:bn.num_features].tolist() == pytest.approx(torch.linspace(-1, 1, bn.num_features).tolist())


@pytest.mark.parametrize("overrides", [
    "prune=channel prune.ratio=0", "prune=channel prune.ratio=1", "prune=channel prune.ratio=1.5",
    "prune=channel prune.importance=shuffle", "prune=channel prune.max_layer_ratio=1",
    "prune=channel prune.calibration_batches=0", "prune=slimming prune.sparsity_lambda=-1",
    "prune=slimming prune.baseline_ckpt=model.pt",
])
def test_bad_options_raise(overrides):
    with pytest.raises(ConfigError, match="prune"):
        build(compose(overrides.split()).prune)


def test_ratio_above_the_layer_cap_raises_before_training(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "prune=channel", "backbone=simple_cnn", "prune.ratio=0.7", "prune.max_layer_ratio=0.6"))
    with pytest.raises(ConfigError, match="prune.ratio=0.7 is above prune.max_layer_ratio=0.6"):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("global_pruning", [False, True])
def test_no_layer_is_emptied_even_when_the_ratio_would(global_pruning):
    net = _net("resnet18")   # 0.97 of 64 channels is 62.08: one layer's whole share rounds to all of it
    prune_channels(net, importance="l1", ratio=0.97, global_pruning=global_pruning, max_layer_ratio=0.98,
                   input_size=32)
    assert min(m.out_channels for m in prunable_layers(net).values() if isinstance(m, nn.Conv2d)) >= 1
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("method,extra", [("channel", "prune.importance=taylor"), ("slimming", "prune.sparsity_lambda=0.01")])
def test_end_to_end(tmp_path, fashion_dir, method, extra):
    cfg = compose(tiny(tmp_path, f"prune={method}", "backbone=simple_cnn", extra))
    m = run(cfg)
    assert m["model/params"] < 0.8 * m["baseline/params"]
    assert m["model/flops"] < 0.8 * m["baseline/flops"]
    assert m[f"{method}/params_after"] == m["model/params"] < m[f"{method}/params_before"]
    assert m[f"{method}/channels_removed_share"] > 0.05
    assert m["test/acc"] == pytest.approx(report_accuracy(cfg.tracking.uri), abs=5e-5)
