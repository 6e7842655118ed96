"""Optuna sweeps through Hydra (``python train.py -m hydra/sweeper=optuna ...``): a re-run adds trials to
the study under the same MLflow parent run, trials are pruned on validation, a two-objective study
writes exactly its Pareto front and registers its models, mistakes are one line, every preset composes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from prunegrid import sweep, tracking
from prunegrid.config import conf_dir

from .conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml"))
STATES = optuna.trial.TrialState


def _cell(tmp_path: Path) -> list[str]:
    """A cell of seconds (tiny()), its checkpoints and MLflow store under ``tmp_path``; each job writes
    to its own Hydra job folder (no paths.output_dir)."""
    keep = [o for o in tiny(tmp_path) if not o.startswith("paths.output_dir=")]
    return [*keep, "backbone=simple_cnn", "explain.enabled=false"]


def _start(tmp_path: Path, study: str, *extra: str) -> subprocess.Popen:
    """``python train.py -m hydra/sweeper=optuna hydra.sweeper.n_trials=3 prune=l1_static
    'prune.amount=interval(0.2,0.6)' ...`` in ``tmp_path`` (reports/sweeps/ lands there)."""
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "prune=l1_static", "prune.amount=interval(0.2,0.6)",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", f"hydra.sweeper.study_name={study}",
            f"hydra.sweep.dir={tmp_path}/multirun/{study}", *_cell(tmp_path), *extra]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}   # two sweeps at once share 2 cores
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    if check:
        assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _sweep(tmp_path: Path, study: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _finish(_start(tmp_path, study, *extra), check)


@pytest.fixture(scope="module")
def front_sweep(tmp_path_factory, fashion_dir):
    """The two-objective sweep, started with this module's first sweep and run beside it: a sweep
    process spends much of its time in single-threaded start-up, and the machine has two cores."""
    tmp = tmp_path_factory.mktemp("front")
    proc = _start(tmp, "front", "optimized_metric=[val/final_acc,time/infer_ms]",
                  "hydra.sweeper.direction=[maximize,minimize]", "tracking.log_model=true",
                  "hydra.sweeper.n_jobs=2")                   # batches of 2 and 1 trials
    yield tmp, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def _children(client: MlflowClient, parent: str):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.usefixtures("front_sweep")  # starts the two-objective sweep beside this one
def test_a_rerun_adds_trials_under_the_same_parent_run_and_trials_are_pruned(tmp_path, fashion_dir):
    _sweep(tmp_path, "adds", "tracking.log_model=true")     # the best trial's model goes to the registry
    study = _study(tmp_path, "adds")
    assert [t.state for t in study.trials] == [STATES.COMPLETE] * 3
    assert all(0.2 <= t.params["prune.amount"] <= 0.6 for t in study.trials)
    parent = study.user_attrs[sweep.PARENT_ATTR]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(parent).data.tags[tracking.TAG_RUN_KIND] == "sweep"
    assert client.get_run(parent).info.status == "FINISHED"
    runs = {r.info.run_id: r for r in _children(client, parent)}
    assert set(runs) == {t.user_attrs[sweep.RUN_ATTR] for t in study.trials}
    for t in study.trials:
        run = runs[t.user_attrs[sweep.RUN_ATTR]]
        assert run.data.params["prune.amount"] == str(t.params["prune.amount"])
        assert run.data.metrics["val/final_acc"] == pytest.approx(t.value)    # chosen on validation, not test
    assert (tmp_path / "reports" / "sweeps" / "adds" / "pareto.md").is_file()
    best = client.get_model_version_by_alias("sweep-adds", "best")
    assert best.run_id == study.best_trial.user_attrs[sweep.RUN_ATTR]
    for t in study.trials:   # each trial's run says which trial it is and what it sampled
        run = runs[t.user_attrs[sweep.RUN_ATTR]]
        assert run.data.tags[tracking.TAG_SWEEP_TRIAL] == str(t.number)
        assert run.info.run_name.endswith(f"trial {t.number} (amount={t.params['prune.amount']:.4g})"), run.info.run_name
    top = client.get_run(parent)   # the parent carries the best trial and the summary
    assert top.data.params["best_trial"] == str(study.best_trial.number)
    assert top.data.params["best.prune.amount"] == str(study.best_trial.params["prune.amount"])
    assert top.data.metrics["best/val/final_acc"] == pytest.approx(study.best_value)
    assert top.data.metrics["best/test/acc"] == runs[best.run_id].data.metrics["test/acc"]
    assert {"pareto.md", "pareto.csv"} <= {a.path for a in client.list_artifacts(parent)}
    model = client.get_logged_model(runs[best.run_id].data.tags[tracking.TAG_MODEL_URI].removeprefix("models:/"))
    figures = {m.key: m for m in model.metrics}
    assert figures["test/acc"].value == runs[best.run_id].data.metrics["test/acc"]
    assert {"model/params_nonzero", "time/infer_ms", "val/final_acc"} <= set(figures)
    assert "val/loss" not in figures and "train/loss" not in figures, "no epoch figures on the final model"
    assert figures["test/acc"].dataset_name == "fashion_mnist"
    assert model.name == tracking.model_name({"backbone": "simple_cnn", "prune": runs[best.run_id].data.tags["prune"],
                                              "dataset": "fashion_mnist", "loss": "cross_entropy", "seed": "42"})

    # the same storage and study again: 3 more trials, the same parent run; a pruner that always prunes
    _sweep(tmp_path, "adds", "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
           "+hydra.sweeper.pruner.lower=1.1")
    study = _study(tmp_path, "adds")
    assert [t.state for t in study.trials] == [STATES.COMPLETE] * 3 + [STATES.PRUNED] * 3
    assert all(0 in t.intermediate_values for t in study.trials[3:])           # reported val/acc, then pruned
    assert len({t.params["prune.amount"] for t in study.trials}) == 6         # the re-run did not replay samples
    assert study.user_attrs[sweep.PARENT_ATTR] == parent
    runs = _children(client, parent)
    assert len(runs) == 6 and {r.info.run_id for r in runs} >= {t.user_attrs[sweep.RUN_ATTR] for t in study.trials}
    assert sum(r.data.tags.get("status_detail", "").startswith("TrialPruned") for r in runs) == 3


def _dominates(a, b, signs):
    return all(s * x >= s * y for x, y, s in zip(a, b, signs)) and any(s * x > s * y for x, y, s in zip(a, b, signs))


def test_two_objectives_write_exactly_the_pareto_front_and_register_its_models(front_sweep):
    tmp_path, proc = front_sweep
    _finish(proc)
    study = _study(tmp_path, "front")
    done = [t for t in study.trials if t.state == STATES.COMPLETE]
    assert len(done) == 3 and all(len(t.values) == 2 for t in done)
    signs = (1, -1)
    expected = {t.number for t in done if not any(_dominates(o.values, t.values, signs) for o in done)}
    import pandas as pd

    table = pd.read_csv(tmp_path / "reports" / "sweeps" / "front" / "pareto.csv")
    assert set(table["trial"]) == expected and len(table) == len(expected)
    assert list(table.columns[:3]) == ["trial", "val/final_acc", "time/infer_ms"]
    assert (tmp_path / "reports" / "sweeps" / "front" / "pareto.png").stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for number in expected:
        version = client.get_model_version_by_alias("sweep-front", f"pareto-{number}")
        assert version.run_id == study.trials[number].user_attrs[sweep.RUN_ATTR]
        run = client.get_run(version.run_id)
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs[sweep.PARENT_ATTR]
    assert set(client.get_registered_model("sweep-front").aliases) == {f"pareto-{n}" for n in expected}


def test_a_mistake_on_the_command_line_is_one_line_and_touches_nothing(tmp_path):
    proc = _sweep(tmp_path, "bad", "hydra.sweeper.direction=[maximize,minimize]", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == ["prunegrid: error: hydra.sweeper.direction gives 2 direction(s) for 1 optimized_metric key(s) "
                     "['val/final_acc']; give one per key, e.g. hydra.sweeper.direction=[maximize]"], lines
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_front_trials_without_a_logged_model_are_skipped_and_said_once(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.open_client(uri)
    exp = tracking.experiment_id(client, "e")
    study = optuna.create_study(study_name="nomodel", directions=["maximize", "minimize"])
    capsys.readouterr()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, values in enumerate(([0.9, 2.0], [0.8, 1.0], [0.7, 3.0])):
        run_id = client.create_run(exp).info.run_id       # no model_uri tag
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions=dist, values=values,
                                                  user_attrs={sweep.RUN_ATTR: run_id}))
    assert sweep.register_front(study, uri) == {}
    err = capsys.readouterr().err
    assert err.count("prunegrid:") == 1 and "trials [0, 1] are not registered" in err, err
    assert tracking.TAG_MODEL_URI in err


# -- in process: the sweeper's checks, and the presets ---------------------------------------------
def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _sweeper(overrides: list[str]):
    from hydra.utils import instantiate

    cfg = _compose(["hydra/sweeper=optuna", *overrides])
    sweeper = instantiate(cfg.hydra.sweeper)
    sweeper.sweeper.config = cfg
    return sweeper


@pytest.mark.parametrize("overrides, message", [
    (["hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler"], "unknown sampler 'optuna.samplers.NoSuchSampler'"),
    (["hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner"], "unknown pruner"),
    (["hydra.sweeper.storage=nosuchdb://host/db"], "cannot open sweep storage 'nosuchdb://host/db'"),
    (["hydra.sweeper.storage=sqlite:////nonexistent-dir/x/optuna.db"], "cannot open sweep storage"),
    (["optimized_metric=test/acc"], "reads the test split"),
    (["optimized_metric=[val/final_acc,test/f1_macro]", "hydra.sweeper.direction=[maximize,maximize]"],
     "'test/f1_macro' reads the test split"),
    (["optimized_metric=val/nope"], "'val/nope' is not a run metric"),
    (["optimized_metric=[val/final_acc,time/infer_ms]"], "gives 1 direction(s) for 2 optimized_metric key(s)"),
    (["hydra.sweeper.direction=[maximize,minimize]"], "gives 2 direction(s) for 1"),
    (["hydra.sweeper.direction=up"], "'up' must be maximize or minimize"),
    (["hydra.sweeper.n_trials=0"], "n_trials=0 must be a positive integer"),
    (["hydra.sweeper.max_complete=0"], "hydra.sweeper.max_complete=0 must be a positive integer or null"),
    (["hydra.sweeper.max_complete=3", "hydra.sweeper.storage=null"], "max_complete=3 counts every worker's trials"),
    (["prune=none"], "sweep parameter 'prune.amount' is not in the config (prune=none)"),
])
def test_the_sweepers_mistakes_are_one_line(overrides, message, tmp_path, capsys):
    storage = [] if any("storage" in o for o in overrides) else [f"hydra.sweeper.storage=sqlite:///{tmp_path}/o.db"]
    sweeper = _sweeper(["prune=l1_static", *storage, *overrides])
    with pytest.raises(SystemExit) as exc:
        sweeper.sweep(["prune.amount=interval(0.2,0.6)"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.db").exists()


def test_search_space_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.prunegrid_optuna_sweeper._impl import search_space

    space, fixed = search_space(["a=interval(0.1,0.9)", "b=tag(log, interval(1e-4, 1e-2))", "c=choice(x, y)",
                                 "d=range(2, 12, 2)", "e=int(interval(2, 12))", "f=3", "a=interval(0.2,0.3)"])
    assert space == {"a": FloatDistribution(0.2, 0.3), "b": FloatDistribution(1e-4, 1e-2, log=True),
                     "c": CategoricalDistribution(["x", "y"]), "d": IntDistribution(2, 10, step=2),
                     "e": IntDistribution(2, 12)}
    assert fixed == {"f": "f=3"}


def test_an_interrupted_trial_is_fail_and_the_next_sweep_runs_it_again_with_resume(capsys):
    """The sweeper's side of SIGINT/SIGTERM, on a batch of two trials whose second one is cut (end to
    end: the slow test in tests/test_reliability.py)."""
    import signal

    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.prunegrid_optuna_sweeper._impl import OptunaSweeperImpl, TrialJob, search_space, trial_tags
    from prunegrid.interrupt import Interrupted

    class Launcher:  # runs no cell: job k returns 0.1 * (k + 1); with ``cut``, the batch's last job is interrupted
        def __init__(self, job, cut):
            self.job, self.cut, self.overrides = job, cut, []

        def launch(self, overrides, initial_job_idx):
            self.overrides += [list(o) for o in overrides]
            returns = []
            for k in range(initial_job_idx, initial_job_idx + len(overrides)):
                self.job.started.append(k)
                if self.cut and k == initial_job_idx + len(overrides) - 1:
                    try:
                        raise Interrupted(signal.SIGTERM)
                    except Interrupted:
                        sys.exit(143)       # what prunegrid.cli.guard makes of it in train.py
                ret = JobReturn(status=JobStatus.COMPLETED, _return_value=0.1 * (k + 1))
                self.job.returns[k] = ret
                returns.append(ret)
            return returns

    impl = OptunaSweeperImpl(sampler=None, direction="maximize", storage=None, study_name="s", n_trials=1, n_jobs=1,
                             params=None, pruner=None, max_failure_rate=0.0, report_dir="unused")
    impl.job = TrialJob(lambda cfg: None)
    study = optuna.create_study(direction="maximize")
    space, fixed = search_space(["prune.amount=interval(0.2,0.6)", "prune=l1_static"])
    impl.launcher = Launcher(impl.job, cut=True)
    with pytest.raises(SystemExit) as exc:
        impl._batch(study, [study.ask(), study.ask()], space, fixed, ["tracking.parent_run_id='p'"], ["val/final_acc"])
    assert exc.value.code == 143 and "trial 1 was interrupted" in capsys.readouterr().err
    done, cut = study.trials
    assert done.state == STATES.COMPLETE and done.value == pytest.approx(0.1)     # ended before the cut
    assert cut.state == STATES.FAIL and cut.user_attrs[sweep.INTERRUPTED_ATTR] == "SIGTERM"

    assert sweep.requeue_interrupted(study) == [1] and sweep.requeue_interrupted(study) == []
    impl.launcher = Launcher(impl.job, cut=False)
    impl._batch(study, [study.ask()], space, fixed, [], ["val/final_acc"])
    again = study.trials[-1]
    assert again.state == STATES.COMPLETE and again.user_attrs[sweep.RESUMES_ATTR] == 1
    assert again.params == cut.params and again.value == pytest.approx(0.3)
    assert impl.launcher.overrides[0][:3] == [f"prune.amount={cut.params['prune.amount']}", "prune=l1_static", "resume=true"]
    assert impl.launcher.overrides[0][3:] == trial_tags(again.number, cut.params)   # the new trial's own number


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_chooses_on_validation(name):
    from hydra_plugins.prunegrid_optuna_sweeper._impl import check_directions, search_space

    cfg = _compose([f"sweep={name}"])
    s = cfg.hydra.sweeper
    assert s._target_ == "hydra_plugins.prunegrid_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN"
    keys = sweep.objective_keys(cfg.optimized_metric)          # run metrics, no test/*
    assert any(k.startswith("val/") for k in keys), f"{name} does not choose on the validation split"
    assert len(check_directions(s.direction, keys)) == len(keys)
    assert s.study_name and s.n_trials >= 1 and s.storage
    sweep.instantiate(s.sampler, "sampler")
    if len(keys) == 1 and s.pruner is not None:
        sweep.instantiate(s.pruner, "pruner")
    space, _ = search_space([f"{k}={v}" for k, v in s.params.items()])
    assert space, f"{name} has no search space"
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    assert all(OmegaConf.select(task, k, default="__absent__") != "__absent__" for k in space), name


@pytest.mark.parametrize("overrides", [["sweep=l1"], ["sweep=channel_pareto"], ["hydra/sweeper=optuna"]])
def test_the_storage_is_the_heads_when_it_is_exported(overrides, monkeypatch):
    url = "postgresql+psycopg2://prunegrid:secret@head:5432/optuna"
    monkeypatch.delenv(sweep.STORAGE_ENV, raising=False)
    assert _compose(overrides).hydra.sweeper.storage == sweep.DEFAULT_STORAGE
    monkeypatch.setenv(sweep.STORAGE_ENV, url)
    cfg = _compose(overrides)
    assert cfg.hydra.sweeper.storage == url and cfg.hydra.sweeper.max_complete is None
    assert sweep.redact(url) == "postgresql+psycopg2://prunegrid:***@head:5432/optuna"


def test_plain_runs_compose_as_before():
    for overrides in ([], ["prune=channel"]):
        cfg = _compose(overrides)
        assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
        assert cfg.hydra.runtime.choices.sweep is None and cfg.optimized_metric == "val/final_acc"
        assert "trainer.callbacks.optuna_pruning" not in str(cfg.trainer.callbacks)


def test_the_old_command_is_an_alias_of_train_py_multirun(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append(argv))
    sweep.main(["sweep=l1", "hydra.sweeper.n_trials=3", "trainer.max_epochs=2"])
    assert calls == [[sys.executable, str(ROOT / "train.py"), "-m", "sweep=l1", "hydra.sweeper.n_trials=3",
                      "trainer.max_epochs=2"]]
    for args, message in ((["sweep=nope"], "unknown sweep 'nope'"),
                          (["sweep=l1", "sweep.n_trials=5"], "hydra.sweeper.n_trials=5")):
        with pytest.raises(SystemExit) as exc:
            sweep.main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
