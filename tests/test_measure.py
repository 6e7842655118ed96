"""Measurement functions against hand-computed values."""

from __future__ import annotations

import pytest
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


def test_latency_and_peak_memory_of_a_block(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    ms = measure.latency_ms(net, 16, batch_size=2, warmup=1, repeats=3, threads=1)
    assert ms > 0
    held = torch.ones(32, 2**20)                    # 128 MB held before the block: not the block's
    with measure.PeakMemory() as mem:
        big = torch.ones(64, 2**20)                 # 256 MB allocated inside it, then freed
        big.add_(1)
        del big
    assert mem.start_mb > 128 and mem.peak_mb > mem.start_mb + 200
    assert 240 < mem.increase_mb < 300
    del held
    path = measure.save_model(net, tmp_path / "m.pt")
    assert measure.file_size_mb(path) > 0
    assert isinstance(measure.load_model(path), nn.Sequential)


def test_threads_restored():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def test_model_memory_is_the_models_own(tmp_path):
    """Measured in a fresh process: a small model measured after a 10x larger one (and while this
    process holds 512 MB) reads only what it adds itself."""
    big, small = _mlp(100_000), _mlp(10_000)                   # ~20.2M and ~2.0M parameters
    assert measure.count_params(big) > 9.99 * measure.count_params(small)
    big_path = measure.save_model(big, tmp_path / "big.pt")
    small_path = measure.save_model(small, tmp_path / "small.pt")
    held = torch.ones(128, 2**20)                              # 512 MB in this process
    m_big = measure.model_memory(big_path, 8, 4)
    m_small = measure.model_memory(small_path, 8, 4)
    del held
    assert m_big["increase_mb"] > 77                            # at least its 20.2M float32 weights
    assert 7.7 < m_small["increase_mb"] < m_big["increase_mb"] / 3
    assert m_small["before_mb"] < 1000 and m_small["peak_mb"] == pytest.approx(
        m_small["before_mb"] + m_small["increase_mb"], abs=0.01)


def test_model_memory_probe_failure_is_one_line(tmp_path):
    bad = tmp_path / "not_a_model.pt"
    bad.write_text("nope")
    with pytest.raises(RuntimeError, match="memory probe exited with 1: "):
        measure.model_memory(bad, 8, 2)


def test_interleaved_rounds_alternate_the_order():
    calls = []
    times = measure.interleaved([lambda: calls.append("A"), lambda: calls.append("B")], rounds=4, warmup=1)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [len(t) for t in times] == [4, 4]


def test_comparison_quartiles_and_paired_speedups():
    model_s = [0.001, 0.002, 0.003, 0.004, 0.010]          # one slow outlier round
    base_s = [0.002, 0.004, 0.006, 0.008, 0.020]            # the same rounds, twice as slow
    c = measure.Comparison.from_times(model_s, base_s, per=2)
    assert c.ms == pytest.approx(1.5) and c.ms_iqr == pytest.approx(1.0)     # ms per image: 0.5 1 1.5 2 5
    assert c.base_ms == pytest.approx(3.0) and c.base_ms_iqr == pytest.approx(2.0)
    assert (c.speedup, c.speedup_q25, c.speedup_q75) == pytest.approx((2.0, 2.0, 2.0))  # paired: noise cancels
    keys = c.metrics("_onnx", "_batch")
    assert keys["time/infer_ms_onnx_batch"] == c.ms and keys["baseline/infer_ms_onnx_batch_iqr"] == c.base_ms_iqr
    assert keys["speedup/infer_onnx_batch_q75"] == 2.0


def test_three_deployments():
    edge, mt, batch = measure.settings(threads=1, threads_all=None, batch_size=16)
    assert (edge.suffix, edge.batch, edge.threads) == ("", 1, 1)
    assert (mt.batch, batch.batch) == (1, 16) and mt.threads == batch.threads == measure.all_threads() >= 1
    assert measure.settings(2, 3, 8)[2] == measure.Setting("_batch", 8, 3)


def _convnet(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_identical_models_read_one_and_a_heavier_baseline_reads_faster():
    import copy

    setting = measure.Setting("", 1, 1)
    net = _convnet(32)
    same = measure.compare_eager(net, copy.deepcopy(net), 32, setting, warmup=5, repeats=60)
    assert same.speedup == pytest.approx(1.0, abs=0.05)
    assert same.speedup_q25 <= 1.0 <= same.speedup_q75
    wide = measure.compare_eager(net, _convnet(128), 32, setting, warmup=5, repeats=30)   # ~16x the conv FLOPs
    assert wide.speedup_q25 > 2.0 and wide.base_ms > wide.ms
