"""Optuna sweeps: resume after a stop, nested MLflow runs, trial pruning, the Pareto front, bad input."""

from __future__ import annotations

import itertools

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from prunegrid import sweep
from prunegrid.errors import ConfigError
from tests.conftest import tiny

FAST = ("backbone=simple_cnn", "explain.enabled=false")


def _args(tmp_path, *extra):
    return [f"sweep.storage=sqlite:///{tmp_path}/optuna.db", *tiny(tmp_path, *FAST), *extra]


def test_resume_after_stop_runs_only_the_rest_and_nests_runs(tmp_path, fashion_dir):
    args = _args(tmp_path, "sweep.n_trials=3", "sweep.study_name=resume")
    first = sweep.run_sweep("l1", args, tmp_path / "rep", max_new_trials=2)   # "killed" after two trials
    assert sweep.complete(first) == 2
    study = sweep.run_sweep("l1", args, tmp_path / "rep")                      # restarted
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == 3 and len(trials) == 3                         # only the missing one ran
    assert len({(t.params["prune.amount"], t.params["optimizer.lr"]) for t in trials}) == 3
    assert all(0.1 <= t.params["prune.amount"] <= 0.9 for t in trials)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = study.user_attrs[sweep.PARENT_ATTR]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {t.user_attrs[sweep.RUN_ATTR] for t in trials}
    for t, r in ((t, client.get_run(t.user_attrs[sweep.RUN_ATTR])) for t in trials):
        assert r.data.params["prune.amount"] == str(t.params["prune.amount"])
        assert r.data.metrics["val/final_acc"] == pytest.approx(t.value)   # chosen on validation, not test
    assert client.get_run(parent).info.status == "FINISHED"
    assert (tmp_path / "rep" / "resume" / "pareto.md").is_file()


def test_trial_pruned_through_lightning_callback(tmp_path, fashion_dir):
    preset = OmegaConf.load(sweep.conf_dir() / "sweep" / "l1.yaml")
    preset.pruner = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 2.0}   # accuracy never reaches 2
    preset.study_name, preset.n_trials = "pruned", 1
    path = tmp_path / "pruned.yaml"
    OmegaConf.save(preset, path)
    study = sweep.run_sweep(str(path), _args(tmp_path), tmp_path / "rep", max_new_trials=1)
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.PRUNED and 0 in t.intermediate_values
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(study.user_attrs[sweep.PARENT_ATTR])
    runs = client.search_runs([parent.info.experiment_id], filter_string="tags.status_detail LIKE 'TrialPruned%'")
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id


def _dominates(a, b, signs):
    return all(s * x >= s * y for x, y, s in zip(a, b, signs)) and any(s * x > s * y for x, y, s in zip(a, b, signs))


def test_pareto_front_is_exactly_the_non_dominated_trials(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [(0.90, 100), (0.85, 50), (0.80, 60), (0.95, 200), (0.85, 40), (0.70, 40), (0.95, 250), (0.60, 10)]
    for i, (acc, params) in enumerate(points):
        study.add_trial(optuna.trial.create_trial(params={"x": float(i)}, distributions={
            "x": optuna.distributions.FloatDistribution(0, 10)}, values=[acc, params]))
    signs = (1, -1)
    expected = {i for i, p in enumerate(points) if not any(_dominates(q, p, signs) for q in points)}
    assert expected == {0, 3, 4, 7}
    keys = ["test/acc", "model/params_nonzero"]
    table = sweep.front_table(study, keys)
    assert set(table["trial"]) == expected
    out = sweep.write_summary(study, keys, tmp_path / "front")
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "pareto.csv").read_text().count("\n") == len(expected) + 1


@pytest.mark.parametrize("override, message", [
    ("sweep.space.prune.amount.low=0.95", "low=0.95 > high=0.9"),
    ("sweep.objectives={val/nope: maximize}", "not a run metric"),
    ("sweep.objectives={test/acc: maximize}", "reads the test split"),
    ("sweep.space.optimizer.lr.low=0", "log scale needs low > 0"),
    ("sweep.n_trials=0", "must be a positive integer"),
    ("sweep.space.prune.amount.type=normal", "type 'normal'"),
])
def test_bad_preset_is_one_line_error(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as exc:
        sweep.run_sweep("l1", [override, f"sweep.storage=sqlite:///{tmp_path}/o.db"], tmp_path)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("storage", ["sqlite:////nonexistent-dir/x/optuna.db", "nosuchdb://host/db"])
def test_unopenable_storage_is_one_line_error(storage, tmp_path):
    with pytest.raises(ConfigError, match="cannot open sweep storage") as exc:
        sweep.run_sweep("l1", [f"sweep.storage={storage}", *tiny(tmp_path)], tmp_path)
    assert "\n" not in str(exc.value)


def test_unknown_preset_and_space_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        sweep.run_sweep("nope", [], tmp_path)
    with pytest.raises(ConfigError, match="'prune.amount' is not in the config"):
        sweep.run_sweep("l1", ["prune=none", f"sweep.storage=sqlite:///{tmp_path}/o.db"], tmp_path)


PRESETS = sorted(p.stem for p in (sweep.conf_dir() / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_valid_and_chooses_on_validation(name):
    preset = sweep.load_preset(name)
    sweep._check_space_keys(preset, [])
    assert not [k for k in preset.objectives if str(k).startswith("test/")], f"{name} optimizes the test split"
    assert any(str(k).startswith("val/") for k in preset.objectives)
