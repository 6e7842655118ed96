"""Train, lighten, measure and track one cell: ``python train.py backbone=resnet50 prune=layer_importance``."""

import sys

import hydra
from omegaconf import DictConfig

from prunegrid.cli import guard, precheck


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from prunegrid.pipeline import run

    with guard():
        return float(run(cfg)["test/acc"])


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
