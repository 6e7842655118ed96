"""One cell end to end: the MLflow record holds every CONTRACT.md key; failures end FAILED."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from prunegrid import tracking
from prunegrid.config import compose
from prunegrid.errors import DataError
from prunegrid.pipeline import run
from tests.conftest import report_accuracy, tiny


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_run_records_every_contract_key(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "measure.memory=true", "measure.repeats=40", "measure.warmup=5"))
    metrics = run(cfg)
    client, r = _only_run(cfg.tracking.uri)
    assert r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == "fashion_mnist"
    for key in tracking.REQUIRED_METRICS:
        assert key in r.data.metrics, key
    for kind in tracking.PER_CLASS_KINDS:
        assert tracking.class_key(kind, "T-shirt/top") in r.data.metrics
    for tag in tracking.TAGS:
        assert tag in r.data.tags, tag
    assert r.data.tags["backbone"] == "resnet18" and r.data.tags["prune"] == "none"
    assert r.data.tags["data_md5"].endswith(".dir")
    assert r.data.params["choices.prune"] == "none" and r.data.params["trainer.max_epochs"] == "1"
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    model = {a.path for a in client.list_artifacts(r.info.run_id, tracking.ARTIFACT_MODEL_DIR)}
    for name in tracking.REQUIRED_ARTIFACTS:
        assert name in top | model, name
    assert metrics["test/acc"] == pytest.approx(report_accuracy(cfg.tracking.uri), abs=5e-5)
    assert metrics["model/params"] == metrics["baseline/params"]
    assert r.data.metrics["model/sparsity"] == pytest.approx(0, abs=1e-6)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [0]

    # memory is the model's own: at least resnet18's 11.2M float32 weights, far below the process's
    assert 42 < metrics["memory/infer_peak_mb"] < 400 < metrics["memory/infer_process_peak_mb"]
    assert r.data.tags[tracking.MEMORY_STATUS] == "ok (cpu)" and r.data.tags[tracking.TAG_MEASURE_DEVICE] == "cpu"
    # the trained model against its dense baseline (same architecture): no speed-up, in both runtimes
    assert metrics["speedup/infer"] == pytest.approx(1.0, abs=0.05)
    # its quartiles reach 1.0 within 2% (a load drift on the shared machine can shift a whole run that much)
    for rt in tracking.RUNTIMES:
        q25, mid, q75 = (metrics[tracking.speedup_key(rt) + s] for s in ("_q25", "", "_q75"))
        assert q25 <= mid <= q75 and q25 <= 1.02 and q75 >= 0.98, (rt, q25, mid, q75)
    for d in tracking.DEPLOYMENTS:
        for rt in tracking.RUNTIMES:
            assert metrics[tracking.infer_key(rt, d)] > 0 and tracking.speedup_key(rt, d) + "_q75" in metrics
    assert metrics["measure/threads"] == 1 and metrics["measure/batch_batch"] == 4


def test_epochs_are_steps(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "trainer.max_epochs=2", "trainer.callbacks.early_stopping=null"))
    run(cfg)
    client, r = _only_run(cfg.tracking.uri)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [0, 1]


def test_image_folder_trains(tmp_path, image_tree):
    cfg = compose(tiny(tmp_path, "dataset=image_folder", f"dataset.root={image_tree}", "dataset.input_size=32",
                       "dataset.num_workers=0"))
    metrics = run(cfg)
    client, r = _only_run(cfg.tracking.uri)
    assert client.get_experiment(r.info.experiment_id).name == "image_folder"
    assert {"test/f1_sneaker", "test/f1_trouser", "test/f1_t_shirt"} <= set(r.data.metrics)
    assert metrics["test/acc"] == pytest.approx(report_accuracy(cfg.tracking.uri), abs=5e-5)


def test_crash_ends_failed_with_reason(tmp_path, fashion_dir, monkeypatch):
    import prunegrid.pipeline as pipeline

    def boom(self, net, ctx):
        raise RuntimeError("method exploded")

    monkeypatch.setattr(pipeline.PruningMethod, "after_fit", boom)
    cfg = compose(tiny(tmp_path))
    with pytest.raises(RuntimeError):
        run(cfg)
    _, r = _only_run(cfg.tracking.uri)
    assert r.info.status == "FAILED"
    assert r.data.tags["status_detail"] == "RuntimeError: method exploded"


def test_bad_data_leaves_no_running_run(tmp_path, fashion_dir):
    cfg = compose(tiny(tmp_path, "dataset=image_folder", f"dataset.root={tmp_path}/nowhere"))
    with pytest.raises(DataError):
        run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status != "RUNNING" for r in runs)


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert compose([]).tracking.uri == "sqlite:///from-env.db"
    assert compose(["tracking.uri=sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose([]).tracking.uri == "sqlite:///mlflow.db"
