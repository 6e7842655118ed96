"""On a GPU: eager latency is timed with the model on the GPU and memory is the CUDA peak allocation.

Skipped without CUDA (CI has none). Imports only torch and prunegrid's measurement and model code,
so it runs on a bare GPU machine: ``python -m pytest tests/test_gpu.py --noconftest``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunegrid import measure
from prunegrid.models.backbones import resnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_latency_on_the_gpu_and_cuda_peak_memory(tmp_path):
    net = resnet("resnet18", num_classes=10, input_size=32)
    assert measure.resolve_device("auto", net, 32) == "cuda"
    base = copy.deepcopy(net).cuda()
    assert next(net.parameters()).is_cuda
    c = measure.compare_eager(net, base, 32, measure.Setting("", 1, 1), warmup=5, repeats=40)
    assert c.speedup == pytest.approx(1.0, abs=0.1) and c.ms > 0
    path = measure.save_model(net.cpu(), tmp_path / "m.pt")
    mem = measure.model_memory(path, 32, 32, device="cuda")
    weights_mb = measure.count_params(net) * 4 / 2**20
    assert weights_mb < mem["cuda_peak_mb"] < weights_mb + 256   # the model on the GPU, not the process


def test_an_int8_model_falls_back_to_the_cpu():
    from prunegrid.pruning.quant import quantize_net

    net = resnet("resnet18", num_classes=10, input_size=32).eval()
    q = quantize_net(net, [torch.randn(4, 3, 32, 32)])
    assert measure.resolve_device("auto", q, 32) == "cpu"
