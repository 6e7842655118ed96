"""The sweep: ask Optuna for trials, hand them to Hydra's launcher as jobs, tell Optuna how they ended.

Each invocation adds ``n_trials`` trials to the study (``storage`` + ``study_name``), in batches of
``n_jobs``. With ``max_complete`` instead, it is one of any number of workers on the study (processes
on the same storage and study name, started together or not, on any machine): each runs batches until
the study holds exactly ``max_complete`` COMPLETE trials, every worker's counted (:meth:`OptunaSweeperImpl._until`).
It asks only for the slots that the complete and RUNNING trials leave, waits while other workers'
RUNNING trials may still complete, and runs more when one FAILs or is PRUNED. Exact under races: the
storage numbers trials densely in the order it creates them (one at a time per study), so after
``study.ask()`` a trial whose earlier live trials (COMPLETE, RUNNING, WAITING) already reach the target
is surplus; it is told FAIL at once with user attribute ``surplus`` and never runs. (Optuna's
``MaxTrialsCallback`` counts after each trial ends, so N workers may overshoot by up to N - 1.)

Before the first batch, trials that SIGINT/SIGTERM interrupted earlier are queued again
with the same values and ``resume=true`` (:func:`prunegrid.sweep.requeue_interrupted`), and trials a
killed process left RUNNING are failed and retried (Optuna's heartbeat). Every job gets, besides its
sampled values and the command line's fixed overrides, ``tracking.parent_run_id`` (the study's MLflow
parent run) and, for one objective, the pruning callback ``trainer.callbacks.optuna_pruning``.

A job's outcome: its return value (``train.py`` returns the ``optimized_metric`` values) -> COMPLETE;
``optuna.TrialPruned`` -> PRUNED; another exception (kept by Hydra in the ``JobReturn``) -> FAIL; a
SIGINT/SIGTERM -> FAIL with user attribute ``interrupted``, and the sweep ends (exit 130/143). Optuna
is told under :func:`prunegrid.interrupt.deferred`, so a second signal cannot cut it in half.

Launchers that run jobs in other processes (Hydra's Ray launcher, ``hydra/launcher=ray``) get a pickled
:class:`TrialJob` without the trial objects: with a database storage it reopens the job's trial there
by its id (``optuna.trial.Trial(study, trial_id)``), so the job reports to it, is pruned and records
its MLflow run id as in this process; with an in-memory study (``storage: null``) it cannot, and the
sweep says so once (no pruning). A relative SQLite path is made absolute for them. A job that ends
with an exit there (a user error, a signal: :class:`prunegrid.cli.JobExit`) ends the sweep with it, as
it does in this process. A first SIGINT/SIGTERM to this process while such jobs run marks their trials
``stop``: each job stops at its next validation (its run KILLED with its checkpoints) or finishes, and
the sweep then ends with exit 130/143; a second signal stops waiting. Either way the trials whose
jobs did not finish are FAIL with ``interrupted``, and the next sweep runs them again with ``resume=true``.
With Hydra's Ray launcher the sweep starts Ray itself before its first batch (``ray.init`` would
otherwise replace its SIGTERM handler). ``hydra.launcher.ray.init.address=local`` always starts a Ray
of its own; ``hydra/launcher=ray_cluster`` (``conf/hydra/launcher/``) joins a running cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from prunegrid.cli import EXIT_USAGE, JobExit
from prunegrid.interrupt import Interrupted

log = logging.getLogger(__name__)
PRUNING_KEY = "trainer.callbacks.optuna_pruning"
POLL_S = 2.0   # max_complete: how often a worker with no slot left looks at the study again


def distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override (``choice``, ``range``, ``interval``, ``tag(log, ...)``),
    or the value of a plain override as a string."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        assert isinstance(value, (ChoiceSweep, RangeSweep))
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if bad:
            raise ValueError(f"choices must be str, int, float, bool or null (got {bad[0]!r})")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():  # range(start, stop, step): stop excluded, as in Hydra
        assert isinstance(value, RangeSweep)
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"range({value.start}, {value.stop}, {value.step}) is empty")
        if all(isinstance(v, int) for v in values) and isinstance(value.step, int):
            return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line} is not supported by the Optuna sweeper")


def search_space(arguments: List[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The distributions and the fixed overrides (``key -> override as written``) of ``key=value``
    arguments; the later of two arguments with one key wins (command line over ``hydra.sweeper.params``)."""
    from prunegrid.errors import ConfigError

    space: Dict[str, Any] = {}
    fixed: Dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        try:
            value = distribution(override)
        except ValueError as exc:
            raise ConfigError(f"sweep parameter {override.input_line}: {(str(exc).splitlines() or [''])[0]}") from None
        space.pop(key, None)
        fixed.pop(key, None)
        if isinstance(value, str):
            fixed[key] = override.input_line
        else:
            space[key] = value
    return space, fixed


def suggest(trial: Any, space: Dict[str, Any]) -> Dict[str, Any]:
    """The trial's values (an enqueued trial gets its queued ones)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    values = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, FloatDistribution):
            values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        else:
            values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
    return values


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else str(value)


def check_directions(direction: Any, keys: List[Any]) -> List[str]:
    """``hydra.sweeper.direction`` as one direction per ``optimized_metric`` key."""
    from prunegrid.errors import ConfigError

    directions = [str(d) for d in direction] if isinstance(direction, (list, tuple, ListConfig)) else [str(direction)]
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction '{d}' must be maximize or minimize")
    if len(directions) != len(keys):
        example = ",".join((["maximize", "minimize"] * len(keys))[:len(keys)])
        raise ConfigError(f"hydra.sweeper.direction gives {len(directions)} direction(s) for {len(keys)} "
                          f"optimized_metric key(s) {[str(k) for k in keys]}; give one per key, e.g. "
                          f"hydra.sweeper.direction=[{example}]")
    return directions


class LaunchInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM while the launcher runs a batch, outside its jobs' own handlers: a
    ``KeyboardInterrupt``, the one exception Ray's ``ray.get`` stops on cleanly (it mangles others that
    a signal handler raises there)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


def interruption(exc: BaseException) -> Optional[int]:
    """The signal number when ``exc`` is a SIGINT/SIGTERM (raised as such, or turned into an exit by
    ``prunegrid.cli.guard`` in the job); else None."""
    from prunegrid.interrupt import Interrupted

    seen = exc
    for _ in range(3):
        if isinstance(seen, (Interrupted, LaunchInterrupted)):
            return seen.signum
        if seen.__context__ is None:
            break
        seen = seen.__context__
    return None


class TrialJob:
    """The task function as the launcher runs it. In this process the trial of job ``hydra.job.num`` is
    the active one (for :class:`prunegrid.sweep.OptunaPruning`) and the job's MLflow run id is kept.

    A launcher that pickles it runs it elsewhere (a Ray worker): the copy carries no trial objects,
    only their ids, the study's ``storage`` URL, ``study_name`` and ``pruner``, and reopens the job's
    trial from the database, so the job reports to it and is pruned there; it records its MLflow run
    id on the trial itself. ``ran_elsewhere`` tells this process that it was pickled."""

    def __init__(self, task_function: TaskFunction):
        self.task_function = task_function
        self.trials: Dict[int, Any] = {}
        self.started: List[int] = []
        self.run_ids: Dict[int, str] = {}
        self.returns: Dict[int, Any] = {}   # the jobs that ended (a JobReturn each), for a batch cut short
        self.storage: Optional[str] = None  # an absolute database URL; None: the study is in memory
        self.study_name: Optional[str] = None
        self.pruner: Any = None
        self.ran_elsewhere = False
        self.trial_ids: Dict[int, int] = {}  # in a copy run elsewhere: job num -> the trial's id in the storage

    def __getstate__(self) -> dict:  # a launcher that pickles the job runs it elsewhere: no trial objects there
        self.ran_elsewhere = True
        ids = {num: t._trial_id for num, t in self.trials.items()} if self.storage else {}
        return {"task_function": self.task_function, "trials": {}, "started": [], "run_ids": {}, "returns": {},
                "storage": self.storage, "study_name": self.study_name, "pruner": self.pruner,
                "ran_elsewhere": True, "trial_ids": ids}

    def clear(self) -> None:
        for kept in (self.trials, self.started, self.run_ids, self.returns, self.trial_ids):
            kept.clear()

    def _reopen(self, num: int) -> Any:
        """The trial of job ``num`` in a copy run elsewhere, from the storage (None when it has none or
        cannot be reached from here: the job then runs without pruning, and says so)."""
        trial_id = self.trial_ids.get(num)
        if trial_id is None or not self.storage:
            return None
        import optuna

        from prunegrid import sweep

        try:
            study = optuna.load_study(study_name=str(self.study_name), storage=sweep.open_storage(self.storage),
                                      sampler=optuna.samplers.RandomSampler(), pruner=self.pruner)
            return optuna.trial.Trial(study, trial_id)
        except Exception as exc:
            log.warning("job %d cannot reach its trial in %s (%s): it runs without pruning", num,
                        sweep.redact(self.storage), (str(exc).splitlines() or [type(exc).__name__])[0][:200])
            return None

    def __call__(self, cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobReturn, JobStatus

        from prunegrid import sweep

        num = int(HydraConfig.get().job.num)
        self.started.append(num)
        trial = self.trials.get(num)
        if trial is None and self.ran_elsewhere:
            trial = self._reopen(num)
            sweep.follow_task_threads()
        sweep._active.update(trial=trial, step=0, run_id=None)
        try:
            value = self.task_function(cfg)
            self.returns[num] = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
            return value
        except Exception as exc:
            self.returns[num] = JobReturn(status=JobStatus.FAILED, _return_value=exc)
            raise
        finally:
            run_id = sweep._active["run_id"]
            if run_id:
                self.run_ids[num] = run_id
                if trial is not None and num not in self.trials:  # elsewhere: on the trial itself
                    try:
                        trial.set_user_attr(sweep.RUN_ATTR, run_id)
                    except Exception as exc:  # the sweep told it already (it was interrupted)
                        log.warning("job %d: run id not recorded on trial %d (%s)", num, trial.number,
                                    (str(exc).splitlines() or [type(exc).__name__])[0][:200])
            sweep._active.update(trial=None, step=0, run_id=None)


class OptunaSweeperImpl:
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, params: Optional[DictConfig], pruner: Optional[DictConfig],
                 max_failure_rate: float, report_dir: str, max_complete: Optional[int] = None) -> None:
        self.sampler, self.pruner, self.direction = sampler, pruner, direction
        self.max_complete = max_complete
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.params = params if params is not None else OmegaConf.create({})
        self.report_dir = report_dir
        self.job_idx = 0
        self._seeded = False          # the sampler re-seeded after this process's first trial (_ask)
        self._said_in_memory = False  # the one line about pruning with an in-memory study and remote jobs

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.job_idx = config, hydra_context, 0
        self.job = TrialJob(task_function)
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=self.job)

    # -- checks before any trial -----------------------------------------------------------------
    def _task_config(self) -> DictConfig:
        """The config every job starts from (no hydra node), with the cell groups' choices."""
        from prunegrid.config import CELL_GROUPS

        cfg = OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"])
        with open_dict(cfg):
            cfg.choices = {g: str(v) for g, v in self.config.hydra.runtime.choices.items()
                           if g in CELL_GROUPS and v is not None}
        return cfg

    def _check(self, arguments: List[str]) -> Tuple[List[str], List[str], Dict[str, Any], Dict[str, str]]:
        """The settings, the objectives and the search space, checked before anything is created (the
        settings first: they need no heavy import)."""
        from prunegrid.errors import ConfigError

        metric = self.config.get("optimized_metric", "val/final_acc")
        directions = check_directions(self.direction, list(metric) if isinstance(metric, ListConfig) else [metric])
        for name, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs), ("max_complete", self.max_complete)):
            if name == "max_complete" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                also = " or null (n_trials decides)" if name == "max_complete" else ""
                raise ConfigError(f"hydra.sweeper.{name}={value} must be a positive integer{also}")
        if self.max_complete is not None and not self.storage:
            raise ConfigError(f"hydra.sweeper.max_complete={self.max_complete} counts every worker's trials in "
                              "a shared study; give it a storage, e.g. hydra.sweeper.storage=sqlite:///optuna.db")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} must be in [0, 1]")
        if not self.study_name:
            raise ConfigError("hydra.sweeper.study_name is empty; name the study")
        from prunegrid import sweep

        keys = sweep.objective_keys(metric)
        params = [f"{k}={v}" for k, v in self.params.items()]
        space, fixed = search_space(params + list(arguments))
        if not space:
            raise ConfigError("the sweep has no search space: give hydra.sweeper.params or a sweep override, "
                              "e.g. 'prune.amount=interval(0.1,0.9)'")
        task = self._task_config()
        groups = set(self.config.hydra.runtime.choices)
        for key in space:
            bare = key.lstrip("+~")
            if bare == key and bare not in groups and OmegaConf.select(task, bare, default="__absent__") == "__absent__":
                prune = task.choices.get("prune", "?")
                raise ConfigError(f"sweep parameter '{key}' is not in the config (prune={prune}); check the "
                                  f"prune option or the key (append a new key with +{key}=...)")
        return keys, directions, space, fixed

    # -- the sweep -------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> Any:
        from prunegrid.cli import guard
        from prunegrid.interrupt import signals

        with guard(), signals():
            return self._sweep(arguments)

    def _sweep(self, arguments: List[str]) -> Any:
        keys, directions, space, fixed = self._check(arguments)
        import optuna

        from prunegrid import sweep, tracking

        multi = len(keys) > 1
        pruner = None if multi or self.pruner is None else sweep.instantiate(self.pruner, "pruner")
        pruner = pruner or optuna.pruners.NopPruner()
        sweep.instantiate(self.sampler, "sampler")  # a bad sampler is one line before the storage is touched
        storage = sweep.open_storage(str(self.storage)) if self.storage else None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, created = sweep.create_study(storage, str(self.study_name), directions, self.sampler, pruner)
        self.job.storage = sweep.absolute_url(str(self.storage)) if self.storage else None
        self.job.study_name, self.job.pruner = study.study_name, None if multi else pruner
        task = self._task_config()
        uri = task.tracking.get("uri")
        parent = sweep._parent_run(study, task, created)
        tracking.open_client(uri).update_run(parent, status="RUNNING")
        if storage is not None:  # trials a killed process left RUNNING: FAIL, and retried (RetryFailedTrialCallback)
            self._fail_stale(study)
        so_far = len(study.trials)
        requeued = sweep.requeue_interrupted(study)
        goal = (f"running trials until it has {self.max_complete} complete, with any other worker on it"
                if self.max_complete is not None else f"adding {self.n_trials}")
        print(f"prunegrid: sweep {study.study_name}: {so_far} trials so far ({sweep.complete(study)} "
              f"complete), {goal}; storage {sweep.redact(self.storage) if self.storage else 'in memory'}; "
              f"MLflow parent run {parent}", file=sys.stderr)
        if requeued:
            print(f"prunegrid: sweep {study.study_name}: trials {requeued} were interrupted; running them again "
                  "from their checkpoints (resume=true)", file=sys.stderr)
        extra = [f"tracking.parent_run_id={_quote(parent)}"]
        if not multi:
            extra.append(f"+{PRUNING_KEY}={{_target_:prunegrid.sweep.OptunaPruning,"
                         f"monitor:{_quote(sweep.PRUNING_MONITOR)}}}")
        status = "FAILED"
        try:
            if self.max_complete is not None:
                self._until(study, int(self.max_complete), space, fixed, extra, keys)
            else:
                to_go = self.n_trials
                while to_go > 0:
                    batch = min(self.n_jobs, to_go)
                    self._batch(study, self._ask(study, batch), space, fixed, extra, keys)
                    to_go -= batch
            status = "FINISHED"
        except BaseException as exc:
            status = "KILLED" if interruption(exc) is not None else "FAILED"
            raise
        finally:
            self._summary(study, keys, uri, parent)
            self._end_parent(study, uri, parent, status)
        return study

    def _ask(self, study: Any, n: int) -> List[Any]:
        """``n`` new trials. After the first, a seeded sampler is re-seeded with ``seed`` + that trial's
        number (sampling happens later, at suggest): a number is unique to the process that asked for
        it, so workers started together, and re-runs, never replay each other's samples."""
        import optuna

        from prunegrid import sweep

        with warnings.catch_warnings():  # ask/tell with a heartbeat: _batch runs the heartbeat threads
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trials = [study.ask() for _ in range(n)]
        if trials and not self._seeded:
            self._seeded = True
            sweep.reseed(study, self.sampler, trials[0].number)
        return trials

    @staticmethod
    def _fail_stale(study: Any) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)

    def _until(self, study: Any, target: int, space: Dict[str, Any], fixed: Dict[str, str], extra: List[str],
               keys: List[str]) -> None:
        """Batches of at most ``n_jobs`` trials until the study holds ``target`` COMPLETE trials, every
        worker's counted; wait (poll) while others' RUNNING trials leave no slot."""
        import optuna

        from prunegrid import sweep
        from prunegrid.interrupt import deferred

        S = optuna.trial.TrialState
        waiting_since = None
        while True:
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state == S.COMPLETE for t in trials)
            if done >= target:
                return
            running = sum(t.state == S.RUNNING for t in trials)
            slots = target - done - running
            if slots <= 0:  # others' trials may still complete; a FAIL or PRUNED one frees a slot
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    print(f"prunegrid: sweep {study.study_name}: {done} of {target} complete, {running} running "
                          "elsewhere; waiting for them", file=sys.stderr)
                time.sleep(POLL_S)
                self._fail_stale(study)   # a worker killed outright leaves RUNNING trials: FAIL after the grace
                continue
            waiting_since = None
            asked = self._ask(study, min(self.n_jobs, slots))
            with deferred():  # exact under races: numbers are dense, in the order the storage made the trials
                live = sorted(t.number for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.RUNNING,
                                                                                          S.WAITING)))
                kept = []
                for trial in asked:
                    before = sum(n < trial.number for n in live)
                    if before < target:
                        kept.append(trial)
                        continue
                    trial.set_user_attr(sweep.SURPLUS_ATTR, f"max_complete={target}: {before} trials before it "
                                                            "were already complete or running")
                    study.tell(trial, state=S.FAIL)
            if len(kept) < len(asked):
                log.info("%d surplus trial(s) told FAIL: other workers filled the study first", len(asked) - len(kept))
            if kept:
                self._batch(study, kept, space, fixed, extra, keys)

    def _end_parent(self, study: Any, uri: Optional[str], parent: str, status: str) -> None:
        """End the parent run, unless another worker still runs trials under it (it ends it then)."""
        import optuna

        from prunegrid import tracking

        if status == "FINISHED":
            try:
                others = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            except Exception:
                others = []
            if others:
                print(f"prunegrid: sweep {study.study_name}: {len(others)} trials of other workers still running; "
                      f"the parent run {parent} stays RUNNING until the last worker ends", file=sys.stderr)
                return
        tracking.end_parent_run(uri, parent, status)

    def _batch(self, study: Any, trials: List[Any], space: Dict[str, Any], fixed: Dict[str, str],
               extra: List[str], keys: List[str]) -> None:
        import optuna
        from optuna.storages._heartbeat import get_heartbeat_thread

        from prunegrid import sweep
        from prunegrid.interrupt import deferred

        overrides: List[Sequence[str]] = []
        for i, trial in enumerate(trials):
            values = suggest(trial, space)
            resume = ["resume=true"] if sweep.RESUMES_ATTR in trial.user_attrs else []
            overrides.append((*(f"{k}={_quote(v) if isinstance(v, str) and _needs_quote(v) else v}"
                                for k, v in values.items()),
                              *fixed.values(), *extra, *resume, *trial_tags(trial.number, values)))
        first = self.job_idx
        self.job.clear()
        self.job.trials.update({first + i: trial for i, trial in enumerate(trials)})
        beats = [get_heartbeat_thread(t._trial_id, study._storage) for t in trials]
        for b in beats:
            b.start()
        stopping: List[int] = []
        try:
            with self._launch_signals(study, trials, stopping):
                returns = self.launcher.launch(overrides, initial_job_idx=first)
        except BaseException as exc:  # SIGINT/SIGTERM, or a user error that ended a job with its one line
            self.job_idx += len(trials)
            signum = interruption(exc)
            if signum is None and stopping:
                signum = stopping[0]
            running = [n for n in self.job.started if n not in self.job.returns]
            cut = running[-1] if running else None                      # the job that was running
            # jobs run elsewhere (a Ray worker) that have not come back: each was running or about to
            cuts = ({first + i for i in range(len(trials))} if self.job.ran_elsewhere and signum is not None
                    else {cut} if signum is not None and cut is not None else set())
            with deferred():
                for i, trial in enumerate(trials):
                    ended = self.job.returns.get(first + i)
                    if ended is not None:                               # ended before the cut: as usual
                        self._tell(study, trial, ended, first + i, keys)
                        continue
                    if self.job.run_ids.get(first + i):
                        trial.set_user_attr(sweep.RUN_ATTR, self.job.run_ids[first + i])
                    if first + i in cuts:
                        trial.set_user_attr(sweep.INTERRUPTED_ATTR, signal.Signals(signum).name)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            cut_trials = [trials[n - first].number for n in sorted(cuts - set(self.job.returns))]
            if len(cut_trials) == 1:
                print(f"prunegrid: sweep {study.study_name}: trial {cut_trials[0]} was interrupted; "
                      "the next sweep on this study runs it again from its checkpoints", file=sys.stderr)
            elif cut_trials:
                print(f"prunegrid: sweep {study.study_name}: trials {cut_trials} were interrupted; "
                      "the next sweep on this study runs them again (from their checkpoints)", file=sys.stderr)
            if signum is not None and not isinstance(exc, (Interrupted, SystemExit)):
                raise Interrupted(signum) from None   # guard: one line, exit 128 + signal
            raise
        finally:
            for b in beats:
                b.join()
        self.job_idx += len(returns)
        if self.job.ran_elsewhere and self.job.storage is None and self.pruner is not None and len(keys) == 1:
            if not self._said_in_memory:
                self._said_in_memory = True
                print(f"prunegrid: sweep {study.study_name}: the launcher runs jobs in other processes and the "
                      "study is in memory (hydra.sweeper.storage=null): they cannot report to their trials, so "
                      "no trial is pruned; give a database storage", file=sys.stderr)
        with deferred():
            failures = [e for e in (self._tell(study, trial, ret, first + i, keys)
                                    for i, (trial, ret) in enumerate(zip(trials, returns))) if e is not None]
        self.job.clear()
        exits = [(t, ret._return_value) for t, ret in zip(trials, returns) if isinstance(ret._return_value, JobExit)]
        if stopping:  # the jobs elsewhere stopped (or had finished) after SIGINT/SIGTERM here: so does the sweep
            stopped = [t.number for t, e in exits if e.code - 128 in (signal.SIGINT, signal.SIGTERM)]
            if stopped:
                print(f"prunegrid: sweep {study.study_name}: trials {stopped} were interrupted; the next sweep on "
                      "this study runs them again from their checkpoints", file=sys.stderr)
            raise Interrupted(stopping[0])
        if exits:  # a job run elsewhere wanted to exit (a user error, a signal): so does the sweep, as in-process
            trial, first_exit = exits[0]
            if first_exit.code == EXIT_USAGE:
                print(f"prunegrid: error: {first_exit.line}", file=sys.stderr)
            else:
                print(f"prunegrid: sweep {study.study_name}: trial {trial.number}'s job ended with exit "
                      f"{first_exit.code} in its worker ({first_exit}); the next sweep on this study runs "
                      "interrupted trials again from their checkpoints", file=sys.stderr)
            sys.exit(first_exit.code)
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            log.error("%d of %d trials failed (max_failure_rate=%s)", len(failures), len(returns),
                      self.max_failure_rate)
            raise failures[0]

    def _start_ray(self) -> None:
        """Hydra's Ray launcher calls ``ray.init`` at its first launch, and ``ray.init`` puts its own
        SIGTERM handler (``sys.exit``) in place of ours: start Ray first, as the launcher would (it then
        finds it running), so the handlers of :meth:`_launch_signals` stay. With an address to join
        (``hydra.launcher.ray.init.address=auto``), without the launcher's object store size, which
        Ray refuses when joining a cluster."""
        if not type(self.launcher).__module__.startswith("hydra_plugins.hydra_ray_launcher"):
            return
        import ray

        if ray.is_initialized():
            return
        from hydra_plugins.hydra_ray_launcher._launcher_util import start_ray

        init = self.launcher.ray_cfg.init
        if init.get("address") not in (None, "local"):  # joining a cluster: Ray refuses an object store size
            init.setdefault("object_store_memory", None)
        init.setdefault("object_store_memory", 78643200)  # what the launcher's launch() sets before ray.init
        start_ray(init)

    @contextlib.contextmanager
    def _launch_signals(self, study: Any, trials: List[Any], stopping: List[int]):
        """SIGINT/SIGTERM while the launcher runs the batch. Jobs in this process have their own
        handlers (:func:`prunegrid.interrupt.signals`); between them, and while jobs run elsewhere, the
        signal raises :class:`LaunchInterrupted`. For jobs run elsewhere the first signal instead marks
        the batch's trials ``stop`` and waits: each job stops at its next validation (its run KILLED
        with its checkpoints) or finishes; a second signal stops waiting."""
        from prunegrid import interrupt, sweep

        self._start_ray()

        def handler(signum: int, _frame: Any) -> None:
            if interrupt._state["depth"]:
                interrupt._state["pending"] = signum
                return
            if self.job.ran_elsewhere and self.job.storage and not stopping:
                stopping.append(signum)
                name = signal.Signals(signum).name
                try:
                    for trial in trials:
                        trial.set_user_attr(sweep.STOP_ATTR, name)
                except Exception:  # a trial told already, a storage gone: stop waiting
                    raise LaunchInterrupted(signum) from None
                print(f"prunegrid: sweep {study.study_name}: {name}; the batch's jobs stop at their next validation "
                      f"(their runs KILLED, resumable); {name} again stops waiting for them", file=sys.stderr)
                return
            raise LaunchInterrupted(stopping[0] if stopping else signum)

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
        for s in interrupt.SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in before.items():
                signal.signal(s, h)

    def _tell(self, study: Any, trial: Any, ret: Any, num: int, keys: List[str]) -> Optional[BaseException]:
        """Tell Optuna how job ``num`` ended (its MLflow run id first); the error of a FAIL trial."""
        from prunegrid import sweep

        if self.job.run_ids.get(num):
            trial.set_user_attr(sweep.RUN_ATTR, self.job.run_ids[num])
        state, values, error = self._outcome(ret, keys)
        if isinstance(error, JobExit):  # its job ran elsewhere and wanted to exit; _batch ends the sweep with it
            if error.code - 128 in (signal.SIGINT, signal.SIGTERM):
                trial.set_user_attr(sweep.INTERRUPTED_ATTR, signal.Signals(error.code - 128).name)
        elif error is not None:
            log.warning("trial %d failed: %s", trial.number, error)
        study.tell(trial, values=values, state=state)
        return error

    @staticmethod
    def _outcome(ret: Any, keys: List[str]) -> Tuple[Any, Optional[List[float]], Optional[BaseException]]:
        import optuna
        from hydra.core.utils import JobStatus

        value = ret._return_value
        if ret.status != JobStatus.COMPLETED:
            if isinstance(value, optuna.TrialPruned):
                return optuna.trial.TrialState.PRUNED, None, None
            return optuna.trial.TrialState.FAIL, None, value if isinstance(value, BaseException) else None
        raw = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        try:
            values = [float(v) for v in raw]
        except (TypeError, ValueError):
            return optuna.trial.TrialState.FAIL, None, ValueError(
                f"the job returned {value!r}, not {len(keys)} number(s) for optimized_metric {keys}")
        if len(values) != len(keys):
            return optuna.trial.TrialState.FAIL, None, ValueError(
                f"the job returned {len(values)} value(s) for {len(keys)} optimized_metric key(s) {keys}")
        if any(math.isnan(v) for v in values):
            log.warning("a trial's %s is missing (NaN): the trial is FAIL", keys)
            return optuna.trial.TrialState.FAIL, None, None
        return optuna.trial.TrialState.COMPLETE, values, None

    def _summary(self, study: Any, keys: List[str], uri: Optional[str], parent: Optional[str] = None) -> None:
        from prunegrid import sweep

        if not sweep.complete(study):
            print(f"prunegrid: sweep {study.study_name}: {len(study.trials)} trials, none complete yet; no summary",
                  file=sys.stderr)
            return
        out = sweep.write_summary(study, keys, Path(self.report_dir) / str(study.study_name))
        if parent:
            try:
                sweep.publish_to_parent(study, keys, uri, parent, out)
            except Exception as exc:  # as the registry below: the sweep's results stand without it
                print(f"prunegrid: sweep {study.study_name}: parent run not updated ({type(exc).__name__}: "
                      f"{(str(exc).splitlines() or [''])[0][:200]})", file=sys.stderr)
        try:
            sweep.register_front(study, uri)
        except Exception as exc:  # the registry is a convenience: the sweep's results stand without it
            print(f"prunegrid: sweep {study.study_name}: model registry not updated ({type(exc).__name__}: "
                  f"{(str(exc).splitlines() or [''])[0][:200]})", file=sys.stderr)
        best = sweep.front(study)
        results: Dict[str, Any] = {"name": "optuna", "study_name": str(study.study_name)}
        if len(keys) == 1 and best:
            results.update(best_params=best[0].params, best_value=best[0].value)
        elif best:
            results["solutions"] = [{"params": t.params, "values": t.values, "trial": t.number} for t in best]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        print(f"prunegrid: sweep {study.study_name}: {len(study.trials)} trials ({sweep.complete(study)} complete); "
              f"{'Pareto front' if len(keys) > 1 else 'best trial'} {[t.number for t in best]} -> {out / 'pareto.md'}",
              file=sys.stderr)


def trial_tags(number: int, values: Dict[str, Any]) -> List[str]:
    """Overrides that tag a trial's run with its number and sampled values (``sweep_trial``,
    ``sweep_params``): its MLflow name says which trial it is, and the grid report keeps it out."""
    from prunegrid import tracking

    sampled = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                       for k, v in values.items())
    return [f"++tracking.tags.{tracking.TAG_SWEEP_TRIAL}={number}",
            f"++tracking.tags.{tracking.TAG_SWEEP_PARAMS}={_quote(sampled)}"]


def _needs_quote(value: str) -> bool:
    """A string value that Hydra would read as something else (a number, null, a list) or not parse."""
    import re

    return not re.fullmatch(r"[A-Za-z_][\w./\-]*", value) or value.lower() in ("null", "true", "false")
