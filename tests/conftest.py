"""Shared fixtures: tiny cells on real Fashion-MNIST, a temporary MLflow store, image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from prunegrid.config import options

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The Fashion-MNIST files the README's setup restores (fetched here if missing)."""
    from prunegrid.data.fetch import fetch

    fetch(DATA / "fashion_mnist", ROOT)
    return DATA / "fashion_mnist"


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a cell that runs in seconds: few images, few batches, short benchmark."""
    return [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"paths.output_dir={tmp_path}/out",
        f"paths.checkpoint_dir={tmp_path}/ckpt",   # a FAILED run keeps its checkpoints: not in the checkout
        f"paths.data_dir={DATA}",
        "dataset.subset=64",
        "dataset.batch_size=16",
        "dataset.eval_batch_size=32",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "measure.warmup=1",
        "measure.repeats=3",
        "measure.batch_size=4",
        "measure.memory=false",  # the fresh-process probe costs seconds; tests that read memory turn it on
        "tracking.log_model=false",  # the MLflow model costs a second; tests of the MLflow side turn it on
        "tracking.system_metrics=false",
        *extra,
    ]



@pytest.fixture(scope="session")
def image_tree(tmp_path_factory, fashion_dir) -> Path:
    """A real image folder tree: Fashion-MNIST PNGs in 3 class folders, 20 images each."""
    from prunegrid.data.sources import fashion_mnist

    splits = fashion_mnist(str(fashion_dir), download=False)
    root = tmp_path_factory.mktemp("images")
    names = {0: "t_shirt", 1: "trouser", 7: "sneaker"}
    counts = {k: 0 for k in names}
    for i in range(len(splits.test)):
        img, label = splits.test[i]
        if label in names and counts[label] < 20:
            d = root / names[label]
            d.mkdir(exist_ok=True)
            Image.fromarray(img.squeeze(0).numpy()).save(d / f"{label}_{counts[label]:03d}.png")
            counts[label] += 1
        if all(v == 20 for v in counts.values()):
            break
    return root


def report_accuracy(uri: str) -> float:
    """The accuracy line of the latest run's sklearn ``classification_report.txt`` (computed by sklearn
    from the predictions, independently of the torchmetrics value logged as ``test/acc``)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run.info.run_id, "classification_report.txt", tmp)).read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("accuracy"))
    return float(line.split()[1])


def all_group_params():
    from prunegrid.config import GROUPS

    return [(g, o) for g in GROUPS for o in options(g)]


def task_of(group: str, option: str) -> list[str]:
    """``["task=<t>"]`` for an option made for a task other than classification (a detector, a
    detection data set or loss), else nothing: the overrides that compose it."""
    from prunegrid.config import DEFAULT_TASK, TASK_GROUPS

    if group not in TASK_GROUPS:
        return []
    kind = next((t for t in options("task") if option in options(group, t)), DEFAULT_TASK)
    return [] if kind == DEFAULT_TASK else [f"task={kind}"]



@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """A head on loopback for the scale-out tests: PostgreSQL + an MLflow server on it (free ports)."""
    import shutil

    from prunegrid import head as head_mod

    folder = tmp_path_factory.mktemp("head")

    def down():
        head_mod.stop(folder)
        state = head_mod._load(folder) or {}
        for key in ("pg_data", "pg_socket"):  # the cluster may live outside the tmp folder (see prunegrid.head)
            if state.get(key) and not Path(state[key]).is_relative_to(folder):
                shutil.rmtree(state[key], ignore_errors=True)
        if state.get("pg_log"):
            Path(state["pg_log"]).unlink(missing_ok=True)

    try:
        info = head_mod.start(folder, mlflow_port=0, pg_port=0)
    except BaseException:
        down()
        raise
    yield info
    down()
