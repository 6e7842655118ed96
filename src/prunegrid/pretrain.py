"""``python -m prunegrid.pretrain``: the grid's ``pretrain`` stage (transfer learning offline).

Layer Importance Evaluation (Jin & Song) and the ResNet transfer-learning recipe start from
ImageNet-pretrained backbones, whose weights cannot be downloaded here. This stage stands in for
that: when the grid's cells set ``transfer.source=<dataset>`` (in ``grid.overrides``), it trains
every grid backbone on that source task (``prune=none``, ``grid.pretrain.overrides``) and saves
the state dict where the cells look for it (:func:`prunegrid.pipeline.pretrained_path`); the
cells then load those feature weights and train a new head on their own (target) task. Without
``transfer.source`` it trains nothing. On a machine with internet, ``backbone.pretrained=true``
takes the ImageNet weights instead.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError

README = "Source-task weights written by `python -m prunegrid.pretrain` (the grid's pretrain stage).\n"


def plan(grid: dict) -> tuple[str | None, str, list[str]]:
    """``(source, weights dir, backbones)`` of a grid: what the stage would train."""
    from prunegrid.config import compose

    cell = compose([f"backbone={grid['backbones'][0]}", *str(grid.get("overrides") or "").split()])
    return cell.transfer.get("source"), str(cell.transfer.dir), list(grid["backbones"])


def pretrain(grid: dict) -> list[Path]:
    """Train each grid backbone on the source task; return the weight files written."""
    from prunegrid.config import compose, options

    source, folder, backbones = plan(grid)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "README.txt").write_text(README)
    if not source:
        print("prunegrid: pretrain: no transfer.source in grid.overrides; nothing to train")
        return []
    from prunegrid.pipeline import pretrained_path, run  # torch and Lightning: only when there is work
    if source not in options("dataset"):
        raise ConfigError(f"transfer.source={source} is not a dataset option; valid: {', '.join(options('dataset'))}")
    extra = str((grid.get("pretrain") or {}).get("overrides") or "").split()
    written = []
    for backbone in backbones:
        cfg = compose([f"backbone={backbone}", f"dataset={source}", "transfer.source=null", *extra])
        out = pretrained_path(compose([f"backbone={backbone}", f"transfer.source={source}", f"transfer.dir={folder}"]))
        cfg.paths.weights_out = str(out)
        print(f"prunegrid: pretrain {backbone} on {source} -> {out}")
        run(cfg)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m prunegrid.pretrain", description="Train the grid's backbones on the transfer "
                       "source task (grid.overrides' transfer.source), for the cells to start from.")
    p.add_argument("--params", default="params.yaml", help="the grid's params.yaml (python -m prunegrid.grid writes it)")
    args = p.parse_args(argv)
    with guard():
        path = Path(args.params)
        if not path.is_file():
            raise ConfigError(f"--params {path} not found; write it with `python -m prunegrid.grid`")
        grid = (yaml.safe_load(path.read_text()) or {}).get("grid")
        if not grid:
            raise ConfigError(f"{path} has no `grid` section; write it with `python -m prunegrid.grid`")
        pretrain(grid)


if __name__ == "__main__":
    main()
