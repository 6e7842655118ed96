"""The grid report on hand-made runs in a temporary MLflow store (known params, accuracy, latencies)."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from prunegrid import tracking
from prunegrid.report import grid as g
from prunegrid.report.__main__ import main

CONTRACT = ["backbone", "prune", "dataset", "loss", "seed", "acc", "f1_macro", "params", "params_nonzero", "flops",
            "size_mb", "train_s", "epoch_s", "infer_ms", "infer_peak_mb", "train_peak_mb"]
RELATIVE = ["params_reduction_pct", "flops_reduction_pct", "acc_delta_pt", "epoch_speedup", "infer_speedup"]
SUMMARY = ["budget_epochs", "ref_prune", "ref_budget_epochs", "acc_delta_pt", "acc_delta_pt_std", "n_seeds", "converged"]


def log_run(client, exp_id, prune, seed=42, status="FINISHED", backbone="resnet18", ref=None, **m):
    tags = {"backbone": backbone, "prune": prune, "dataset": "fashion_mnist", "loss": "cross_entropy",
            "seed": str(seed), **({"ref_prune": ref} if ref else {})}
    run = client.create_run(exp_id, tags=tags, run_name=tracking.run_name(tags))
    metrics = {"test/acc": 0.9, "test/f1_macro": 0.89, "model/params": 1000, "model/params_nonzero": 1000,
               "model/flops": 5000, "model/size_mb": 4.0, "time/train_s": 100, "time/epoch_s": 10,
               "time/infer_ms": 2.0, "memory/infer_peak_mb": 300, "memory/train_peak_mb": 900}
    metrics.update({k.replace("__", "/"): v for k, v in m.items()})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
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
