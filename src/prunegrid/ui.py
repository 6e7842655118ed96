"""``python -m prunegrid.ui`` / ``bash scripts/ui.sh``: browse the runs in the MLflow UI.

Starts ``mlflow ui`` on the project's store (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db``), bound to 127.0.0.1, and prints (and, with a screen, opens) the
address of the experiment's runs table. MLflow 3's UI keeps a per-browser choice between its
GenAI and model-training views; the address asks for the model-training view
(``workflowType=machine_learning``), where the runs table, datasets, sources and models are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from prunegrid import tracking
from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError

VIEW = "workflowType=machine_learning"


def experiment_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI address of an experiment's runs table (or of one run) in the model-training view. The
    table opens on the grid's preset (:func:`prunegrid.tracking.grid_view`: the cells, best accuracy
    first, accuracy, delta, non-zero parameters, speed-ups and memory as columns)."""
    if run_id:
        return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{VIEW}"
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{VIEW}"
            f"&viewStateShareKey={tracking.GRID_VIEW_KEY}&compareRunsMode=TABLE")


def pick_experiment(uri: str, name: str | None) -> str:
    """The id of experiment ``name``, else of the experiment holding the latest run."""
    client = tracking.open_client(uri)
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments() if e.name != "Default") or "none"
            raise ConfigError(f"no experiment '{name}' in {uri}; experiments: {names}")
        return exp.experiment_id
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        raise ConfigError(f"no runs in {uri} yet; train a cell first (python train.py) or give --tracking-uri")
    return runs[0].info.experiment_id


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, a port some server (another MLflow UI or anything else) already holds.

    Probed by binding it the way uvicorn does (``SO_REUSEADDR``, so a closed socket in TIME_WAIT does
    not count), before MLflow starts: a UI that would fail to bind must not report another server's address.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {host} is already in use ({exc.strerror}); "
                              f"stop that server or pick another with --port") from None


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"mlflow ui exited with code {proc.returncode}; is the port taken? (try --port)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise ConfigError(f"mlflow ui did not answer at {url} within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m prunegrid.ui", description="Browse the runs in the MLflow UI "
                       "(bound to 127.0.0.1), opened on an experiment's runs table.")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=None, help="experiment to open (default: the one with the latest run)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--no-browser", action="store_true", help="print the address only")
    a = p.parse_args(argv)
    from prunegrid.interrupt import Interrupted, signals

    with guard(), signals():  # SIGINT/SIGTERM stop the server too
        try:
            serve(a)
        except Interrupted as exc:
            print(f"prunegrid: MLflow UI stopped ({exc})", file=sys.stderr)
            sys.exit(exc.exit_code)


def serve(a) -> None:
    """Start ``mlflow ui`` on the store, print the experiment's address, wait for the server."""
    check_port_free("127.0.0.1", a.port)
    uri = tracking.resolve_uri(a.tracking_uri)
    exp_id = pick_experiment(uri, a.experiment)
    client = tracking.open_client(uri)
    tracking.experiment_id(client, client.get_experiment(exp_id).name)  # the preset, also on older experiments
    server = f"http://127.0.0.1:{a.port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(a.port), "--workers", "1"]
    # its own process group (the server's workers with it); stdout carries only the address line
    proc = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True)
    try:
        wait_until_up(server, proc)
        url = experiment_url(server, exp_id)
        print(f"prunegrid: MLflow UI of {uri}: {url}", flush=True)
        if not a.no_browser and (os.environ.get("DISPLAY") or sys.platform == "darwin"):
            import webbrowser

            webbrowser.open(url)
        while proc.poll() is None:  # short sleeps: a signal that lands on another thread is still seen
            time.sleep(0.5)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace_s`` (uvicorn waits for idle
    connections to close before it exits)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    main()
