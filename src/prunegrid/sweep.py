"""The pieces of prunegrid's Optuna sweeps, and ``python -m prunegrid.sweep``, an alias of ``python train.py -m``.

Sweeps are Hydra multiruns: ``python train.py -m sweep=l1`` (a preset in ``conf/sweep/``) or
``python train.py -m hydra/sweeper=optuna 'prune.amount=interval(0.2,0.6)' ...``. The sweeper is the
project's Hydra plugin ``hydra_plugins.prunegrid_optuna_sweeper`` (Optuna >= 4; Hydra's own Optuna
sweeper 1.3 pins optuna<3). It uses what this module defines:

- :func:`objective_keys`: ``optimized_metric`` (one key, or a list for a multi-objective study) must
  be run metrics (:data:`OBJECTIVE_KEYS`), never ``test/*``: the test split is read once per run,
  never to choose. ``train.py`` returns :func:`objective_values` of the run.
- :func:`open_storage` / :func:`create_study`: any Optuna database URL, with a heartbeat (a trial
  left RUNNING by a process killed outright becomes FAIL and is retried); the same storage and
  study name load the study, and a resumed study's sampler is re-seeded so it does not replay the
  first trials' values. The presets' storage is ``$PRUNEGRID_OPTUNA_STORAGE`` (the PostgreSQL URL
  that ``python -m prunegrid.head start`` prints), else ``sqlite:///optuna.db``.
- Several workers on one study (``hydra.sweeper.max_complete``): start the same sweep command in
  several processes or on several machines against one database storage; together they end with
  exactly ``max_complete`` COMPLETE trials (surplus trials of a race are FAIL with user attribute
  ``surplus`` and never run) under one parent run. Each worker may itself run its batches on Ray:
  ``hydra/launcher=ray hydra.sweeper.n_jobs=4`` (a Ray started here; with
  ``hydra.launcher.ray.init.address=auto``, or ``hydra/launcher=ray_cluster`` as a plain multirun
  needs, it joins a running cluster). Jobs in Ray workers reopen
  their trial from the storage by its id, so they are pruned as in-process ones
  (:func:`follow_task_threads`: torch there uses the CPUs of the task).
- :func:`requeue_interrupted`: a trial that SIGINT/SIGTERM ended is FAIL with user attribute
  ``interrupted``; the next sweep on the study first runs it again with the same values and
  ``resume=true``, so its KILLED MLflow run continues from its checkpoints.
- :class:`OptunaPruning`: a Lightning callback that reports ``val/acc`` to the active trial after
  each validation and raises ``optuna.TrialPruned`` (single-objective studies).
- :func:`_parent_run`: one MLflow parent run per study (kept across re-runs); of several workers
  started together, the one whose :func:`create_study` created the study makes it, the others wait
  for its id in the study's user attributes.
- :func:`write_summary` / :func:`register_front`: the Pareto front (the best trial for one
  objective) as ``reports/sweeps/<study>/pareto.{csv,md,png}``, and its trials' models in the
  MLflow model registry as ``sweep-<study>`` (aliases ``pareto-<trial>``, or ``best``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import optuna
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig

from prunegrid import tracking
from prunegrid.cli import ArgumentParser, fail, guard
from prunegrid.config import build, cell
from prunegrid.errors import ConfigError

DEFAULT_STORAGE = "sqlite:///optuna.db"
STORAGE_ENV = "PRUNEGRID_OPTUNA_STORAGE"  # the presets' and the sweeper's storage when set (a shared database)
OBJECTIVE_KEYS = (tracking.VAL_FINAL_METRICS + tracking.DETECTION_VAL_FINAL_METRICS[:2] + tracking.MODEL_METRICS
                  + tracking.TIME_METRICS + tracking.ONNX_METRICS + tracking.EXPLAIN_METRICS
                  + tracking.DETECTION_DEPLOY_METRICS[:5])
PRUNING_MONITOR = "val/acc"
TASK_MONITORS = (PRUNING_MONITOR, "val/map50")  # a classifier's, a detector's (task=detection): higher is better
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
INTERRUPTED_ATTR = "interrupted"     # a trial ended by SIGINT/SIGTERM: the signal's name
RESUMES_ATTR = "resumes_trial"       # a trial that re-runs an interrupted one (its number), with resume=true
STOP_ATTR = "stop"                   # the sweep was interrupted: the job (in another process) stops at its next validation
SURPLUS_ATTR = "surplus"             # max_complete: a trial asked in a race that the study had no slot for (FAIL)
VERSION_ATTR = "registered_version"  # study user attr "registered_version:<trial>": its model's registry version
PARENT_PENDING = "pending"            # the study's creator is making the parent run
PARENT_WAIT_S, PARENT_GRACE_S = 120, 2.0
PARENT_FRESH_S = 30.0                 # a joined study with no trials and no mark yet: its creator marks it now

# The trial of the job running in this process (the sweeper sets it), and the MLflow run id that
# objective_values() saw last (the sweeper reads it back).
_active: dict[str, Any] = {"trial": None, "step": 0, "run_id": None}


class OptunaPruning(Callback):
    """Report ``monitor`` to the running Optuna trial after each validation; prune when told.

    Steps count validations over the whole trial (fit and fine-tuning), so a method's
    fine-tuning continues the curve instead of repeating its steps. Without an active trial (a
    job run outside a sweep) it does nothing. A trial whose sweep was interrupted while its job ran
    in another process (user attribute ``stop``: the signal's name) ends there as if that process
    had received the signal: the run is KILLED with its checkpoints, and the next sweep resumes it.
    """

    def __init__(self, monitor: str = PRUNING_MONITOR):
        self.monitor = monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        trial = _active["trial"]
        metrics = trainer.callback_metrics
        monitor = self.monitor if self.monitor in metrics or self.monitor != PRUNING_MONITOR else \
            next((m for m in TASK_MONITORS if m in metrics), self.monitor)
        if trial is None or trainer.sanity_checking or monitor not in metrics:
            return
        value = float(metrics[monitor])
        _active["run_id"] = _active["run_id"] or getattr(trainer.logger, "version", None) or None  # a pruned trial's run
        step = _active["step"]
        _active["step"] += 1
        stop = trial.storage.get_trial_user_attrs(trial._trial_id).get(STOP_ATTR)  # fresh: trial.user_attrs is cached
        if stop:
            import signal

            from prunegrid.interrupt import Interrupted

            raise Interrupted(signal.Signals[stop])
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{monitor}={value:.4f} at validation {step}")


# -- objectives ---------------------------------------------------------------------------------
def objective_keys(value: Any) -> list[str]:
    """``optimized_metric`` as a list of metric keys, checked: run metrics only, never ``test/*``."""
    keys = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    keys = [str(k) for k in keys if k is not None and str(k) != ""]
    if not keys:
        raise ConfigError(f"optimized_metric is empty; give a run metric, e.g. optimized_metric={OBJECTIVE_KEYS[0]}")
    for key in keys:
        if key.startswith("test/"):
            raise ConfigError(f"optimized_metric '{key}' reads the test split; choose on the validation split "
                              f"(e.g. {tracking.VAL_FINAL_METRICS[0]}); test/* is read once per run, never to choose")
        if key not in OBJECTIVE_KEYS:
            raise ConfigError(f"optimized_metric '{key}' is not a run metric; use one of {', '.join(OBJECTIVE_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"optimized_metric lists a key twice: {keys}")
    return keys


def objective_values(result: Mapping[str, float], keys: list[str]) -> float | list[float]:
    """What ``train.py`` returns: the value of the one key (a float), or the list of values; a
    missing metric is NaN (Optuna then marks the trial FAIL). Records the run id for the sweeper."""
    _active["run_id"] = getattr(result, "run_id", None)
    values = [float(result[k]) if k in result else math.nan for k in keys]
    return values[0] if len(values) == 1 else values


# -- study --------------------------------------------------------------------------------------
def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage with a heartbeat (killed trials become FAILED and are retried); a fresh
    SQLite file is created by one process at a time (and waits up to a minute for another's write),
    and workers that open a fresh server database at once retry when they race to create its tables."""
    import inspect
    import time
    import warnings

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    kw = ("heartbeat_stale_trial_callback"
          if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
          else "failed_trial_callback")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):
        try:
            with warnings.catch_warnings(), tracking.store_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, engine_kwargs=engine,
                                                  **{kw: retry(max_retry=2)})
        except (IntegrityError, ProgrammingError):  # another worker created the tables at the same moment
            if attempt == 2:
                raise
            time.sleep(0.5 + attempt)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"cannot open sweep storage '{redact(url)}' ({reason[:200]}); give a writable database "
                              f"URL, e.g. hydra.sweeper.storage={DEFAULT_STORAGE}") from exc
    raise AssertionError("not reached")


def redact(url: str) -> str:
    """A database URL without its password, to print."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def absolute_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (from the current folder), for jobs that run
    in other processes (a Ray worker's folder may differ); other URLs as they are."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return url
    path = Path(parsed.database).expanduser()
    if path.is_absolute():
        return url
    return parsed.set(database=str(path.resolve())).render_as_string(hide_password=False)


def follow_task_threads() -> None:
    """Torch's intra-op threads from ``OMP_NUM_THREADS``: Ray sets it for each task to the CPUs the task
    holds, but a Ray worker reused from an earlier task imported torch already, with the earlier value."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != int(threads):
            torch.set_num_threads(int(threads))


def instantiate(node: DictConfig | None, what: str, **kwargs: Any) -> Any:
    """A sampler or pruner from its ``_target_`` node; a bad target or argument is one line."""
    if node is None:
        return None
    target = node.get("_target_") if isinstance(node, (DictConfig, dict)) else None
    if not target:
        example = "optuna.samplers.TPESampler" if what == "sampler" else "optuna.pruners.MedianPruner"
        raise ConfigError(f"hydra.sweeper.{what} needs a _target_, e.g. hydra.sweeper.{what}._target_={example}")
    try:
        return build(node, **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if isinstance(cause, ImportError) or "Error locating target" in str(exc):
            names = sorted(n for n in dir(getattr(optuna, f"{what}s")) if n.endswith(what.capitalize())
                           and not n.startswith(("_", "Base", "PartialFixed")))
            raise ConfigError(f"unknown {what} '{target}'; Optuna's: {', '.join(f'optuna.{what}s.{n}' for n in names)}") from None
        raise ConfigError(f"hydra.sweeper.{what} {target}: {reason[:300]}") from None


def create_study(storage: optuna.storages.BaseStorage | None, study_name: str, directions: list[str],
                 sampler: DictConfig | None, pruner: optuna.pruners.BasePruner | None) -> tuple[optuna.Study, bool]:
    """The study, loaded when it exists; ``True`` with it when this call created it. ``sampler`` is
    its ``_target_`` node: a loaded study's sampler is seeded with ``seed + trials so far``, so a
    re-run does not replay the first trials' values."""
    created = True
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=instantiate(sampler, "sampler"),
                                    pruner=pruner, directions=directions)
        study.set_user_attr(PARENT_ATTR, PARENT_PENDING)  # workers joining now wait for the parent run
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        study = optuna.load_study(storage=storage, study_name=study_name, sampler=instantiate(sampler, "sampler"),
                                  pruner=pruner)
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        have = [d.name.lower() for d in study.directions]
        raise ConfigError(f"study '{study_name}' exists with directions {have}, not {directions}; give another "
                          "hydra.sweeper.study_name")
    seed = sampler.get("seed") if sampler is not None else None
    if seed is not None and study.trials:
        study.sampler = instantiate(sampler, "sampler", seed=int(seed) + len(study.trials))
    return study, created


def reseed(study: optuna.Study, sampler: DictConfig | None, number: int) -> None:
    """A seeded sampler (``sampler`` is its ``_target_`` node) re-seeded with ``seed + number``, where
    ``number`` is that of the first trial this process asked for: unique to this process, so several
    workers started together on one study (and re-runs) do not sample the same values."""
    seed = sampler.get("seed") if sampler is not None else None
    if seed is not None:
        study.sampler = instantiate(sampler, "sampler", seed=int(seed) + int(number))


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again, with the same values, every trial that SIGINT/SIGTERM ended and no trial re-runs yet
    (its cell then resumes the KILLED MLflow run); the numbers of the trials queued."""
    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get(RESUMES_ATTR) for t in trials}
    queued = []
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in taken:
            study.enqueue_trial(t.params, user_attrs={RESUMES_ATTR: t.number}, skip_if_exists=False)
            queued.append(t.number)
    return queued


def complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _parent_run(study: optuna.Study, cfg: DictConfig, created: bool, experiment: str | None = None) -> str:
    """The study's MLflow parent run (tag ``prunegrid.kind=sweep``), made once. The worker whose
    :func:`create_study` created the study marks it pending at once and makes the run; a worker that
    joined waits for the run's id (up to :data:`PARENT_WAIT_S` while pending; :data:`PARENT_FRESH_S`
    for a study with no mark and no trials yet, which its creator is about to mark; a short grace
    otherwise: a study made before the mark existed has none) and makes the run itself only when none
    comes. ``cfg`` is a cell's config (its tracking URI, experiment and labels)."""
    import time

    run_id = study.user_attrs.get(PARENT_ATTR)
    if not created:
        start = time.monotonic()
        fresh = run_id is None and not study.get_trials(deepcopy=False)
        while run_id in (None, PARENT_PENDING):
            limit = PARENT_WAIT_S if run_id == PARENT_PENDING else PARENT_FRESH_S if fresh else PARENT_GRACE_S
            if time.monotonic() - start >= limit:
                break
            time.sleep(0.2)
            run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id and run_id != PARENT_PENDING:
        return run_id
    labels = cell(cfg)
    experiment = experiment or cfg.tracking.get("experiment") or labels["dataset"]
    run_id = tracking.start_parent_run(cfg.tracking.get("uri"), experiment, f"sweep-{study.study_name}",
                                       {tracking.TAG_RUN_KIND: "sweep", "sweep": str(study.study_name),
                                        "prune": labels["prune"]})
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


# -- summary ------------------------------------------------------------------------------------
def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front (``study.best_trials``) by trial number; for one objective, ``study.best_trial``
    (the first of equal values) alone."""
    if not complete(study):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)


def front_table(study: optuna.Study, keys: list[str]):
    """:func:`front` as a DataFrame: trial, the objectives, the params, the MLflow run id."""
    import pandas as pd

    rows = []
    for t in front(study):
        rows.append({"trial": t.number, **dict(zip(keys, t.values)), **t.params,
                     "run_id": t.user_attrs.get(RUN_ATTR, "")})
    return pd.DataFrame(rows)


def write_summary(study: optuna.Study, keys: list[str], out: Path) -> Path:
    """``pareto.csv``/``pareto.md`` (best trials) and, with two objectives, ``pareto.png``."""
    out.mkdir(parents=True, exist_ok=True)
    table = front_table(study, keys)
    table.to_csv(out / "pareto.csv", index=False)
    header = "Pareto front" if len(keys) > 1 else "Best trial"
    md = [f"# {header} of study `{study.study_name}`", "",
          f"Objectives: {', '.join(f'{k} ({d.name.lower()})' for k, d in zip(keys, study.directions))}; "
          f"{complete(study)} complete trials.", ""]
    if not table.empty:
        md += ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        md += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |"
               for r in table.itertuples(index=False)]
    (out / "pareto.md").write_text("\n".join(md) + "\n")
    if len(keys) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="lightgray", label="trials")
        best = sorted(study.best_trials, key=lambda t: t.values[1])
        ax.plot([t.values[1] for t in best], [t.values[0] for t in best], "o-", c="tab:red", label="Pareto front")
        for t in best:
            ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=keys[1], ylabel=keys[0], title=f"{study.study_name}: Pareto front")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=90)
        plt.close(fig)
    return out


def publish_to_parent(study: optuna.Study, keys: list[str], uri: str | None, parent: str, out: Path) -> int | None:
    """The study's result on its MLflow parent run: ``pareto.md``/``.csv``/``.png`` as artifacts, and the best
    trial's number (``best_trial``), sampled values (``best.<param>``), objective values (``best/<key>``) and
    its run's final figures (``best/test/acc``, ``best/model/params_nonzero``, ...) as params and metrics. With
    several objectives, the front's trial with the best first objective is the one shown (``pareto_trials``
    lists the whole front). The trial shown, or ``None`` when none is complete."""
    import time as _time

    from mlflow.entities import Metric, Param

    best = front(study)
    if not best:
        return None
    client = tracking.open_client(uri)
    for name in ("pareto.md", "pareto.csv", "pareto.png"):
        if (out / name).is_file():
            client.log_artifact(parent, str(out / name))
    first = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    top = sorted(best, key=lambda t: t.values[0], reverse=first)[0]
    params = {"best_trial": top.number, **{f"best.{k}": v for k, v in top.params.items()},
              "pareto_trials": " ".join(str(t.number) for t in best)}
    now = int(_time.time() * 1000)
    metrics = {f"best/{k}": v for k, v in zip(keys, top.values)}
    run_id = top.user_attrs.get(RUN_ATTR)
    if run_id:
        run = client.get_run(run_id)
        metrics.update({f"best/{k}": v for k, v in run.data.metrics.items() if k in tracking.MODEL_FIGURES})
        params["best_run_id"] = run_id
    have = client.get_run(parent).data.params
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items() if k not in have])
    for k, v in params.items():  # a re-run of the study may change the best trial: params are write-once, tags are not
        client.set_tag(parent, f"sweep.{k}", str(v)[:5000])
    return top.number


def register_front(study: optuna.Study, uri: str | None) -> dict[int, str]:
    """Register the models of the front's trials in the MLflow model registry as versions of
    ``sweep-<study>``, aliased ``pareto-<trial>`` (``best`` for one objective); a trial keeps its
    version across re-runs, and aliases of trials no longer on the front are removed. Trials whose
    run has no ``model_uri`` tag are skipped (said once). Returns {trial number: version}."""
    from mlflow.exceptions import MlflowException

    name, multi = f"sweep-{study.study_name}", len(study.directions) > 1
    best = front(study)
    if not best:
        return {}
    client = tracking.open_client(uri)
    versions, missing = {}, []
    for t in best:
        alias = f"pareto-{t.number}" if multi else "best"
        version = study.user_attrs.get(f"{VERSION_ATTR}:{t.number}")
        if version is None:
            run_id = t.user_attrs.get(RUN_ATTR)
            model_uri = client.get_run(run_id).data.tags.get(tracking.TAG_MODEL_URI) if run_id else None
            if not model_uri:
                missing.append(t.number)
                continue
            version = tracking.register_model(uri, model_uri, name=name, aliases=[alias])
            study.set_user_attr(f"{VERSION_ATTR}:{t.number}", str(version))
        else:
            client.set_registered_model_alias(name, alias, str(version))
        versions[t.number] = str(version)
    if missing:
        print(f"prunegrid: sweep {study.study_name}: trials {missing} are not registered: their runs have no "
              f"'{tracking.TAG_MODEL_URI}' tag (no logged MLflow model)", file=sys.stderr)
    if multi and versions:
        try:
            aliases = dict(client.get_registered_model(name).aliases or {})
        except MlflowException:
            aliases = {}
        keep = {f"pareto-{n}" for n in (t.number for t in best)}
        for alias in aliases:
            if alias.startswith("pareto-") and alias not in keep:
                client.delete_registered_model_alias(name, alias)
    return versions


# -- the alias ----------------------------------------------------------------------------------
def train_py() -> Path:
    path = Path(__file__).resolve().parents[2] / "train.py"
    if not path.is_file():
        raise ConfigError(f"{path} not found; run sweeps from a prunegrid checkout: python train.py -m sweep=<preset>")
    return path


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m prunegrid.sweep",
                       description="Optuna sweep of one method, an alias of `python train.py -m sweep=<preset> "
                                   "[overrides]` (Hydra's multirun with the project's Optuna sweeper; presets in "
                                   "conf/sweep/, settings hydra.sweeper.<key>=...)")
    p.add_argument("args", nargs="+", metavar="ARG",
                   help="sweep=<preset> then overrides (hydra.sweeper.n_trials=5, trainer.max_epochs=2)")
    a = p.parse_args(argv)
    with guard():
        _exec(p, a.args)


def _exec(p: ArgumentParser, args: list[str]) -> None:
    names = [x.split("=", 1)[1] for x in args if x.startswith("sweep=")]
    if len(names) != 1:
        p.error("name one preset: sweep=<name> (conf/sweep/<name>.yaml)")
    presets = sorted(f.stem for f in (train_py().parent / "conf" / "sweep").glob("*.yaml"))
    if names[0] not in presets:
        fail(f"unknown sweep '{names[0]}'; presets in conf/sweep/: {', '.join(presets)}")
    old = [x for x in args if x.startswith("sweep.")]
    if old:
        key, _, value = old[0][len("sweep."):].partition("=")
        fail(f"'{old[0]}': sweep settings are hydra.sweeper.<key> now, e.g. hydra.sweeper.{key}={value}")
    script = train_py()
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, str(script), "-m", *args])


if __name__ == "__main__":
    main()
