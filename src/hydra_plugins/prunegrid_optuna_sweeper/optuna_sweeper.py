"""The ``Sweeper`` Hydra instantiates for ``hydra/sweeper=optuna`` (see :mod:`._impl`)."""

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Hydra sweeper on Optuna >= 4 with prunegrid's MLflow parent run, pruning, interruption
    handling, Pareto front and model registry (settings: :class:`.config.OptunaSweeperConf`)."""

    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, params: Optional[DictConfig], pruner: Optional[DictConfig] = None,
                 max_failure_rate: float = 0.0, report_dir: str = "reports/sweeps",
                 max_complete: Optional[int] = None) -> None:
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(sampler=sampler, direction=direction, storage=storage,
                                         study_name=study_name, n_trials=n_trials, n_jobs=n_jobs, params=params,
                                         pruner=pruner, max_failure_rate=max_failure_rate, report_dir=report_dir,
                                         max_complete=max_complete)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.sweeper.sweep(arguments)
