"""``quant_int8``: INT8 outputs close to the float model, honest counts / FLOPs / file size, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunegrid import measure
from prunegrid.config import build, compose
from prunegrid.errors import ConfigError
from prunegrid.models.net import Net
from prunegrid.pipeline import run
from prunegrid.pruning.quant import QuantInt8, float_layers, quantize_net, quantized_layers
from tests.conftest import report_accuracy, tiny


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, fashion_dir):
    """Real Fashion-MNIST batches at 32 px: a few training batches and one test batch."""
    cfg = compose(tiny(tmp_path_factory.mktemp("q"), "dataset.subset=512", "dataset.batch_size=32"))
    data = build(cfg.dataset, seed=0)
    data.setup()
    train = [b for _, b in zip(range(12), data.loader("train", shuffle=True))]
    test_x = torch.cat([x for _, (x, _) in zip(range(4), data.loader("test", shuffle=False))])[:128]
    return train, test_x


def _net(backbone: str) -> nn.Module:
    torch.manual_seed(0)
    return build(compose([f"backbone={backbone}"]).backbone, num_classes=10, input_size=32)


def test_int8_agrees_with_float_after_tiny_training(fashion):
    train, test_x = fashion
    net = _net("simple_cnn")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for x, y in train:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    q = quantize_net(net, [x for x, _ in train[:4]])
    with torch.no_grad():
        ref, out = net(test_x), q(test_x)
    assert isinstance(q, Net) and q.arch == "simple_cnn" and q is not net
    assert quantized_layers(q) == 5 and float_layers(q) == 0
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    assert nn.functional.cosine_similarity(ref, out).mean() > 0.99
    assert not torch.equal(ref, out)  # it really runs in INT8


def test_resnet18_counts_flops_size_and_reload(fashion, tmp_path):
    train, test_x = fashion
    net = _net("resnet18").eval()
    q = quantize_net(net, [x for x, _ in train[:2]])
    with torch.no_grad():
        assert nn.functional.cosine_similarity(net(test_x), q(test_x)).mean() > 0.99
    bn_scales = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    int8 = sum(t.numel() for t in measure.weight_tensors(q, declared=False))
    assert int8 == measure.count_params(net) - bn_scales  # BN folded: its shift is the conv bias
    # quantization removes no parameter: the INT8 graphs declare the float model's counts
    assert measure.count_params(q) == measure.count_params(net)
    assert measure.count_nonzero_params(q) == measure.count_nonzero_params(net)
    assert measure.flops(q, 32) == measure.flops(net, 32) > 0
    f_path, q_path = measure.save_model(net, tmp_path / "f.pt"), measure.save_model(q, tmp_path / "q.pt")
    assert measure.file_size_mb(q_path) < 0.3 * measure.file_size_mb(f_path)
    loaded = measure.load_model(q_path)  # runs as TorchScript; counted and timed the same way
    with torch.no_grad():
        assert torch.allclose(loaded(test_x[:8]), q(test_x[:8]))
    assert measure.static_metrics(loaded, 32) == measure.static_metrics(q, 32)


def test_float_counts_unchanged_and_shared_layers_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert measure.count_params(model) == 20
    conv = nn.Conv2d(3, 8, 3)
    assert measure.count_params(conv) == 8 * 27 + 8
    assert measure.flops(conv, 5) == 2 * 8 * 27 * 9


class _Untraceable(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow: FX cannot trace it


@pytest.mark.parametrize("kwargs", [{"backend": "tpu"}, {"finetune_epochs": 1}, {"calibration_batches": 0}])
def test_bad_options(kwargs):
    with pytest.raises(ConfigError, match="prune"):
        QuantInt8(**kwargs)


def test_untraceable_backbone_fails_before_training():
    net = _net("simple_cnn")
    net.features.add_module("odd", _Untraceable())
    net.declare(32)
    with pytest.raises(ConfigError, match="prune=quant_int8 cannot serve backbone simple_cnn: it needs a graph "
                                          "torch.fx can trace") as err:
        QuantInt8().serves(net)
    assert "\n" not in str(err.value)


def test_end_to_end(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "prune=quant_int8", "backbone=simple_cnn", "prune.calibration_batches=2"))
    m = run(cfg)
    assert m["quant_int8/quantized_layers"] == 5 and m["quant_int8/float_layers"] == 0
    assert m["model/flops"] == m["baseline/flops"]
    assert m["model/params"] == m["model/params_nonzero"] == m["baseline/params"]   # quantization removes nothing
    assert m["quant_int8/int8_zero_share"] < 0.1
    # ONNX Runtime times its own INT8 model (onnxruntime static quantization) against the float ONNX baseline
    import onnx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run_id = client.search_runs([e.experiment_id for e in client.search_experiments()])[0].info.run_id
    assert client.get_run(run_id).data.tags["onnx_status"] == "ok"
    model = onnx.load(client.download_artifacts(run_id, "model/model.onnx", str(tmp_path)))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert m["time/infer_ms_onnx"] > 0 and m["baseline/infer_ms_onnx"] > 0 and "speedup/infer_onnx_q25" in m
    assert abs(m["quant_int8/val_acc_int8_onnx"] - m["quant_int8/val_acc_float"]) <= 0.1
    assert abs(m["quant_int8/val_acc_int8"] - m["quant_int8/val_acc_float"]) <= 0.1
    # Grad-CAM draws the float model it was quantized from, says so, and computes no agreement for it
    tags = client.get_run(run_id).data.tags
    assert "gradcam.png" in {a.path for a in client.list_artifacts(run_id)}
    assert tags["cam_agreement_status"].startswith("skipped: the figure explains the float model before INT8")
    assert "explain/cam_agreement" not in m
    assert m["test/acc"] == pytest.approx(report_accuracy(cfg.tracking.uri), abs=5e-5)
