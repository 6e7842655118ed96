"""The grid report on hand-made runs in a temporary MLflow store (known params, accuracy, latencies)."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from prunegrid import tracking
from prunegrid.report import grid as g
from prunegrid.report.__main__ import main

CONTRACT = ["backbone", "prune", "dataset", "loss", "seed", "acc", "f1_macro", "params", "params_nonzero", "flops",
            "size_mb", "train_s", "epoch_s", "infer_ms", "infer_peak_mb", "train_peak_mb"]
RELATIVE = ["params_reduction_pct", "flops_reduction_pct", "acc_delta_pt", "epoch_speedup", "infer_speedup"]
SUMMARY = ["budget_epochs", "ref_prune", "ref_budget_epochs", "acc_delta_pt", "acc_delta_pt_std", "n_seeds", "converged"]


def log_run(client, exp_id, prune, seed=42, status="FINISHED", backbone="resnet18", ref=None, drop=(), params=None,
            tags=None, **m):
    tags = {"backbone": backbone, "prune": prune, "dataset": "fashion_mnist", "loss": "cross_entropy",
            "seed": str(seed), **({"ref_prune": ref} if ref else {}), **(tags or {})}
    run = client.create_run(exp_id, tags=tags, run_name=tracking.run_name(tags))
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    metrics = {"test/acc": 0.9, "test/f1_macro": 0.89, "model/params": 1000, "model/params_nonzero": 1000,
               "model/flops": 5000, "model/size_mb": 4.0, "time/train_s": 100, "time/epoch_s": 10,
               "time/infer_ms": 2.0, "memory/infer_peak_mb": 300, "memory/train_peak_mb": 900}
    metrics.update({k.replace("__", "/"): v for k, v in m.items()})
    metrics = {k: v for k, v in metrics.items() if k not in drop}
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status)
    time.sleep(0.01)
    return run.info.run_id


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, MlflowClient(uri)


@pytest.fixture
def store(db, request):
    """One experiment per test in a shared store (creating an MLflow database takes seconds)."""
    uri, client = db
    return uri, client, client.create_experiment(request.node.name)


def test_relative_columns_on_known_runs(store, tmp_path):
    uri, client, exp = store
    log_run(client, exp, "none", **{"test__acc": 0.9, "model__params_nonzero": 1000, "model__flops": 5000,
                                    "time__epoch_s": 10, "time__infer_ms": 2.0})
    old = log_run(client, exp, "channel", **{"test__acc": 0.1})          # superseded by the later run
    new = log_run(client, exp, "channel", **{"test__acc": 0.85, "model__params": 400, "model__params_nonzero": 400,
                                             "model__flops": 2500, "time__epoch_s": 5, "time__infer_ms": 1.0,
                                             "baseline__infer_ms": 2.5})
    log_run(client, exp, "channel", status="FAILED", **{"test__acc": 0.0})  # failed runs never enter the grid
    log_run(client, exp, "l1_static", **{"test__acc": 0.91, "model__params_nonzero": 250, "time__infer_ms": 2.0,
                                         "time__epoch_s": 0, "time__infer_ms_onnx": 1.5})

    table = g.build(uri, ["test_relative_columns_on_known_runs"], tmp_path / "rep", ui=None)
    assert list(table.columns[:len(CONTRACT)]) == CONTRACT and set(RELATIVE) <= set(table.columns)
    assert "infer_ms_onnx" in table.columns and "cam_agreement" not in table.columns
    assert list(table["prune"]) == ["none", "channel", "l1_static"]
    ch = table[table.prune == "channel"].iloc[0]
    assert ch["run_id"] == new != old
    assert ch["params_reduction_pct"] == pytest.approx(60.0)
    assert ch["flops_reduction_pct"] == pytest.approx(50.0)
    assert ch["acc_delta_pt"] == pytest.approx(-5.0)
    assert ch["epoch_speedup"] == pytest.approx(2.0)
    assert ch["infer_speedup"] == pytest.approx(2.5)     # same-process baseline timing wins
    l1 = table[table.prune == "l1_static"].iloc[0]
    assert l1["params_reduction_pct"] == pytest.approx(75.0)
    assert l1["flops_reduction_pct"] == pytest.approx(0.0)
    assert l1["acc_delta_pt"] == pytest.approx(1.0)
    assert pd.isna(l1["epoch_speedup"])                  # no training epochs: no speed-up to report
    assert l1["infer_speedup"] == pytest.approx(1.0)     # falls back to the none cell's latency
    none = table[table.prune == "none"].iloc[0]
    assert none["params_reduction_pct"] == 0 and none["acc_delta_pt"] == 0

    out = tmp_path / "rep"
    csv = pd.read_csv(out / "grid.csv")
    assert len(csv) == 3 and set(CONTRACT[:4] + CONTRACT[5:] + RELATIVE + SUMMARY) <= set(csv.columns)
    assert len(pd.read_csv(out / "grid_seeds.csv")) == 3
    data = json.loads((out / "grid.json").read_text())
    assert data["seeds"]["resnet18-channel-fashion_mnist-cross_entropy-s42"]["acc_delta_pt"] == pytest.approx(-5.0)
    assert data["cells"]["resnet18-channel-fashion_mnist-cross_entropy"]["n_seeds"] == 1
    md = (out / "grid.md").read_text()
    assert new in md and md.count("\n| resnet18 |") == 3 + 2 + 3  # seed means, speed-ups of the 2 methods, per seed
    assert "one seed: no spread" in md
    for png in ("acc_vs_params.png", "acc_vs_latency.png", "relative.png"):
        assert (out / png).stat().st_size > 1000


def test_seed_mean_and_spread(store, tmp_path):
    uri, client, exp = store
    for seed, acc in ((1, 0.80), (2, 0.90)):
        log_run(client, exp, "none", seed=seed, **{"test__acc": acc})
        log_run(client, exp, "channel", seed=seed, **{"test__acc": acc - 0.1 * seed, "model__params_nonzero": 500})
    g.build(uri, ["test_seed_mean_and_spread"], tmp_path / "rep", ui="http://localhost:5000")
    data = json.loads((tmp_path / "rep" / "grid.json").read_text())
    m = data["cells"]["resnet18-channel-fashion_mnist-cross_entropy"]
    assert m["n_seeds"] == 2
    assert m["acc"] == pytest.approx(0.7)                # 0.8 - 0.1 and 0.9 - 0.2
    assert m["acc_delta_pt"] == pytest.approx(-15.0)
    assert m["acc_delta_pt_std"] == pytest.approx(7.0710678, rel=1e-5)
    md = (tmp_path / "rep" / "grid.md").read_text()
    assert "Mean ± std over seeds" in md and "http://localhost:5000/#/experiments/" in md


def test_equal_budget_reference_spread_and_marks(store, tmp_path):
    """Deltas against the reference the run names, paired by seed; noise, speed and cap marks."""
    uri, client, exp = store
    for seed, base, conv in ((1, 0.80, 1), (2, 0.82, 0)):
        log_run(client, exp, "none", seed=seed, **{"test__acc": base, "budget__epochs": 3, "train__converged": conv})
        log_run(client, exp, "none_ft1", seed=seed, **{"test__acc": base + 0.04, "budget__epochs": 4})
        log_run(client, exp, "channel", seed=seed, ref="none_ft1",
                **{"test__acc": base + 0.04 + (0.01 if seed == 2 else -0.01), "budget__epochs": 4,
                   "baseline__infer_ms": 2.0, "time__infer_ms": 1.0, "model__params_nonzero": 250})
        log_run(client, exp, "l1_static", seed=seed, ref="none",
                **{"test__acc": base - 0.10, "budget__epochs": 3, "baseline__infer_ms": 2.0,
                   "time__infer_ms": 1.9 if seed == 1 else 2.1})
    per_seed = g.build(uri, ["test_equal_budget_reference_spread_and_marks"], tmp_path / "rep", ui=None)
    ch = per_seed[per_seed.prune == "channel"].set_index("seed")
    assert list(ch["ref_prune"]) == ["none_ft1"] * 2 and list(ch["ref_budget_epochs"]) == [4, 4]
    assert list(ch["acc_delta_pt"]) == pytest.approx([-1.0, 1.0])          # against none_ft1, same seed
    assert list(ch["acc_delta_pt_vs_base"]) == pytest.approx([3.0, 5.0])    # against the plain baseline

    csv = pd.read_csv(tmp_path / "rep" / "grid.csv").set_index("prune")
    assert list(csv.index) == ["none", "none_ft1", "channel", "l1_static"]
    assert set(SUMMARY) <= set(csv.columns) and (csv["n_seeds"] == 2).all()
    assert (csv.loc[["channel", "l1_static"], "budget_epochs"]
            == csv.loc[["channel", "l1_static"], "ref_budget_epochs"]).all()
    assert csv.loc["channel", "acc_delta_pt"] == pytest.approx(0.0, abs=1e-9)
    assert csv.loc["channel", "acc_delta_pt_std"] == pytest.approx(2 ** 0.5)
    assert csv.loc["l1_static", "acc_delta_pt"] == pytest.approx(-10.0)
    assert csv.loc["none", "converged"] == pytest.approx(0.5)

    md = (tmp_path / "rep" / "grid.md").read_text()
    summary = md.split("## Speed-ups")[0]
    rows = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| resnet18 |")}
    assert "accuracy within noise" in rows["channel"] and "not measurably faster" not in rows["channel"]
    assert "within noise" not in rows["l1_static"] and "not measurably faster" in rows["l1_static"]
    assert "hit the epoch cap (1/2 seeds)" in rows["none"]
    assert "unequal budget" not in md


def test_select_by_run_ids_and_grid(store, tmp_path):
    uri, client, exp = store
    a = log_run(client, exp, "none")
    b = log_run(client, exp, "channel")
    log_run(client, exp, "channel", backbone="vgg19")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for i, rid in enumerate((a, b)):
        (metrics / f"{i}.json").write_text(json.dumps({"run_id": rid}))
    exps = ["test_select_by_run_ids_and_grid"]
    table = g.build(uri, exps, tmp_path / "rep", run_ids=g.run_ids_from(metrics))
    assert set(table["run_id"]) == {a, b}
    grid = {"backbones": ["resnet18"], "datasets": ["fashion_mnist"], "losses": ["cross_entropy"], "seeds": [42],
            "methods": {"from_baseline": [], "scratch": []}}
    assert list(g.build(uri, exps, tmp_path / "rep2", grid=grid)["prune"]) == ["none"]


def test_bad_input_is_one_line(tmp_path, store, capsys):
    uri, client, exp = store
    with pytest.raises(g.ReportError, match="no FINISHED runs"):
        g.build(uri, ["test_bad_input_is_one_line"], tmp_path / "rep")
    with pytest.raises(g.ReportError, match="no per-cell metrics JSON"):
        g.run_ids_from(tmp_path / "nothing")
    with pytest.raises(SystemExit) as exc:
        main(["--tracking-uri", uri, "--out", str(tmp_path / "rep"), "--experiment", "test_bad_input_is_one_line"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().count("\n") == 0 and "no FINISHED runs" in err


def test_cli_prints_console_table(store, tmp_path, capsys):
    uri, client, exp = store
    log_run(client, exp, "none")
    main(["--tracking-uri", uri, "--out", str(tmp_path / "rep"), "--experiment", "test_cli_prints_console_table"])
    out = capsys.readouterr().out
    assert "resnet18" in out and "1 runs" in out


def test_speedups_show_their_spread_and_marks_within_one_runtime(store, tmp_path):
    """Each speed-up is the run's paired median with quartiles; the mark reads the interval, per runtime."""
    uri, client, exp = store
    cases = {  # prune: (eager median, q25, q75), (onnx median, q25, q75)
        "channel": ((1.30, 1.20, 1.40), (1.10, 1.02, 1.18)),    # faster in both
        "l1_static": ((1.02, 0.97, 1.06), (0.99, 0.95, 1.03)),  # identical-looking: noise
        "quant_int8": ((4.0, 3.8, 4.2), (0.80, 0.75, 0.85)),    # fast in eager, slower in ONNX Runtime
    }
    for seed in (1, 2):
        log_run(client, exp, "none", seed=seed, **{"speedup__infer": 1.0, "speedup__infer_q25": 0.98,
                                                   "speedup__infer_q75": 1.02})
        for prune, (eager, onnx) in cases.items():
            metrics = {}
            for key, (med, q25, q75) in (("speedup__infer", eager), ("speedup__infer_onnx", onnx)):
                metrics.update({key: med, f"{key}_q25": q25, f"{key}_q75": q75})
            log_run(client, exp, prune, seed=seed, ref="none", time__infer_ms=5.0, baseline__infer_ms=5.0,
                    time__infer_ms_onnx=1.0, **metrics)
    g.build(uri, [exp_name(client, exp)], tmp_path / "rep")
    csv = pd.read_csv(tmp_path / "rep" / "grid.csv").set_index("prune")
    # the run's own paired speed-up, not infer_ms ratios (5.0 / 5.0 would read 1.00x)
    assert csv.loc["quant_int8", "infer_speedup"] == pytest.approx(4.0)
    assert csv.loc["quant_int8", "infer_speedup_onnx_q75"] == pytest.approx(0.85)
    md = (tmp_path / "rep" / "grid.md").read_text()
    summary, speedups = md.split("## Per seed")[0].split("## Speed-ups")
    rows = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| resnet18 |")}
    assert "1.30x ± 0.00 [1.20, 1.40]" in rows["channel"] and "1.10x ± 0.00 [1.02, 1.18]" in rows["channel"]
    assert "not measurably" not in rows["channel"] and "slower" not in rows["channel"]
    assert "not measurably faster (eager)" in rows["l1_static"] and "not measurably faster (onnx)" in rows["l1_static"]
    assert "measurably slower (onnx)" in rows["quant_int8"] and "(eager)" not in rows["quant_int8"]
    assert "not measurably" not in rows["none"]
    assert "4.00x ± 0.00 [3.80, 4.20]" in speedups and "| eager | onnx | notes |" in speedups


def exp_name(client, exp_id):
    return client.get_experiment(exp_id).name


# -- what the report writes back to MLflow, and its figures ----------------------------------------
def log_epochs(client, run_id, epochs=3, acc=0.8):
    """Per-epoch metrics (step = epoch), as the pipeline logs them."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, v, now, ep) for ep in range(epochs) for key, v in (
        ("train/loss", 1.0 - 0.2 * ep), ("val/loss", 1.1 - 0.2 * ep), ("val/acc", acc - 0.05 * (epochs - 1 - ep)))])


def test_grid_parent_run_nests_the_cells_and_holds_the_figures(store, tmp_path):
    """One FINISHED grid parent run per experiment, every selected cell nested under it, the report's
    files as its artifacts; parent runs (grid and sweep) are never rows, also on a second report."""
    uri, client, exp = store
    cells = [log_run(client, exp, prune, seed=seed, **{"test__acc": 0.9 - 0.05 * i})
             for seed in (1, 2) for i, prune in enumerate(("none", "channel"))]
    for rid in cells:
        log_epochs(client, rid)
    # a sweep's parent run that even carries every cell tag and metric, started last: never a cell
    sweep = log_run(client, exp, "channel", seed=1, **{"test__acc": 0.99})
    client.set_tag(sweep, tracking.TAG_RUN_KIND, "sweep")
    name = exp_name(client, exp)

    table = g.build(uri, [name], tmp_path / "rep", ui=None)
    assert set(table["run_id"]) == set(cells) and sweep not in set(table["run_id"])
    parents = client.search_runs([exp], f"tags.`{tracking.TAG_RUN_KIND}` = 'grid'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("grid-")
    for rid in cells:
        assert client.get_run(rid).data.tags[tracking.TAG_PARENT_RUN] == parent.info.run_id
    assert tracking.TAG_PARENT_RUN not in client.get_run(sweep).data.tags
    logged = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"grid.md", "grid.csv", "learning_curves.csv", "acc_vs_params.png", "acc_vs_latency.png", "relative.png",
            "learning_curves_resnet18.png", "tradeoff.csv", "tradeoff_compression.png"} <= logged
    assert parent.info.run_id in (tmp_path / "rep" / "grid.md").read_text()

    curves = pd.read_csv(tmp_path / "rep" / "learning_curves.csv")
    assert {"cell", "prune", "seed", "epoch", "val/acc", "train/loss"} <= set(curves.columns)
    assert len(curves) == 4 * 3 and sorted(curves["epoch"].unique()) == [0, 1, 2]
    assert (tmp_path / "rep" / "learning_curves" / "learning_curves_resnet18.png").stat().st_size > 1000

    again = g.build(uri, [name], tmp_path / "rep2", ui=None)     # the first grid run is no cell either
    assert set(again["run_id"]) == set(cells)
    runs = tracking.load_cell_runs(uri, [name])
    assert parent.info.run_id not in set(runs["run_id"]) and sweep not in set(runs["run_id"])
    newest = [p for p in client.search_runs([exp], f"tags.`{tracking.TAG_RUN_KIND}` = 'grid'")
              if p.info.run_id != parent.info.run_id]
    assert len(newest) == 1
    assert {client.get_run(r).data.tags[tracking.TAG_PARENT_RUN] for r in cells} == {newest[0].info.run_id}


def _dominated(i, pts):
    xi, yi = pts[i]
    return any(xj <= xi and yj >= yi and (xj, yj) != (xi, yi) for j, (xj, yj) in enumerate(pts) if j != i)


def test_pareto_front_drawn_is_exactly_the_non_dominated_cells(store, tmp_path):
    """Brute force over the cells' (cost, accuracy) means: the front line holds exactly the cells no other
    cell dominates, in both trade-off figures and in grid.csv's pareto_* columns."""
    import numpy as np

    from prunegrid.report import figures

    uri, client, exp = store
    cells = {  # prune: (non-zero params, latency ms, test acc): ties and dominated points included
        "none": (1000, 4.0, 0.90), "none_ft1": (1000, 4.0, 0.91), "channel": (400, 2.0, 0.85),
        "slimming": (400, 2.5, 0.80), "l1_static": (600, 4.0, 0.91), "l1_dynamic": (600, 1.0, 0.70),
        "layer_importance": (200, 3.0, 0.60), "quant_int8": (1000, 1.0, 0.90)}
    for seed in (1, 2):
        for prune, (params, ms, acc) in cells.items():
            log_run(client, exp, prune, seed=seed, **{"model__params_nonzero": params, "time__infer_ms": ms,
                                                     "test__acc": acc + (0.01 if seed == 1 else -0.01)})
    g.build(uri, [exp_name(client, exp)], tmp_path / "rep", mlflow_write=False)
    means = pd.read_csv(tmp_path / "rep" / "grid.csv")
    for x, col in (("params_nonzero", "pareto_params"), ("infer_ms", "pareto_latency")):
        pts = [(float(a), float(b)) for a, b in zip(means[x], means["acc"])]
        expected = {p for i, p in enumerate(pts) if not _dominated(i, pts)}
        fig = figures.tradeoff_figure(means, x, x)
        assert figures.front_points(fig) == expected
        assert {p for p, on in zip(pts, means[col]) if on} == expected
        figures.close(fig)
    assert set(means.loc[means["pareto_latency"], "prune"]) == {"none_ft1", "l1_static", "quant_int8"}
    assert set(means.loc[means["pareto_params"], "prune"]) == {"layer_importance", "channel", "l1_static"}

    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = rng.integers(0, 6, 12).astype(float), rng.integers(0, 6, 12).astype(float)
        x[rng.integers(0, 12)] = np.nan
        valid = [i for i in range(12) if np.isfinite(x[i])]
        pts = [(x[i], y[i]) for i in valid]
        expected = [False] * 12
        for k, i in enumerate(valid):
            expected[i] = not _dominated(k, pts)
        assert [bool(v) for v in figures.pareto_mask(x, y)] == expected


def model_run(uri, exp, prune, seed, val, test, with_model=True):
    """A cell run with an MLflow model (a tiny torch.nn.Linear logged in the run) and its model_uri tag."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    client = MlflowClient(uri)
    tags = {"backbone": "resnet18", "prune": prune, "dataset": "fashion_mnist", "loss": "cross_entropy",
            "seed": str(seed)}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp, run_name=tracking.run_name(tags), tags=tags) as run:
            rid = run.info.run_id
            if with_model:
                info = mlflow.pytorch.log_model(torch.nn.Linear(4, 2), name="model", pip_requirements=["torch"],
                                                input_example=np.zeros((1, 4), np.float32))
                client.set_tag(rid, tracking.TAG_MODEL_URI, info.model_uri)
            for k, v in {"test/acc": test, "val/final_acc": val, "model/params_nonzero": 1000, "time/infer_ms": 2.0,
                         "model/params": 1000, "model/flops": 10}.items():
                client.log_metric(rid, k, v)
    finally:
        mlflow.set_tracking_uri(previous)
    return rid


def test_registry_alias_is_the_best_validation_run_not_the_best_test_run(store, tmp_path, capsys):
    import mlflow
    import mlflow.pyfunc
    import numpy as np

    uri, client, exp = store
    best = {}
    for prune, vals in {"none": ((0.80, 0.95), (0.85, 0.70)), "channel": ((0.75, 0.60), (0.70, 0.90))}.items():
        runs = [model_run(uri, exp, prune, seed, val, test) for seed, (val, test) in enumerate(vals, 1)]
        best[prune] = runs[int(np.argmax([v for v, _ in vals]))]    # test/acc would pick the other run
    model_run(uri, exp, "l1_static", 1, 0.9, 0.9, with_model=False)   # no model logged: skipped, said so
    name = exp_name(client, exp)
    g.build(uri, [name], tmp_path / "rep", ui=None)
    out = capsys.readouterr().out
    registered = f"prunegrid-{name}"
    for prune, rid in best.items():
        assert client.get_model_version_by_alias(registered, f"best-{prune}").run_id == rid
    assert "l1_static: not registered" in out and tracking.TAG_MODEL_URI in out
    with pytest.raises(Exception):
        client.get_model_version_by_alias(registered, "best-l1_static")
    md = (tmp_path / "rep" / "grid.md").read_text()
    assert "## Registered models" in md and f"| {registered} | best-channel | " in md
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{registered}@best-channel")   # as the README says
    finally:
        mlflow.set_tracking_uri(previous)
    assert model.predict(np.zeros((1, 4), np.float32)).shape == (1, 2)

    g.build(uri, [name], tmp_path / "rep2", ui=None)                  # same best models: no new versions
    assert len(client.search_model_versions(f"name = '{registered}'")) == 2
    assert "unchanged" in capsys.readouterr().out


def test_timings_are_not_compared_across_hosts(store, tmp_path):
    """Cells of a Ray grid ran on two machines: no relative column mixes two hosts' timings, no mean of
    absolute times over seeds timed on different hosts, one latency panel per host."""
    from prunegrid.report import figures

    uri, client, exp = store
    placed = {("none", 1): "node-a", ("channel", 1): "node-b", ("none", 2): "node-a", ("channel", 2): "node-a"}
    for (prune, seed), host in placed.items():
        fast = prune == "channel"
        rid = log_run(client, exp, prune, seed=seed, **{"time__epoch_s": 5 if fast else 10,
                                                         "time__infer_ms": 1.0 if fast else 2.0})
        client.set_tag(rid, tracking.TAG_HOST, host)
    table = g.build(uri, ["test_timings_are_not_compared_across_hosts"], tmp_path / "rep", ui=None)
    ch = table[table.prune == "channel"].set_index("seed")
    assert pd.isna(ch.loc["1", "epoch_speedup"]) and pd.isna(ch.loc["1", "infer_speedup"])  # node-b vs node-a
    assert ch.loc["2", "epoch_speedup"] == pytest.approx(2.0) and ch.loc["2", "infer_speedup"] == pytest.approx(2.0)
    assert list(ch["host"]) == ["node-b", "node-a"]
    means = pd.read_csv(tmp_path / "rep" / "grid.csv").set_index("prune")
    assert pd.isna(means.loc["channel", "infer_ms"]) and pd.isna(means.loc["channel", "epoch_s"])
    assert means.loc["none", "infer_ms"] == pytest.approx(2.0)                  # both seeds on node-a
    md = (tmp_path / "rep" / "grid.md").read_text()
    assert "Timed on 2 hosts (node-a, node-b)" in md and g.CROSS_HOST in md
    fig = figures.tradeoff_figure(means.reset_index().assign(infer_ms=[2.0, 1.0], host=["node-a", "node-b"]),
                                  "infer_ms", "latency", by="host")
    assert [ax.get_title().split(": ")[0] for ax in fig.axes] == ["Accuracy vs latency (timed on node-a)",
                                                                  "Accuracy vs latency (timed on node-b)"]


def test_detection_cells_have_map50_compared_like_acc(store, tmp_path):
    """Detection cells (no test/acc): map50 where classifiers have acc, deltas against the equal-budget
    reference per seed, the whole detector's time and sampled memory as columns, noise marked."""
    uri, client, exp = store
    maps = {("none", 0): 0.60, ("none", 1): 0.62, ("l1_static", 0): 0.55, ("l1_static", 1): 0.58,
            ("l1_dynamic", 0): 0.50, ("l1_dynamic", 1): 0.62}
    for (prune, seed), m50 in maps.items():
        rid = log_run(client, exp, prune, seed=seed, backbone="yolov5n", drop=("test/acc", "test/f1_macro"), **{
            "test__map50": m50, "test__map": m50 / 2, "time__detect_ms": 6.0, "memory__detect_peak_mb": 950,
            "memory__detect_increase_mb": 36.0})
        client.set_tag(rid, "dataset", "fashion_det")
        client.set_tag(rid, "loss", "yolov5")
    table = g.build(uri, ["test_detection_cells_have_map50_compared_like_acc"], tmp_path / "rep", ui=None)
    st = table[table.prune == "l1_static"].set_index("seed")
    assert st.loc["0", "map50_delta_pt"] == pytest.approx(-5.0) and st.loc["1", "map50_delta_pt"] == pytest.approx(-4.0)
    assert {"map50", "map", "detect_ms", "detect_peak_mb", "detect_increase_mb"} <= set(table.columns)
    means = pd.read_csv(tmp_path / "rep" / "grid.csv").set_index("prune")
    assert means.loc["l1_static", "map50_delta_pt"] == pytest.approx(-4.5)
    assert means.loc["l1_dynamic", "map50_delta_pt"] == pytest.approx(-5.0)   # -10 and 0: std 7.1
    md = (tmp_path / "rep" / "grid.md").read_text()
    dyn = next(line for line in md.splitlines() if line.startswith("| yolov5n | l1_dynamic"))
    assert "mAP50 within noise" in dyn
    st_line = next(line for line in md.splitlines() if line.startswith("| yolov5n | l1_static"))
    assert "mAP50 within noise" not in st_line                                   # -5 and -4: std 0.7
    from prunegrid.report import figures

    scored = g._scored(means.reset_index())
    fig = figures.tradeoff_figure(scored, "params_nonzero", "non-zero parameters")
    front = figures.front_points(fig)
    assert front and {round(y, 4) for _, y in front} <= {round(v, 4) for v in means["map50"]}
    assert "mAP50" in fig.axes[0].get_ylabel()


def test_noise_sentinel_marks_a_hosts_speedups_unreliable(store, tmp_path):
    """The none cell timed against itself at 0.75x in ONNX Runtime (a loaded host): every ONNX speed-up of
    that host is unreliable, the eager ones (sentinel 1.01x) are not."""
    uri, client, exp = store
    for seed in (1, 2):
        log_run(client, exp, "none", seed=seed, speedup__infer=1.01, speedup__infer_onnx=0.75)
        log_run(client, exp, "channel", seed=seed, ref="none", speedup__infer=2.0, speedup__infer_onnx=3.0)
    g.build(uri, [exp_name(client, exp)], tmp_path / "rep", mlflow_write=False)
    md = (tmp_path / "rep" / "grid.md").read_text()
    summary = md.split("## Speed-ups")[0]
    rows = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| resnet18 |")}
    assert "unreliable: timing noise (onnx: sentinel 0.75x)" in rows["channel"]
    assert "(eager: sentinel" not in rows["channel"]
    assert "noise sentinel) read 0.75x in onnx" in summary
    speedups = md.split("## Speed-ups")[1].split("## Per seed")[0]
    assert "unreliable: timing noise (onnx: sentinel 0.75x)" in speedups


def test_quiet_sentinel_marks_nothing(store, tmp_path):
    uri, client, exp = store
    for seed in (1, 2):
        log_run(client, exp, "none", seed=seed, speedup__infer=0.97, speedup__infer_onnx=1.04)
        log_run(client, exp, "channel", seed=seed, ref="none", speedup__infer=2.0, speedup__infer_onnx=3.0)
    g.build(uri, [exp_name(client, exp)], tmp_path / "rep", mlflow_write=False)
    assert "unreliable" not in (tmp_path / "rep" / "grid.md").read_text()


def test_a_cell_holds_only_runs_of_its_own_config_and_names_the_others(store, tmp_path):
    """One store: the grid's l1_static cell, an older run of another config, a sweep trial of the same
    method (nested under its sweep's parent run, with the same tags) and a re-run of the cell."""
    uri, client, exp = store
    cell = {"prune.amount": 0.4, "optimizer.lr": 0.003, "paths.model_out": "models/a.pt"}
    log_run(client, exp, "none", params={"prune.amount": "none"})
    other = log_run(client, exp, "l1_static", params={**cell, "optimizer.lr": 0.01}, **{"test__acc": 0.50})
    first = log_run(client, exp, "l1_static", params=cell, **{"test__acc": 0.80})
    sweep = client.create_run(exp, tags={tracking.TAG_RUN_KIND: "sweep"}, run_name="sweep-l1_static").info.run_id
    trial = log_run(client, exp, "l1_static", params={**cell, "prune.amount": 0.25}, **{"test__acc": 0.95},
                    tags={tracking.TAG_SWEEP_TRIAL: "2", "mlflow.parentRunId": sweep})
    untagged = log_run(client, exp, "l1_static", params={**cell, "prune.amount": 0.3}, **{"test__acc": 0.97},
                       tags={"mlflow.parentRunId": sweep})          # a trial logged before the tag existed
    rerun = log_run(client, exp, "l1_static", params={**cell, "paths.model_out": "elsewhere.pt"},
                    **{"test__acc": 0.82})                           # where a run writes is not its config
    name = "test_a_cell_holds_only_runs_of_its_own_config_and_names_the_others"

    table = g.build(uri, [name], tmp_path / "rep", ui=None, mlflow_write=False)
    row = table[table.prune == "l1_static"].iloc[0]
    assert row["run_id"] == rerun and row["acc"] == pytest.approx(0.82)
    note = row["other_runs"]
    assert f"older runs of seed 42: {first[:8]}" in note
    assert f"{other[:8]} (optimizer.lr differ)" in note
    assert f"sweep trials left out: {untagged[:8]} (trial ?), {trial[:8]} (trial 2)" in note
    md = (tmp_path / "rep" / "grid.md").read_text()
    assert f"not used: older runs of seed 42: {first[:8]}" in md

    with_sweeps = g.build(uri, [name], tmp_path / "rep2", ui=None, mlflow_write=False, include_sweeps=True)
    assert with_sweeps[with_sweeps.prune == "l1_static"].iloc[0]["run_id"] == rerun   # the latest run still wins


def test_a_seed_with_runs_of_another_config_only_is_left_out_and_said(store, tmp_path):
    uri, client, exp = store
    for seed in (0, 1):
        log_run(client, exp, "none", seed=seed)
    stray = log_run(client, exp, "channel", seed=0, params={"prune.ratio": 0.3}, **{"test__acc": 0.7})
    kept = log_run(client, exp, "channel", seed=1, params={"prune.ratio": 0.5}, **{"test__acc": 0.8})
    table = g.build(uri, ["test_a_seed_with_runs_of_another_config_only_is_left_out_and_said"], tmp_path / "rep",
                    ui=None, mlflow_write=False)
    ch = table[table.prune == "channel"]
    assert list(ch["run_id"]) == [kept]
    assert f"seed 0 left out, only runs of another config: {stray[:8]} (prune.ratio differ)" in ch.iloc[0]["other_runs"]
