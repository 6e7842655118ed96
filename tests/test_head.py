"""The head node (``python -m prunegrid.head``): PostgreSQL and an MLflow server on it, on loopback."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from prunegrid import head as head_mod
from prunegrid.errors import ConfigError


def test_runs_and_artifacts_go_to_postgres_and_the_artifact_folder(head, tmp_path):
    client = MlflowClient(head.tracking_uri)
    exp = client.create_experiment("head-test")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "val/acc", 0.75)
    note = tmp_path / "note.txt"
    note.write_text("hello from a worker")
    client.log_artifact(run.info.run_id, str(note))
    assert client.get_run(run.info.run_id).data.metrics["val/acc"] == 0.75
    on_disk = list(Path(head.artifacts).rglob("note.txt"))
    assert len(on_disk) == 1 and on_disk[0].read_text() == "hello from a worker"
    import sqlalchemy

    engine = sqlalchemy.create_engine(head.backend_store_uri)
    with engine.connect() as conn:
        ids = {r[0] for r in conn.execute(sqlalchemy.text("select run_uuid from runs"))}
        listen = conn.execute(sqlalchemy.text("show listen_addresses")).scalar()
    engine.dispose()
    assert run.info.run_id in ids
    assert listen == "127.0.0.1"


def test_an_optuna_study_is_shared_through_postgres(head):
    import optuna

    optuna.create_study(study_name="shared", storage=head.optuna_storage).enqueue_trial({"x": 1.0})
    code = ("import optuna,sys; s=optuna.load_study(study_name='shared', storage=sys.argv[1]); "
            "t=s.ask(); s.tell(t, t.suggest_float('x', 0, 2) * 2)")
    subprocess.run([sys.executable, "-c", code, head.optuna_storage], check=True, capture_output=True)
    study = optuna.load_study(study_name="shared", storage=head.optuna_storage)
    assert [t.value for t in study.trials] == [2.0]


def test_unknown_host_header_is_refused(head):
    url = f"{head.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Host": "evil.example:80"}), timeout=10)
    assert err.value.code == 403  # MLflow's DNS-rebinding guard
    with urllib.request.urlopen(url, timeout=10) as ok:
        assert ok.status == 200


def test_start_is_idempotent_and_status_reports_it(head):
    assert {head.mlflow_port, head.pg_port}.isdisjoint({5000, 5432})  # port 0: free ports, not the defaults
    assert head_mod.start(head.dir) == head
    assert head_mod.status(head.dir) == head
    res = subprocess.run([sys.executable, "-m", "prunegrid.head", "start", "--dir", head.dir],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"export MLFLOW_TRACKING_URI={head.tracking_uri}",
                                       f"export PRUNEGRID_OPTUNA_STORAGE={head.optuna_storage}"]
    assert res.stdout.splitlines() == head_mod.env_lines(head)
    assert f"MLflow UI and API: {head.tracking_uri}" in res.stderr
    with pytest.raises(ConfigError, match="running with other --host"):
        head_mod.start(head.dir, host="0.0.0.0")


def test_stop_then_status_says_not_running_and_start_reuses_the_data(head):
    client = MlflowClient(head.tracking_uri)
    exp = client.create_experiment("kept-across-restarts")
    assert head_mod.stop(head.dir) is True
    assert head_mod.status(head.dir) is None
    res = subprocess.run([sys.executable, "-m", "prunegrid.head", "status", "--dir", head.dir],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no head running" in res.stderr
    assert head_mod.stop(head.dir) is False
    assert head_mod.start(head.dir) == head  # the same ports, password and artifact folder
    assert MlflowClient(head.tracking_uri).get_experiment_by_name("kept-across-restarts").experiment_id == exp


@pytest.mark.parametrize("args, message", [
    (["start", "--port", "notanumber"], "--port"),
    (["start", "--dir", "/proc/prunegrid-head"], "cannot write there"),
    (["start", "--port", "70000", "--dir", "{tmp}"], "must be a port number"),
    (["start", "--host", "a b", "--dir", "{tmp}"], "not an address"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path / "h")) for a in args]
    res = subprocess.run([sys.executable, "-m", "prunegrid.head", *args], capture_output=True, text=True)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_no_head_is_reported(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prunegrid.head", "status", "--dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no head running" in res.stderr
    assert head_mod.stop(tmp_path) is False
