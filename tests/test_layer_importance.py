"""Layer Importance Evaluation (Jin & Song (Layer Importance Evaluation)): scores against hand-computed values, the ranking,
the rebuild on the Net shape, every backbone option, one cell end to end, and bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from prunegrid import measure
from prunegrid.config import build, compose, options
from prunegrid.errors import ConfigError
from prunegrid.models.net import ClassifierHead, Net
from prunegrid.pipeline import _load_baseline, run
from prunegrid.pruning.base import Context
from prunegrid.pruning.layer_importance import (
    ActivationStats,
    LayerImportance,
    abs_weight_activation,
    abs_weight_sum,
    ablate,
    rank_layers,
    rebuild,
    select,
    spearman,
    tensor_stats,
    weight_score,
)
from tests.conftest import tiny


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine, 2 threads contending with other jobs run
    these small forwards 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv1x1(cin: int, cout: int, weight: list[list[float]] | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    with torch.no_grad():
        if weight is None:
            conv.weight.fill_(0.5)
        else:
            conv.weight.copy_(torch.tensor(weight).reshape(cout, cin, 1, 1))
    return conv


def toy_net(num_classes: int = 3) -> Net:
    """stem 3->2, b1 2->2 (removable), b2 2->4 (changes shape), b3 4->4 and b4 4->4 (removable)."""
    units = [
        ("stem", conv1x1(3, 2, [[1, 0, 0], [0, -2, 1]])),
        ("b1", conv1x1(2, 2)),
        ("b2", conv1x1(2, 4)),
        ("b3", conv1x1(4, 4)),
        ("b4", conv1x1(4, 4)),
    ]
    return Net(units, ClassifierHead(4, num_classes, 0.0), [["stem", "b1"], ["b2", "b3", "b4"]], "toy", num_classes,
               input_size=4)


# input (1, 3, 1, 2): channel 0 = [1, 2], channel 1 = [0, 1], channel 2 = [3, -1]
X = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]], [[3.0, -1.0]]]])


def fake_ctx(tmp_path, batches, num_classes=3, input_size=4, evaluate=None) -> Context:
    return Context(num_classes=num_classes, input_size=input_size, seed=0, fit=None, evaluate=evaluate,
                   loader=lambda split, shuffle=None: list(batches), log_metrics=lambda m: None,
                   log_artifact=lambda p, a=None: None, artifact_dir=tmp_path)


# -- statistics ---------------------------------------------------------------------------------

def test_weight_stats_and_s_w_by_hand():
    w = toy_net().features.stem.weight            # values 1, 0, 0, 0, -2, 1
    s = tensor_stats(w)
    assert (s.mean, s.min, s.max) == pytest.approx((0.0, -2.0, 1.0), abs=1e-9)
    assert s.std == pytest.approx(math.sqrt((1 + 4 + 1) / 6))   # population std (eq. 5), = 1
    assert weight_score(w) == pytest.approx(0 + 1 + 2 + 1)      # eq. 8
    assert abs_weight_sum(w) == pytest.approx(4)                 # eq. 1


def test_activation_stats_s_a_and_p_by_hand():
    net = toy_net()
    ranking = rank_layers(net, [X], ["Conv2d"])
    stem = ranking.set_index("layer").loc["features.stem"]
    # stem output: channel 0 = x0 = [1, 2]; channel 1 = -2 x1 + x2 = [3, -3]  -> values 1, 2, 3, -3
    mean = 3 / 4
    std = math.sqrt((1 + 4 + 9 + 9) / 4 - mean ** 2)
    assert (stem.a_mean, stem.a_min, stem.a_max) == pytest.approx((mean, -3, 3))
    assert stem.a_std == pytest.approx(std)
    assert stem.S_a == pytest.approx(mean + std + 3 + 3)         # eq. 9
    assert stem.S_w == pytest.approx(4)
    assert stem.P == pytest.approx(4 * (mean + std + 6))         # eq. 10
    assert stem.score == stem.P


def test_abs_weight_activation_by_hand():
    net = toy_net()
    ranking = rank_layers(net, [X], ["Conv2d"], score="abs_weight_activation")
    stem = ranking.set_index("layer").loc["features.stem"]
    # mean |w| per output channel: 1/3 and 1; mean |a| per channel: 1.5 and 3 -> mean(0.5, 3)
    assert stem.score == pytest.approx(1.75)
    assert abs_weight_activation(net.features.stem.weight, torch.tensor([1.5, 3.0])) == pytest.approx(1.75)
    by_sum = rank_layers(net, [X], ["Conv2d"], score="abs_weight_sum").set_index("layer")
    assert by_sum.loc["features.stem", "score"] == pytest.approx(4)
    assert by_sum.loc["features.b3", "score"] == pytest.approx(16 * 0.5)


def test_activation_stats_merge_batches_exactly():
    a, b = torch.randn(4, 3, 5, 5), torch.randn(7, 3, 5, 5) * 3 + 1
    acc = ActivationStats()
    acc.update(a)
    acc.update(b)
    ref = tensor_stats(torch.cat([a, b]).double())
    got = acc.stats()
    assert (got.mean, got.std, got.min, got.max) == pytest.approx((ref.mean, ref.std, ref.min, ref.max), rel=1e-9)
    per_channel = torch.cat([a, b]).abs().double().mean(dim=(0, 2, 3))
    assert torch.allclose(acc.channel_abs_mean(), per_channel)


# -- ranking and selection ------------------------------------------------------------------------

def test_ranking_is_sorted_with_shares():
    net = toy_net()
    r = rank_layers(net, [X])
    assert list(r["rank"]) == list(range(1, len(r) + 1))
    assert list(r["score"]) == sorted(r["score"], reverse=True)
    assert r["share"].sum() == pytest.approx(1)
    assert r["cumulative_share"].iloc[-1] == pytest.approx(1)
    assert set(r["type"]) == {"Conv2d", "Linear"}
    assert pd.isna(r.set_index("layer").loc["head.3", "unit"])          # head layers belong to no unit
    # the positions are the order in the model: stem first, then b1..b4, then the head's Linear
    by_pos = r.sort_values("position")["layer"].tolist()
    assert by_pos == ["features.stem", "features.b1", "features.b2", "features.b3", "features.b4", "head.3"]


def test_ranking_order_follows_weight_scale():
    net = toy_net()
    with torch.no_grad():
        net.features.b1.weight.fill_(0.1)
        net.features.b4.weight.fill_(2.0)
    r = rank_layers(net, [X], ["Conv2d"]).set_index("layer")
    # b4's weights 4x b3's: both its S_w and (its output being 8x b3's) its S_a are larger
    assert r.loc["features.b4", "rank"] < r.loc["features.b3", "rank"]
    assert r.loc["features.b4", "P"] == pytest.approx(r.loc["features.b4", "S_w"] * r.loc["features.b4", "S_a"])


def test_select_top_k_and_cumulative_share():
    r = rank_layers(toy_net(), [X])
    assert select(r, k=2) == list(r["layer"][:2])
    share = float(r["cumulative_share"].iloc[2])
    assert select(r, cumulative_share=share) == list(r["layer"][:3])
    assert select(r, cumulative_share=share - 1e-6) == list(r["layer"][:3])
    assert select(r, cumulative_share=1.0) == list(r["layer"])


# -- rebuild -----------------------------------------------------------------------------------

def test_rebuild_keeps_selected_and_shape_changing_units():
    net = toy_net()
    assert net.contract.removable() == ["b1", "b3", "b4"]
    new, plan = rebuild(net, ["features.b3"], input_size=4, dropout=0.1)
    assert isinstance(new, Net) and new.num_classes == 3 and new.arch == "toy"
    assert new.unit_names() == ["stem", "b1", "b2", "b3"]             # b4 after the deepest selection: dropped
    assert isinstance(new.features.b1, nn.Identity)                    # unselected and removable
    assert isinstance(new.features.b2, nn.Conv2d)                      # changes 2 -> 4 channels: kept
    assert torch.equal(new.features.b3.weight, net.features.b3.weight)
    assert new.features.b3.weight is not net.features.b3.weight       # a copy; the baseline is untouched
    assert (plan.kept, plan.replaced, plan.dropped) == (["stem", "b2", "b3"], ["b1"], ["b4"])
    assert new.head[-1].in_features == 4 and new.head[2].p == 0.1
    assert new.stages == [["stem", "b1"], ["b2", "b3"]]
    assert measure.count_params(new) < measure.count_params(net)
    assert new(torch.randn(2, 3, 4, 4)).shape == (2, 3)
    assert new.contract.cam_layer == "features.b3"
    assert new.contract.unit("b3").out_shape == (4, 4, 4) and new.contract.input_size == 4


def test_rebuild_with_only_head_layers_keeps_the_stem():
    net = toy_net()
    new, plan = rebuild(net, ["head.3"], input_size=4)
    assert new.unit_names() == ["stem"] and plan.dropped == ["b1", "b2", "b3", "b4"]
    assert new.head[-1].in_features == 2
    assert new(torch.randn(1, 3, 4, 4)).shape == (1, 3)


def test_rebuild_resnet18_removes_exactly_unselected_removable_units():
    net = build(compose(["backbone=resnet18"]).backbone, num_classes=7, input_size=32)
    selected = ["features.layer1_1.conv1", "features.layer3_0.bn2", "head.3"]
    new, plan = rebuild(net, selected, input_size=32)
    removable = net.contract.removable()
    assert removable == ["layer1_0", "layer1_1", "layer2_1", "layer3_1", "layer4_1"]
    identities = [n for n in new.unit_names() if isinstance(new.features._modules[n], nn.Identity)]
    assert identities == ["layer1_0", "layer2_1"]
    assert plan.dropped == ["layer3_1", "layer4_0", "layer4_1"]
    assert new.unit_names()[-1] == "layer3_0" and new.num_classes == 7
    assert new.head[-1].in_features == 256
    assert measure.count_params(new) < measure.count_params(net) / 4
    assert new(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# -- every backbone option ------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", options("backbone", "classification"))
def test_every_backbone_scores_rebuilds_and_trains(backbone, tmp_path):
    torch.manual_seed(0)
    net = build(compose([f"backbone={backbone}"]).backbone, num_classes=3, input_size=32)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    method = LayerImportance(calibration_batches=1)
    ctx = fake_ctx(tmp_path, [(x, y)], input_size=32)
    method.check(net, ctx)
    new = method.after_fit(net, ctx)
    assert isinstance(new, Net) and new.num_classes == 3 and new.arch == net.arch
    assert measure.count_params(new) < measure.count_params(net)
    assert (tmp_path / "layer_importance" / "ranking.csv").is_file()
    m = method.report(new, ctx)
    assert m["layer_importance/kept_layers"] == 6 and 0 < m["layer_importance/top_k_share"] <= 1
    assert m["layer_importance/removed_units"] == len(method.plan.removed)
    new.train()
    opt = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=0.01)
    loss = nn.functional.cross_entropy(new(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not isinstance(new.get_submodule(new.contract.cam_layer), nn.Identity)


# -- ablation (the paper's layer-removal check) -------------------------------------------------

def test_ablation_restores_net_and_correlates(tmp_path):
    net = toy_net()
    drops = {"b1": 0.05, "b3": 0.2, "b4": 0.4}

    def evaluate(n, split="val", max_batches=None):
        assert max_batches == 2
        missing = [u for u in drops if isinstance(n.features._modules[u], nn.Identity)]
        return {"acc": 0.9 - sum(drops[u] for u in missing), "loss": 0.0}

    table = ablate(net, ["b1", "b3", "b4"], lambda n: evaluate(n, max_batches=2))
    assert table.attrs["base_acc"] == 0.9
    assert table.set_index("unit")["acc_drop"].to_dict() == pytest.approx(drops)
    assert not any(isinstance(u, nn.Identity) for u in net.features)
    assert spearman([1, 2, 3], [0.1, 0.2, 0.3]) == pytest.approx(1)
    assert math.isnan(spearman([1, 2], [1, 2]))

    method = LayerImportance(calibration_batches=1, k=2, ablation=True, ablation_batches=2)
    method.after_fit(net, fake_ctx(tmp_path, [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))], evaluate=evaluate))
    csv = (tmp_path / "layer_importance" / "ablation.csv").read_text().splitlines()
    assert csv[0].startswith("unit,score,acc,acc_drop") and len(csv) == 4
    assert "layer_importance/ablation_spearman" in method.metrics


# -- one cell end to end ----------------------------------------------------------------------

def test_pipeline_logs_ranking_and_metrics(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "prune=layer_importance", "prune.calibration_batches=1"))
    metrics = run(cfg)
    for key in ("top_k_share", "kept_layers", "kept_units", "removed_units"):
        assert f"layer_importance/{key}" in metrics, key
    assert metrics["layer_importance/kept_layers"] == 6
    assert metrics["model/params"] < metrics["baseline/params"]
    client = MlflowClient(cfg.tracking.uri)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FINISHED" and r.data.tags["prune"] == "layer_importance"
    assert r.data.metrics["layer_importance/kept_layers"] == 6
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "layer_importance")}
    assert {"layer_importance/ranking.csv", "layer_importance/ranking.png"} <= arts
    # two fits (baseline + fine-tune) continue the epoch count
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [0, 1]


def test_pipeline_from_baseline_ckpt_with_ablation(tmp_path, fashion_dir):
    base = build(compose(["backbone=resnet18"]).backbone, num_classes=10, input_size=32)
    ckpt = measure.save_model(base, tmp_path / "base.pt")
    cfg = compose(tiny(tmp_path, "backbone=resnet18", "prune=layer_importance", f"prune.baseline_ckpt={ckpt}",
                       "prune.k=2", "prune.ablation=true", "prune.ablation_batches=1", "prune.calibration_batches=1"))
    metrics = run(cfg)
    assert metrics["layer_importance/kept_layers"] == 2
    client = MlflowClient(cfg.tracking.uri)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [0]   # fine-tune only
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "layer_importance")}
    assert "layer_importance/ablation.csv" in arts
    table = pd.read_csv(client.download_artifacts(r.info.run_id, "layer_importance/ablation.csv", str(tmp_path)))
    assert sorted(table["unit"]) == ["layer1_0", "layer1_1", "layer2_1", "layer3_1", "layer4_1"]   # the removable units
    saved = measure.load_model(client.download_artifacts(r.info.run_id, "model/model.pt", str(tmp_path)))
    assert isinstance(saved, Net) and saved.num_classes == 10


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("prune.k=0", "prune.k=0 must be 1 or more"),
    ("prune.cumulative_share=0", r"prune.cumulative_share=0.* must be in \(0, 1\]"),
    ("prune.cumulative_share=1.5", r"prune.cumulative_share=1.5 must be in \(0, 1\]"),
    ("prune.calibration_batches=0", "prune.calibration_batches=0 must be 1 or more"),
    ("prune.score=bogus", "prune.score=bogus is unknown"),
    ("prune.layer_types=[Conv2d,Bogus]", "unknown layer type 'Bogus'"),
])
def test_bad_options_raise_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(compose(["prune=layer_importance", override]).prune)
    assert "\n" not in str(err.value)


def _fail_before_training(cfg, match):
    with pytest.raises(ConfigError, match=match) as err:
        run(cfg)
    assert "\n" not in str(err.value)
    client = MlflowClient(cfg.tracking.uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_ablation_on_a_backbone_without_removable_units_fails_before_training(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", "prune=layer_importance", "prune.ablation=true"))
    _fail_before_training(cfg, "prune=layer_importance cannot serve backbone simple_cnn: it needs units that can be "
                               "removed without changing shapes")


def test_k_above_layer_count_fails_before_training(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", "prune=layer_importance", "prune.k=99"))
    _fail_before_training(cfg, r"prune.k=99 is more than the 7 scored layers of simple_cnn")


def test_baseline_ckpt_of_other_backbone_fails_before_training(tmp_path, fashion_dir):
    other = build(compose(["backbone=simple_cnn"]).backbone, num_classes=10, input_size=32)
    ckpt = measure.save_model(other, tmp_path / "other.pt")
    cfg = compose(tiny(tmp_path, "prune=layer_importance", f"prune.baseline_ckpt={ckpt}"))
    _fail_before_training(cfg, "is a simple_cnn with 10 classes; this cell needs resnet18 with 10 classes")


def test_baseline_ckpt_of_other_class_count_fails(tmp_path):
    net = build(compose(["backbone=simple_cnn"]).backbone, num_classes=3, input_size=32)
    ckpt = measure.save_model(net, tmp_path / "three.pt")
    with pytest.raises(ConfigError, match="is a simple_cnn with 3 classes; this cell needs simple_cnn with 10 classes"):
        _load_baseline(str(ckpt), build(compose(["backbone=simple_cnn"]).backbone, num_classes=10, input_size=32), 10)
