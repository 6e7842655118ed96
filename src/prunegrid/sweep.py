"""Optuna sweeps over one method's options: ``python -m prunegrid.sweep sweep=l1 [overrides...]``.

Optuna is driven directly (the Hydra Optuna sweeper plugin pins optuna<3); each trial's config
is composed with :func:`prunegrid.config.compose` from the preset's ``overrides``, the
command-line overrides and the sampled values, and run with :func:`prunegrid.pipeline.run`.

A preset is ``conf/sweep/<name>.yaml`` or a YAML path (see ``conf/sweep/l1.yaml``): study name, ``objectives``
(metric keys of a run with ``maximize``/``minimize``; two or more make a multi-objective study;
accuracy objectives read the validation split, ``val/final_acc``: a ``test/`` objective is
refused, since the test split is read once per run, never to choose),
``n_trials`` (the number of COMPLETE trials wanted), ``space`` (``float``/``int`` with
``low``/``high``/``log``/``step``, or ``categorical`` with ``choices``), ``storage`` (any Optuna
database URL, default ``sqlite:///optuna.db``), ``sampler`` and ``pruner`` (``_target_`` nodes).
Any preset key can be overridden with ``sweep.<key>=...`` on the command line.

- Persistence: the study lives in ``storage`` and is loaded if it exists, so a killed sweep
  resumes with the trials still missing (COMPLETE trials are counted, never re-run), and
  several processes started with the same command share the study. A trial whose process gets
  SIGINT/SIGTERM ends FAIL (its MLflow run KILLED, its checkpoints kept); the next sweep started
  on the study runs it again with the same values and ``resume=true``, so it continues that
  MLflow run from its checkpoints. A trial left RUNNING by a process killed outright (SIGKILL)
  is marked FAIL by Optuna's heartbeat and retried.
- Single objective: trials are pruned through :class:`OptunaPruning`, a Lightning callback
  that reports ``val/acc`` after each validation and raises ``optuna.TrialPruned``.
- Multi-objective: the Pareto front (``study.best_trials``) is written as ``pareto.csv``,
  ``pareto.md`` and ``pareto.png`` under ``reports/sweeps/<study>/``.
- MLflow: one parent run per study (kept across resumes) with every trial's run nested under it.
  Of several workers started together, the one whose ``create_study`` created the study creates
  the parent run; the others wait for its id in the study's user attributes.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from prunegrid import tracking
from prunegrid.cli import ArgumentParser, guard
from prunegrid.config import build, cell, compose, conf_dir
from prunegrid.errors import ConfigError
from prunegrid.interrupt import Interrupted, deferred, signals

DEFAULT_STORAGE = "sqlite:///optuna.db"
DIRECTIONS = ("maximize", "minimize")
TYPES = ("float", "int", "categorical")
OBJECTIVE_KEYS = (tracking.VAL_FINAL_METRICS + tracking.MODEL_METRICS + tracking.TIME_METRICS + tracking.ONNX_METRICS
                  + tracking.EXPLAIN_METRICS)
PRUNING_MONITOR = "val/acc"
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
INTERRUPTED_ATTR = "interrupted"     # a trial ended by SIGINT/SIGTERM: the signal's name
RESUMES_ATTR = "resumes_trial"       # a trial that re-runs an interrupted one (its number), with resume=true
PARENT_PENDING = "pending"            # the study's creator is making the parent run
PARENT_WAIT_S, PARENT_GRACE_S = 120, 2.0

_active: dict[str, Any] = {"trial": None, "step": 0}


class OptunaPruning(Callback):
    """Report ``monitor`` to the running Optuna trial after each validation; prune when told.

    Steps count validations over the whole trial (fit and fine-tuning), so a method's
    fine-tuning continues the curve instead of repeating its steps.
    """

    def __init__(self, monitor: str = PRUNING_MONITOR):
        self.monitor = monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        trial = _active["trial"]
        if trial is None or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        step = _active["step"]
        _active["step"] += 1
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor}={value:.4f} at validation {step}")


# -- preset -------------------------------------------------------------------------------------
def load_preset(name: str, overrides: list[str] = ()) -> DictConfig:
    """``conf/sweep/<name>.yaml`` with ``sweep.<key>=value`` overrides, checked."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else conf_dir() / "sweep" / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"unknown sweep '{name}'; presets in conf/sweep/: {names}")
    preset = OmegaConf.load(path)
    for item in overrides:  # sweep.n_trials=5, sweep.space.prune.amount.high=0.7 (the last part is the field)
        key, _, value = item[len("sweep."):].partition("=")
        try:
            parsed = yaml.safe_load(value) if value else None
            if key.startswith("space.") and key.count(".") >= 2:
                name, field = key[len("space."):].rsplit(".", 1)
                preset.space[name][field] = parsed
            else:
                OmegaConf.update(preset, key, parsed, force_add=True, merge=False)
        except Exception as exc:
            raise ConfigError(f"bad sweep override '{item}': {(str(exc).splitlines() or [''])[0]}") from exc
    check_preset(preset)
    return preset


def check_preset(p: DictConfig) -> None:
    if not p.get("study_name"):
        raise ConfigError("sweep preset needs study_name")
    objectives = p.get("objectives") or {}
    if not objectives:
        raise ConfigError("sweep preset needs objectives, e.g. {val/final_acc: maximize}")
    for key, direction in objectives.items():
        if str(key).startswith("test/"):
            raise ConfigError(f"sweep objective '{key}' reads the test split; choose hyperparameters on the "
                              f"validation split (e.g. {tracking.VAL_FINAL_METRICS[0]}); test/* is read once per run")
        if key not in OBJECTIVE_KEYS:
            raise ConfigError(f"sweep objective '{key}' is not a run metric; use one of {', '.join(OBJECTIVE_KEYS)}")
        if direction not in DIRECTIONS:
            raise ConfigError(f"sweep objective {key}: '{direction}' must be maximize or minimize")
    n = p.get("n_trials")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"sweep.n_trials={n} must be a positive integer")
    if not p.get("space"):
        raise ConfigError("sweep preset needs a search space (space: {key: {type, low, high}})")
    for key, s in p.space.items():
        kind = s.get("type")
        if kind not in TYPES:
            raise ConfigError(f"sweep space {key}: type '{kind}' must be one of {', '.join(TYPES)}")
        if kind == "categorical":
            if not s.get("choices"):
                raise ConfigError(f"sweep space {key}: categorical needs a non-empty choices list")
            continue
        low, high = s.get("low"), s.get("high")
        if low is None or high is None:
            raise ConfigError(f"sweep space {key}: {kind} needs low and high")
        if low > high:
            raise ConfigError(f"sweep space {key}: low={low} > high={high}; swap them")
        if s.get("log") and low <= 0:
            raise ConfigError(f"sweep space {key}: log scale needs low > 0 (got {low})")


def suggest(trial: optuna.Trial, space: DictConfig) -> dict[str, Any]:
    values = {}
    for key, s in space.items():
        if s.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(s.choices))
        elif s.type == "int":
            values[key] = trial.suggest_int(key, int(s.low), int(s.high), step=int(s.get("step") or 1),
                                            log=bool(s.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, float(s.low), float(s.high), step=s.get("step"),
                                              log=bool(s.get("log", False)))
    return values


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage with a heartbeat (killed trials become FAILED and are retried); a fresh
    SQLite file is created by one process at a time."""
    import warnings

    try:
        with warnings.catch_warnings(), tracking.store_lock(url):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=30, grace_period=90,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot open sweep storage '{url}' ({reason[:200]}); give a writable database URL, "
                          f"e.g. sweep.storage={DEFAULT_STORAGE}") from exc


def trial_config(preset: DictConfig, overrides: list[str], values: dict[str, Any], pruning: bool,
                 resume: bool = False) -> DictConfig:
    cfg = compose([*preset.get("overrides", []), *overrides, *(f"{k}={v}" for k, v in values.items()),
                   *(["resume=true"] if resume else [])])
    if pruning:
        OmegaConf.update(cfg, "trainer.callbacks.optuna_pruning",
                         {"_target_": f"{__name__}.OptunaPruning", "monitor": PRUNING_MONITOR}, force_add=True)
    if preset.get("experiment"):
        OmegaConf.update(cfg, "tracking.experiment", preset.experiment, force_add=True)
    return cfg


def _check_space_keys(preset: DictConfig, overrides: list[str]) -> DictConfig:
    cfg = compose([*preset.get("overrides", []), *overrides])
    missing = [k for k in preset.space if OmegaConf.select(cfg, k, default="__missing__") == "__missing__"]
    if missing:
        raise ConfigError(f"sweep space key '{missing[0]}' is not in the config of {cell(cfg)['prune']}; "
                          f"check the preset's overrides (e.g. prune=...)")
    return cfg


# -- the sweep ----------------------------------------------------------------------------------
def create_study(preset: DictConfig) -> tuple[optuna.Study, bool]:
    """The preset's study, loaded when it exists; ``True`` with it when this call created it."""
    storage = open_storage(str(preset.get("storage") or DEFAULT_STORAGE))
    sampler = build(preset.sampler) if preset.get("sampler") else None
    multi = len(preset.objectives) > 1
    pruner = optuna.pruners.NopPruner() if multi or not preset.get("pruner") else build(preset.pruner)
    created = True
    try:
        study = optuna.create_study(storage=storage, study_name=str(preset.study_name), sampler=sampler,
                                    pruner=pruner, directions=list(preset.objectives.values()))
        study.set_user_attr(PARENT_ATTR, PARENT_PENDING)  # workers joining now wait for the parent run
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        study = optuna.load_study(storage=storage, study_name=str(preset.study_name), sampler=sampler, pruner=pruner)
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in preset.objectives.values()]:
        raise ConfigError(f"study '{preset.study_name}' exists with other objectives or directions; give a new "
                          "sweep.study_name")
    seed = preset.sampler.get("seed") if preset.get("sampler") else None
    if seed is not None and study.trials:  # a resumed/joined sweep must not replay the first trials' samples
        study.sampler = build(preset.sampler, seed=int(seed) + len(study.trials))
    return study, created


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


def _parent_run(study: optuna.Study, cfg: DictConfig, preset: DictConfig, created: bool) -> str:
    """The study's MLflow parent run, made once. The worker whose ``create_study`` created the study
    marks it pending at once and makes the run; a worker that joined waits for the run's id (up to
    :data:`PARENT_WAIT_S` while pending, a short grace otherwise: a study made before this version
    has no mark) and makes the run itself only when none comes."""
    import time

    run_id = study.user_attrs.get(PARENT_ATTR)
    if not created:
        deadline = time.monotonic() + (PARENT_WAIT_S if run_id == PARENT_PENDING else PARENT_GRACE_S)
        while run_id in (None, PARENT_PENDING) and time.monotonic() < deadline:
            time.sleep(0.2)
            run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id and run_id != PARENT_PENDING:
        return run_id
    labels = cell(cfg)
    experiment = preset.get("experiment") or cfg.tracking.get("experiment") or labels["dataset"]
    run_id = tracking.start_parent_run(cfg.tracking.get("uri"), experiment, f"sweep-{study.study_name}",
                                       {"sweep": str(study.study_name), "prune": labels["prune"]})
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def run_sweep(name: str, overrides: list[str] = (), out: str | Path = "reports/sweeps",
              max_new_trials: int | None = None) -> optuna.Study:
    """Run (or resume) a sweep until ``n_trials`` trials are COMPLETE; write its summary.

    ``max_new_trials`` stops this process after that many new trials (another process or a
    later call finishes the study).
    """
    from prunegrid.pipeline import run

    overrides = list(overrides)
    preset = load_preset(name, [o for o in overrides if o.startswith("sweep.")])
    cell_overrides = [o for o in overrides if not o.startswith("sweep.")]
    cell_cfg = _check_space_keys(preset, cell_overrides)
    study, created = create_study(preset)
    keys = list(preset.objectives)
    multi = len(keys) > 1
    parent = _parent_run(study, cell_cfg, preset, created)
    target = int(preset.n_trials)
    requeued = requeue_interrupted(study)
    if requeued:
        print(f"prunegrid: sweep {study.study_name}: trials {requeued} were interrupted; running them again "
              "from their checkpoints")

    def objective(trial: optuna.Trial):
        values = suggest(trial, preset.space)
        cfg = trial_config(preset, cell_overrides, values, pruning=not multi,
                           resume=RESUMES_ATTR in trial.user_attrs)
        _active.update(trial=trial, step=0)
        try:
            metrics = run(cfg, parent_run_id=parent)
        except Interrupted as exc:   # not an Exception, so Optuna would leave the trial RUNNING
            with deferred():
                trial.set_user_attr(INTERRUPTED_ATTR, signal.Signals(exc.signum).name)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            _active.update(trial=None, step=0)
        trial.set_user_attr(RUN_ATTR, metrics.run_id)
        result = [float(metrics.get(k, math.nan)) for k in keys]
        return result if multi else result[0]

    started = 0
    while complete(study) < target and (max_new_trials is None or started < max_new_trials):
        if started >= 3 * target:
            print(f"prunegrid: sweep {study.study_name}: {started} trials run, too many pruned; stopping")
            break
        if started == 0:
            print(f"prunegrid: sweep {study.study_name}: {complete(study)}/{target} trials complete; "
                  f"running the rest")
        study.optimize(objective, n_trials=1, gc_after_trial=True)
        started += 1
    tracking.end_parent_run(cell_cfg.tracking.get("uri"), parent, "FINISHED" if complete(study) >= target else "RUNNING")
    write_summary(study, keys, Path(out) / str(study.study_name))
    return study


# -- summary ------------------------------------------------------------------------------------
def front_table(study: optuna.Study, keys: list[str]):
    """The Pareto front (``study.best_trials``; the best trial for one objective) as a DataFrame."""
    import pandas as pd

    rows = []
    for t in sorted(study.best_trials, key=lambda t: t.number):
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
        front = sorted(study.best_trials, key=lambda t: t.values[1])
        ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="tab:red", label="Pareto front")
        for t in front:
            ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=keys[1], ylabel=keys[0], title=f"{study.study_name}: Pareto front")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=90)
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m prunegrid.sweep", description="Optuna sweep of one method: "
                       "sweep=<preset in conf/sweep/> [sweep.<key>=...] [config overrides...]")
    p.add_argument("args", nargs="+", metavar="ARG",
                   help="sweep=<preset> then overrides (sweep.n_trials=5, trainer.max_epochs=2)")
    p.add_argument("--out", default="reports/sweeps", help="output folder (default: reports/sweeps)")
    p.add_argument("--max-new-trials", type=int, default=None, help="stop this process after N new trials")
    a = p.parse_args(argv)
    names = [x.split("=", 1)[1] for x in a.args if x.startswith("sweep=")]
    if len(names) != 1:
        p.error("name one preset: sweep=<name> (conf/sweep/<name>.yaml)")
    with guard(), signals():
        study = run_sweep(names[0], [x for x in a.args if not x.startswith("sweep=")], a.out, a.max_new_trials)
    print(f"prunegrid: sweep {study.study_name}: {complete(study)} complete trials -> "
          f"{Path(a.out) / study.study_name / 'pareto.md'}")


if __name__ == "__main__":
    main()
