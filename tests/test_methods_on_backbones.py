"""Every method on every backbone: each YAML of ``conf/prune`` × each YAML of ``conf/backbone``.

For each pair, at the backbone's smallest input, on a few images: the method accepts the backbone
(or refuses it in one line naming a capability the contract really lacks), then every hook runs
in the pipeline's order (``check → before_fit → fit → after_fit → fine-tune → to_onnx → report``)
with a real Lightning fit of one batch, the final model reloads safely (``weights_only``) and gives
the same logits, the ONNX model runs in ONNX Runtime, and a float model
gives a Grad-CAM map at its declared layer. A new YAML in either group is tested with no new code.
The pairs of the methods that train or export a full copy with the largest backbones (:data:`BIG`)
are ``slow``.

Also: no module outside ``prunegrid.models`` reads a ``Net`` attribute the contract does not
declare (``prunegrid.models.net.DECLARED``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunegrid import measure
from prunegrid.config import build, compose, options
from prunegrid.errors import ConfigError
from prunegrid.explain.gradcam import gradcam, target_layer
from prunegrid.models.module import Classifier
from prunegrid.models.net import CAPABILITIES, DECLARED, FLOAT, Net
from prunegrid.pruning.base import Context

SRC = Path(__file__).resolve().parents[1] / "src" / "prunegrid"
CLASSES, N = 3, 4
_NETS: dict[str, tuple[Net, int]] = {}
_TRAINED: dict[str, Net] = {}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _backbone(option: str) -> tuple[Net, int]:
    """A fresh copy of the backbone at its smallest input (each is built once per session)."""
    if option not in _NETS:
        cfg = compose([f"backbone={option}"]).backbone
        size = int(cfg.min_input_size)
        torch.manual_seed(0)
        _NETS[option] = (build(cfg, num_classes=CLASSES, input_size=size), size)
    net, size = _NETS[option]
    return copy.deepcopy(net), size


class Recorder:
    """A :class:`Context` on a few random images, with a real Lightning fit of one batch."""

    def __init__(self, size: int, tmp_path: Path, loss: nn.Module):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, size, size, generator=g)
        self.y = torch.arange(N) % CLASSES
        self.loss, self.logged = loss, {}
        self.ctx = Context(num_classes=CLASSES, input_size=size, seed=0, fit=self.fit, evaluate=self.evaluate,
                           loader=self.loader, log_metrics=self.logged.update, log_artifact=lambda p, a=None: None,
                           artifact_dir=tmp_path, extras={"cfg": compose([])}, loss=loss)

    def loader(self, split: str, shuffle: bool | None = None) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=N // 2)

    def fit(self, net: nn.Module, epochs: int, callbacks=(), **_) -> nn.Module:
        module = Classifier(net, self.loss, lambda p: torch.optim.AdamW(p, lr=1e-3), None, CLASSES)
        trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=list(callbacks), accelerator="cpu")
        trainer.fit(module, self.loader("train"), self.loader("val"))
        return module.net

    @torch.no_grad()
    def evaluate(self, net: nn.Module, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        was = net.training
        net.eval()
        logits = net(self.x)
        net.train(was)
        return {"acc": float((logits.argmax(1) == self.y).float().mean()), "loss": float(self.loss(logits, self.y))}


# Backbones of 20M parameters or more: their pairs with the methods that train or export a full
# copy (8-60 s each on 2 cores) run with the slow tests; prune=none, layer_importance and slimming
# on them (under 5 s) stay in the default run.
BIG = {"vgg19", "efficientnet_b5", "resnet34", "resnet50", "se_resnet50", "sse_resnet50", "xception"}
QUICK_ON_BIG = {"none", "layer_importance", "slimming"}
HEAVIEST = {("none", "vgg19")}  # 139M parameters kept dense: save, load and ONNX export take ~20 s
PAIRS = [pytest.param(p, b, marks=[pytest.mark.slow] if (b in BIG and p not in QUICK_ON_BIG) or (p, b) in HEAVIEST
                      else []) for p in options("prune") for b in options("backbone", "classification")]


@pytest.mark.parametrize("prune, backbone", PAIRS)
def test_every_method_runs_on_every_backbone(prune, backbone, tmp_path):
    import onnxruntime as ort

    cfg = compose([f"backbone={backbone}", f"prune={prune}"])
    method = build(cfg.prune)
    net, size = _backbone(backbone)
    rec = Recorder(size, tmp_path, build(cfg.loss))
    ctx = rec.ctx
    try:
        method.serves(net)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        missing = net.contract.missing(method.requires)
        assert missing and all(CAPABILITIES[m] in str(exc) for m in missing)
        return
    try:
        method.check(net, ctx)
    except ConfigError as exc:     # a library cannot handle this backbone: refused before training, with the reason
        assert "\n" not in str(exc) and f"prune={method.name} cannot serve backbone {net.arch}" in str(exc), exc
        return
    if method.from_baseline:   # one trained baseline per backbone, as the grid reuses the prune=none cell's model
        if backbone not in _TRAINED:
            _TRAINED[backbone] = rec.fit(net, 1)
        net = copy.deepcopy(_TRAINED[backbone])
    else:
        net = rec.fit(method.before_fit(net, ctx), 1, method.callbacks(ctx))
    net = method.after_fit(net, ctx)
    if method.finetune_epochs:
        net = rec.fit(net, method.finetune_epochs, method.finetune_callbacks(ctx))

    assert isinstance(net, Net) and net.contract is not None and net.contract.input_size == size
    with torch.no_grad():
        out = net.eval()(rec.x)
    assert out.shape == (N, CLASSES) and torch.isfinite(out).all()
    assert tuple(net.features(rec.x).shape[1:]) == net.contract.units[-1].out_shape   # the contract is true
    loaded = measure.load_model(measure.save_model(net, tmp_path / "model.pt"))   # weights_only, no code run
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(rec.x), out, atol=1e-5)
    assert loaded.contract == net.contract

    onnx_path = method.to_onnx(net, size, tmp_path / "model.onnx")
    sess = measure.onnx_session(onnx_path)
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: rec.x.numpy()})
    assert logits.shape == (N, CLASSES) and np.isfinite(logits).all()
    assert isinstance(sess, ort.InferenceSession)

    metrics = {**rec.logged, **method.report(net, ctx)}
    own = f"{method.namespace or method.name}/"
    assert all(k.startswith(own) for k in metrics), sorted(k for k in metrics if not k.startswith(own))
    if method.name != "none":
        assert metrics, f"prune={prune} reported no metric of its own"

    explained, stand_in = method.explained(net)
    assert FLOAT in explained.contract.capabilities, f"prune={prune} gives Grad-CAM a model without gradients"
    assert (explained is net) == (stand_in is None)
    name, layer = target_layer(explained, None, size)
    maps, cam_logits = gradcam(explained, rec.x[:2], layer, [0, 1])
    hw = explained.contract.unit(name.split(".", 1)[1]).map_size
    assert maps.shape == (2, size, size) and hw is not None and cam_logits.shape == (2, CLASSES)
    assert np.isfinite(maps).all() and maps.max() <= 1.0 + 1e-6


def test_a_backbone_torch_pruning_cannot_trace_is_refused_before_training(tmp_path):
    net = build(compose(["backbone=torchvision", "backbone.arch=shufflenet_v2_x0_5"]).backbone, num_classes=3,
                input_size=32)
    with pytest.raises(ConfigError, match=r"prune=channel cannot serve backbone shufflenet_v2_x0_5: torch-pruning "
                                          r"cannot trace its channel dependencies \(ZeroDivisionError") as err:
        build(compose(["prune=channel"]).prune).check(net, Recorder(32, tmp_path, nn.CrossEntropyLoss()).ctx)
    assert "\n" not in str(err.value)


# -- the contract is the only way in ----------------------------------------------------------

RECEIVERS = r"(?<![.\w])(?:net|base|baseline_net|start_net|new|explained)"
NN_MODULE = frozenset(dir(nn.Module)) | {"training"}


def _reads(root: Path = SRC) -> list[tuple[str, int, str]]:
    """``(file, line, attribute)`` of every attribute read on a net outside ``prunegrid.models``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        if "models" in path.relative_to(root).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            for attr in re.findall(rf"\b{RECEIVERS}\.([A-Za-z_]\w*)", line):
                out.append((str(path.relative_to(root)), i, attr))
            for attr in re.findall(rf"(?:getattr|hasattr)\(\s*{RECEIVERS}\s*,\s*['\"](\w+)", line):
                out.append((str(path.relative_to(root)), i, f"getattr:{attr}"))
    return out


def test_no_module_outside_models_reads_an_undeclared_net_attribute():
    reads = _reads()
    assert any(attr == "contract" for _, _, attr in reads)   # the scan sees the code that reads the contract
    undeclared = [(f, i, a) for f, i, a in reads if a not in DECLARED and a not in NN_MODULE]
    assert not undeclared, undeclared


def test_the_scan_catches_an_undeclared_read(tmp_path):
    (tmp_path / "pruning").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "pruning" / "odd.py").write_text("def f(net):\n    return net.cam_layer(), getattr(net, 'stem')\n")
    (tmp_path / "models" / "own.py").write_text("def g(net):\n    return net.anything\n")
    assert [a for _, _, a in _reads(tmp_path)] == ["cam_layer", "getattr:stem"]
