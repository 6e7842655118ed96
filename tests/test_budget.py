"""Equal training budgets: what each run records, the references, matched scratch training,
convergence, and the transfer protocol's source-task weights."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from prunegrid import budget, pretrain
from prunegrid.config import build, cell, compose
from prunegrid.errors import ConfigError
from prunegrid.pipeline import run
from tests.conftest import tiny

FAST = ("backbone=simple_cnn", "explain.enabled=false", "trainer.limit_train_batches=2")
IMAGES_PER_EPOCH = 2 * 16  # limit_train_batches x dataset.batch_size of tiny()


def _run(tmp_path, *overrides):
    cfg = compose(tiny(tmp_path, *FAST, *overrides))
    metrics = run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"], max_results=1)
    return metrics, runs[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, fashion_dir):
    """A prune=none cell trained 2 epochs (the cap), saved like the grid's train_base stage."""
    tmp = tmp_path_factory.mktemp("budget")
    model = tmp / "none.pt"
    metrics, r = _run(tmp, "trainer.max_epochs=2", f"paths.model_out={model}")
    return tmp, model, metrics, r


def test_baseline_records_its_budget(baseline):
    _, _, metrics, r = baseline
    assert metrics[budget.EPOCHS] == 2 and metrics[budget.IMAGES] == 2 * IMAGES_PER_EPOCH
    assert metrics[budget.CONVERGED] == 0                       # ended by the cap, not early stopping
    assert r.data.tags[budget.TAG_REF_PRUNE] == "none" and r.data.tags["prune"] == "none"


def test_reference_and_method_from_baseline_have_equal_budgets(baseline):
    tmp, model, base, _ = baseline
    ref, r_ref = _run(tmp, "prune=none", "prune.finetune_epochs=1", f"prune.baseline_ckpt={model}")
    assert r_ref.data.tags["prune"] == "none_ft1" == r_ref.data.tags[budget.TAG_REF_PRUNE]
    method, r_m = _run(tmp, "prune=channel", "prune.finetune_epochs=1", f"prune.baseline_ckpt={model}")
    assert r_m.data.tags[budget.TAG_REF_PRUNE] == "none_ft1"
    for m in (ref, method):                                     # 2 baseline epochs + 1 of fine-tuning
        assert m[budget.EPOCHS] == 3 and m[budget.IMAGES] == 3 * IMAGES_PER_EPOCH
    assert method[budget.TRAIN_TOTAL_S] > method["time/train_s"]   # the baseline's training counted too
    assert method[budget.TRAIN_TOTAL_S] == pytest.approx(method["time/train_s"] + base["time/train_s"], rel=1e-6)


def test_scratch_method_trains_exactly_the_baselines_epochs(baseline):
    tmp, model, _, _ = baseline
    metrics, r = _run(tmp, "prune=l1_static", "trainer.max_epochs=4", f"budget.match={model}")
    assert metrics[budget.EPOCHS] == 2                          # not the 4 of max_epochs
    assert r.data.tags[budget.TAG_REF_PRUNE] == "none"
    assert metrics["val/final_acc"] > 0 and "val/final_loss" in metrics


def test_early_stopping_marks_converged(tmp_path, fashion_dir):
    metrics, _ = _run(tmp_path, "trainer.max_epochs=5", "trainer.callbacks.early_stopping.patience=1",
                      "+trainer.callbacks.early_stopping.min_delta=100")
    assert metrics[budget.CONVERGED] == 1 and metrics[budget.EPOCHS] == 2


def test_budget_match_errors_are_one_line(tmp_path, baseline):
    _, model, _, _ = baseline
    with pytest.raises(ConfigError, match="does not exist"):
        _run(tmp_path, "prune=l1_static", f"budget.match={tmp_path}/nope.pt")
    with pytest.raises(ConfigError, match="more than trainer.max_epochs=1"):
        _run(tmp_path, "prune=l1_static", "trainer.max_epochs=1", f"budget.match={model}")


def test_reference_names():
    assert budget.reference_name(0) == "none" and budget.reference_name(2) == "none_ft2"
    assert budget.is_baseline_family("none_ft3") and not budget.is_baseline_family("none_ftx")
    assert cell(compose(["prune=none", "prune.finetune_epochs=2"]))["prune"] == "none_ft2"
    assert build(compose(["prune=channel"]).prune).reference == f"none_ft{compose(['prune=channel']).prune.finetune_epochs}"
    assert build(compose(["prune=channel", "prune.finetune_epochs=1"]).prune).reference == "none_ft1"
    assert build(compose(["prune=quant_int8"]).prune).reference == "none"


def test_transfer_source_weights_start_the_target_cell(tmp_path, fashion_dir):
    """The pretrain stage's state dict (5 source classes) fills the features of a target-task net."""
    cfg = compose(tiny(tmp_path, *FAST, "dataset=fashion_mnist_0to4", "dataset.subset=64"))
    grid = {"backbones": ["simple_cnn"], "overrides": f"transfer.source=fashion_mnist_0to4 transfer.dir={tmp_path}/pre",
            "pretrain": {"overrides": " ".join(tiny(tmp_path, *FAST, "dataset.subset=64"))}}
    written = pretrain.pretrain(grid)
    assert [p.name for p in written] == ["simple_cnn-fashion_mnist_0to4.pt"]
    source = torch.load(written[0], weights_only=True)
    head = [v for k, v in source.items() if k.startswith("head.") and k.endswith("weight") and v.dim() == 2]
    assert head[-1].shape[0] == 5                                # trained on the 5 source classes

    target = compose(tiny(tmp_path, *FAST, "dataset=fashion_mnist_5to9", "transfer.source=fashion_mnist_0to4",
                          f"transfer.dir={tmp_path}/pre"))
    from prunegrid.pipeline import Cell

    c = Cell(target)
    assert c.data.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    own = c.net.state_dict()
    for k, v in source.items():
        if k.startswith("features."):
            assert torch.equal(own[k], v), k
    assert cfg.dataset.classes == [0, 1, 2, 3, 4]
    none = pretrain.pretrain({"backbones": ["simple_cnn"], "overrides": f"transfer.dir={tmp_path}/empty"})
    assert none == [] and (tmp_path / "empty" / "README.txt").is_file()
