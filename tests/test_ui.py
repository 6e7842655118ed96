"""The MLflow UI as its users browse it, in a real headless Chromium driven by Playwright.

Two tiny cells (a baseline and a method) are trained into a fresh store, the report turns them
into a tiny grid (a parent run, registered models), ``python -m prunegrid.ui`` serves the store,
and the browser checks the runs table, the run page and the grid's nesting. Screenshots go to
``reports/ui/``. Chromium comes from Debian (``apt-get install chromium``, done by
``scripts/test.sh``); Playwright drives it through ``executable_path`` (its own browser download
needs the internet). Without Chromium the browser tests skip, unless ``PRUNEGRID_REQUIRE_BROWSER``
is set (``scripts/test.sh`` sets it), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from prunegrid import tracking
from prunegrid.config import compose
from tests.conftest import ROOT, tiny

SHOTS = ROOT / "reports" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
METHOD = "l1_static"
CELL = ["backbone=simple_cnn", "explain.enabled=false", "tracking.log_model=true", "tracking.system_metrics=true",
        "tracking.system_metrics_interval_s=0.2"]  # a tiny cell trains for about a second


def _browser_ready() -> str | None:
    if not Path(CHROMIUM).is_file():
        return "Chromium not installed (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two tiny runs and the grid the report makes of them; ``python -m prunegrid.ui``
    starts on it (while the cells train) when the browser tests can run."""
    from prunegrid.pipeline import run
    from prunegrid.report import grid as report

    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracking.experiment_id(tracking.open_client(uri), "fashion_mnist")
    proc = None
    if _browser_ready() is None:
        proc = subprocess.Popen([sys.executable, "-m", "prunegrid.ui", "--tracking-uri", uri, "--experiment",
                                 "fashion_mnist", "--port", str(_free_port()), "--no-browser"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        runs = {p: run(compose(tiny(tmp, *CELL, f"prune={p}"))) for p in ("none", METHOD)}
        report.build(uri, out=tmp / "reports", run_ids=[r.run_id for r in runs.values()], ui=None)
        yield {"uri": uri, "tmp": tmp, "runs": runs, "ui": proc}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def ui(store):
    """The address ``python -m prunegrid.ui`` printed: the experiment's runs table."""
    why = _browser_ready()
    if why:
        if os.environ.get("PRUNEGRID_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    proc = store["ui"]
    line = ""
    for line in proc.stdout:
        if line.startswith("prunegrid: MLflow UI"):
            break
    url = re.search(r"http://\S+", line)
    assert url, f"prunegrid.ui printed no address (exit {proc.poll()})"
    return url.group(0)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        pg = browser.new_page(viewport={"width": 1500, "height": 900})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _run_names(store) -> dict[str, str]:
    client = MlflowClient(store["uri"])
    return {p: client.get_run(r.run_id).info.run_name for p, r in store["runs"].items()}


def _parent(store):
    client = MlflowClient(store["uri"])
    exp = client.get_run(store["runs"]["none"].run_id).info.experiment_id
    parents = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_RUN_KIND}` = 'grid'")
    assert len(parents) == 1, "the report makes one parent run for the grid"
    return parents[0]


def test_printed_address_opens_on_the_cells_with_the_compared_columns_in_view(store, ui, page):
    """The runs table opens on the grid's preset (an MLflow shared view): the cells themselves, not
    folded under the grid's parent, best accuracy first, with accuracy, delta vs reference, non-zero
    parameters and both speed-ups visible without a click or a scroll; Dataset, Source and Models follow."""
    names = _run_names(store)
    page.goto(ui)
    for name in names.values():
        page.get_by_text(name, exact=True).wait_for()
    assert "workflowType=machine_learning" in page.url and "/runs" in page.url  # the training-runs view
    assert page.get_by_text(_parent(store).info.run_name, exact=True).count() == 0, "cells only, no parent row"
    width = page.viewport_size["width"]
    for column in ("test/acc", "grid/acc_delta_pt", "model/params_nonzero", "speedup/infer", "speedup/infer_onnx"):
        header = page.get_by_role("columnheader", name=column, exact=True)
        assert header.count() >= 1, column
        box = header.first.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, f"{column} is off-screen: {box}"
    page.screenshot(path=str(SHOTS / "experiment_runs.png"))
    page.set_viewport_size({"width": 2600, "height": 900})  # the grid renders only the columns in view
    page.wait_for_timeout(1000)
    for column in ("Dataset", "Source", "Models"):
        page.get_by_role("columnheader", name=column, exact=True).first.wait_for(timeout=20_000)
    table = page.locator("[role=grid]").first.inner_text()
    accuracies = {p: MlflowClient(store["uri"]).get_run(r.run_id).data.metrics["test/acc"] for p, r in store["runs"].items()}
    best, worst = (names[p] for p in sorted(accuracies, key=accuracies.get, reverse=True))
    assert table.index(best) < table.index(worst), "best accuracy first"
    assert table.count("fashion_mnist (") >= 2, "each cell's row shows its data set and digest"
    digest = MlflowClient(store["uri"]).get_run(store["runs"]["none"].run_id).inputs.dataset_inputs[0].dataset.digest
    assert digest[:12] in table
    page.set_viewport_size({"width": 1500, "height": 900})


def test_run_names_say_what_differs(store):
    names = _run_names(store)
    assert len(set(names.values())) == len(names)
    for prune, name in names.items():
        assert name.startswith(f"{prune} · simple_cnn · s"), name


def test_run_page_shows_dataset_model_and_system_metrics(store, ui, page):
    run_id = store["runs"][METHOD].run_id
    client = MlflowClient(store["uri"])
    run = client.get_run(run_id)
    page.goto(ui.replace("/runs?", f"/runs/{run_id}?"))
    page.get_by_text("Logged models (1)").wait_for()
    assert page.get_by_text("Datasets", exact=True).count() >= 1
    model_id = run.data.tags[tracking.TAG_MODEL_URI].removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == run_id
    page.screenshot(path=str(SHOTS / "run_overview.png"), full_page=True)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), "system metrics were sampled"
    page.get_by_role("tab", name="System metrics").click()
    page.get_by_text(re.compile("cpu_utilization")).first.wait_for()
    page.wait_for_timeout(3000)  # the charts draw after their titles
    page.screenshot(path=str(SHOTS / "run_system_metrics.png"))


def test_grid_parent_run_lists_its_children(store, ui, page):
    parent = _parent(store)
    client = MlflowClient(store["uri"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(r.run_id for r in store["runs"].values())
    page.goto(ui.replace("/runs?", f"/runs/{parent.info.run_id}?"))
    page.get_by_text(parent.info.run_name).first.wait_for()
    page.goto(ui.split("&viewStateShareKey")[0])  # the plain runs table, parents and all
    page.get_by_text(parent.info.run_name).wait_for()
    note = parent.data.tags["mlflow.note.content"]
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts/grid.html" in note
    names = list(_run_names(store).values())
    page.wait_for_timeout(1000)
    if not page.get_by_text(names[0], exact=True).is_visible():  # the table remembers an expanded parent
        page.locator("[role=row]", has_text=parent.info.run_name).locator("button").first.click()
    rows = page.locator("[role=row]")
    for name in names:
        page.get_by_text(name, exact=True).wait_for()
    assert rows.count() >= 4  # header, parent, two children
    page.screenshot(path=str(SHOTS / "grid_parent.png"))


def test_registered_best_model_predicts_through_pyfunc(store):
    """``models:/<name>@best-<method>`` loads with ``mlflow.pyfunc`` and predicts what the run's own
    saved model predicts on real validation images."""
    from prunegrid import measure

    client = MlflowClient(store["uri"])
    run = client.get_run(store["runs"][METHOD].run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"models:/prunegrid-{experiment}@best-{METHOD}")
    finally:
        mlflow.set_tracking_uri(previous)
    from prunegrid.config import build

    cfg = compose(tiny(store["tmp"], *CELL))
    data = build(cfg.dataset, seed=cfg.seed)
    data.setup()
    images, _ = next(iter(data.loader("val", shuffle=False, batch_size=8)))
    out = np.asarray(model.predict(images.numpy()))
    assert out.shape == (8, data.num_classes)
    saved = measure.load_model(Path(client.download_artifacts(run.info.run_id, "model/model.pt", str(store["tmp"]))))
    with torch.no_grad():
        expected = saved.eval()(images).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_experiment_is_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.experiment_id(tracking.open_client(uri), "fashion_mnist")
    proc = subprocess.run([sys.executable, "-m", "prunegrid.ui", "--tracking-uri", uri, "--experiment", "cifar"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"prunegrid: error: no experiment 'cifar' in {uri}; experiments: fashion_mnist"]



def _second_ui(uri: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunegrid.ui", "--tracking-uri", uri, "--port", str(port),
                           "--experiment", "fashion_mnist", "--no-browser"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _refused_in_one_line(proc: subprocess.CompletedProcess, port: int) -> None:
    """Exit 2, no address on stdout (never the other server's as its own), one line on stderr."""
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"prunegrid: error: port {port} on 127.0.0.1 is already in use (Address already in use); "
        "stop that server or pick another with --port"]


def test_a_port_held_by_any_server_is_one_line_before_mlflow_starts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.experiment_id(tracking.open_client(uri), "fashion_mnist")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _refused_in_one_line(_second_ui(uri, port), port)


def test_a_port_held_by_another_prunegrid_ui_is_one_line(store, ui):
    port = int(re.search(r":(\d+)/", ui).group(1))
    _refused_in_one_line(_second_ui(store["uri"], port), port)


def test_grid_page_loads_offline_sorts_and_shows_every_figure(store, page):
    """``grid.html`` from the tiny grid's report: no console error, no request leaves the file, sorting by
    accuracy reorders the rows, and every embedded figure has a size."""
    path = store["tmp"] / "reports" / "grid.html"
    assert path.is_file(), "the report writes grid.html"
    errors, remote = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    rows = page.locator("#summary tbody tr")
    assert rows.count() == 2

    def accuracies() -> list[float]:
        col = page.locator("#summary thead th").all_inner_texts().index("test acc")
        return [float(rows.nth(i).locator("td").nth(col).get_attribute("data-v")) for i in range(rows.count())]

    header = page.locator("#summary thead th", has_text="test acc")
    header.click()
    up = accuracies()
    header.click()
    down = accuracies()
    assert up == sorted(up) and down == sorted(down, reverse=True) and (up != down or len(set(up)) == 1)
    assert header.get_attribute("aria-sort") == "descending"
    figures = page.locator("#figures img")
    assert figures.count() >= 3
    for i in range(figures.count()):
        w, h = figures.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert w > 0 and h > 0, f"figure {i} has no size"
        assert figures.nth(i).get_attribute("src").startswith("data:image/png;base64,")
    assert not page.locator("#per-seed").evaluate("d => d.open"), "the per-seed rows start folded"
    page.screenshot(path=str(SHOTS / "grid_page.png"), full_page=True)
    assert errors == [] and remote == []


def test_grid_page_sorting_reorders_known_rows(tmp_path, page):
    """Hand-made runs with known accuracies: the page's first order is the report's, and a click on the
    accuracy header sorts them (ascending, then descending)."""
    from tests.test_report import log_run

    from prunegrid.report import grid as report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("page")
    for prune, acc in (("none", 0.90), ("channel", 0.70), ("l1_static", 0.95)):
        log_run(client, exp, prune, **{"test__acc": acc})
    report.build(uri, ["page"], tmp_path / "rep", ui="http://127.0.0.1:5999", mlflow_write=False)
    page.goto((tmp_path / "rep" / "grid.html").as_uri())
    methods = lambda: page.locator("#summary tbody tr td:nth-child(2)").all_inner_texts()  # noqa: E731
    assert methods() == ["none", "channel", "l1_static"]
    header = page.locator("#summary thead th", has_text="test acc")
    header.click()
    assert methods() == ["channel", "none", "l1_static"]
    header.click()
    assert methods() == ["l1_static", "none", "channel"]
    link = page.locator("#summary tbody tr", has_text="channel").locator("a").first
    assert link.get_attribute("href").startswith("http://127.0.0.1:5999/#/experiments/")
