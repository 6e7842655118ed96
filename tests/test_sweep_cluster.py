"""Sweeps scaled out: several workers on one study end with exactly ``hydra.sweeper.max_complete`` COMPLETE
trials under one MLflow parent run (on the head's PostgreSQL and MLflow server), and Hydra's Ray launcher
runs any multirun, the Optuna sweep included, with its jobs in Ray workers that report to their trials."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from prunegrid import sweep, tracking

from .conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
STATES = optuna.trial.TrialState
# a Ray of its own (address=local: not a cluster this machine may be part of), small and without dashboard
RAY = ["hydra/launcher=ray", "hydra.launcher.ray.init.address=local", "+hydra.launcher.ray.init.num_cpus=2",
       "+hydra.launcher.ray.init.include_dashboard=false"]


def _start(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """``python train.py -m <args>`` on a cell of seconds, in ``tmp_path``, with ``env`` (its runs go to
    ``MLFLOW_TRACKING_URI``, else ``tmp_path/mlflow.db``; its study to ``PRUNEGRID_OPTUNA_STORAGE`` unless
    an argument names it)."""
    tmp_path.mkdir(exist_ok=True)
    cell = [o for o in tiny(tmp_path) if not o.startswith(("paths.output_dir=", "tracking.uri="))]
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PRUNEGRID_OPTUNA_STORAGE")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *args, *cell, "backbone=simple_cnn",
                             "explain.enabled=false"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    """The process's stdout and stderr (Hydra logs on stdout), once it has ended well."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out + err


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory, fashion_dir):
    """The two multiruns on Hydra's Ray launcher, started with this module's first test and run beside it
    (each spends most of its time starting Ray and importing torch in Ray workers): a plain one over two
    seeds, and the Optuna sweep with batches of 2 (its storage a relative SQLite path, made absolute
    for the workers)."""
    plain, swept = tmp_path_factory.mktemp("ray_plain"), tmp_path_factory.mktemp("ray_sweep")
    procs = {"plain": (plain, _start(plain, "seed=1,2", *RAY, f"hydra.sweep.dir={plain}/multirun")),
             "sweep": (swept, _start(swept, "sweep=l1", *RAY, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                                     "hydra.sweeper.storage=sqlite:///optuna.db", "hydra.sweeper.study_name=ray",
                                     f"hydra.sweep.dir={swept}/multirun"))}
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _parent_runs(client: MlflowClient, experiment: str, study: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_RUN_KIND}` = 'sweep' and "
                                                                 f"tags.sweep = '{study}'")


def _check_nested(client: MlflowClient, study: optuna.Study, parent: str) -> None:
    """Every trial that ran has its run nested under ``parent``; the COMPLETE ones FINISHED."""
    ran = [t for t in study.trials if sweep.RUN_ATTR in t.user_attrs]
    assert {t.number for t in ran} >= {t.number for t in study.trials if t.state == STATES.COMPLETE}
    for t in ran:
        run = client.get_run(t.user_attrs[sweep.RUN_ATTR])
        assert run.data.tags["mlflow.parentRunId"] == parent, t.number
        if t.state == STATES.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics["val/final_acc"] == pytest.approx(t.value)


@pytest.mark.usefixtures("ray_runs")  # starts the Ray multiruns beside this test
def test_two_workers_on_one_study_end_with_exactly_max_complete_trials_under_one_parent_run(tmp_path, head,
                                                                                           fashion_dir):
    """On the head's PostgreSQL (the study) and MLflow server (on PostgreSQL too)."""
    storage, uri = head.optuna_storage, head.tracking_uri
    study_name, experiment, n = f"workers-{uuid.uuid4().hex[:8]}", f"sweep-workers-{uuid.uuid4().hex[:8]}", 3
    # the head's URLs as `python -m prunegrid.head start` exports them; each worker in a folder of its own
    workers = [_start(tmp_path / f"w{i}", "sweep=l1", f"hydra.sweeper.study_name={study_name}",
                      f"hydra.sweeper.max_complete={n}", "hydra.sweeper.n_jobs=2",   # batches of 2: a race leaves a surplus
                      "hydra.sweeper.n_trials=1",  # unused with max_complete: each worker runs until the study has n
                      f"tracking.experiment={experiment}", f"hydra.sweep.dir={tmp_path}/multirun/w{i}",
                      PRUNEGRID_OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=uri)
               for i in range(2)]
    ended = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(f"worker {i}:\n{err[-3000:]}"
                                                               for i, (_, err) in enumerate(ended))
    errs = [out + err for out, err in ended]

    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(STATES.COMPLETE) == n, (states, errs[0][-2000:])
    others = [t for t in study.trials if t.state != STATES.COMPLETE]
    assert all(t.state == STATES.FAIL and sweep.SURPLUS_ATTR in t.user_attrs for t in others), \
        [(t.number, t.state, t.user_attrs) for t in others]          # a race's surplus trial, never run
    assert all(f"until it has {n} complete" in e for e in errs)
    done = [t for t in study.trials if t.state == STATES.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in done}) == n     # the workers' samplers do not replay

    client = MlflowClient(uri)
    parents = _parent_runs(client, experiment, study_name)
    assert len(parents) == 1, [(p.info.run_id, p.info.status) for p in parents]
    parent = parents[0].info.run_id
    assert study.user_attrs[sweep.PARENT_ATTR] == parent and parents[0].info.status == "FINISHED"
    _check_nested(client, study, parent)
    children = client.search_runs([parents[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == n and all(r.info.status == "FINISHED" for r in children)


def test_a_plain_multirun_on_hydras_ray_launcher_runs_its_jobs_in_ray_workers(ray_runs):
    tmp_path, proc = ray_runs["plain"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    err = _finish(proc)
    assert "Ray Launcher is launching 2 jobs" in err
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # MLflow names the process's script: a Ray worker's, not train.py (the driver's)
    assert {r.data.tags["mlflow.source.name"] for r in runs} == {"default_worker.py"}


def test_the_optuna_sweep_on_hydras_ray_launcher_reports_to_its_trials_from_the_workers(ray_runs):
    tmp_path, proc = ray_runs["sweep"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    err = _finish(proc)
    assert "Ray Launcher is launching 2 jobs" in err
    study = optuna.load_study(study_name="ray", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [STATES.COMPLETE] * 2
    # the jobs reported val/acc to their trials from the Ray workers (what pruning decides on)
    assert all(t.intermediate_values for t in study.trials), [t.intermediate_values for t in study.trials]
    client = MlflowClient(uri)
    parents = _parent_runs(client, "fashion_mnist", "ray")
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs[sweep.PARENT_ATTR]
    _check_nested(client, study, parents[0].info.run_id)
    assert {client.get_run(t.user_attrs[sweep.RUN_ATTR]).data.tags["mlflow.source.name"]
            for t in study.trials} == {"default_worker.py"}


# -- in process: the exactness rule of max_complete, on a race made to order -------------------------
def test_max_complete_is_exact_when_another_worker_asks_between_our_count_and_our_ask(tmp_path, monkeypatch):
    """Another worker holds trial 0 RUNNING; between our count (1 slot of 2) and our ``ask`` it asks
    trial 1. Our trial 2 has 2 live trials before it: it is surplus (FAIL, never launched); we wait
    until the other worker's trials complete, then stop with exactly 2 COMPLETE trials."""
    from hydra_plugins.prunegrid_optuna_sweeper import _impl

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="race", storage=storage, direction="maximize")
    other = optuna.load_study(study_name="race", storage=storage)        # the other worker's handle
    held = [other.ask()]                                                 # trial 0, RUNNING elsewhere
    ask = study.ask

    def racing_ask(*a, **kw):
        if len(held) == 1:
            held.append(other.ask())                                     # trial 1: the other worker was faster
        return ask(*a, **kw)

    monkeypatch.setattr(study, "ask", racing_ask)

    def poll(_s):                                                        # while we wait, the other worker ends
        for t in held:
            if other._storage.get_trial(t._trial_id).state == STATES.RUNNING:
                other.tell(t, 0.5)

    monkeypatch.setattr(_impl.time, "sleep", poll)
    impl = _impl.OptunaSweeperImpl(sampler=None, direction="maximize", storage=storage, study_name="race",
                                   n_trials=1, n_jobs=2, params=None, pruner=None, max_failure_rate=0.0,
                                   report_dir="unused", max_complete=2)
    impl._batch = lambda *a, **kw: pytest.fail("a surplus trial was launched")
    impl._until(study, 2, {}, {}, [], ["val/final_acc"])
    trials = optuna.load_study(study_name="race", storage=storage).trials
    assert [t.state for t in trials] == [STATES.COMPLETE, STATES.COMPLETE, STATES.FAIL]
    assert "2 trials before it" in trials[2].user_attrs[sweep.SURPLUS_ATTR]
