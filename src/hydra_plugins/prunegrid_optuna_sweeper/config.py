"""The sweeper's settings (``hydra.sweeper.*``), registered as ``hydra/sweeper=optuna``."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.prunegrid_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner itself (a bad _target_ is one line)

    # an Optuna sampler (_target_ and its arguments); a re-run of a study re-seeds it with seed + trials so far
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    # an Optuna pruner for single-objective studies (null: none); trials report val/acc after each validation
    pruner: Optional[Dict[str, Any]] = field(default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner"})
    # maximize|minimize, or a list with one per optimized_metric key (a multi-objective study)
    direction: Any = "maximize"
    # any Optuna database URL (sqlite:///..., postgresql+psycopg2://..., mysql://...); null: in memory, not kept.
    # Default: $PRUNEGRID_OPTUNA_STORAGE (`python -m prunegrid.head start` prints it), else optuna.db here
    storage: Optional[str] = "${oc.env:PRUNEGRID_OPTUNA_STORAGE,sqlite:///optuna.db}"
    # the same storage and study_name load the study: a re-run adds n_trials trials to it
    study_name: Optional[str] = "${hydra.job.name}-${hydra.runtime.choices.prune}"
    n_trials: int = 20        # trials this run adds (PRUNED and FAIL count); unused with max_complete
    # a study-wide target for several workers (processes on the same storage + study_name, started anywhere):
    # each runs trials until the study holds exactly this many COMPLETE trials, every worker's counted; it
    # waits while others' RUNNING trials may still complete and runs more when one FAILs or is PRUNED.
    # null: n_trials decides
    max_complete: Optional[int] = None
    n_jobs: int = 1           # trials asked for at once and handed to the launcher as one batch
    max_failure_rate: float = 0.0  # a batch with more FAIL trials than this share ends the sweep with the error
    # the search space: {key: "interval(0.1, 0.9)" | "tag(log, interval(1e-4, 1e-2))" | "int(interval(2, 12))" |
    # "choice(a, b)" | "range(2, 12)" (12 excluded) | a fixed value}; command-line sweep overrides add to it
    params: Dict[str, Any] = field(default_factory=dict)
    report_dir: str = "reports/sweeps"  # <report_dir>/<study_name>/pareto.{csv,md,png}


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="prunegrid")
