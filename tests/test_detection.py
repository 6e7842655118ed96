"""Detection: YOLOv5 as published, its loss, NMS, mAP against hand-computed values, L1 pruning
on a detector, and every method on every detector (runs or is refused in one line)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prunegrid import measure
from prunegrid.config import build, compose, options
from prunegrid.detection.module import DetectionMetrics, Detector, non_max_suppression, precision_recall
from prunegrid.errors import ConfigError
from prunegrid.models.net import CAPABILITIES
from prunegrid.pruning.base import Context

DETECTORS = options("backbone", "detection")
# Ju & Kang, Table 1 (80 COCO classes, 640 px): YOLOv5m 21,190,557 parameters, 49.2 GFLOPs; YOLOv5n
# about 1.87 M parameters, 4.6 GFLOPs.
PAPER = {"yolov5n": (1.87e6, 4.6e9), "yolov5m": (21_190_557, 49.2e9)}


def detector(option: str = "yolov5n", num_classes: int = 3, input_size: int = 64):
    cfg = compose(["task=detection", f"backbone={option}"])
    return build(cfg.backbone, num_classes=num_classes, input_size=input_size)


def test_every_detector_yaml_is_a_detector():
    assert set(PAPER) <= set(DETECTORS)


@pytest.mark.parametrize("option", sorted(PAPER))
def test_parameters_and_flops_at_640_match_the_paper(option):
    net = detector(option, num_classes=80, input_size=640)
    params, gflops = PAPER[option]
    assert abs(measure.count_params(net) - params) / params < 0.05
    assert abs(measure.flops(net.eval(), 640) - gflops) / gflops < 0.05
    assert net.head.stride.tolist() == [8.0, 16.0, 32.0]


@pytest.mark.parametrize("option", DETECTORS)
def test_forward_shapes_and_one_training_step(option):
    torch.manual_seed(0)
    net = detector(option, num_classes=3, input_size=64)
    loss_fn = build(compose(["task=detection"]).loss)
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    net.train()
    raw = net(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 8), (2, 3, 2, 2, 8)]
    loss, parts = loss_fn(raw, targets, net.head)
    loss.backward()
    assert torch.isfinite(loss) and parts.shape == (3,) and (parts > 0).all()
    pred = net.eval()(x)
    assert pred.shape == (2, 3 * (64 + 16 + 4), 8)
    assert net.contract.input_size == 64 and not net.contract.removable()


def test_input_size_must_be_a_multiple_of_the_stride():
    with pytest.raises(ConfigError, match="multiple of 32") as err:
        detector(input_size=80)
    assert "\n" not in str(err.value)


def test_a_detector_needs_task_detection():
    with pytest.raises(ConfigError, match="backbone=yolov5n is made for task=detection.*add task=detection"):
        compose(["backbone=yolov5n"])
    with pytest.raises(ConfigError, match="backbone=resnet18 is made for task=classification"):
        compose(["task=detection", "backbone=resnet18"])


def test_pretrained_offline_is_one_line(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    cfg = compose(["task=detection", "backbone.pretrained=true"])
    with pytest.raises(ConfigError, match="cannot fetch pretrained yolov5n.*backbone.weights_path") as err:
        build(cfg.backbone, num_classes=3, input_size=64)
    assert "\n" not in str(err.value)


def test_original_state_dict_keys_load(tmp_path):
    a = detector()
    original = {("model.24." + k[5:]) if k.startswith("head.") else "model." + k[len("features."):]: v
                for k, v in a.state_dict().items()}
    torch.save(original, tmp_path / "yolov5n.pt")
    cfg = compose(["task=detection", f"backbone.weights_path={tmp_path / 'yolov5n.pt'}"])
    b = build(cfg.backbone, num_classes=3, input_size=64)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# -- NMS and metrics ---------------------------------------------------------------------------

def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    # decoded rows: cx, cy, w, h, objectness, p(class 0), p(class 1)
    pred = torch.tensor([[[20, 20, 10, 10, 0.9, 0.9, 0.1],
                          [21, 20, 10, 10, 0.8, 0.9, 0.1],   # IoU 0.82 with the first: suppressed
                          [21, 20, 10, 10, 0.8, 0.1, 0.9],   # the other class: kept
                          [50, 50, 10, 10, 0.1, 0.9, 0.1]]])  # score 0.09 < conf
    (d,) = non_max_suppression(pred, conf=0.25, iou=0.5)
    assert d.shape == (2, 6)
    assert torch.allclose(d[0], torch.tensor([15, 15, 25, 25, 0.81, 0]))
    assert torch.allclose(d[1], torch.tensor([16, 15, 26, 25, 0.72, 1]))


def test_map50_perfect_and_one_shifted_box():
    gts = [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([0])},
           {"boxes": torch.tensor([[20.0, 20, 60, 60]]), "labels": torch.tensor([0])}]
    perfect = DetectionMetrics(2)
    perfect.update([torch.tensor([[10.0, 10, 50, 50, 0.9, 0]]), torch.tensor([[20.0, 20, 60, 60, 0.8, 0]])], gts)
    r = perfect.compute()
    assert r["map50"] == pytest.approx(1.0) and r["ap50"][0] == pytest.approx(1.0)
    assert r["precision"][0] == 1.0 and r["recall"][0] == 1.0
    shifted = DetectionMetrics(2)
    # the second box shifted 20 px right: IoU = 20*40 / (2*1600 - 800) = 1/3 < 0.5, a false positive.
    # Ranked: TP (P 1, R 0.5), FP (P 0.5, R 0.5); COCO's 101 recall points: 51 at precision 1, 50 at 0.
    shifted.update([torch.tensor([[10.0, 10, 50, 50, 0.9, 0]]), torch.tensor([[40.0, 20, 80, 60, 0.8, 0]])], gts)
    r = shifted.compute()
    assert r["map50"] == pytest.approx(51 / 101, abs=1e-6)
    assert r["precision"][0] == 0.5 and r["recall"][0] == 0.5


def test_precision_recall_reads_only_detections_above_conf():
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}]
    dets = [torch.tensor([[0.0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.2, 1], [40, 40, 50, 50, 0.6, 1]])]
    p, r = precision_recall(dets, gts, 2, conf=0.5)
    assert p.tolist() == [1.0, 0.0] and r.tolist() == [1.0, 0.0]


# -- L1 pruning on a detector (Ju & Kang, Algorithm 1) -----------------------------------------

class RandomBoxes(Dataset):
    """Images with one bright square each, and its box."""

    def __init__(self, n: int = 8, size: int = 64):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            x = torch.rand(3, size, size, generator=g) * 0.2
            s = int(torch.randint(12, 28, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            x[:, y0:y0 + s, x0:x0 + s] = 1.0
            self.items.append((x, torch.tensor([[i % 3, (x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size]])))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    targets = torch.cat([torch.cat((torch.full((len(b[1]), 1), float(i)), b[1]), 1) for i, b in enumerate(batch)])
    return images, targets


def fake_ctx(tmp_path, logged: dict) -> Context:
    loader = lambda split, shuffle=None, batch_size=None: DataLoader(RandomBoxes(), batch_size=4, collate_fn=collate)
    return Context(num_classes=3, input_size=64, seed=0, fit=None, evaluate=None, loader=loader,
                   log_metrics=logged.update, log_artifact=lambda p, a=None: None, artifact_dir=tmp_path,
                   extras={"cfg": compose(["task=detection", "trainer.max_epochs=3"])})


def fit(net, epochs: int, callbacks=()):
    loss = build(compose(["task=detection"]).loss)
    module = Detector(net, loss, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), None, 3)
    loader = DataLoader(RandomBoxes(), batch_size=4, collate_fn=collate)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        accelerator="cpu", limit_val_batches=1)
    trainer.fit(module, loader, loader)
    return module.net, trainer


def zeros_per_layer(net, kind):
    return [(int((m.weight == 0).sum()), m.weight.numel()) for m in net.modules() if isinstance(m, kind)]


def test_l1_static_reaches_the_amounts_on_yolov5n(tmp_path):
    torch.manual_seed(0)
    net = detector()
    method = build(compose(["task=detection", "prune=l1_static", "prune.amount=0.4", "prune.bn_amount=0.3"]).prune)
    method.serves(net)
    logged = {}
    ctx = fake_ctx(tmp_path, logged)
    net, _ = fit(method.before_fit(net, ctx), 1)
    net = method.after_fit(net, ctx)
    convs, bns = zeros_per_layer(net, nn.Conv2d), zeros_per_layer(net, nn.BatchNorm2d)
    # 57 Conv blocks (5 strided, 26 in the backbone's C3s, 2 in SPPF, 4 + 20 in the neck) + Detect's three convs
    assert len(convs) == 60 and len(bns) == 57
    # torch.nn.utils.prune removes round(amount * n) weights of each layer; held masks keep them zero
    assert all(z >= round(0.4 * n) and z <= round(0.4 * n) + 1 for z, n in convs)
    assert all(z >= round(0.3 * n) and z <= round(0.3 * n) + 1 for z, n in bns)
    report = method.report(net, ctx)
    assert report["l1/conv_sparsity"] == pytest.approx(0.4, abs=2e-3)
    assert report["l1/bn_sparsity"] == pytest.approx(0.3, abs=5e-3)


def test_l1_dynamic_paper_loop_holds_the_amounts_every_epoch(tmp_path):
    torch.manual_seed(0)
    net = detector()
    method = build(compose(["task=detection", "prune=l1_dynamic", "trainer.max_epochs=3"]).prune)
    ctx = fake_ctx(tmp_path, {})
    callbacks = method.callbacks(ctx)
    net, _ = fit(method.before_fit(net, ctx), 3, callbacks)
    history = callbacks[0].history
    assert len(history) == 3
    for h in history:     # right after each epoch's pruning: Algorithm 1's amounts
        assert h["l1/conv_sparsity"] == pytest.approx(0.4, abs=2e-3)
        assert h["l1/bn_sparsity"] == pytest.approx(0.3, abs=5e-3)
    regrown = measure.layer_sparsity(net, nn.Conv2d)
    assert regrown < 0.4        # pruned weights regrow during an epoch (permanent pruning, no masks)
    net = method.after_fit(net, ctx)
    assert measure.layer_sparsity(net, nn.Conv2d) == pytest.approx(0.4, abs=2e-3)


# -- every method on every detector ------------------------------------------------------------

# YOLOv5m (21 M parameters) with a method that trains it: tens of seconds each on 2 cores, in the slow run;
# the methods refused on sight stay in the default run for every detector.
PAIRS = [pytest.param(p, d, marks=[pytest.mark.slow] if d == "yolov5m" and p not in ("quant_int8", "layer_importance",
                                                                                   "channel", "slimming") else [])
         for p in options("prune") for d in DETECTORS]


@pytest.mark.parametrize("prune, option", PAIRS)
def test_every_method_runs_on_a_detector_or_is_refused_in_one_line(prune, option, tmp_path):
    net = detector(option)
    method = build(compose(["task=detection", f"backbone={option}", f"prune={prune}"]).prune)
    ctx = fake_ctx(tmp_path, {})
    try:
        method.serves(net)
        method.check(net, ctx)
    except ConfigError as exc:
        assert "\n" not in str(exc) and f"prune={method.name} cannot serve backbone {option}" in str(exc), exc
        missing = net.contract.missing(method.requires)
        assert all(CAPABILITIES[m] in str(exc) for m in missing)
        return
    base = copy.deepcopy(net)
    if method.from_baseline:
        net, _ = fit(net, 1)
    else:
        net, _ = fit(method.before_fit(net, ctx), 1, method.callbacks(ctx))
    net = method.after_fit(net, ctx)
    if method.finetune_epochs:
        net, _ = fit(net, 1, method.finetune_callbacks(ctx))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape[0] == 2 and out.shape[-1] == 8 and torch.isfinite(out).all()
    assert measure.count_params(net) <= measure.count_params(base)
    loaded = measure.load_model(measure.save_model(net, tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), out, atol=1e-5)
