"""Train, lighten, measure and track one cell: ``python train.py backbone=resnet50 prune=layer_importance``.

Returns the run's ``optimized_metric`` (a float, or a list of them), so ``python train.py -m sweep=l1``
(or ``-m hydra/sweeper=optuna ...``) sweeps it with Optuna.
"""

import sys

import hydra
from omegaconf import DictConfig

from prunegrid.cli import guard
from prunegrid.config import precheck


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | list[float]:
    from prunegrid.pipeline import run
    from prunegrid.sweep import objective_keys, objective_values

    with guard():
        keys = objective_keys(cfg.get("optimized_metric"))
        return objective_values(run(cfg), keys)


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
