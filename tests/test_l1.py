"""Static and dynamic L1 pruning (Ju & Kang (on-device lightweight methods)): sparsity as Algorithm 1, masks held, schedules."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient
from torch import nn

from prunegrid import measure, pipeline, tracking
from prunegrid.config import build, compose
from prunegrid.errors import ConfigError
from prunegrid.pruning import l1
from tests.conftest import tiny

METHODS = ("l1_static", "l1_dynamic")


def test_algorithm1_sparsity_on_known_zeros():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "weight"):
                m.weight.fill_(1.0)
        net[0].weight[:2] = 0                     # 36 of 72 conv-1 weights
        net[2].weight[0] = 0                      # 4 of 20 conv-2 weights
        net[1].weight[:1] = 0                     # 1 of 4 BN-1 scales
        net[3].weight[:3] = 0                     # 3 of 5 BN-2 scales
    m = l1.sparsity_metrics(net)
    assert m[l1.L1_CONV_SPARSITY] == pytest.approx(40 / 92)
    assert m[l1.L1_BN_SPARSITY] == pytest.approx(4 / 9)


@pytest.mark.parametrize("scope", l1.SCOPES)
def test_prune_hits_amount_and_is_permanent(scope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32))
    with torch.no_grad():
        for bn in (net[1], net[3]):
            bn.weight.uniform_(0.5, 1.5)
    l1.l1_prune(net, nn.Conv2d, 0.4, scope)
    l1.l1_prune(net, nn.BatchNorm2d, 0.25, scope)
    l1.make_permanent(net)
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in net.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in net.named_buffers())
    m = l1.sparsity_metrics(net)
    assert abs(m[l1.L1_CONV_SPARSITY] - 0.4) < 0.005
    assert abs(m[l1.L1_BN_SPARSITY] - 0.25) < 0.005


def test_schedules():
    lin = [l1.cumulative_sparsity(0.4, e, 4, "gradual", "linear") for e in range(4)]
    assert lin == pytest.approx([0.1, 0.2, 0.3, 0.4])
    cub = [l1.cumulative_sparsity(0.4, e, 4, "gradual", "cubic") for e in range(4)]
    assert cub[-1] == pytest.approx(0.4) and all(a < b for a, b in zip(cub, cub[1:])) and cub[0] > lin[0]
    const = [l1.cumulative_sparsity(0.2, e, 4, "constant", "linear") for e in range(3)]
    assert const == pytest.approx([0.2, 0.36, 0.488])
    # stacked step amounts (share of the remaining weights) reproduce the cumulative target
    left = 1.0
    for e in range(4):
        left *= 1 - l1.step_amount(0.4, e, 4, "gradual", "cubic")
    assert 1 - left == pytest.approx(0.4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("override", ["prune.amount=1.0", "prune.amount=-0.1", "prune.bn_amount=1.5",
                                      "prune.scope=everywhere"])
def test_bad_options_raise_before_training(tmp_path, fashion_dir, method, override):
    with pytest.raises(ConfigError, match="prune\\."):
        pipeline.run(compose(tiny(tmp_path, f"prune={method}", override)))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.ckpt"))


def test_bad_schedule_raises():
    with pytest.raises(ConfigError, match="prune.schedule"):
        build(compose(["prune=l1_dynamic", "prune.schedule=sometimes"]).prune)


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory, fashion_dir):
    """Runs tiny cells into ONE temporary MLflow store (creating a store costs ~10 s), cached per overrides."""
    root = tmp_path_factory.mktemp("l1")
    uri = f"sqlite:///{root}/mlflow.db"
    done: dict[tuple[str, ...], tuple] = {}

    def go(*overrides: str):
        if overrides not in done:
            args = [a for a in tiny(root, *overrides) if not a.startswith("paths.output_dir=")]
            metrics = pipeline.run(compose([*args, f"paths.output_dir={root}/out{len(done)}"]))
            client = MlflowClient(uri)
            runs = tracking.load_runs(uri).sort_values("start_time")
            done[overrides] = (metrics, client, runs.iloc[-1], root)
        return done[overrides]

    return go


# simple_cnn cells also cover the global scope (static) and the constant schedule's per-epoch log (dynamic)
CASES = {
    ("l1_static", "resnet18"): ("backbone=resnet18", "dataset.input_size=16"),
    ("l1_dynamic", "resnet18"): ("backbone=resnet18", "dataset.input_size=16"),
    ("l1_static", "simple_cnn"): ("backbone=simple_cnn", "prune.scope=global"),
    ("l1_dynamic", "simple_cnn"): ("backbone=simple_cnn", "trainer.max_epochs=2", "prune.schedule=constant",
                                   "prune.amount=0.2", "prune.bn_amount=0.1", "trainer.callbacks.early_stopping=null"),
}
FINAL = {"l1_dynamic-simple_cnn": (0.36, 0.19)}


@pytest.mark.parametrize("method,backbone", [pytest.param(*k, marks=pytest.mark.slow) if k[1] == "resnet18" else k
                                             for k in CASES])  # resnet18: ~70 s each on the shared 2-core box
def test_end_to_end_reaches_amounts(cell_run, method, backbone):
    metrics, client, run, root = cell_run(f"prune={method}", *CASES[method, backbone])
    conv, bn = FINAL.get(f"{method}-{backbone}", (0.4, 0.3))
    assert abs(metrics[l1.L1_CONV_SPARSITY] - conv) < 0.005
    assert abs(metrics[l1.L1_BN_SPARSITY] - bn) < 0.005
    assert metrics["model/params_nonzero"] < metrics["model/params"]
    assert run["prune"].split("-")[0] == method and run["backbone"] == backbone and run["status_detail"] == ""
    assert run["method"] == method and run["control"] == "none"
    assert run[l1.L1_CONV_SPARSITY] == metrics[l1.L1_CONV_SPARSITY]
    path = client.download_artifacts(run["run_id"], f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}",
                                     str(root / run["run_id"]))
    saved = measure.load_model(path)  # plain weights (no pruning re-parametrisation), as sparse
    assert not any(n.endswith("_orig") for n, _ in saved.named_parameters())
    assert abs(measure.layer_sparsity(saved, nn.Conv2d) - conv) < 0.005


def test_dynamic_logs_sparsity_each_epoch(cell_run):
    _, client, run, _ = cell_run("prune=l1_dynamic", *CASES["l1_dynamic", "simple_cnn"])
    hist = sorted(client.get_metric_history(run["run_id"], l1.L1_EPOCH_CONV_SPARSITY), key=lambda x: x.step)
    assert [h.value for h in hist] == pytest.approx([0.2, 0.36], abs=0.005)
    assert [h.step for h in hist] == [0, 1]


def _direct_fit(tmp_path, epochs: int, *overrides: str, probe: Callback | None = None):
    """before_fit -> fit -> after_fit of a tiny simple_cnn cell, without MLflow (fast)."""
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", f"trainer.max_epochs={epochs}",
                       "trainer.callbacks.early_stopping=null", *overrides))
    cell = pipeline.Cell(cfg)
    ctx = cell.context()
    net = cell.method.before_fit(cell.net, ctx)
    net = cell.fit(net, epochs, [*cell.method.callbacks(ctx), *([probe] if probe else [])])
    return cell.method.after_fit(net, ctx)


def test_static_without_held_mask_regrows(tmp_path, fashion_dir):
    """The paper's literal order (permanent before training): training revives pruned weights."""
    held = _direct_fit(tmp_path, 1, "prune=l1_static")
    literal = _direct_fit(tmp_path, 1, "prune=l1_static", "prune.hold_mask=false")
    assert abs(measure.layer_sparsity(held, nn.Conv2d) - 0.4) < 0.005
    assert measure.layer_sparsity(literal, nn.Conv2d) < 0.3


class ZeroProbe(Callback):
    """Records, at each epoch end, the zero positions of the effective Conv2d weights."""

    def __init__(self):
        self.zeros: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.zeros.append([(m.weight == 0).clone() for m in pl_module.modules() if isinstance(m, nn.Conv2d)])


def test_dynamic_masks_held_and_sparsity_rises_per_schedule(tmp_path, fashion_dir):
    probe = ZeroProbe()
    net = _direct_fit(tmp_path, 3, "prune=l1_dynamic", "prune.schedule=gradual", probe=probe)
    final = [m.weight == 0 for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(probe.zeros) == 3
    conv = [sum(int(z.sum()) for z in zs) / sum(z.numel() for z in zs) for zs in probe.zeros]
    assert conv == pytest.approx([0.4 / 3, 0.8 / 3, 0.4], abs=0.005)
    for epoch in (1, 2):  # zeros of an epoch are still zero at the next epoch and in the final model
        for before, after in zip(probe.zeros[epoch - 1], probe.zeros[epoch]):
            assert bool(after[before].all())
    for at_epoch1, end in zip(probe.zeros[0], final):
        assert bool(end[at_epoch1].all())
    assert not any(n.endswith("_orig") for n, _ in net.named_parameters())


def _sparsity(zeros: list[torch.Tensor]) -> float:
    return sum(int(z.sum()) for z in zeros) / sum(z.numel() for z in zeros)


def test_paper_loop_prunes_amount_each_epoch_and_weights_regrow(tmp_path, fashion_dir):
    """Ju & Kang (on-device lightweight methods), Algorithm 1: prune ``amount`` at each epoch's start, permanent, regrowth in between."""
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", "trainer.max_epochs=3", "trainer.callbacks.early_stopping=null",
                       "trainer.limit_train_batches=3", "prune=l1_dynamic"))
    cell = pipeline.Cell(cfg)
    ctx = cell.context()
    assert cell.method.schedule == "paper"                      # the default
    callbacks = cell.method.callbacks(ctx)
    loop = next(c for c in callbacks if isinstance(c, l1.PaperDynamicPruning))
    probe = ZeroProbe()
    net = cell.fit(cell.method.before_fit(cell.net, ctx), 3, [*callbacks, probe])
    assert len(loop.history) == 3
    for at_pruning in loop.history:                             # every pruning: amount, within 0.5 point
        assert abs(at_pruning[l1.L1_CONV_SPARSITY] - 0.4) < 0.005
        assert abs(at_pruning[l1.L1_BN_SPARSITY] - 0.3) < 0.005
    assert all(_sparsity(zs) < 0.4 - 0.05 for zs in probe.zeros)  # permanent: pruned weights regrow in the epoch
    assert not any(n.endswith("_orig") for n, _ in net.named_parameters())
    final = cell.method.after_fit(net, ctx)
    assert abs(measure.layer_sparsity(final, nn.Conv2d) - 0.4) < 0.005
    assert abs(measure.layer_sparsity(final, nn.BatchNorm2d) - 0.3) < 0.005


def test_static_and_dynamic_differ_after_two_epochs(tmp_path, fashion_dir):
    """With more than one epoch, the paper's static and dynamic timings give different models."""
    static = _direct_fit(tmp_path, 2, "prune=l1_static", "trainer.limit_train_batches=3")
    dynamic = _direct_fit(tmp_path, 2, "prune=l1_dynamic", "trainer.limit_train_batches=3")
    zs = [m.weight == 0 for m in static.modules() if isinstance(m, nn.Conv2d)]
    zd = [m.weight == 0 for m in dynamic.modules() if isinstance(m, nn.Conv2d)]
    assert abs(_sparsity(zs) - _sparsity(zd)) < 0.005          # same sparsity ...
    assert any(not torch.equal(a, b) for a, b in zip(zs, zd))  # ... at different positions
