"""What the grid report writes back to MLflow: a parent run per experiment and the best models.

- **Grid parent run** (:func:`start_parents`, :func:`nest`, :func:`finish`): the grid's cells are
  separate ``python train.py`` processes, top-level runs. For each experiment holding selected cells
  the report makes one run ``grid-<YYYYmmdd-HHMMSS>`` (tag ``prunegrid.kind=grid``), nests every
  selected cell under it (tag ``mlflow.parentRunId``; a cell already nested under a run that is not a
  grid parent, a sweep's, stays there), logs the report's files on it and ends it FINISHED.
- **Model registry** (:func:`register_best`): for each experiment and method (``prune``, the
  reference cells ``none``/``none_ftF`` included), the selected run with the highest
  ``val/final_acc`` (the validation split; ties: lower ``val/final_loss``), its logged model (tag
  ``model_uri``) registered as ``prunegrid-<experiment>`` with alias ``best-<prune>``. A run without
  ``val/final_acc`` is not a candidate; when the best run has no ``model_uri`` the method is skipped
  with a line saying why. An alias already on that very model is left as it is (no new version).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from prunegrid import tracking
from prunegrid.cli import message

KIND = "grid"
VAL_ACC, VAL_LOSS = tracking.VAL_FINAL_METRICS


def model_name(experiment: str) -> str:
    return f"prunegrid-{experiment}"


def alias(prune: str) -> str:
    """``best-<prune>``; MLflow aliases hold only word characters and ``-``, so a strength's dot becomes
    ``_`` (``best-channel-r0_7``)."""
    import re

    return "best-" + re.sub(r"[^\w-]", "_", prune)


@dataclass
class Registration:
    experiment: str
    prune: str
    run_id: str
    run_name: str
    val_acc: float
    model_uri: str = ""
    name: str = ""
    alias: str = ""
    version: str = ""
    status: str = ""   # "registered", "unchanged" (the alias already named this model), "skipped"
    why: str = ""

    def line(self) -> str:
        if self.status == "skipped":
            return f"prunegrid: registry: {self.experiment}/{self.prune}: not registered, {self.why}"
        return (f"prunegrid: registry: {self.name}@{self.alias} -> version {self.version} "
                f"({self.run_name}, val/final_acc {self.val_acc:.4f}, {self.model_uri}){' unchanged' if self.status == 'unchanged' else ''}")


def _model_id(model_uri: str) -> str:
    return model_uri.removeprefix("models:/").split("/")[0]


def best_runs(cells: pd.DataFrame) -> list[tuple[str, str, pd.Series | None]]:
    """(experiment_id, prune, best row or None) for every experiment and method of ``cells`` (rows with
    ``run_id``, ``experiment_id``, ``prune``, ``val/final_acc``, optional ``val/final_loss``)."""
    out = []
    for (exp_id, prune), g in cells.groupby(["experiment_id", "prune"], sort=False):
        acc = pd.to_numeric(g[VAL_ACC], errors="coerce") if VAL_ACC in g else pd.Series(np.nan, index=g.index)
        loss = pd.to_numeric(g[VAL_LOSS], errors="coerce") if VAL_LOSS in g else pd.Series(np.nan, index=g.index)
        ranked = g.assign(_a=acc, _l=loss.fillna(np.inf))[acc.notna()].sort_values(["_a", "_l", "run_id"],
                                                                                    ascending=[False, True, True])
        out.append((exp_id, prune, ranked.iloc[0] if len(ranked) else None))
    return out


def register_best(uri: str, cells: pd.DataFrame, experiments: dict[str, str],
                  log: Callable[[str], None] = print) -> list[Registration]:
    """Register the best model of each experiment × method (module docstring); one line each."""
    client = MlflowClient(uri)
    done = []
    for exp_id, prune, best in best_runs(cells):
        exp = experiments[exp_id]
        if best is None:
            reg = Registration(exp, prune, "", "", np.nan, status="skipped",
                               why=f"no run of it has {VAL_ACC} (logged before that metric existed)")
        else:
            reg = Registration(exp, prune, best["run_id"], str(best.get("run_name") or best["run_id"]),
                               float(best[VAL_ACC]), str(best.get("model_uri") or ""),
                               model_name(exp), alias(prune))
            if not reg.model_uri:
                reg.status = "skipped"
                reg.why = (f"its best run {reg.run_name} ({reg.run_id[:8]}, {VAL_ACC} {reg.val_acc:.4f}) has no "
                           f"'{tracking.TAG_MODEL_URI}' tag (no MLflow model logged with it)")
            else:
                try:
                    current = client.get_model_version_by_alias(reg.name, reg.alias)
                except Exception:  # no such model or alias yet
                    current = None
                if current is not None and _model_id(reg.model_uri) in (current.model_id, _model_id(current.source or "")):
                    reg.version, reg.status = str(current.version), "unchanged"
                else:
                    try:
                        reg.version = tracking.register_model(uri, reg.model_uri, reg.name, [reg.alias])
                        reg.status = "registered"
                    except MlflowException as exc:  # the logged model was deleted, a registry that refuses
                        reg.status = "skipped"
                        reg.why = f"registering {reg.model_uri} failed: {message(exc)}"
        log(reg.line())
        done.append(reg)
    return done


def registry_markdown(regs: list[Registration]) -> list[str]:
    if not regs:
        return []
    lines = ["", "## Registered models", "",
             f"The best run of each method by `{VAL_ACC}` (validation split; never the test split), its MLflow "
             "model registered under `prunegrid-<experiment>` with alias `best-<prune>`: load it with "
             "`mlflow.pyfunc.load_model(\"models:/<name>@<alias>\")`.", "",
             "| model | alias | version | run | val/final_acc | model URI | note |", "|---|---|---|---|---|---|---|"]
    for r in regs:
        if r.status == "skipped":
            lines.append(f"| prunegrid-{r.experiment} | best-{r.prune} |  | {r.run_name} | "
                         f"{'' if np.isnan(r.val_acc) else f'{r.val_acc:.4f}'} |  | not registered: {r.why} |")
        else:
            lines.append(f"| {r.name} | {r.alias} | {r.version} | {r.run_name} | {r.val_acc:.4f} | {r.model_uri} | "
                         f"{'alias already on this model' if r.status == 'unchanged' else 'new version'} |")
    return lines


def start_parents(uri: str, experiments: dict[str, str], grid: dict | None = None) -> dict[str, str]:
    """One running grid parent run per experiment id in ``experiments`` (id -> name); id -> run id."""
    client = MlflowClient(uri)
    name = f"grid-{time.strftime('%Y%m%d-%H%M%S')}"
    commit = tracking.git_commit()
    tags = {tracking.TAG_RUN_KIND: KIND, "git_commit": commit, **tracking.source_tags(commit),
            "mlflow.source.name": "prunegrid.report",
            "mlflow.note.content": "The comparison grid: every selected cell run is nested under this run; the "
                                   "report's tables and figures are its artifacts (grid.md, grid.csv, *.png)."}
    parents = {}
    for exp_id, exp in experiments.items():
        run_id = tracking.start_parent_run(uri, exp, name, tags)
        if grid:
            params = {f"grid.{k}": v for k, v in grid.items() if k in ("backbones", "prunes", "datasets", "losses",
                                                                       "seeds", "overrides", "baseline")}
            methods = grid.get("methods") or {}
            params["grid.methods"] = [*methods.get("from_baseline", []), *methods.get("scratch", [])]
            client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        parents[exp_id] = run_id
    return parents


def nest(uri: str, parents: dict[str, str], cells: pd.DataFrame, log: Callable[[str], None] = print) -> list[str]:
    """Set ``mlflow.parentRunId`` of every row of ``cells`` to its experiment's grid parent; a run
    nested under a run that is not a grid parent (a sweep's) keeps it. The run ids nested."""
    client = MlflowClient(uri)
    kinds: dict[str, str] = {}
    nested = []
    for _, r in cells.iterrows():
        parent = parents.get(r["experiment_id"])
        if not parent:
            continue
        old = str(r.get("parent_run_id") or "")
        if old and old != parent:
            if old not in kinds:
                try:
                    kinds[old] = client.get_run(old).data.tags.get(tracking.TAG_RUN_KIND, "")
                except Exception:  # the old parent was deleted
                    kinds[old] = KIND
            if kinds[old] != KIND:
                log(f"prunegrid: run {r.get('run_name') or r['run_id']} stays nested under its "
                    f"{kinds[old] or 'parent'} run {old[:8]} (not moved into the grid run)")
                continue
        client.set_tag(r["run_id"], tracking.TAG_PARENT_RUN, parent)
        nested.append(r["run_id"])
    return nested


def log_deltas(uri: str, table: pd.DataFrame) -> None:
    """Each cell's delta against its equal-budget reference and the plain baseline, as the report computed
    them, logged on the cell's run (``grid/acc_delta_pt``, ``grid/acc_delta_pt_vs_base``): the runs table's
    preset shows them beside ``test/acc``."""
    from mlflow.entities import Metric

    client, now = MlflowClient(uri), int(time.time() * 1000)
    for _, r in table.iterrows():
        values = {tracking.GRID_DELTA: r.get("acc_delta_pt"), tracking.GRID_DELTA_BASE: r.get("acc_delta_pt_vs_base")}
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and np.isfinite(v)]
        if metrics:
            client.log_batch(r["run_id"], metrics=metrics)


def description(experiment_id: str, run_id: str, files: list[Path]) -> str:
    """The grid parent's description (``mlflow.note.content``, markdown): a link that opens ``grid.html`` in
    this run's artifact view, where the UI renders it."""
    text = ("The comparison grid: every selected cell run is nested under this run; the report's tables and "
            "figures are its artifacts (grid.md, grid.csv, *.png).")
    if any(Path(f).name == "grid.html" for f in files):
        text = (f"**[Open the grid page (grid.html)](#/experiments/{experiment_id}/runs/{run_id}/artifacts/grid.html)**"
                " — the sortable summary, the trade-off and Pareto figures and every seed.\n\n" + text)
    return text


def finish(uri: str, parents: dict[str, str], files: list[Path], status: str = "FINISHED") -> None:
    """Log ``files`` (at the artifact root) on every parent run, link ``grid.html`` from its description and
    end it with ``status``."""
    client = MlflowClient(uri)
    for exp_id, run_id in parents.items():
        try:
            if status == "FINISHED":
                for f in files:
                    client.log_artifact(run_id, str(f))
                client.set_tag(run_id, "mlflow.note.content", description(exp_id, run_id, files))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, status)
