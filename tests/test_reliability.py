"""Reliability as a user meets it: class names in any script, interruptions and resume, concurrent
writers, one-line mistakes with no run created, outputs before FINISHED, model files that cannot
run code, broken images, and sweeps (``train.py -m hydra/sweeper=optuna``) killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from prunegrid import cli, measure, tracking
from prunegrid.config import compose
from prunegrid.data.sources import ImageFiles
from prunegrid.errors import ConfigError
from prunegrid.pipeline import run

from .conftest import DATA, tiny

ROOT = Path(__file__).resolve().parents[1]
KOREAN = ["화재", "연기", "비화재", "non_fire"]


def _runs(uri: str):
    client = MlflowClient(uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    """A cell whose fit lasts a few seconds per epoch (so a signal lands mid-fit), in ``tmp_path``."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"paths.output_dir={tmp_path}/out",
            f"paths.checkpoint_dir={tmp_path}/ckpt", f"paths.data_dir={DATA}", "backbone=simple_cnn",
            "dataset.subset=512", "dataset.batch_size=16", "trainer.max_epochs=3",
            "trainer.callbacks.early_stopping=null", "trainer.enable_progress_bar=false", "measure.warmup=1",
            "measure.repeats=3", "measure.batch_size=4", "measure.memory=false", "explain.enabled=false", *extra]


def _cmd(args: list[str], module: str | None = None) -> list[str]:
    return [sys.executable, *(["-m", module] if module else [str(ROOT / "train.py")]), *args]


def _popen(args: list[str], cwd: Path, module: str | None = None) -> subprocess.Popen:
    """The command in its own working folder (MLflow puts a SQLite store's artifacts under ``./mlruns``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(_cmd(args, module), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """The first file matching ``pattern`` under ``root`` (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {pattern} under {root} after {timeout} s")


def _interrupt_mid_fit(tmp_path: Path, sig: int, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a cell, send ``sig`` once its first epoch is checkpointed (the fit still running)."""
    proc = _popen(_train_args(tmp_path, *extra), tmp_path)
    last = _wait_for("ckpt/*/fit0/last.ckpt", tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert not (last.parent / "done.pt").exists(), "the fit had ended before the signal"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), last


# -- class names in any script ----------------------------------------------------------------

def test_class_keys_keep_every_script_and_never_collide():
    assert tracking.class_keys("f1", KOREAN) == ["test/f1_화재", "test/f1_연기", "test/f1_비화재", "test/f1_non_fire"]
    keys = tracking.class_keys("f1", ["Cat", "cat", "a/b", "a_b", "T-shirt/top"])
    assert len(set(keys)) == 5 and keys[:2] == ["test/f1_cat", "test/f1_cat_2"] and keys[4] == "test/f1_t_shirt_top"
    from mlflow.utils.validation import _validate_metric_name

    for key in keys + tracking.class_keys("f1", KOREAN):
        _validate_metric_name(key)


@pytest.fixture(scope="module")
def korean_tree(tmp_path_factory, fashion_dir) -> Path:
    """Fashion-MNIST PNGs of four classes in folders named 화재, 연기, 비화재, non_fire (15 each)."""
    from prunegrid.data.sources import fashion_mnist

    splits = fashion_mnist(str(fashion_dir), download=False)
    root = tmp_path_factory.mktemp("fire")
    names = dict(zip((0, 1, 7, 9), KOREAN))
    counts = dict.fromkeys(names, 0)
    for i in range(len(splits.test)):
        img, label = splits.test[i]
        if label in names and counts[label] < 15:
            (root / names[label]).mkdir(exist_ok=True)
            Image.fromarray(img.squeeze(0).numpy()).save(root / names[label] / f"{counts[label]:03d}.png")
            counts[label] += 1
    return root


def test_korean_class_names_get_four_keys_with_the_right_values(tmp_path, korean_tree):
    from sklearn.metrics import f1_score

    cfg = compose(tiny(tmp_path, "dataset=image_folder", f"dataset.root={korean_tree}", "dataset.input_size=32",
                       "dataset.num_workers=0", "trainer.limit_test_batches=null", "explain.enabled=false"))
    result = run(cfg)
    _, (r,) = _runs(cfg.tracking.uri)
    f1_keys = sorted(k for k in r.data.metrics if k.startswith("test/f1_") and k != "test/f1_macro")
    assert f1_keys == sorted(f"test/f1_{name}" for name in KOREAN)
    classes = sorted(KOREAN)  # the image folder's class order: sorted folder names
    expected = f1_score(result.test["targets"].numpy(), result.test["preds"].numpy(), labels=range(4), average=None,
                        zero_division=0)
    for name, value in zip(classes, expected):
        assert r.data.metrics[f"test/f1_{name}"] == pytest.approx(value, abs=1e-6), name


# -- interruptions and resume -----------------------------------------------------------------

def test_a_signal_inside_a_store_write_lets_the_write_finish_then_ends_the_run_killed(tmp_path):
    from prunegrid import interrupt

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = tracking.Tracker(uri, "e", "cell", {})
    with interrupt.signals(), pytest.raises(interrupt.Interrupted):
        with tr.run({}):
            write = tr.client.log_batch

            def signalled_mid_write(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)   # the handler runs here, in the middle of the write
                return write(*args, **kwargs)

            tr.client.log_batch = signalled_mid_write
            tr.log_metrics({"m": 1.0})
    _, (r,) = _runs(uri)
    assert r.data.metrics == {"m": 1.0} and r.info.status == "KILLED" and "SIGTERM" in r.data.tags["status_detail"]


def test_sigint_and_sigterm_mid_fit_end_killed_without_test_metrics_then_resume(tmp_path):
    outcome: dict[str, tuple] = {}

    def interrupt(name: str, sig: int):
        outcome[name] = _interrupt_mid_fit(tmp_path / name, sig)

    threads = [threading.Thread(target=interrupt, args=(n, s)) for n, s in (("int", signal.SIGINT),
                                                                           ("term", signal.SIGTERM))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, sig, code in (("int", "SIGINT", 130), ("term", "SIGTERM", 143)):
        proc, last = outcome[name]
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and f"interrupted by {sig}" in proc.stderr
        _, (r,) = _runs(f"sqlite:///{tmp_path / name}/mlflow.db")
        assert r.info.status == "KILLED" and sig in r.data.tags["status_detail"]
        assert not [k for k in r.data.metrics if k.startswith(("test/", "model/", "time/infer"))]
        assert last.is_file(), "the last checkpoint is kept"

    # the SIGTERM'd cell, resumed: the same MLflow run, FINISHED, with an uninterrupted run's budget
    term = tmp_path / "term"
    killed = _runs(f"sqlite:///{term}/mlflow.db")[1][0].info.run_id
    proc = subprocess.run(_cmd(_train_args(term, "resume=true")), cwd=term, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, (r,) = _runs(f"sqlite:///{term}/mlflow.db")
    assert r.info.run_id == killed and r.info.status == "FINISHED" and r.data.tags[tracking.TAG_RESUMES] == "1"
    epochs, images = r.data.metrics["budget/epochs"], r.data.metrics["budget/images"]
    assert epochs == 3 and images > 0 and images % 3 == 0   # every epoch counted once, the interrupted one included
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")] == [0, 1, 2]
    assert not (term / "ckpt" / killed).exists(), "a FINISHED run's checkpoints are removed"


def test_four_processes_write_one_fresh_sqlite_store(tmp_path):
    procs = [_popen(tiny(tmp_path / f"p{i}", f"tracking.uri=sqlite:///{tmp_path}/shared.db", "backbone=simple_cnn",
                         f"seed={i}", "explain.enabled=false"), tmp_path)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client, runs = _runs(f"sqlite:///{tmp_path}/shared.db")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "fashion_mnist"]


# -- mistakes: one line, exit 2, no run -------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("dataset.skip_bad_filez=true", "did you mean dataset.skip_bad_images"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 must be an integer >= 1"),
    ("prune.amount=1.5", "prune=none has no option 'amount'; it is an option of prune=l1_dynamic, prune=l1_static"),
])
def test_mistakes_are_one_line_exit_2_and_create_no_run(tmp_path, override, needle):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(_cmd([f"tracking.uri=sqlite:///{db}", override]), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr[-2000:]
    assert not db.exists() or not _runs(f"sqlite:///{db}")[1]


def test_a_value_of_the_wrong_type_or_range_is_refused_before_any_run():
    for override, needle in [("measure.threads=0", "measure.threads=0 must be an integer >= 1"),
                             ("trainer.max_epochs=2.5", "must be an integer"),
                             ("dataset.num_workers=-1", "dataset.num_workers=-1 must be an integer >= 0"),
                             ("prune=channel prune.ratio=1.2", "prune.ratio=1.2"),
                             ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0")]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
            compose(override.split())


def test_hydra_full_error_shows_the_stack_trace(tmp_path):
    proc = subprocess.run(_cmd(["trainer.max_epochz=1"]), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# -- FINISHED only after the outputs ----------------------------------------------------------

def test_an_unwritable_metrics_out_ends_the_run_failed(tmp_path, fashion_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", f"paths.metrics_out={blocker}/metrics.json",
                       "explain.enabled=false"))
    with pytest.raises(ConfigError, match="cannot write the run's outputs"):
        run(cfg)
    _, (r,) = _runs(cfg.tracking.uri)
    assert r.info.status == "FAILED" and "cannot write the run's outputs" in r.data.tags["status_detail"]


# -- model files that cannot run code ---------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_checkpoint_crafted_to_run_code_is_refused_and_nothing_runs(tmp_path, fashion_dir):
    marker, evil = tmp_path / "code_ran", tmp_path / "model.pt"
    torch.save({"model": _RunsCode(marker)}, evil)
    cfg = compose(tiny(tmp_path, "backbone=simple_cnn", "prune=channel", f"prune.baseline_ckpt={evil}"))
    with pytest.raises(measure.ModelFileError, match=r"names builtins\.exec, which prunegrid does not load \(it could run code\)"):
        run(cfg)
    assert not marker.exists()
    assert not Path(str(cfg.tracking.uri).split(":///", 1)[1]).exists() or not _runs(cfg.tracking.uri)[1]
    with pytest.raises(measure.ModelFileError):
        measure.load_model(evil)
    assert not marker.exists()


# -- broken images ----------------------------------------------------------------------------

@pytest.fixture
def truncated_tree(tmp_path, image_tree) -> tuple[Path, Path]:
    """The image tree as JPEGs, one of them truncated (it passes ``Image.verify`` but cannot be decoded)."""
    root = tmp_path / "jpegs"
    for png in image_tree.rglob("*.png"):
        dest = root / png.parent.name / (png.stem + ".jpg")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").resize((64, 64)).save(dest, quality=95)
    bad = sorted((root / "trouser").glob("*.jpg"))[3]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with Image.open(bad) as im:
        im.verify()   # the case Image.verify misses
    return root, bad


def test_a_truncated_jpeg_is_named_in_one_line_or_skipped_and_counted(tmp_path, truncated_tree, capsys):
    root, bad = truncated_tree
    args = tiny(tmp_path, "dataset=image_folder", f"dataset.root={root}", "dataset.input_size=32",
                "dataset.num_workers=2", "backbone=simple_cnn", "explain.enabled=false")
    with pytest.raises(SystemExit) as exit_info, cli.guard():
        run(compose(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and str(bad) in err and "skip_bad_images" in err
    run(compose([*args, "dataset.skip_bad_images=true"]))
    _, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert [r.data.metrics.get("data/bad_images_skipped") for r in runs] == [1.0]


def test_an_image_broken_after_the_check_is_named_from_a_dataloader_worker(truncated_tree, capsys):
    root, bad = truncated_tree
    loader = torch.utils.data.DataLoader(ImageFiles([(bad, 0)] * 4), num_workers=2, collate_fn=list)
    with pytest.raises(SystemExit) as exit_info, cli.guard():
        list(loader)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and str(bad) in err, err


# -- sweeps -----------------------------------------------------------------------------------

def _sweep_args(tmp_path: Path, study: str, n_trials: int, *extra: str, worker: int = 0) -> list[str]:
    """``train.py -m hydra/sweeper=optuna ...`` on a study in ``tmp_path`` (cells as :func:`_train_args`,
    without an MLflow model or system metrics); each worker has its own output folders."""
    cell = [a for a in _train_args(tmp_path, *extra) if not a.startswith("paths.output_dir=")]
    return ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n_trials}", "prune=l1_static",
            "prune.amount=interval(0.2,0.6)", f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"hydra.sweeper.study_name={study}", f"hydra.sweep.dir={tmp_path}/multirun{worker}",
            f"paths.output_dir={tmp_path}/out{worker}", "tracking.log_model=false", "tracking.system_metrics=false",
            *cell]


@pytest.mark.slow  # two sweep processes with 2-epoch cells (about a minute); the sweeper's side: tests/test_sweep.py
def test_a_sweep_killed_mid_trial_runs_it_again_from_its_checkpoints_under_the_same_parent(tmp_path):
    import optuna

    from prunegrid import sweep

    args = _sweep_args(tmp_path, "killed", 2, "trainer.max_epochs=2", "dataset.subset=640")
    proc = _popen(args, tmp_path)
    _wait_for("ckpt/*/fit0/last.ckpt", tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "trial 0 was interrupted" in err and "Traceback" not in err, err[-3000:]
    args = _sweep_args(tmp_path, "killed", 1, "trainer.max_epochs=2", "dataset.subset=640")
    done = subprocess.run(_cmd(args), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path}/optuna.db")
    first, again = study.trials                                   # the re-run ran the interrupted trial first
    assert first.state.name == "FAIL" and first.user_attrs[sweep.INTERRUPTED_ATTR] == "SIGTERM"
    assert again.state.name == "COMPLETE" and again.user_attrs[sweep.RESUMES_ATTR] == 0
    assert again.params == first.params
    _, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]   # one MLflow run: the killed one, resumed
    assert len(parents) == 1 and child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].data.tags[tracking.TAG_RUN_KIND] == "sweep" and parents[0].info.status == "FINISHED"
    assert child.info.status == "FINISHED" and child.data.tags.get(tracking.TAG_RESUMES) == "1"
    assert child.info.run_id == first.user_attrs[sweep.RUN_ATTR] == again.user_attrs[sweep.RUN_ATTR]


def test_workers_started_together_make_one_parent_run(tmp_path):
    """The election itself, in threads (the CLI version is the slow test below)."""
    from omegaconf import OmegaConf

    from prunegrid import sweep

    cfg = compose([f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "prune=l1_static"])
    sampler = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 0})
    ids, errors = [], []

    def worker():
        try:
            storage = sweep.open_storage(f"sqlite:///{tmp_path}/optuna.db")
            study, created = sweep.create_study(storage, "together", ["maximize"], sampler, None)
            ids.append(sweep._parent_run(study, cfg, created))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 4 and len(set(ids)) == 1
    assert len(_runs(f"sqlite:///{tmp_path}/mlflow.db")[1]) == 1


@pytest.mark.slow  # four sweep processes at once (over a minute on 2 cores)
def test_four_sweep_processes_on_one_study_share_one_parent_run(tmp_path):
    import optuna

    extra = ("trainer.max_epochs=1", "dataset.subset=64", "trainer.limit_train_batches=2",
             "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    procs = [_popen(_sweep_args(tmp_path, "together", 1, *extra, worker=i), tmp_path) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="together", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    _, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 5
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parents[0]} == {parents[0].info.run_id}
