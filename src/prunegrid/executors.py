"""Who runs the grid's cells: ``dvc repro`` on this machine, or Ray tasks on a cluster.

``python -m prunegrid.grid run --executor local|ray`` builds one of these from ``conf/executor/<name>.yaml``
(``_target_``). Both run exactly the stages of ``dvc.yaml`` (the matrix expanded by DVC, with DVC's own
commands and dependency graph), so a cell means the same thing whichever runs it.

- :class:`DvcExecutor` (``local``): ``dvc repro``, one cell after another, the single-machine path (unchanged).
- :class:`RayExecutor`: every stage but the report is a Ray task (:func:`run_stage`) that asks for the
  CPUs and GPUs a cell needs. A stage's upstream outputs (the baseline's ``model.pt`` a method starts
  from, the ``pretrained/`` weights) reach it through Ray's object store, never a node-local path; its own
  outputs come back the same way and the head writes them into the project and ``dvc commit``-s the
  stage as it ends. Then the report stage runs on the head, so ``dvc status`` and ``reports/`` read as
  after ``dvc repro``. A re-run skips the stages DVC finds up to date.

Retries: a task whose worker dies (node lost, process killed) or whose cell ends with an error other
than a user error (exit 2) runs again, up to ``retries`` times. Each attempt's MLflow run carries the tags
``grid_run`` (this invocation), ``grid_stage`` and ``grid_attempt``; an attempt first marks KILLED the
runs a dead attempt of its stage left RUNNING, and then continues that run from its checkpoints when
they are on its node (the stage's ``resume=true``); a stage that already has a FINISHED run in this
grid run is not run again (its outputs are read back from the artifact store), so no cell is FINISHED
twice. Timing: each cell measures latency against its own dense baseline in its own process, under
the node-wide measurement lock (``measure.lock``), so two measurements never share a node's cores.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunegrid.errors import ConfigError

log = logging.getLogger("prunegrid")

REPORT_STAGE = "grid"
EXIT_USER_ERROR = 2
TAG_GRID_RUN, TAG_STAGE, TAG_ATTEMPT, TAG_NODE = "grid_run", "grid_stage", "grid_attempt", "ray_node"
RAY_EXCLUDES = ["/.git", "/.dvc/cache", "/.dvc/tmp", "/.venv", "/outputs", "/multirun", "/checkpoints", "/mlruns",
                "/mlartifacts", "/models", "/metrics", "/pretrained", "/reports", "/data", "*.db", "*.pt", "*.onnx"]
LOG_TAIL = 1500


@dataclass
class Stage:
    """One stage of ``dvc.yaml`` as DVC expanded it: its command, outputs and upstream stages."""

    name: str
    cmd: str
    outs: list[str]
    upstream: list[str] = field(default_factory=list)
    changed: bool = True

    def option(self, key: str) -> str | None:
        """The value of a ``key=value`` override in the command (``paths.model_out``, ...)."""
        for word in shlex.split(self.cmd):
            k, sep, v = word.lstrip("+").partition("=")
            if sep and k == key:
                return v
        return None

    @property
    def is_cell(self) -> bool:
        return "train.py" in shlex.split(self.cmd)[:2]


def plan(project: Path) -> tuple[list[Stage], Stage | None]:
    """The pipeline's stages in dependency order (upstream first), and the report stage."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    repo = Repo(str(project))
    try:
        graph = repo.index.graph
        order = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        with repo.lock:
            changed = {s.name: s.changed() for s in order}
        stages, report = [], None
        for s in order:
            ups = [u.name for u in graph.successors(s) if isinstance(u, PipelineStage)]
            stage = Stage(s.name, s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                          [str(o.def_path) for o in s.outs], ups, changed[s.name])
            if s.name == REPORT_STAGE:
                report = stage
            else:
                stages.append(stage)
    finally:
        repo.close()
    runs = {s.name for s in stages if s.changed}
    for s in stages:  # a stage re-runs when its own inputs changed or an upstream stage re-runs
        if not s.changed and any(u in runs for u in s.upstream):
            s.changed = True
            runs.add(s.name)
    return stages, report


def commit(project: Path, stage: str) -> None:
    """``dvc commit`` of one stage: its outputs and dependencies as they are now, into ``dvc.lock``."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        repo.commit(stage, force=True)


# -- files through the object store -----------------------------------------------------------------
def collect(root: Path, paths: list[str]) -> dict[str, bytes | None]:
    """The files under ``root`` at ``paths`` (a folder: every file in it, and the folder as None)."""
    files: dict[str, bytes | None] = {}
    for rel in paths:
        p = root / rel
        if p.is_dir():
            files[rel.rstrip("/") + "/"] = None
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(root))] = f.read_bytes()
        elif p.is_file():
            files[rel] = p.read_bytes()
    return files


def write(root: Path, files: dict[str, bytes | None], replace: list[str] = ()) -> None:
    """Write ``files`` under ``root`` (each atomically); the folders in ``replace`` are emptied first."""
    for rel in replace:
        p = root / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for rel, data in files.items():
        p = root / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        part = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.part")
        part.write_bytes(data)
        os.replace(part, p)


# -- MLflow side of an attempt ---------------------------------------------------------------------
def _runs(uri: str, grid_run: str, stage: str | None = None) -> list[Any]:
    from prunegrid import tracking

    client = tracking.open_client(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.{TAG_GRID_RUN} = '{grid_run}'" + (f" and tags.{TAG_STAGE} = '{stage}'" if stage else "")
    return client.search_runs(exps, filter_string=where, max_results=1000) if exps else []


def mark_dead(uri: str, grid_run: str, stage: str | None, why: str) -> list[str]:
    """End KILLED the runs of this grid run (one stage, or all) still RUNNING: their process is gone."""
    from prunegrid import tracking

    client = tracking.open_client(uri)
    dead = [r.info.run_id for r in _runs(uri, grid_run, stage) if r.info.status == "RUNNING"]
    for run_id in dead:
        client.set_tag(run_id, "status_detail", why)
        client.set_terminated(run_id, "KILLED")
    return dead


def _finished_outputs(uri: str, run: Any, stage: Stage, scratch: Path) -> dict[str, bytes | None]:
    """A FINISHED run's outputs read back from the artifact store, at the stage's output paths."""
    from prunegrid import tracking

    client = tracking.open_client(uri)
    files: dict[str, bytes | None] = {}
    wanted = {stage.option("paths.model_out"): f"{tracking.ARTIFACT_MODEL_DIR}/{tracking.MODEL_FILE}"}
    metrics_out = stage.option("paths.metrics_out")
    if metrics_out:
        wanted[metrics_out] = f"{tracking.ARTIFACT_OUTPUTS}/{Path(metrics_out).name}"
    for out, artifact in wanted.items():
        if out:
            local = client.download_artifacts(run.info.run_id, artifact, str(scratch))
            files[out] = Path(local).read_bytes()
    return files


class CellFailed(RuntimeError):
    """A cell's process ended with an error (retried)."""


class CellRefused(RuntimeError):
    """A cell's process refused its input (exit 2: a user error; not retried)."""


def _die_with_parent() -> None:  # a cell's process ends with the worker that runs it (Linux)
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class TaskContext:
    """What every stage task needs besides its stage: this grid run, the shared stores and data."""

    grid_run: str
    tracking_uri: str
    data_dir: str
    log_dir: str
    env: dict[str, str] = field(default_factory=dict)


def run_stage(stage: Stage, ctx: TaskContext, *upstream: dict[str, Any]) -> dict[str, Any]:
    """One stage as a Ray task: its command in a scratch folder holding the project's code (the job's
    working dir), the data and the upstream outputs; returns its outputs and where it ran."""
    import ray

    from prunegrid import tracking

    code = Path.cwd()
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    host = tracking.host_name()
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="prunegrid-cell-"))
    try:
        skip = {p.split("/")[0] for p in stage.outs} | {"data", "models", "metrics", "pretrained"}
        for entry in code.iterdir():
            if entry.name not in skip:
                (scratch / entry.name).symlink_to(entry)
        (scratch / "data").symlink_to(Path(ctx.data_dir))
        for result in upstream:
            write(scratch, result["files"])
        attempt = 1
        if stage.is_cell:
            previous = _runs(ctx.tracking_uri, ctx.grid_run, stage.name)
            done = [r for r in previous if r.info.status == "FINISHED"]
            if done:
                log.warning("%s: already FINISHED in run %s of this grid run; not run again", stage.name,
                            done[0].info.run_id)
                return {"files": _finished_outputs(ctx.tracking_uri, done[0], stage, scratch), "host": host,
                        "node": node, "seconds": time.time() - t0, "reused": True}
            mark_dead(ctx.tracking_uri, ctx.grid_run, stage.name,
                      "attempt lost: its Ray worker died; the stage was retried")
            attempt = len(previous) + 1
        cmd = stage.cmd
        if stage.is_cell:
            tags = {TAG_GRID_RUN: ctx.grid_run, TAG_STAGE: stage.name, TAG_ATTEMPT: attempt, TAG_NODE: node}
            cmd += " " + shlex.quote("++tracking.tags={" + ",".join(f"{k}:'{v}'" for k, v in tags.items()) + "}")
            cmd += " " + shlex.quote(f"paths.checkpoint_dir={Path(tempfile.gettempdir()) / 'prunegrid-checkpoints'}")
        env = {**os.environ, **ctx.env, "MLFLOW_TRACKING_URI": ctx.tracking_uri,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join([str(code / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        log_file = Path(ctx.log_dir) / f"{stage.name}.{time.strftime('%H%M%S')}-{os.getpid()}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "wb") as out:
            proc = subprocess.run(["bash", "-c", cmd], cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            tail = log_file.read_bytes()[-LOG_TAIL:].decode(errors="replace").strip().splitlines()
            last = next((line for line in reversed(tail) if line.strip()), "")
            if stage.is_cell and proc.returncode < 0:
                mark_dead(ctx.tracking_uri, ctx.grid_run, stage.name,
                          f"attempt {attempt} ended by {signal.Signals(-proc.returncode).name}")
            kind = CellRefused if proc.returncode == EXIT_USER_ERROR else CellFailed
            raise kind(f"{stage.name} on {host}: exit {proc.returncode}: {last} (log: {log_file})")
        return {"files": collect(scratch, stage.outs), "host": host, "node": node, "seconds": time.time() - t0,
                "reused": False, "attempt": attempt}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- executors -------------------------------------------------------------------------------------
def _dvc(project: Path, *args: str) -> int:
    """A ``dvc`` command in the project, its stages' ``python`` being this one."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env).returncode


class DvcExecutor:
    """``dvc repro``: the grid on this machine, one cell after another."""

    def run(self, project: Path) -> int:
        return _dvc(project, "repro")


class RayExecutor:
    """The grid's cells as Ray tasks on a cluster (``address``), or on a Ray started here (null).

    Args:
        address: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); null starts Ray here.
        num_cpus: CPUs of the Ray started here (null: all); ignored when joining a cluster.
        cpus_per_cell, gpus_per_cell: what each cell's task asks Ray for (its threads: Ray sets
            ``OMP_NUM_THREADS`` to the CPUs a task holds).
        retries: how many times a failed or lost task runs again.
        data_dir: the data folder as every node sees it (null: this project's ``data/``; on several
            machines a shared mount, or the same path filled by ``dvc pull`` on each).
        report: run the report stage on the head when every cell has finished.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_cell: float = 1,
                 gpus_per_cell: float = 0, retries: int = 2, data_dir: str | None = None, report: bool = True):
        for name, value in (("cpus_per_cell", cpus_per_cell), ("gpus_per_cell", gpus_per_cell)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"executor.{name}={value} must be a number >= 0")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"executor.retries={retries} must be an integer >= 0")
        self.address, self.num_cpus = address or None, num_cpus
        self.cpus_per_cell, self.gpus_per_cell, self.retries = cpus_per_cell, gpus_per_cell, retries
        self.data_dir, self.report = data_dir, report

    def _tracking_uri(self, project: Path, nodes: int) -> str:
        """The store every task writes to: ``MLFLOW_TRACKING_URI`` (a server on a cluster), else the
        project's SQLite file by its absolute path (one machine only)."""
        from prunegrid import tracking

        uri = tracking.resolve_uri()
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        if local and nodes > 1:
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is on this machine, but the Ray cluster has {nodes} "
                              "nodes: start a tracking server every node reaches (bash scripts/head.sh start) "
                              "and export its MLFLOW_TRACKING_URI")
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{(project / uri.removeprefix('sqlite:///')).resolve()}"
        return uri

    def run(self, project: Path) -> int:
        import ray
        from tqdm import tqdm

        project = project.resolve()
        data_dir = Path(self.data_dir).expanduser() if self.data_dir else project / "data"
        if not data_dir.is_dir():
            raise ConfigError(f"executor.data_dir={data_dir} is not a folder; restore the data first "
                              "(python -m prunegrid.data.fetch, or dvc pull)")
        stages, report = plan(project)
        runtime_env = {"working_dir": str(project), "excludes": RAY_EXCLUDES}
        init: dict[str, Any] = {"address": self.address or "local", "runtime_env": runtime_env,
                                "log_to_driver": False, "configure_logging": False}
        if self.address is None:  # a Ray of its own, even where a cluster runs (`ray start`)
            init.update(num_cpus=self.num_cpus, include_dashboard=False)
        ray.init(**init)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            uri = self._tracking_uri(project, len(nodes))
            grid_run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            ctx = TaskContext(grid_run, uri, str(data_dir.resolve()),
                              str(Path(tempfile.gettempdir()) / "prunegrid-logs" / grid_run))
            return self._run(ray, tqdm, project, stages, report, ctx, len(nodes))
        finally:
            ray.shutdown()

    def _run(self, ray, tqdm, project: Path, stages: list[Stage], report: Stage | None, ctx: TaskContext,
             nodes: int) -> int:
        todo = [s for s in stages if s.changed]
        print(f"prunegrid: grid run {ctx.grid_run} on Ray ({nodes} node(s), {ray.cluster_resources().get('CPU', 0):g} "
              f"CPUs): {len(todo)} of {len(stages)} stages to run, {self.cpus_per_cell:g} CPU / "
              f"{self.gpus_per_cell:g} GPU each, {self.retries} retries; tracking {ctx.tracking_uri}; "
              f"cell logs under {ctx.log_dir} on each node", file=sys.stderr)
        task = ray.remote(run_stage)
        options = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell, "max_retries": self.retries,
                   "retry_exceptions": [CellFailed]}
        refs: dict[str, Any] = {}
        for s in stages:
            if not s.changed:  # up to date: its outputs, from the project, for the stages after it
                refs[s.name] = ray.put({"files": collect(project, s.outs)})
                continue
            refs[s.name] = task.options(name=s.name, **options).remote(s, ctx, *[refs[u] for u in s.upstream if u in refs])
        pending = {refs[s.name]: s for s in todo}
        failed: list[str] = []
        with tqdm(total=len(todo), desc="grid cells", unit="cell", file=sys.stderr) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ready[0])
                try:
                    out = ray.get(ready[0])
                except Exception as exc:
                    failed.append(s.name)
                    cause = getattr(exc, "cause", None) or exc
                    bar.write(f"prunegrid: {s.name} FAILED: {str(cause).strip().splitlines()[-1][:300]}")
                else:
                    write(project, out["files"], replace=s.outs)
                    commit(project, s.name)
                    bar.write(f"prunegrid: {s.name} done on {out['host']} in {out['seconds']:.0f} s"
                              + (" (its FINISHED run reused)" if out.get("reused") else ""))
                bar.update(1)
        dead = mark_dead(ctx.tracking_uri, ctx.grid_run, None, "its Ray task ended without finishing it")
        if dead:
            print(f"prunegrid: {len(dead)} run(s) left RUNNING by lost attempts marked KILLED", file=sys.stderr)
        if failed:
            print(f"prunegrid: {len(failed)} of {len(todo)} stages failed ({', '.join(failed[:5])}); the report "
                  "stage is not run. Run the same command again to retry them.", file=sys.stderr)
            return 1
        if report is not None and self.report:
            return _dvc(project, "repro", "--single-item", report.name)
        return 0
