"""Trade-off curves: strengths and controls in the grid, the random and Scratch-E controls, the report's ratios."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from prunegrid import grid as G
from prunegrid.config import build, cell, compose, options
from prunegrid.errors import ConfigError
from prunegrid.pipeline import reinitialize
from prunegrid.pruning.channel import prune_channels
from prunegrid.pruning.l1 import l1_prune, make_permanent
from prunegrid.report import tradeoff as T
from prunegrid.strength import CONTROLS, knob


def _grid(*overrides: str) -> dict:
    return G.compose_grid(list(overrides))["grid"]


def test_every_method_with_a_strength_names_an_option_it_has():
    for method in options("prune"):
        node = compose([f"prune={method}"]).prune
        k = knob(node)
        if k is not None:
            assert k in node, f"conf/prune/{method}.yaml: strength names '{k}', which it does not set"


def test_overrides_expand_to_strengths_times_controls_times_seeds():
    grid = _grid("grid.strengths={channel:[0.3,0.7],l1_static:[0.2]}", "grid.controls=[random,scratch]",
                 "grid.seeds=[0,1]")
    names = set(grid["tradeoff"])
    # channel: 2 strengths x (itself, random, Scratch-E); l1_static keeps its architecture: no Scratch-E
    labels = ["channel-r0.3", "channel-r0.3-random", "channel-r0.3-scratch", "channel-r0.7", "channel-r0.7-random",
              "channel-r0.7-scratch", "l1_static-a0.2", "l1_static-a0.2-random"]
    assert names == {f"resnet18-{lab}-fashion_mnist-cross_entropy-s{s}" for lab in labels for s in (0, 1)}
    item = grid["tradeoff"]["resnet18-channel-r0.7-random-fashion_mnist-cross_entropy-s1"]
    assert item["args"] == "prune.ratio=0.7 prune.importance=random"
    assert item["start"] == "++prune.baseline_ckpt=models/resnet18-none-fashion_mnist-cross_entropy-s1.pt"
    assert grid["tradeoff"]["resnet18-l1_static-a0.2-fashion_mnist-cross_entropy-s0"]["start"].startswith("++budget.match=")
    assert len(G.cells(grid)) == 16 + 2 * (len(G.prunes("all")) + len(G.references("all")))  # trade-off cells + the grid's own


def test_the_default_method_strength_is_the_grids_own_cell_but_its_controls_are_new():
    grid = _grid("grid.strengths={channel:[0.5]}", "grid.controls=[random]", "grid.seeds=[0]")
    assert set(grid["tradeoff"]) == {"resnet18-channel-random-fashion_mnist-cross_entropy-s0"}


@pytest.mark.parametrize("preset,least", [("tradeoff", 3), ("tradeoff_full", 5)])
def test_presets_run_every_strength_with_its_controls_and_seeds(preset, least):
    grid = _grid(f"+experiment={preset}")
    assert len(grid["seeds"]) >= 2 and set(grid["controls"]) == {"random", "scratch"}
    labels = {(i["prune"], i["label"], i["seed"]) for i in grid["tradeoff"].values()}
    for method in ("channel", "slimming", "l1_static"):
        values = grid["strengths"][method]
        assert len(values) >= least
        for seed in grid["seeds"]:
            random = {lab for m, lab, s in labels if m == method and s == seed and lab.endswith("-random")}
            assert len(random) == len(values), (method, seed, random)
            scratch = {lab for m, lab, s in labels if m == method and s == seed and lab.endswith("-scratch")}
            assert len(scratch) == (len(values) if method != "l1_static" else 0)


@pytest.mark.parametrize("overrides,message", [
    (["grid.strengths={quant_int8:[1]}"], "names no strength"),
    (["grid.strengths={channel:[0.3]}", "grid.controls=[shuffle]"], "unknown control 'shuffle'"),
    (["grid.strengths={channel:[0.3]}", "grid.prunes=[none,l1_static]"], "not in grid.prunes"),
    (["grid.strengths={chanel:[0.3]}"], "unknown prune 'chanel'"),
])
def test_bad_tradeoff_lists_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _grid(*overrides)


def test_cell_names_carry_strength_and_control():
    assert cell(compose(["prune=channel", "prune.ratio=0.7"]))["prune"] == "channel-r0.7"
    assert cell(compose(["prune=channel", "prune.importance=random"]))["prune"] == "channel-random"
    assert cell(compose(["prune=layer_importance", "prune.k=3", "prune.reinit=true"]))["prune"] == "layer_importance-k3-scratch"
    assert cell(compose(["prune=l1_static"]))["prune"] == "l1_static"
    assert cell(compose(["prune=none", "prune.finetune_epochs=2"]))["prune"] == "none_ft2"


def test_scratch_control_only_for_methods_that_change_the_architecture():
    with pytest.raises(ConfigError, match="no option 'reinit'"):
        compose(["prune=l1_static", "prune.reinit=true"])
    assert build(compose(["prune=channel", "prune.reinit=true"]).prune).control == "scratch"
    assert build(compose(["prune=slimming", "prune.importance=random"]).prune).control == "random"


def _net():
    return build(compose(["backbone=resnet18"]).backbone, num_classes=10, input_size=32)


def _kept(importance: str, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(123)
    net = _net()
    torch.manual_seed(seed)
    prune_channels(net, importance=importance, ratio=0.5, global_pruning=False, max_layer_ratio=0.9, input_size=32)
    return [m.weight.detach().clone() for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_random_channel_control_keeps_other_channels_for_another_seed_and_l1_does_not():
    a, b = _kept("random", 0), _kept("random", 1)
    assert [t.shape for t in a] == [t.shape for t in b]                      # the same structure
    assert any(not torch.equal(x, y) for x, y in zip(a, b))                    # other channels kept
    assert all(torch.equal(x, y) for x, y in zip(_kept("l1", 0), _kept("l1", 1)))


def _masks(importance: str, seed: int, scope: str) -> list[torch.Tensor]:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    torch.manual_seed(seed)
    l1_prune(net, nn.Conv2d, 0.5, scope, importance)
    make_permanent(net)
    return [(m.weight == 0) for m in net if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_random_unstructured_control_prunes_the_same_share_elsewhere(scope):
    a, b = _masks("random", 0, scope), _masks("random", 1, scope)
    share = lambda ms: float(sum(m.sum() for m in ms) / sum(m.numel() for m in ms))  # noqa: E731
    assert share(a) == pytest.approx(0.5, abs=0.01) and share(b) == pytest.approx(0.5, abs=0.01)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(_masks("l1", 0, scope), _masks("l1", 1, scope)))


def test_random_unstructured_control_adds_to_an_already_sparse_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    l1_prune(net, nn.Conv2d, 0.5, "layerwise", "random")
    make_permanent(net)
    zeros = net[0].weight == 0
    l1_prune(net, nn.Conv2d, 0.75, "layerwise", "random")
    make_permanent(net)
    assert float((net[0].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    assert bool((net[0].weight[zeros] == 0).all())            # the zeros were pruned first


def test_scratch_e_reinitialises_every_weight_and_keeps_the_architecture():
    torch.manual_seed(0)
    net = prune_channels(_net(), importance="l1", ratio=0.5, global_pruning=False, max_layer_ratio=0.9, input_size=32)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 0.8)     # trained-like BN, unlike a fresh one (ones, zeros)
            m.bias.data.uniform_(-0.1, 0.1)
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    pruned = copy.deepcopy(net)
    fresh = reinitialize(net)
    shapes = lambda n: {k: tuple(v.shape) for k, v in n.state_dict().items()}  # noqa: E731
    assert fresh is net and shapes(fresh) == shapes(pruned)
    learned = [k for k, v in pruned.state_dict().items() if v.is_floating_point() and v.numel() > 1]
    changed = [k for k in learned if not torch.equal(pruned.state_dict()[k], fresh.state_dict()[k])]
    assert changed == learned
    x = torch.randn(2, 3, 32, 32)
    assert fresh.eval()(x).shape == (2, 10)


def _rows() -> pd.DataFrame:
    """Per-seed grid rows by hand: a dense baseline of 1,000 parameters and 8,000 FLOPs; channel at two
    ratios with its random control; l1_static at one amount."""
    rows = []

    def add(prune, method, seed, acc, params, flops, strength="", knob="", control="none", delta=0.0):
        rows.append({"backbone": "resnet18", "prune": prune, "dataset": "fmnist", "loss": "ce", "seed": seed,
                     "acc": acc, "params_nonzero": params, "flops": flops, "ref_prune": "none_ft1",
                     "acc_delta_pt": delta, "infer_speedup": 8000 / flops, "infer_speedup_onnx": np.nan,
                     "method": method, "strength": strength, "strength_knob": knob, "control": control})

    for s in (0, 1):
        add("none", "none", s, 0.90, 1000, 8000)
        add("none_ft1", "none", s, 0.91, 1000, 8000)
        add("channel", "channel", s, 0.90, 250, 2000, "0.5", "ratio", delta=-1.0)
        add("channel-random", "channel", s, 0.86 + 0.02 * s, 250, 2000, "0.5", "ratio", "random", delta=-4.0)
        add("channel-r0.8", "channel", s, 0.80 + 0.01 * s, 40, 400, "0.8", "ratio", delta=-10.0)
        add("channel-r0.8-random", "channel", s, 0.81 - 0.01 * s, 40, 400, "0.8", "ratio", "random", delta=-10.0)
        add("l1_static", "l1_static", s, 0.905, 600, 8000, "0.4", "amount", delta=-0.5)
    return pd.DataFrame(rows)


def test_report_ratios_and_control_gaps_match_hand_computed_values():
    curves = T.table(_rows()).set_index(["method", "control", "strength"])
    ch = curves.loc[("channel", "none", "0.5")]
    assert ch["compression_ratio"] == pytest.approx(1000 / 250) and ch["macs_ratio"] == pytest.approx(8000 / 2000)
    assert ch["n_seeds"] == 2 and ch["acc"] == pytest.approx(0.90)
    assert ch["vs_random_pt"] == pytest.approx(100 * (0.90 - 0.87))           # 4 and 2 points: mean 3, std 1.41
    assert ch["vs_random_pt_std"] == pytest.approx(np.std([4.0, 2.0], ddof=1))
    assert bool(ch["no_better_than_random"]) is False
    hard = curves.loc[("channel", "none", "0.8")]
    assert hard["compression_ratio"] == pytest.approx(25.0) and hard["macs_ratio"] == pytest.approx(20.0)
    assert hard["vs_random_pt"] == pytest.approx(0.0) and bool(hard["no_better_than_random"]) is True
    l1 = curves.loc[("l1_static", "none", "0.4")]
    assert l1["compression_ratio"] == pytest.approx(1000 / 600) and l1["macs_ratio"] == pytest.approx(1.0)
    assert pd.isna(l1["vs_random_pt"])                                         # no control ran
    assert ("none", "none", "") not in curves.index                            # the dense cells are the band


def test_largest_compression_within_one_point_of_the_reference():
    best = T.largest_within(T.table(_rows()), 1.0).set_index("method")
    assert best.loc["channel", "compression_ratio"] == pytest.approx(4.0)     # 0.8 costs 10 points
    assert best.loc["l1_static", "compression_ratio"] == pytest.approx(1000 / 600)


def test_report_writes_the_table_and_both_figures(tmp_path):
    rows = _rows()
    runs = rows.assign(run_id=[f"r{i}" for i in range(len(rows))])
    tagged = runs.rename(columns={k: v for k, v in T.TAGS.items()})[["run_id", *T.TAGS.values()]]
    curves, paths = T.write(runs.drop(columns=list(T.TAGS)), tagged, tmp_path)
    assert [p.name for p in paths] == ["tradeoff.csv", "tradeoff_compression.png", "tradeoff_speedup.png"]
    assert all(p.stat().st_size > 5000 for p in paths[1:])
    assert len(pd.read_csv(tmp_path / "tradeoff.csv")) == 5
    assert "no better than random" in "\n".join(T.markdown(curves))


def test_controls_set_options_that_the_methods_have():
    for method in options("prune"):
        cls = G.method_class(method)
        node = compose([f"prune={method}"]).prune
        for control in getattr(cls, "controls", ()):
            for key in CONTROLS[control]:
                assert key in node, f"{method} offers {control} but its YAML has no {key}"
