"""A tiny ``dvc repro`` of the grid in a temporary copy of the project, and the grid's bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from prunegrid import grid
from prunegrid.budget import BASELINE
from prunegrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ("dataset.subset=64 dataset.batch_size=16 dataset.eval_batch_size=32 trainer.max_epochs=1 "
        "trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.limit_test_batches=1 "
        "trainer.enable_progress_bar=false measure.warmup=1 measure.repeats=3 measure.batch_size=4 "
        "explain.enabled=false")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sh(cwd: Path, *cmd: str) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _method(flag: bool) -> str | None:
    return next((m for m in grid.prunes("all") if m != BASELINE and grid.from_baseline(m) == flag), None)


@pytest.fixture(scope="module")
def project(tmp_path_factory, fashion_dir) -> Path:
    """A copy of the project (conf, code, dvc.yaml, data) with git + DVC initialised."""
    dst = tmp_path_factory.mktemp("proj")
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
    method = _method(True) or _method(False)
    sh(dst, sys.executable, "-m", "prunegrid.grid", f"grid.prunes=[none,{method}]", "grid.seeds=[42]",
       f"grid.overrides='{TINY}'")
    sh(dst, sys.executable, "-m", "dvc", "add", "-q", "data")
    return dst


@pytest.mark.slow
def test_tiny_dvc_repro_one_row_per_cell(project):
    """Baseline + one from-baseline method: a row per cell; a second repro runs nothing; one YAML -> one stage.

    Slow: ~90 s of CPU (two ``python train.py`` processes, the report, six DVC commands), minutes on a
    loaded machine.
    """
    dvc = (sys.executable, "-m", "dvc")
    method = _method(True) or _method(False)
    prunes = ["none", *[r["prune"] for r in grid.references([method])], method]
    out = sh(project, *dvc, "repro")
    assert "Running stage 'grid'" in out

    table = pd.read_csv(project / "reports" / "grid_seeds.csv")
    assert sorted(table["prune"]) == sorted(prunes)
    assert (table.groupby(["backbone", "prune", "dataset", "loss", "seed"]).size() == 1).all()
    assert table.loc[table.prune == "none", "acc_delta_pt"].iloc[0] == 0
    row = table[table.prune == method].iloc[0]
    assert row["budget_epochs"] == row["ref_budget_epochs"] and row["ref_prune"] in prunes
    for p in prunes:
        cell = f"resnet18-{p}-fashion_mnist-cross_entropy-s42"
        assert (project / "models" / f"{cell}.pt").is_file()
        assert json.loads((project / "metrics" / f"{cell}.json").read_text())["run_id"] in set(table["run_id"])
    md = (project / "reports" / "grid.md").read_text()
    summary, per_seed = md.split("## Speed-ups")[0], md.split("## Per seed")[1]
    assert summary.count("| resnet18 |") == per_seed.count("| resnet18 |") == len(prunes)
    assert "## Grid run in MLflow" in md and f"| prunegrid-fashion_mnist | best-{method} | " in md

    again = sh(project, *dvc, "repro")
    assert "Running stage" not in again

    shown = sh(project, *dvc, "metrics", "show")
    assert all(f"resnet18-{p}-fashion_mnist-cross_entropy-s42.json" in shown for p in prunes)

    y = project / "conf" / "prune" / f"{method}.yaml"
    data = yaml.safe_load(y.read_text())
    y.write_text(y.read_text().replace("finetune_epochs:", "finetune_epochs: 0 #", 1) if "finetune_epochs" in data
                 else y.read_text() + "\nfinetune_epochs: 0\n")
    status = sh(project, *dvc, "status")
    stages = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert stages == {f"train_{'from_base' if grid.from_baseline(method) else 'scratch'}"
                      f"@resnet18-{method}-fashion_mnist-cross_entropy-42"} or \
        stages == {f"train_{'from_base' if grid.from_baseline(method) else 'scratch'}"
                   f"@resnet18-{method}-fashion_mnist-cross_entropy-42", "grid"}, status


def test_params_yaml_is_what_dvc_composes(tmp_path):
    """``python -m prunegrid.grid`` writes what DVC's Hydra composition writes, with every method listed."""
    data = grid.write_params([], tmp_path / "params.yaml")
    g = yaml.safe_load((tmp_path / "params.yaml").read_text())["grid"]
    assert g == data["grid"]
    methods = set(g["methods"]["from_baseline"]) | set(g["methods"]["scratch"])
    assert methods == set(grid.prunes("all")) - {"none"}
    assert not set(g["methods"]["from_baseline"]) & set(g["methods"]["scratch"])
    assert all(grid.from_baseline(m) for m in g["methods"]["from_baseline"])
    assert g["baseline"] == BASELINE and g["references"] == grid.references("all")


def test_paper_grid_preset(tmp_path):
    g = grid.compose_grid(["+experiment=paper_grid"])["grid"]
    assert {"resnet18", "resnet50", "vgg19", "efficientnet_b5", "xception"} <= set(g["backbones"])
    assert set(g["losses"]) == {"cross_entropy", "focal"} and len(g["seeds"]) == 3
    assert "backbone.pretrained=true" in g["overrides"]


@pytest.mark.parametrize("preset, seeds", [([], 3), (["+experiment=quick"], 2), (["+experiment=transfer"], 3)])
def test_presets_have_seeds_and_references(preset, seeds):
    g = grid.compose_grid(preset)["grid"]
    assert len(g["seeds"]) >= seeds
    epochs = {grid.finetune_epochs(m) for m in g["methods"]["from_baseline"] + g["methods"]["scratch"]} - {0}
    assert [r["finetune"] for r in g["references"]] == sorted(epochs)
    assert all(r["prune"] == f"{BASELINE}_ft{r['finetune']}" for r in g["references"])


def test_class_declaration_alone_moves_a_method_between_stages(project, monkeypatch):
    """Flip a method class's ``from_baseline``: DVC expands it in the other stage; no YAML or dvc.yaml edit."""
    method = _method(True)
    cls = grid.method_class(method)
    before = sh(project, sys.executable, "-m", "dvc", "stage", "list")
    assert f"train_from_base@resnet18-{method}-" in before and f"train_scratch@resnet18-{method}-" not in before
    monkeypatch.setattr(cls, "from_baseline", False)
    monkeypatch.chdir(project)
    g = grid.write_params([f"grid.prunes=[none,{method}]", "grid.seeds=[42]", f"grid.overrides='{TINY}'"],
                          project / "params.yaml")
    assert g["grid"]["methods"] == {"from_baseline": [], "scratch": [method]}
    after = sh(project, sys.executable, "-m", "dvc", "stage", "list")
    assert f"train_scratch@resnet18-{method}-" in after and f"train_from_base@resnet18-{method}-" not in after
    monkeypatch.undo()
    monkeypatch.chdir(project)
    grid.write_params([f"grid.prunes=[none,{method}]", "grid.seeds=[42]", f"grid.overrides='{TINY}'"],
                      project / "params.yaml")
    assert f"train_from_base@resnet18-{method}-" in sh(project, sys.executable, "-m", "dvc", "stage", "list")


@pytest.mark.parametrize("override, message", [
    ("grid.prunes=[nope]", "grid.prunes names unknown prune 'nope'"),
    ("grid.backbones=[resnet999]", "grid.backbones names unknown backbone 'resnet999'"),
    ("grid.datasets=[]", "grid.datasets is empty"),
    ("grid.seeds=[]", "grid.seeds is empty"),
    ("grid.seeds=[a]", "must be integers"),
    ("grid.overrides='backbone=nope'", "unknown backbone 'nope'"),
    ("grid.overrides='prune.finetune_epochs=3'", "may not set prune.finetune_epochs"),
])
def test_bad_grid_is_one_line_error(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        grid.write_params([override], tmp_path / "params.yaml")
    assert not (tmp_path / "params.yaml").exists()


def test_bad_grid_cli_exit(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prunegrid.grid", "grid.prunes=[nope]", "--output",
                          str(tmp_path / "p.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown prune 'nope'" in res.stderr


def test_dvc_plots_show_renders_every_declared_plot(tmp_path):
    """The project's dvc.yaml on a tiny report (hand-made MLflow runs): ``dvc plots show --json`` renders the
    grid stage's PNGs (the curves folder's included) and every top-level CSV plot with DVC's templates."""
    from mlflow.tracking import MlflowClient

    from prunegrid.report import grid as report
    from tests.test_report import log_epochs, log_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("plots")
    for seed in (1, 2):
        for prune, acc, params in (("none", 0.90, 1000), ("channel", 0.85, 400)):
            run_id = log_run(client, exp, prune, seed=seed, test__acc=acc, model__params_nonzero=params)
            log_epochs(client, run_id)
            if prune == "channel":  # the method tags the pipeline sets: the trade-off plot has its point
                for k, v in {"method": "channel", "strength_knob": "ratio", "strength": "0.5", "control": "none"}.items():
                    client.set_tag(run_id, k, v)
    repo = tmp_path / "repo"
    repo.mkdir()
    report.build(uri, ["plots"], repo / "reports", mlflow_write=False)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump({"grid": {  # what dvc.yaml's templating reads (write_params: ~10 s)
        "backbones": ["resnet18"], "datasets": ["fashion_mnist"], "losses": ["cross_entropy"], "seeds": [1, 2],
        "overrides": "", "pretrain": {"overrides": ""}, "baseline": "none",
        "methods": {"from_baseline": ["channel"], "scratch": []}, "references": [{"prune": "none_ft1", "finetune": 1}],
        "strengths": None, "controls": [], "tradeoff": {}}}))
    sh(repo, "git", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")

    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    top = [next(iter(p)) if isinstance(p, dict) else p for p in declared["plots"]]
    images = [next(iter(p)) if isinstance(p, dict) else p for p in declared["stages"]["grid"]["plots"]]
    assert "reports/learning_curves.csv" in top and len(top) >= 2 and "reports/acc_vs_latency.png" in images
    res = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(tmp_path / "html")],
                         cwd=repo, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    shown = json.loads(res.stdout)
    assert not shown.get("errors"), shown["errors"]
    for plot_id in top:
        (plot,) = shown["data"][plot_id]
        assert plot["type"] == "vega" and plot["content"]["data"]["values"], plot_id
    for path in images:
        rendered = [k for k in shown["data"] if k == path or k.startswith(path + "/")]
        assert rendered, f"{path} not rendered: {sorted(shown['data'])}"
        for k in rendered:
            assert shown["data"][k][0]["type"] == "image" and Path(shown["data"][k][0]["url"]).is_file()
    assert "reports/learning_curves/learning_curves_resnet18.png" in shown["data"]
