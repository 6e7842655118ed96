"""Measurement functions against hand-computed values."""

from __future__ import annotations

import torch
from torch import nn

from prunegrid import measure


def test_params_of_known_layers():
    conv = nn.Conv2d(3, 8, 3)                    # 8*3*3*3 + 8
    lin = nn.Linear(10, 4)                        # 40 + 4
    assert measure.count_params(conv) == 224
    assert measure.count_params(nn.Sequential(conv, lin)) == 268


def test_shared_module_counts_once():
    lin = nn.Linear(5, 5)
    assert measure.count_params(nn.Sequential(lin, lin)) == 30


def test_sparsity_of_tensor_with_known_zeros():
    t = torch.ones(10, 10)
    t[:3] = 0                                     # 30 of 100 zeros
    assert measure.sparsity([t]) == 0.3
    assert measure.sparsity([t, torch.zeros(50)]) == 80 / 150
    assert measure.sparsity([]) == 0.0


def test_nonzero_params_and_layer_sparsity():
    net = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1))
        net[1].weight.copy_(torch.tensor([0.0, 0.0]))
    assert measure.count_nonzero_params(net) == 3                # 3 conv ones; BN weight and bias all zero
    assert measure.layer_sparsity(net, nn.Conv2d) == 0.5
    assert measure.layer_sparsity(net, nn.BatchNorm2d) == 1.0
    static = measure.static_metrics(net, 4)
    assert static["model/params"] == 10 and static["model/sparsity"] == 0.7


def test_flops_of_conv_and_linear():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # 2 * (8*3*3*3) MACs per pixel * 16 pixels
    assert measure.flops(conv, 4) == 2 * 8 * 27 * 16
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5, bias=False))
    assert measure.flops(lin, 2) == 2 * 12 * 5


def test_latency_and_peak_memory_are_positive(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    ms = measure.latency_ms(net, 16, batch_size=2, warmup=1, repeats=3, threads=1)
    assert ms > 0
    with measure.PeakMemory() as mem:
        big = torch.ones(64, 2**20)                 # 256 MB held while sampled
        big.add_(1)
    assert mem.peak_mb > 200
    path = measure.save_model(net, tmp_path / "m.pt")
    assert measure.file_size_mb(path) > 0
    assert isinstance(measure.load_model(path), nn.Sequential)


def test_threads_restored():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
