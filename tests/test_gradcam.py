"""Grad-CAM for every run (BaiNa & Joe (explainable channel attention)): agreement measures, target layers, a patch task, the pipeline and CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from prunegrid import measure, pipeline, tracking
from prunegrid.config import build, compose
from prunegrid.errors import ConfigError
from prunegrid.explain.__main__ import classes_from_report, main
from prunegrid.explain.gradcam import (agreement, baseline_model, fixed_images, gradcam, log_run_explanations, pearson,
                                       target_layer, top_iou, top_region, cam_layers)
from prunegrid.models.backbones import resnet, simple_cnn
from prunegrid.models.net import ClassifierHead, Net

from tests.conftest import tiny


# -- pure measures ----------------------------------------------------------------------------
def test_top_region_iou_and_pearson_by_hand():
    a = np.arange(10, dtype=float)                        # top 20% = indices 9, 8
    b = np.array([0, 1, 2, 3, 4, 5, 6, 8, 0, 9], float)  # top 20% = indices 9, 7
    assert top_region(a).nonzero()[0].tolist() == [8, 9]
    assert top_iou(a, b) == pytest.approx(1 / 3)
    assert top_iou(a, a) == 1.0
    assert top_iou(a, a[::-1].copy()) == 0.0
    assert pearson(a, 2 * a + 3) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, b) == pytest.approx(float(np.corrcoef(a, b)[0, 1]))
    flat = np.zeros((4, 4))
    assert pearson(flat, flat) == 1.0 and pearson(flat, np.eye(4)) == 0.0
    iou, r = agreement([a, a], [a, b])
    assert iou == pytest.approx((1 + 1 / 3) / 2) and r == pytest.approx((1 + np.corrcoef(a, b)[0, 1]) / 2)
    with pytest.raises(ValueError):
        top_iou(np.zeros(4), np.zeros(5))


# -- target layers ------------------------------------------------------------------------------
def test_target_layer_defaults_to_last_unit_with_a_spatial_map():
    net = resnet("resnet18", num_classes=3, input_size=32)
    assert target_layer(net, None, 64)[0] == "features.layer4_1"     # 2x2 map at 64 px
    assert target_layer(net, None, 32)[0] == "features.layer3_1"     # layer4 is 1x1 at 32 px
    net.features.layer4_1 = nn.Identity()                            # rebuilt: the last real unit
    assert target_layer(net, None, 64) == ("features.layer4_0", net.features.layer4_0)
    assert target_layer(net, "features.layer2_0")[1] is net.features.layer2_0
    with pytest.raises(ConfigError, match="explain.target_layer=features.nope"):
        target_layer(net, "features.nope")


def test_agreement_layers_need_4x4_maps_at_the_same_stage():
    base = resnet("resnet18", num_classes=3, input_size=32)
    # resnet18 at 32 px: stem and layer1 8x8, layer2 4x4, layer3 2x2, layer4 1x1
    (name, layer), (b_name, _), status = cam_layers(base, base, 32)
    assert name == b_name == "features.layer2_1" and status.startswith("ok") and "4x4" in status
    assert cam_layers(base, base, 32, min_map=8)[1][0] == "features.layer1_1"

    rebuilt = resnet("resnet18", num_classes=3, input_size=32)      # a rebuilt model: layer2_1 removed
    rebuilt.features.layer2_1 = nn.Identity()
    rebuilt.declare(32)
    (name, _), (b_name, _), _ = cam_layers(rebuilt, base, 32)
    assert (name, b_name) == ("features.layer2_0", "features.layer2_1")   # same 4x4 stage, other unit

    shallow = resnet("resnet18", num_classes=3, input_size=32)     # nothing left at the baseline's 4x4 stage
    for unit in ("layer2_0", "layer2_1", "layer3_0", "layer3_1", "layer4_0", "layer4_1"):
        setattr(shallow.features, unit, nn.Identity())
    shallow.head = ClassifierHead(64, 3)
    shallow.declare(32)                                             # a changed structure is re-declared
    (name, _), b, status = cam_layers(shallow, base, 32)
    assert b is None and status.startswith("skipped: this model has no unit with 4x4 maps")
    assert name == "features.layer1_1"                                # its own figure still gets a layer

    (_, _), b, status = cam_layers(base, base, 32, path="features.layer3_1")   # 2x2: meaningless
    assert b is None and "2x2 maps at 32 px, under explain.min_map=4" in status


# -- a task where the evidence is known ---------------------------------------------------------
SIZE, PATCH = 32, 8
CORNERS = [(2, 2), (SIZE - 2 - PATCH, SIZE - 2 - PATCH)]   # class 0: top-left patch, class 1: bottom-right


def _patch_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 0.5
    y = torch.randint(0, 2, (n,), generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = CORNERS[label]
        x[i, :, r:r + PATCH, c:c + PATCH] = 1.0
    return x, y


def test_gradcam_peak_falls_inside_the_deciding_patch():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = simple_cnn(num_classes=2, input_size=SIZE, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            x, y = _patch_images(32, gen)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    x, y = _patch_images(64, gen)
    name, layer = target_layer(net, None, SIZE)
    maps, logits = gradcam(net, x, layer, y.tolist())
    assert name == "features.pool2" and maps.shape == (64, SIZE, SIZE)
    assert (logits.argmax(1) == y).float().mean() > 0.9
    hits = 0
    for m, label in zip(maps, y.tolist()):
        r, c = np.unravel_index(np.argmax(m), m.shape)
        top, left = CORNERS[label]
        hits += top <= r < top + PATCH and left <= c < left + PATCH
    assert hits / len(y) >= 0.7, f"Grad-CAM peak inside the patch for only {hits}/{len(y)} images"
    assert not any(p.grad is not None for p in net.parameters()), "gradients must be cleared after Grad-CAM"


def test_agreement_of_a_model_with_itself_is_one():
    torch.manual_seed(0)
    net = simple_cnn(num_classes=3, input_size=32)
    x = torch.randn(5, 3, 32, 32)
    _, layer = target_layer(net, None, 32)
    a, _ = gradcam(net, x, layer, [0, 1, 2, 0, 1])
    b, _ = gradcam(net, x, layer, [0, 1, 2, 0, 1])
    assert agreement(a, b) == (1.0, pytest.approx(1.0))
    assert net.training, "train/eval mode is restored"
    other = simple_cnn(num_classes=3, input_size=32)
    c, _ = gradcam(other, x, target_layer(other, None, 32)[1], [0, 1, 2, 0, 1])
    assert agreement(a, c)[0] < 1.0


def test_fixed_images_are_the_same_for_any_subset_and_seed(fashion_dir):
    cfg = compose([f"paths.data_dir={fashion_dir.parent}"])
    picks = []
    for seed, subset in ((1, 64), (2, 200)):
        data = build(cfg.dataset, seed=seed, subset=subset)
        data.setup()
        x, labels, idx = fixed_images(data.full_test, data.transform(False), 8, seed=0)
        picks.append((x, labels, idx))
    assert picks[0][2] == picks[1][2] and picks[0][1] == picks[1][1]
    assert torch.equal(picks[0][0], picks[1][0]) and picks[0][0].shape == (8, 3, 32, 32)


def _explain(net, ecfg, tr):
    test = [(torch.zeros(3, 4, 4), 0), (torch.ones(3, 4, 4), 1)]
    cell = {"backbone": "pool_only", "prune": "l1_static", "dataset": "toy", "loss": "cross_entropy", "seed": "0"}
    return log_run_explanations(net, test=test, transform=lambda img: img, classes=["a", "b"], normalized=False,
                                cell=cell, input_size=4, ecfg=ecfg, tr=tr)


def test_disabled_explain_does_nothing():
    assert _explain(None, compose(["explain.enabled=false"]).explain, None) == {}


def test_model_without_float_weights_is_skipped_with_a_reason():
    tags: dict = {}
    no_float = Net([("pool", nn.MaxPool2d(2))], nn.Flatten(), [["pool"]], "pool_only", 3, input_size=4)
    assert _explain(no_float, compose([]).explain, SimpleNamespace(set_tags=tags.update)) == {}
    assert "no float parameters" in tags[tracking.TAG_EXPLAIN_STATUS]


def test_classes_from_report():
    text = ("              precision    recall  f1-score   support\n\n"
            " T-shirt/top     0.5000    1.0000    0.6667         1\n"
            "  Ankle boot     0.0000    0.0000    0.0000         1\n\n"
            "    accuracy                         0.5000         2\n")
    assert classes_from_report(text, 2) == ["T-shirt/top", "Ankle boot"]
    assert classes_from_report("", 2) == ["class 0", "class 1"]


# -- one tiny run end to end, then the CLI on its model -----------------------------------------
@pytest.fixture(scope="module")
def none_run(tmp_path_factory, fashion_dir):
    tmp = tmp_path_factory.mktemp("camrun")
    metrics = pipeline.run(compose(tiny(tmp, "backbone=simple_cnn")))
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = tracking.load_runs(uri)
    return tmp, uri, runs.run_id.iloc[0], metrics


def test_pipeline_logs_gradcam_and_self_agreement(none_run):
    _, uri, run_id, metrics = none_run
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert tracking.ARTIFACT_GRADCAM in [a.path for a in client.list_artifacts(run_id)]
    assert run.data.metrics[tracking.CAM_AGREEMENT] == 1.0
    assert run.data.metrics[tracking.CAM_PEARSON] == pytest.approx(1.0)
    assert metrics[tracking.CAM_AGREEMENT] == 1.0
    assert run.data.tags[tracking.TAG_CAM_AGREEMENT_STATUS].startswith("ok")
    assert tracking.TAG_EXPLAIN_STATUS not in run.data.tags


def test_method_run_compares_with_the_baseline_run(none_run):
    tmp, uri, base_id, _ = none_run
    # a method cell (named "copy": trains like none) in the same store finds and downloads the baseline
    metrics = pipeline.run(compose(tiny(tmp, "backbone=simple_cnn", "prune.label=copy")))
    iou = metrics[tracking.CAM_AGREEMENT]
    assert 0.0 <= iou <= 1.0 and -1.0 <= metrics[tracking.CAM_PEARSON] <= 1.0
    client = MlflowClient(uri)
    copy_run = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.data.tags.get("prune") == "copy"][0]
    assert base_id in copy_run.data.tags[tracking.TAG_CAM_AGREEMENT_STATUS]


def test_baseline_from_ckpt_file_or_a_reason_when_missing(tmp_path):
    cell = {"backbone": "simple_cnn", "prune": "l1", "dataset": "fashion_mnist", "loss": "cross_entropy", "seed": "7"}
    tr = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db", "fashion_mnist", "x", {})
    model, status = baseline_model(cell, None, tr)
    assert model is None and status.startswith("skipped: no FINISHED prune=none run of simple_cnn/fashion_mnist")
    path = measure.save_model(simple_cnn(num_classes=3, input_size=32), tmp_path / "base.pt")
    model, status = baseline_model(cell, str(path), tr)
    assert isinstance(model, nn.Module) and model.num_classes == 3 and str(path) in status


def test_cli_draws_heatmaps_for_named_images(none_run, image_tree, tmp_path, capsys):
    _, uri, run_id, _ = none_run
    images = sorted(str(p) for p in image_tree.rglob("*.png"))[:3]
    out = tmp_path / "cam.png"
    assert main(["--run-id", run_id, "--tracking-uri", uri, *images, "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--run-id", run_id, "--tracking-uri", uri, str(tmp_path / "missing.png")])
    assert exc.value.code == 2 and "missing.png does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--run-id", "0" * 32, "--tracking-uri", uri, images[0]])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "not found" in err and len(err.splitlines()) == 1
