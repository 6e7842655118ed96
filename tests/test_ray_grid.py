"""The grid on Ray (``python -m prunegrid.grid run --executor ray``) against a local Ray head and the
PostgreSQL-backed MLflow server of the ``head`` fixture, in a temporary copy of the project.

One mini grid (prune=none and one method that starts from the baseline's model, 2 seeds) runs once per
module; while it runs, the test kills the Ray worker of one baseline cell mid-cell. The tests then read
what it left: MLflow runs, the project's models/ and metrics/, DVC's status and the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from prunegrid import executors, grid, tracking
from prunegrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ("dataset.subset=64 dataset.batch_size=16 dataset.eval_batch_size=32 trainer.max_epochs=1 "
        "trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.limit_test_batches=1 "
        "trainer.enable_progress_bar=false measure.warmup=1 measure.repeats=3 measure.batch_size=4 "
        "measure.memory=false explain.enabled=false tracking.log_model=false tracking.system_metrics=false")
SEEDS = (0, 1)
KILLED_SEED = 0


def _method() -> str:
    """A method that starts from the baseline's model and adds no reference cell (no fine-tuning)."""
    found = [m for m in grid.prunes("all") if m != "none" and grid.from_baseline(m) and not grid.finetune_epochs(m)]
    assert found, "no from-baseline method without fine-tuning in conf/prune/"
    return found[0]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def sh(cwd: Path, *cmd: str, **env: str) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def make_project(dst: Path, fashion_dir: Path, overrides: list[str]) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("train.py", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(fashion_dir, dst / "data" / "fashion_mnist")
    sh(dst, "git", "init", "-q")
    sh(dst, sys.executable, "-m", "dvc", "init", "-q")
    for key, value in (("hydra.enabled", "true"), ("hydra.config_name", "grid"), ("hydra.plugins_path", "src")):
        sh(dst, sys.executable, "-m", "dvc", "config", key, value)
    sh(dst, sys.executable, "-m", "prunegrid.grid", *overrides)  # params.yaml: dvc.yaml's matrix reads it
    sh(dst, sys.executable, "-m", "dvc", "add", "-q", "data")
    return dst


def grid_overrides(seeds=SEEDS) -> list[str]:
    return [f"grid.prunes=[none,{_method()}]", f"grid.seeds=[{','.join(map(str, seeds))}]",
            f"grid.overrides='{TINY}'"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on this machine (``ray start --head``), stopped at the end."""
    ray = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray), "stop", "--force"], capture_output=True)
    res = subprocess.run([str(ray), "start", "--head", "--port=0", "--num-cpus=2", "--include-dashboard=false",
                          "--disable-usage-stats"], capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    yield "auto"
    subprocess.run([str(ray), "stop", "--force"], capture_output=True)


def _kill_worker_of(client: MlflowClient, prune: str, seed: int, deadline_s: float = 240) -> str | None:
    """Once cell (prune, seed) has a RUNNING run of the Ray grid, SIGKILL the Ray worker running it
    (its train.py process dies with it); return that run's id."""
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string=f"attributes.status = 'RUNNING' and tags.prune = '{prune}' "
                                                      f"and tags.seed = '{seed}'") if exps else []
        runs = [r for r in runs if r.data.tags.get(executors.TAG_GRID_RUN)]
        if runs:
            time.sleep(2)  # mid-cell: its run exists and training has begun
            for p in psutil.process_iter(["cmdline"]):
                line = " ".join(p.info["cmdline"] or [])
                if "train.py" in line and f"prune={prune} " in line and f"seed={seed} " in line:
                    p.parent().kill()
                    return runs[0].info.run_id
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def ray_grid(tmp_path_factory, fashion_dir, head, ray_cluster):
    """The mini grid on Ray, with the worker of one baseline cell killed mid-cell."""
    project = make_project(tmp_path_factory.mktemp("raygrid"), fashion_dir, grid_overrides())
    cmd = [sys.executable, "-m", "prunegrid.grid", "run", "--executor", "ray", "--address", ray_cluster,
           *grid_overrides()]
    log = project / "grid_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=_env(MLFLOW_TRACKING_URI=head.tracking_uri), stdout=out,
                                stderr=subprocess.STDOUT)
        killed = _kill_worker_of(MlflowClient(head.tracking_uri), "none", KILLED_SEED)
        rc = proc.wait(timeout=600)
    return {"project": project, "rc": rc, "killed": killed, "log": log.read_text(), "uri": head.tracking_uri}


def _grid_runs(uri: str) -> list:
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.{executors.TAG_GRID_RUN} != ''")
    return runs


def test_every_cell_finished_exactly_once(ray_grid):
    assert ray_grid["rc"] == 0, ray_grid["log"][-3000:]
    runs = _grid_runs(ray_grid["uri"])
    stages = {r.data.tags[executors.TAG_STAGE] for r in runs}
    assert len(stages) == 2 * len(SEEDS)
    for stage in stages:
        statuses = [r.info.status for r in runs if r.data.tags[executors.TAG_STAGE] == stage]
        assert statuses.count("FINISHED") == 1, (stage, statuses)
        assert "RUNNING" not in statuses, (stage, statuses)
    assert all(r.data.tags.get(tracking.TAG_HOST) for r in runs)
    assert all(r.data.tags.get("prunegrid.kind") == "cell" for r in runs)


def test_killed_worker_cell_was_retried_not_left_running(ray_grid):
    assert ray_grid["killed"], "the baseline cell's run was never seen RUNNING: nothing was killed"
    run = MlflowClient(ray_grid["uri"]).get_run(ray_grid["killed"])
    # the retry marked the dead attempt KILLED, then continued that run from its checkpoints (resume=true)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get(tracking.TAG_RESUMES) == "1"
    assert run.data.tags.get(executors.TAG_ATTEMPT) == "2"
    assert "A worker died" in ray_grid["log"] or "retried" in ray_grid["log"]


def test_from_baseline_cell_used_its_own_baseline(ray_grid):
    runs = [r for r in _grid_runs(ray_grid["uri"]) if r.info.status == "FINISHED"]
    model = {(r.data.tags["prune"], r.data.tags["seed"]): r.data.tags[tracking.TAG_MODEL_MD5] for r in runs}
    method = _method()
    for seed in map(str, SEEDS):
        used = next(r for r in runs if r.data.tags["prune"] == method and r.data.tags["seed"] == seed)
        own, other = model[("none", seed)], {v for (p, s), v in model.items() if p == "none" and s != seed}
        assert used.data.tags[tracking.TAG_BASELINE_MD5] == own
        assert own not in other
        on_disk = ray_grid["project"] / "models" / f"resnet18-none-fashion_mnist-cross_entropy-s{seed}.pt"
        assert tracking.file_md5(on_disk) == own


def test_measurements_never_overlapped_on_one_host(ray_grid):
    runs = [r for r in _grid_runs(ray_grid["uri"]) if r.info.status == "FINISHED"]
    windows = sorted((r.data.tags[tracking.TAG_HOST], *map(float, r.data.tags[tracking.TAG_MEASURE_WINDOW].split("-")))
                     for r in runs)
    for (h1, _, end), (h2, start, _) in zip(windows, windows[1:]):
        assert h1 != h2 or start >= end, windows


def test_dvc_commit_and_report_match_dvc_repro(ray_grid, tmp_path_factory, fashion_dir):
    project = ray_grid["project"]
    assert "up to date" in sh(project, sys.executable, "-m", "dvc", "status")
    ray_table = pd.read_csv(project / "reports" / "grid_seeds.csv")
    assert len(ray_table) == 2 * len(SEEDS)
    for _, row in ray_table.iterrows():
        cell = f"{row['backbone']}-{row['prune']}-{row['dataset']}-{row['loss']}-s{row['seed']}"
        assert json.loads((project / "metrics" / f"{cell}.json").read_text())["run_id"] == row["run_id"]
    # the single-machine path on the same grid (one seed: half the cells) in another copy
    other = make_project(tmp_path_factory.mktemp("dvcgrid"), fashion_dir, grid_overrides(seeds=(0,)))
    sh(other, sys.executable, "-m", "dvc", "repro", MLFLOW_TRACKING_URI=f"sqlite:///{other}/mlflow.db")
    for name in ("grid.csv", "grid_seeds.csv"):
        assert list(pd.read_csv(project / "reports" / name).columns) == \
            list(pd.read_csv(other / "reports" / name).columns)


def test_a_finished_stage_is_not_run_again(ray_grid, monkeypatch):
    """What a retry of a task whose cell had already FINISHED does (a worker lost after the run ended, or
    Ray rebuilding a lost output): it reads the outputs back from the artifact store, runs nothing."""
    project = ray_grid["project"]
    stages, _ = executors.plan(project)
    stage = next(s for s in stages if s.name.startswith("train_base") and s.name.endswith(f"-{SEEDS[1]}"))
    done = [r for r in _grid_runs(ray_grid["uri"]) if r.data.tags[executors.TAG_STAGE] == stage.name]
    grid_run = done[0].data.tags[executors.TAG_GRID_RUN]
    monkeypatch.chdir(project)
    ctx = executors.TaskContext(grid_run, ray_grid["uri"], str(project / "data"), str(project / "logs"))
    out = executors.run_stage(stage, ctx)
    assert out["reused"] is True
    model_out = stage.option("paths.model_out")
    assert out["files"][model_out] == (project / model_out).read_bytes()
    after = [r for r in _grid_runs(ray_grid["uri"]) if r.data.tags[executors.TAG_STAGE] == stage.name]
    assert len(after) == len(done)


def test_a_local_store_is_refused_on_several_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    ex = executors.RayExecutor()
    assert ex._tracking_uri(tmp_path, nodes=1) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with pytest.raises(ConfigError, match="2 nodes"):
        ex._tracking_uri(tmp_path, nodes=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert ex._tracking_uri(tmp_path, nodes=3) == "http://10.0.0.5:5000"


@pytest.mark.parametrize("args, message", [
    (["--executor", "nope"], "valid executors are"),
    (["--executor", "ray", "executor.retries=-1"], "executor.retries=-1"),
    (["--executor", "ray", "executor.cpus_per_cell=-2"], "executor.cpus_per_cell=-2"),
])
def test_bad_executor_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        grid.main(["run", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_grid_run_help_names_the_executors():
    res = subprocess.run([sys.executable, "-m", "prunegrid.grid", "run", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env=_env())
    assert res.returncode == 0 and "--executor" in res.stdout and "--address" in res.stdout
