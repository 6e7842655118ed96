"""MLflow naming and logging: the one place that knows the keys of CONTRACT.md.

The pipeline logs through :class:`Tracker`; the grid report reads runs back through
:func:`load_runs`. Metric keys, tags and artifact names are defined here only.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"

TAGS = ("backbone", "prune", "dataset", "loss", "seed", "git_commit", "data_md5", "status_detail")
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
TEST_METRICS = ("test/acc", "test/f1_macro", "test/loss")
VAL_FINAL_METRICS = ("val/final_acc", "val/final_loss")  # the final model on the validation split (sweeps choose on these)
MODEL_METRICS = ("model/params", "model/params_nonzero", "model/sparsity", "model/flops", "model/size_mb")
# Latency: three deployments (suffix: batch 1 on measure.threads, batch 1 on all cores, measure.batch_size on
# all cores) in two runtimes ("" eager PyTorch, "_onnx" ONNX Runtime), each timed against the dense baseline.
DEPLOYMENTS = ("", "_mt", "_batch")
RUNTIMES = ("", "_onnx")


def infer_key(runtime: str = "", deployment: str = "") -> str:
    """``time/infer_ms{runtime}{deployment}``: median ms per image (``..._iqr``: its interquartile range)."""
    return f"time/infer_ms{runtime}{deployment}"


def speedup_key(runtime: str = "", deployment: str = "") -> str:
    """``speedup/infer{runtime}{deployment}``: median round-by-round baseline / model (``_q25``, ``_q75``)."""
    return f"speedup/infer{runtime}{deployment}"


TIME_METRICS = ("time/train_s", "time/epoch_s", infer_key(), infer_key() + "_iqr", infer_key("", "_batch"),
                infer_key("", "_mt"), speedup_key(), speedup_key() + "_q25", speedup_key() + "_q75",
                "memory/infer_peak_mb", "memory/train_peak_mb")
ONNX_METRICS = (infer_key("_onnx"), speedup_key("_onnx"), infer_key("_onnx") + "_iqr")
MEMORY_STATUS = "memory_status"          # "ok", or why the fresh-process memory probe failed
TAG_MEASURE_DEVICE = "measure_device"    # where latency and memory were measured (cpu, cuda)
ONNX_FILE = "model.onnx"                 # logged under ARTIFACT_MODEL_DIR
TAG_DEPLOY_STATUS = "deploy_status"    # "ok", or why the whole-detector measurement failed (task=detection)
TAG_ONNX_STATUS = "onnx_status"          # "ok", or the one-line reason the export/run failed
SIZE_COMPRESSED = "model/size_mb_compressed"
EXPLAIN_METRICS = ("explain/cam_agreement", "explain/cam_pearson")
CAM_AGREEMENT, CAM_PEARSON = EXPLAIN_METRICS
TAG_CAM_AGREEMENT_STATUS = "cam_agreement_status"  # why cam_agreement is missing, when it is
TAG_EXPLAIN_STATUS = "explain_status"  # why the Grad-CAM step failed, when it did
ARTIFACT_GRADCAM = "gradcam.png"
REQUIRED_METRICS = EPOCH_METRICS + TEST_METRICS + MODEL_METRICS + TIME_METRICS
# task=detection: the same model, time and memory keys, with the task's own epoch, test and validation keys and
# the whole detector's deployment (reading, resizing, model, NMS; memory sampled every second).
DETECTION_EPOCH_METRICS = ("train/loss", "train/box_loss", "train/obj_loss", "train/cls_loss", "val/loss", "val/map50",
                           "val/map")
DETECTION_TEST_METRICS = ("test/map50", "test/map", "test/loss", "test/precision", "test/recall")
DETECTION_VAL_FINAL_METRICS = ("val/final_map50", "val/final_map", "val/final_loss")
DETECTION_DEPLOY_METRICS = ("time/detect_ms", "time/detect_ms_q25", "time/detect_ms_q75", "time/detect_fps",
                            "memory/detect_peak_mb", "memory/detect_mean_mb", "memory/detect_samples",
                            "memory/detect_exact_peak_mb", "memory/detect_increase_mb", "deploy/boxes_per_image")
DETECTION_REQUIRED_METRICS = (DETECTION_EPOCH_METRICS + DETECTION_TEST_METRICS + MODEL_METRICS + TIME_METRICS
                              + DETECTION_DEPLOY_METRICS)
PER_CLASS_KINDS = ("f1", "precision", "recall")
BASELINE_PREFIX = "baseline/"
CELL_TAGS = TAGS[:5]
# The grid's columns (CONTRACT.md "The grid") -> the metric each one reads.
GRID_METRICS = {"acc": "test/acc", "f1_macro": "test/f1_macro", "params": "model/params",
                "params_nonzero": "model/params_nonzero", "flops": "model/flops", "size_mb": "model/size_mb",
                "train_s": "time/train_s", "epoch_s": "time/epoch_s", "infer_ms": "time/infer_ms",
                "infer_peak_mb": "memory/infer_peak_mb", "train_peak_mb": "memory/train_peak_mb"}
GRID_OPTIONAL_METRICS = {"infer_ms_onnx": infer_key("_onnx"), "cam_agreement": "explain/cam_agreement",
                         "infer_ms_iqr": infer_key() + "_iqr", "infer_ms_onnx_iqr": infer_key("_onnx") + "_iqr",
                         "size_mb_onnx": "model/size_mb_onnx",
                         # task=detection: the primary metric is map50 where classifiers have acc
                         "map50": "test/map50", "map": "test/map", "detect_ms": "time/detect_ms",
                         "detect_peak_mb": "memory/detect_peak_mb", "detect_increase_mb": "memory/detect_increase_mb"}
GRID_BUDGET_METRICS = {"budget_epochs": "budget/epochs", "budget_images": "budget/images",
                       "converged": "train/converged", "train_total_s": "time/train_total_s"}
# Speed-up columns (one runtime each) -> their metric; each also has _q25 / _q75 columns.
GRID_SPEEDUPS = {f"infer_speedup{rt}{d}": speedup_key(rt, d) for rt in RUNTIMES for d in DEPLOYMENTS}
BASELINE_INFER_MS = BASELINE_PREFIX + "infer_ms"   # the dense backbone timed in the same process

ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_CONFUSION = "confusion_matrix.png"
ARTIFACT_CURVES = "learning_curves.png"
ARTIFACT_REPORT = "classification_report.txt"
ARTIFACT_DETECTION_REPORT = "detection_report.txt"  # per-class AP50, precision and recall of a detector
ARTIFACT_MODEL_DIR = "model"
MODEL_FILE = "model.pt"
ARTIFACT_OUTPUTS = "outputs"             # the cell's paths.metrics_out JSON, as DVC's metrics file holds it
TAG_METHOD = "method"                    # the method's YAML (conf/prune/<method>.yaml), whatever its strength or control
TAG_STRENGTH_KNOB = "strength_knob"      # the option that YAML names as its strength (ratio, amount, k)
TAG_STRENGTH = "strength"                # its value in this run
TAG_CONTROL = "control"                  # "none", or the control this run is (random, scratch)
TAG_HOST = "host"                        # the machine the cell ran (and was timed) on
TAG_SWEEP_TRIAL = "sweep_trial"          # an Optuna sweep's trial number (set by the sweeper): never a grid cell
TAG_SWEEP_PARAMS = "sweep_params"        # the values that trial sampled, "amount=0.25 lr=0.001"
TAG_MODEL_MD5 = "model_md5"              # md5 of the final model file (model/model.pt = paths.model_out)
TAG_BASELINE_MD5 = "baseline_md5"        # md5 of the baseline model the cell read (prune.baseline_ckpt, budget.match)
TAG_MEASURE_WINDOW = "measure_window"    # "<start>-<end>" epoch seconds the cell held the node's measurement lock


def host_name() -> str:
    """This machine's name, as runs record it (``host`` tag)."""
    import socket

    return socket.gethostname()


def file_md5(path: str | Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
REQUIRED_ARTIFACTS = (ARTIFACT_CONFIG, ARTIFACT_CONFUSION, ARTIFACT_CURVES, ARTIFACT_REPORT,
                      f"{ARTIFACT_MODEL_DIR}/{MODEL_FILE}")


def class_key(kind: str, class_name: str) -> str:
    """``test/f1_<class>`` with the class name kept in any script, made safe for MLflow
    (``T-shirt/top`` -> ``test/f1_t_shirt_top``, ``화재`` -> ``test/f1_화재``)."""
    from prunegrid.naming import key_part

    return f"test/{kind}_{key_part(class_name)}"


def class_keys(kind: str, classes: list[str]) -> list[str]:
    """:func:`class_key` of every class, distinct: a name that collides after sanitising gets ``_2``, ..."""
    from prunegrid.naming import key_part, unique_parts

    return [f"test/{kind}_{part}" for part in unique_parts(classes, key_part)]


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: an explicit ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else SQLite at the root."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


TAG_CONFIG_MD5 = "config_md5"   # md5 of the run's params: resume=true continues a run with the same one
TAG_RESUMES = "resumes"         # how many times the run was resumed
TAG_RESUMED_COMMIT = "git_commit_resumed"  # the code that resumed the run, when it differs from git_commit
RESUMABLE = ("KILLED", "FAILED")


def config_md5(params: dict[str, Any]) -> str:
    """A digest of a run's params (its whole resolved config), the same in every process."""
    import hashlib
    import json

    return hashlib.md5(json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True).encode()).hexdigest()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Several processes opening one fresh SQLite store at once would each create its tables: the
    first to arrive does it under a file lock beside the database (other stores need none)."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        path = url.database if url.get_backend_name() == "sqlite" else None
    except Exception:  # not a database URL (a file store, an http server)
        path = None
    if not path or path == ":memory:" or not Path(path).expanduser().parent.is_dir():
        yield  # nothing to lock (the store reports a folder that does not exist itself)
        return
    from filelock import FileLock

    with FileLock(f"{Path(path).expanduser()}.lock", timeout=600):
        yield


# MLflow 3's UI opens an experiment by its kind: a model-training experiment opens on the runs table.
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_RUN_KIND = "prunegrid.kind"   # "cell", "grid" (a grid's parent run) or "sweep" (a study's parent run)
TAG_MODEL_URI = "model_uri"       # the run's MLflow logged model, ``models:/m-...`` (load with mlflow.pyfunc)
TAG_MODEL_FLAVOR = "model_flavor" # "pytorch", or "onnx" where the PyTorch flavour cannot hold the model (INT8)


# The runs table's preset (MLflow 3's shared views): an experiment tag ``mlflow.sharedViewState.<key>``
# holds the table's state, which the UI loads from ``#/experiments/<id>/runs?viewStateShareKey=<key>``
# and lists under "Saved views". It shows the cells (no grid or sweep parent, so no folding), best
# accuracy first, with the columns people compare.
GRID_VIEW_KEY = "prunegrid-grid"
TAG_GRID_VIEW = f"mlflow.sharedViewState.{GRID_VIEW_KEY}"
TAG_GRID_VIEW_NAME = "prunegrid: the grid's cells"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


GRID_DELTA, GRID_DELTA_BASE = "grid/acc_delta_pt", "grid/acc_delta_pt_vs_base"   # logged on each cell by the report
GRID_VIEW_COLUMNS = [_column("metrics", k) for k in (GRID_METRICS["acc"], GRID_DELTA, GRID_METRICS["params_nonzero"],
                                                     speedup_key(), speedup_key("_onnx"), GRID_METRICS["infer_peak_mb"])] + \
    [_column("tags", "ref_prune")] + [_column("attributes", a) for a in ("Dataset", "Source", "Models")]


def grid_view() -> str:
    """The tag value of the grid's shared view (the UI's saved-view wrapper around its table state)."""
    import json

    state = {"searchFilter": f"tags.`{TAG_RUN_KIND}` = 'cell'", "orderByKey": _column("metrics", "test/acc"),
             "orderByAsc": False, "selectedColumns": GRID_VIEW_COLUMNS, "columnOrder": GRID_VIEW_COLUMNS,
             "runListHidden": False, "viewMaximized": False}
    return json.dumps({"name": TAG_GRID_VIEW_NAME, "createdAt": 0, "updatedAt": 0, "state": json.dumps(state)})


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing (another process may create it at the same
    moment) as a model-training experiment with the grid's runs-table preset (:func:`grid_view`)."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get(TAG_EXPERIMENT_KIND) is None:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        if exp.tags.get(TAG_GRID_VIEW) != grid_view():
            client.set_experiment_tag(exp.experiment_id, TAG_GRID_VIEW, grid_view())
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, TAG_GRID_VIEW: grid_view()})
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def open_client(uri: str | None) -> MlflowClient:
    """An ``MlflowClient`` whose store is open (created first under :func:`store_lock`)."""
    uri = resolve_uri(uri)
    with store_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the first query opens the store: a fresh database gets its tables
    return client


# Data-preparation runs (not grid cells) carry TAG_JOB (the GAN job's own keys live in prunegrid.data.gan).
TAG_JOB = "job"


def run_name(cell: dict[str, str]) -> str:
    """The cell's file and stage name (``models/<name>.pt``, DVC's stages, ``grid.json``)."""
    return f"{cell['backbone']}-{cell['prune']}-{cell['dataset']}-{cell['loss']}-s{cell['seed']}"


def display_name(cell: dict[str, str], tags: dict[str, str] | None = None, default_loss: str | None = None) -> str:
    """The MLflow run name: what differs between runs first, so the UI's narrow name column tells them
    apart. Method with its strength and control (``channel-r0.7-random``), backbone, seed, the loss when
    it is not ``default_loss``; a sweep trial adds its number and sampled values. The data set is the
    experiment's name and stays out."""
    tags = tags or {}
    parts = [cell["prune"], cell["backbone"], f"s{cell['seed']}"]
    if cell.get("loss") and cell["loss"] != default_loss:
        parts.append(cell["loss"])
    if tags.get(TAG_SWEEP_TRIAL, "") != "":
        parts.append(f"trial {tags[TAG_SWEEP_TRIAL]}" + (f" ({tags[TAG_SWEEP_PARAMS]})" if tags.get(TAG_SWEEP_PARAMS) else ""))
    return " · ".join(parts)


def unique_name(client: MlflowClient, experiment_id: str, name: str) -> str:
    """``name``, or ``name #k`` when ``k - 1`` runs of the experiment already carry it (a re-run of a cell)."""
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    taken = client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'",
                               max_results=1000)
    names = {r.info.run_name for r in taken}
    if name not in names:
        return name
    k = 2
    while f"{name} #{k}" in names:
        k += 1
    return f"{name} #{k}"


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_md5(path: str | Path | None) -> str:
    """The DVC hash of the data version under ``path``: the md5 in the nearest ``<dir>.dvc`` file, or
    of a stage output recorded in a ``dvc.lock`` of the project (such as the offline detection set,
    ``prep/dvc.yaml:fashion_det``)."""
    if not path:
        return "untracked"
    p = Path(path).expanduser().resolve()
    import yaml

    for candidate in [p, *p.parents]:
        if not candidate.name:
            break
        dvc_file = candidate.with_name(candidate.name + ".dvc")
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
            if outs and outs[0].get("md5"):
                return str(outs[0]["md5"])
        if (candidate / ".dvc").is_dir():
            return _stage_out_md5(p, candidate) or "untracked"
    return "untracked"


def _stage_out_md5(path: Path, root: Path) -> str | None:
    """The md5 that a ``dvc.lock`` under ``root`` (or one folder below) records for the stage output
    ``path`` or a folder holding it; paths are relative to the stage's ``wdir`` in its ``dvc.yaml``."""
    import yaml

    for lock in [root / "dvc.lock", *sorted(root.glob("*/dvc.lock"))]:
        if not lock.is_file():
            continue
        spec = lock.with_name("dvc.yaml")
        stages = (yaml.safe_load(spec.read_text()) or {}).get("stages", {}) if spec.is_file() else {}
        for name, stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).items():
            wdir = (lock.parent / str((stages.get(name) or {}).get("wdir", "."))).resolve()
            for out in stage.get("outs") or []:
                where = (wdir / str(out.get("path", ""))).resolve()
                if out.get("md5") and (path == where or where in path.parents):
                    return str(out["md5"])
    return None


class EpochLogger(Logger):
    """Lightning logger writing epoch metrics to the active MLflow run with ``step = epoch``.

    Successive fits in one run (fit, then fine-tune) continue the epoch count, so the curves
    show the whole history. Test metrics are left to the pipeline.
    """

    def __init__(self, tracker: "Tracker"):
        super().__init__()
        self.tracker = tracker
        self.offset = 0
        self.history: list[dict[str, float]] = []

    def restore(self) -> None:
        """A resumed run: the epoch metrics logged before the interruption come back into ``history``."""
        by_step: dict[int, dict[str, float]] = {}
        run = self.tracker.client.get_run(self.tracker.run_id)
        for key in run.data.metrics:
            if key in EPOCH_METRICS:
                for m in self.tracker.client.get_metric_history(self.tracker.run_id, key):
                    by_step.setdefault(int(m.step), {"epoch": int(m.step)})[key] = float(m.value)
        self.history = [by_step[k] for k in sorted(by_step)]

    @property
    def name(self) -> str:
        return "prunegrid"

    @property
    def version(self) -> str:
        return self.tracker.run_id or ""

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        return self.tracker.client

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the pipeline logs the whole resolved config once

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = int(metrics.pop("epoch", step or 0)) + self.offset
        metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("test/")}
        if not metrics:
            return
        self.history.append({"epoch": epoch, **metrics})
        self.tracker.log_metrics(metrics, step=epoch)

    def next_fit(self, epochs_done: int) -> None:
        self.offset += epochs_done


def _whole(write: Callable) -> Callable:
    """Run a store write under :func:`prunegrid.interrupt.deferred`: a SIGINT/SIGTERM raised in the
    middle of a SQLite transaction leaves its connection holding the lock, and the run's own
    KILLED update then fails with 'database is locked'."""
    @functools.wraps(write)
    def whole(*args, **kwargs):
        from prunegrid.interrupt import deferred

        with deferred():
            return write(*args, **kwargs)
    return whole


class Tracker:
    """One MLflow run per cell: tags, flattened params, metrics, artifacts; FAILED on error, KILLED on
    SIGINT/SIGTERM, and reopened to resume."""

    def __init__(self, uri: str | None, experiment: str, name: str, tags: dict[str, str]):
        self.uri = resolve_uri(uri)
        self.experiment, self.name, self.tags = experiment, name, dict(tags)
        self.run_id: str | None = None
        self.client = open_client(self.uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="prunegrid-")
        self.artifact_dir = Path(self._tmp.name)

    @_whole
    def resumable(self, config_md5: str) -> str | None:
        """The latest KILLED or FAILED run of this experiment with the same ``config_md5``, if any."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        runs = self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                       filter_string=f"tags.{TAG_CONFIG_MD5} = '{config_md5}'")
        runs = [r for r in runs if r.info.status in RESUMABLE]
        return runs[0].info.run_id if runs else None

    @contextmanager
    def run(self, params: dict[str, Any], parent_run_id: str | None = None,
            resume_run_id: str | None = None) -> Iterator["Tracker"]:
        """Start the run (or reopen ``resume_run_id``); end it FINISHED, KILLED on SIGINT/SIGTERM, or
        FAILED, with the reason in ``status_detail``."""
        from prunegrid.interrupt import Interrupted, deferred

        mlflow.set_tracking_uri(self.uri)
        with deferred():
            if resume_run_id:
                old = self.client.get_run(resume_run_id)
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                self.set_tags({"status_detail": "running (resumed)",
                               TAG_RESUMES: int(old.data.tags.get(TAG_RESUMES, 0)) + 1})
                now = self.tags.get("git_commit")
                if now and old.data.tags.get("git_commit") != now:  # the code changed between the attempts
                    self.set_tags({TAG_RESUMED_COMMIT: now})
            else:
                tags = {k: str(v) for k, v in self.tags.items()}
                if parent_run_id:
                    tags["mlflow.parentRunId"] = parent_run_id
                exp_id = experiment_id(self.client, self.experiment)
                self.name = unique_name(self.client, exp_id, self.name)
                run = self.client.create_run(exp_id, run_name=self.name, tags=tags)
                self.run_id = run.info.run_id
                self.log_params(params)
        try:
            yield self
        except BaseException as exc:
            with deferred():
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:4000]
                killed = isinstance(exc, (Interrupted, KeyboardInterrupt))
                self.client.set_tag(self.run_id, "status_detail", detail)
                if not killed:
                    self.client.log_text(self.run_id, traceback.format_exc(), "error.txt")
                self.client.set_terminated(self.run_id, "KILLED" if killed else "FAILED")
            raise
        else:
            with deferred():
                self.client.set_tag(self.run_id, "status_detail", "")
                self.client.set_terminated(self.run_id, "FINISHED")
        finally:
            self._tmp.cleanup()

    @_whole
    def log_params(self, params: dict[str, Any]) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    @_whole
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        items = [mlflow.entities.Metric(k, float(v), mlflow.utils.time.get_current_time_millis(), step or 0)
                 for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    @_whole
    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    @_whole
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_whole
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    @_whole
    def log_figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def lightning_logger(self) -> EpochLogger:
        return EpochLogger(self)


def start_parent_run(uri: str | None, experiment: str, name: str, tags: dict[str, str]) -> str:
    """A run that groups others (a sweep's trials nest under it with ``mlflow.parentRunId``)."""
    client = open_client(uri)
    return client.create_run(experiment_id(client, experiment), run_name=name,
                             tags={k: str(v) for k, v in tags.items()}).info.run_id


@contextmanager
def fluent_uri(uri: str | None) -> Iterator[str]:
    """MLflow's fluent API (``mlflow.register_model``, ``mlflow.search_runs``, ``log_model``) pointed
    at the store at ``uri`` within the block; the process's tracking URI is restored after."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(resolve_uri(uri))
    try:
        yield resolve_uri(uri)
    finally:
        mlflow.set_tracking_uri(previous)


def register_model(uri: str | None, model_uri: str, name: str, aliases: list[str] = ()) -> str:
    """Register ``model_uri`` (a run's logged model, ``models:/m-...``) as a new version of ``name`` in
    the registry of the store at ``uri`` (``mlflow.register_model``) and point ``aliases``
    (``best-channel``) at it; the version."""
    with fluent_uri(uri) as store:
        version = mlflow.register_model(model_uri, name).version
        client = MlflowClient(store)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
        return str(version)


def end_parent_run(uri: str | None, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(resolve_uri(uri)).set_terminated(run_id, status)


def search_runs(uri: str | None = None, **kwargs):
    """``mlflow.search_runs`` on the store at ``uri`` (the process's tracking URI is restored after)."""
    with fluent_uri(uri):
        return mlflow.search_runs(**kwargs)


def load_runs(uri: str | None = None, experiments: list[str] | None = None, finished_only: bool = True,
              cells_only: bool = False):
    """Runs as a DataFrame (``mlflow.search_runs``): one row per run with ``run_id``, ``run_name``,
    ``status``, ``experiment_id``, ``start_time``, the CONTRACT tags and the metrics (plain keys).
    ``cells_only``: without the runs that group others (tag ``prunegrid.kind`` = ``grid`` or ``sweep``),
    with the columns ``kind``, ``model_uri`` and ``parent_run_id`` (tags; "" when absent)."""
    import pandas as pd

    df = search_runs(uri, experiment_names=experiments, search_all_experiments=experiments is None,
                     filter_string="attributes.status = 'FINISHED'" if finished_only else "")
    extra = {col: (df[f"tags.{tag}"].fillna("") if f"tags.{tag}" in df else pd.Series("", index=df.index))
             for col, tag in CELL_RUN_COLUMNS.items()} if cells_only and not df.empty else {}
    if extra:
        df = df[~extra["kind"].isin(PARENT_KINDS)]
    if df.empty:
        return pd.DataFrame()
    out = df[["run_id", "status", "experiment_id", "start_time"]].copy()
    out["run_name"] = df.get("tags.mlflow.runName", "")
    for t in (*TAGS, "ref_prune", TAG_HOST, TAG_METHOD, TAG_STRENGTH_KNOB, TAG_STRENGTH, TAG_CONTROL, TAG_SWEEP_TRIAL):
        out[t] = df[f"tags.{t}"].fillna("") if f"tags.{t}" in df else ""
    for col, values in extra.items():
        out[col] = values[df.index]
    if cells_only:
        trials = out["parent_run_id"].isin(_sweep_parent_ids(uri, experiments)) & (out[TAG_SWEEP_TRIAL] == "")
        out.loc[trials, TAG_SWEEP_TRIAL] = "?"  # nested under a sweep's parent run, logged before the tag existed
        params = [{k.removeprefix("params."): v for k, v in row.items() if isinstance(v, str) and in_cell_config(k)}
                  for row in df[[c for c in df.columns if c.startswith("params.")]].to_dict("records")]
        out["cell_params"] = params
        out["cell_config"] = [config_md5(p) for p in params]
    metrics = df[[c for c in df.columns if c.startswith("metrics.")]]
    return pd.concat([out, metrics.rename(columns=lambda c: c.removeprefix("metrics."))], axis=1)


# -- what the MLflow UI shows beside the metrics: data set, source, system metrics, model ----------
def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column, the run page's git commit)."""
    import getpass
    import sys

    entry = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in a bare container
        pass
    return tags


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source: str,
                sizes: dict[str, int], classes: int) -> None:
    """The run's data set as an MLflow dataset input (the UI's Dataset column and drawer): its name,
    its digest (the DVC md5 of the data version) and, as tags of this run's input, the split sizes
    and class count. MLflow stores one dataset per name and digest in an experiment, so sizes that
    differ between runs (``dataset.subset``) go on the input, not in the dataset's profile."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local files
        warnings.simplefilter("ignore")
        src = resolve_dataset_source(str(Path(source).expanduser().resolve()))
    ds = MetaDataset(src, name=name, digest=str(digest)[:36])
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "train"), InputTag("classes", str(classes)),
            *(InputTag(f"{k}_images", str(v)) for k, v in sizes.items())]
    client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])


class SystemMetrics:
    """MLflow's system-metrics sampler (CPU, memory, disk, network; GPU where present) on a run,
    with :meth:`paused` to stop it while latency and memory are measured (its thread would
    disturb the timing)."""

    def __init__(self, run_id: str, uri: str, interval_s: float = 10.0, enabled: bool = True):
        self.run_id, self.uri, self.interval_s, self.enabled = run_id, uri, float(interval_s), enabled
        self._monitor = None
        self._started = False

    def start(self) -> None:
        if not self.enabled or self._monitor is not None:
            return
        import logging as _logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        _logging.getLogger("mlflow.system_metrics").setLevel(_logging.WARNING)
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s,
                                             resume_logging=self._started, tracking_uri=self.uri)
        self._monitor.start()
        self._started = True

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self._monitor is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


# The figures a logged model carries (its page's Metrics), linked to the model and the data set they were
# measured on: the final model's, never the epochs'.
MODEL_FIGURES = (*(GRID_METRICS[k] for k in ("acc", "f1_macro", "params", "params_nonzero", "flops", "size_mb",
                                              "infer_ms", "infer_peak_mb")),
                 "test/map50", VAL_FINAL_METRICS[0], "model/size_mb_onnx", infer_key("_onnx"),
                 speedup_key(), speedup_key("_onnx"))


def model_name(cell: dict[str, str]) -> str:
    """A logged model's name: the cell's (MLflow refuses ``.`` in it, as in ``channel-r0.7``)."""
    return run_name(cell).replace(".", "_")


def log_model_metrics(uri: str, run_id: str, model_uri: str, metrics: dict[str, float], dataset: str,
                      digest: str) -> None:
    """The final figures of :data:`MODEL_FIGURES` in ``metrics`` on the logged model ``model_uri``
    (``models:/m-...``), with the data set they were measured on (the model page's Datasets used)."""
    import math

    model_id = model_uri.removeprefix("models:/")
    now = mlflow.utils.time.get_current_time_millis()
    items = [mlflow.entities.Metric(k, float(metrics[k]), now, 0, model_id=model_id, dataset_name=dataset,
                                    dataset_digest=str(digest)[:36], run_id=run_id)
             for k in MODEL_FIGURES if k in metrics and metrics[k] is not None and math.isfinite(float(metrics[k]))]
    if items:
        MlflowClient(uri).log_batch(run_id, metrics=items)


def log_model(uri: str, run_id: str, net, example, onnx_path: Path | None = None, name: str = "model",
              step: int = 0) -> tuple[str, str, str]:
    """Log the run's final model as an MLflow model named ``name`` (``mlflow.pyfunc.load_model`` predicts
    with it): the PyTorch flavour with a signature and an input example, else, where that flavour cannot
    hold or run the model (INT8), the ONNX flavour of its ONNX export. ``step``: the epoch count the model
    comes after; MLflow copies the run's metrics of that step onto the model, so a step no epoch logged
    keeps epoch figures off it (:func:`log_model_metrics` gives it the final ones). Returns (model URI,
    flavour, why the PyTorch flavour was not used, or "")."""
    import warnings

    import mlflow.onnx
    import mlflow.pytorch
    import numpy as np

    import prunegrid

    client = MlflowClient(uri)
    example = np.ascontiguousarray(example, dtype=np.float32)
    code = [str(Path(prunegrid.__file__).parent)]
    with fluent_uri(uri):
        run = client.get_run(run_id)
        before = {out.model_id for out in run.outputs.model_outputs}
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import torch
                import torchvision

                from mlflow.models import infer_signature

                with torch.no_grad():
                    out = net.eval()(torch.from_numpy(example)).numpy()
                info = mlflow.pytorch.log_model(
                    net, name=name, run_id=run_id, step=step, signature=infer_signature(example, out),
                    input_example=example, code_paths=code,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                      f"torchvision=={torchvision.__version__.split('+')[0]}"])
                return info.model_uri, "pytorch", ""
            except Exception as exc:
                if onnx_path is None or not Path(onnx_path).is_file():
                    raise
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                for out in client.get_run(run_id).outputs.model_outputs:  # the failed PyTorch attempt
                    if out.model_id not in before:
                        client.delete_logged_model(out.model_id)
                import onnx
                import onnxruntime as ort

                sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                out = sess.run(None, {sess.get_inputs()[0].name: example})[0]
                from mlflow.models import infer_signature

                info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=name, run_id=run_id, step=step,
                                             signature=infer_signature(example, out), input_example=example,
                                             onnx_execution_providers=["CPUExecutionProvider"],
                                             pip_requirements=["onnxruntime", "onnx"])
                return info.model_uri, "onnx", why


# -- the grid report's side: cells without their parent runs, parents that group them ---------------
TAG_PARENT_RUN = "mlflow.parentRunId"   # MLflow's own nesting tag (the UI nests runs by it)
PARENT_KINDS = ("grid", "sweep")        # TAG_RUN_KIND of runs that group others: never grid cells
CELL_RUN_COLUMNS = {"kind": TAG_RUN_KIND, "model_uri": TAG_MODEL_URI, "parent_run_id": TAG_PARENT_RUN}


# Params that name where a run writes or what it reads per seed, not what the cell is: left out of the
# cell's config digest (``cell_config``), so the seeds of one config share it.
RUN_LOCAL_PARAMS = ("seed", "resume", "optimized_metric", "prune.baseline_ckpt", "budget.match")
RUN_LOCAL_PREFIXES = ("paths.", "tracking.", "hydra.")


def in_cell_config(column: str) -> bool:
    key = column.removeprefix("params.")
    return key not in RUN_LOCAL_PARAMS and not key.startswith(RUN_LOCAL_PREFIXES)


def _sweep_parent_ids(uri: str | None, experiments: list[str] | None) -> set[str]:
    """The run ids of every sweep's parent run (any status: a sweep still running has finished trials)."""
    df = search_runs(uri, experiment_names=experiments, search_all_experiments=experiments is None,
                     filter_string=f"tags.`{TAG_RUN_KIND}` = 'sweep'")
    return set(df["run_id"]) if not df.empty else set()


def load_cell_runs(uri: str | None = None, experiments: list[str] | None = None):
    """:func:`load_runs` (FINISHED runs) without the runs that group others (tag ``prunegrid.kind`` =
    ``grid`` or ``sweep``), with the columns ``kind``, ``model_uri`` and ``parent_run_id`` (tags; ""
    when absent), ``sweep_trial`` (the trial number, ``?`` for a run nested under a sweep's parent without
    it, "" for no trial), ``cell_params`` (the params that make the cell, :func:`in_cell_config`) and
    ``cell_config`` (their digest) added: what the grid report reads."""
    return load_runs(uri, experiments, cells_only=True)


def metric_histories(uri: str | None, run_ids: list[str], keys: tuple[str, ...] = EPOCH_METRICS):
    """Every step of ``keys`` of each run (``MlflowClient.get_metric_history``), one row per run and
    step: ``run_id``, ``epoch`` (the step: epochs are logged with step = epoch) and one column per key."""
    import pandas as pd

    client = MlflowClient(resolve_uri(uri))
    by_step: dict[tuple[str, int], dict[str, float]] = {}
    for run_id in run_ids:
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                by_step.setdefault((run_id, int(m.step)), {})[key] = float(m.value)
    rows = [{"run_id": r, "epoch": s, **v} for (r, s), v in by_step.items()]
    return pd.DataFrame(rows, columns=["run_id", "epoch", *keys]).sort_values(["run_id", "epoch"],
                                                                              ignore_index=True)
