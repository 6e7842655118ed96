"""ONNX export + ONNX Runtime latency for every cell, and the pipeline's fallback when export fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from prunegrid import measure, pipeline, tracking
from prunegrid.config import build, compose
from prunegrid.pruning import l1
from tests.conftest import tiny


def _net(backbone: str, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    net = build(compose([f"backbone={backbone}"]).backbone, num_classes=10, input_size=size)
    net.eval()
    return net


def _check_same(net: nn.Module, path, size: int) -> None:
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).numpy()
    out = measure.onnx_session(path, threads=1).run(None, {"input": x.numpy()})[0]
    assert out.shape == ref.shape  # exported at batch 1: the batch axis is dynamic
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("backbone", ["simple_cnn", "resnet18"])
def test_onnx_matches_pytorch(tmp_path, backbone):
    net = _net(backbone)
    for m in net.modules():  # trained-like BN statistics, so outputs are not all alike
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = measure.export_onnx(net, 32, tmp_path / "m.onnx")
    assert not net.training  # mode restored
    _check_same(net, path, 32)


def test_onnx_of_pruned_model_keeps_zeros_and_predictions(tmp_path):
    import onnx
    from onnx import numpy_helper

    net = _net("simple_cnn")
    l1.l1_prune(net, nn.Conv2d, 0.5, "layerwise")
    l1.make_permanent(net)
    path = measure.export_onnx(net, 32, tmp_path / "p.onnx")
    _check_same(net, path, 32)
    inits = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    conv_zeros = sum(int((w == 0).sum()) for w in inits if w.ndim == 4)
    assert conv_zeros == sum(int((m.weight == 0).sum()) for m in net.modules() if isinstance(m, nn.Conv2d))


def test_onnx_latency_is_a_median_per_image(tmp_path):
    path = measure.export_onnx(_net("simple_cnn"), 32, tmp_path / "m.onnx")
    one = measure.onnx_latency_ms(path, 32, 1, warmup=1, repeats=5, threads=1)
    batch = measure.onnx_latency_ms(path, 32, 8, warmup=1, repeats=3, threads=1)
    assert 0 < one < 1000 and math.isfinite(batch) and 0 < batch < 1000


def test_compressed_size_counts_zeros_file_size_does_not(tmp_path):
    dense = _net("simple_cnn")
    sparse = _net("simple_cnn")
    l1.l1_prune(sparse, nn.Conv2d, 0.9, "layerwise")
    l1.make_permanent(sparse)
    a = measure.file_size_mb(measure.save_model(dense, tmp_path / "d.pt"))
    b = measure.file_size_mb(measure.save_model(sparse, tmp_path / "s.pt"))
    assert abs(a - b) / a < 0.01  # zeros are stored dense: no smaller on disk
    assert measure.compressed_size_mb(sparse) < 0.97 * measure.compressed_size_mb(dense)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def _in_store(root, out: str, *overrides: str) -> list[str]:
    """Tiny-cell overrides sharing one MLflow store (creating a store costs ~10 s), own output dir."""
    return [a for a in tiny(root, *overrides) if not a.startswith("paths.output_dir=")] + [f"paths.output_dir={root}/{out}"]


def _last_run(root):
    uri = f"sqlite:///{root}/mlflow.db"
    return MlflowClient(uri), tracking.load_runs(uri).sort_values("start_time").iloc[-1]


def test_pipeline_logs_onnx_model_and_latency(store, fashion_dir):
    m = pipeline.run(compose(_in_store(store, "ok", "backbone=simple_cnn")))
    client, run = _last_run(store)
    assert m[tracking.ONNX_METRICS[0]] > 0 and run[tracking.ONNX_METRICS[0]] == m[tracking.ONNX_METRICS[0]]
    assert m[tracking.SIZE_COMPRESSED] > 0
    r = client.get_run(run["run_id"])
    assert r.data.tags[tracking.TAG_ONNX_STATUS] == "ok"
    files = {a.path for a in client.list_artifacts(run["run_id"], tracking.ARTIFACT_MODEL_DIR)}
    assert f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.ONNX_FILE}" in files


def test_export_failure_is_recorded_not_fatal(store, fashion_dir, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("Exporting the operator 'quantized::conv2d' to ONNX opset version 17 is not supported\nmore")

    monkeypatch.setattr(measure, "export_onnx", fail)
    m = pipeline.run(compose(_in_store(store, "failing", "backbone=simple_cnn")))
    client, run = _last_run(store)
    r = client.get_run(run["run_id"])
    assert r.info.status == "FINISHED"
    assert tracking.ONNX_METRICS[0] not in m and tracking.ONNX_METRICS[0] not in r.data.metrics
    assert r.data.tags[tracking.TAG_ONNX_STATUS] == ("RuntimeError: Exporting the operator 'quantized::conv2d' "
                                                     "to ONNX opset version 17 is not supported")


def test_compressed_size_of_quantized_state_dict():
    """Quantized layers put non-tensors (dtypes) in their state dict; the size must still be measured."""
    q = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 64)), {nn.Linear}, dtype=torch.qint8)
    assert any(not torch.is_tensor(v) for v in q.state_dict().values())
    assert 0 < measure.compressed_size_mb(q) < measure.compressed_size_mb(nn.Sequential(nn.Linear(64, 64)))
