"""The comparison grid's lists: what ``dvc.yaml``'s matrix stages expand over.

``conf/grid.yaml`` holds the lists (``grid.backbones``, ``grid.prunes``, ``grid.datasets``,
``grid.losses``, ``grid.seeds``) and ``grid.overrides``, Hydra overrides given to every
cell. DVC composes that file into ``params.yaml`` (``dvc exp run -S grid.seeds=[1,2]``, with
``[hydra]`` enabled in ``.dvc/config``); ``python -m prunegrid.grid`` writes the same file
with the same DVC function after checking the lists, for a plain ``dvc repro``.

``grid.prunes: all`` means every YAML in ``conf/prune/``, so a new method joins the grid with
no change to ``dvc.yaml``. The resolver ``grid_prunes`` splits the methods by what their class
declares (``PruningMethod.from_baseline``): those that lighten a trained baseline (their stage
loads the ``prune=none`` cell's model) and those that train from scratch (their stage trains as
many epochs as that baseline did, read from its model). ``grid_references`` lists the
equal-budget reference cells the grid must train: ``prune=none`` fine-tuned for each distinct
``finetune_epochs`` of the methods (``none_ft1``, ...), so every method's accuracy is compared
with a model trained for the same total epochs.

Trade-off curves (``+experiment=tradeoff``): ``grid.strengths`` maps methods to the values of the
strength their YAML names (``strength: ratio``), and ``grid.controls`` lists the controls
(:data:`prunegrid.strength.CONTROLS`) to run beside them at the same strengths and seeds, where the
method offers them. The resolver ``grid_tradeoff`` expands them into one item per extra cell, keyed by
the cell's name, for ``dvc.yaml``'s ``tradeoff`` stage; the method at its YAML's own strength is the
grid's ordinary cell.

The resolvers themselves live in :mod:`prunegrid.resolvers`, which the config loader imports.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prunegrid.budget import BASELINE
from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError
from prunegrid.resolvers import (  # noqa: F401  (the grid's lists, also used as grid.prunes(...) etc.)
    GRID_CONFIG, LISTS, PARAMS_FILE, _conf_dir, _names, _options, finetune_epochs,
    from_baseline, method_class, prunes, references, tradeoff)

def check(grid: dict) -> dict:
    """Validate the grid lists; return them. One-line :class:`ConfigError` on bad input."""
    for key in LISTS:
        _names(grid.get(key), key)
    seeds = grid.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError("grid.seeds is empty; give a list of integers, e.g. grid.seeds=[42]")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"grid.seeds={seeds} must be integers")
    if not isinstance(grid.get("overrides", ""), str):
        raise ConfigError("grid.overrides must be one string of space-separated Hydra overrides")
    from prunegrid.config import check_overrides

    overrides = str(grid.get("overrides") or "").split()
    check_overrides(overrides)
    fixed = [o for o in overrides if o.lstrip("+~").split("=")[0] in ("prune.finetune_epochs", "prune.baseline_ckpt",
                                                                      "budget.match")]
    if fixed:
        raise ConfigError(f"grid.overrides may not set {fixed[0].split('=')[0]}: the grid derives it (equal-budget "
                          "references); set finetune_epochs in conf/prune/<method>.yaml")
    strengths = grid.get("strengths") or {}
    outside = [m for m in strengths if m in _options("prune") and m not in prunes(grid.get("prunes"))]
    if outside:
        raise ConfigError(f"grid.strengths.{outside[0]}: {outside[0]} is not in grid.prunes; add it there, so its "
                          "own cell and its equal-budget reference are in the grid too")
    tradeoff(strengths, grid.get("controls"), grid["backbones"], grid["datasets"], grid["losses"], seeds)
    return grid


def cells(grid: dict) -> list[dict[str, str]]:
    """Every cell of a resolved grid (baseline cells included)."""
    import itertools

    out = []
    refs = [r["prune"] for r in grid.get("references", [])]
    prune_list = list(dict.fromkeys([BASELINE, *refs, *grid["methods"]["from_baseline"], *grid["methods"]["scratch"]]))
    for b, p, d, lo, s in itertools.product(grid["backbones"], prune_list, grid["datasets"], grid["losses"],
                                            grid["seeds"]):
        out.append({"backbone": b, "prune": p, "dataset": d, "loss": lo, "seed": str(s)})
    for item in (grid.get("tradeoff") or {}).values():
        out.append({"backbone": item["backbone"], "prune": item["label"], "dataset": item["dataset"],
                    "loss": item["loss"], "seed": str(item["seed"])})
    return out


def compose_grid(overrides: list[str] = ()) -> dict:
    """Compose ``conf/grid.yaml`` with overrides, resolved and checked."""
    from hydra import compose, initialize_config_dir

    from prunegrid.config import check_overrides

    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(_conf_dir()), version_base=None):
        cfg = compose(config_name=GRID_CONFIG, overrides=list(overrides))
    if "grid" not in cfg:
        raise ConfigError("conf/grid.yaml has no 'grid' section")
    check(OmegaConf.to_container(cfg.grid, resolve=False))
    data = OmegaConf.to_container(cfg, resolve=True)
    return data


def write_params(overrides: list[str] = (), output: str | Path = PARAMS_FILE) -> dict:
    """Write ``params.yaml`` exactly as ``dvc exp run`` would (DVC's own Hydra composition)."""
    from dvc.utils.hydra import compose_and_dump

    data = compose_grid(overrides)
    compose_and_dump(str(output), str(_conf_dir()), None, GRID_CONFIG, str(_conf_dir().parent / "src"),
                     list(overrides))
    return data


def executors() -> list[str]:
    return _options("executor")


def build_executor(name: str, overrides: list[str] = ()) -> Any:
    """The executor ``conf/executor/<name>.yaml`` builds, with ``executor.*`` overrides."""
    from hydra import compose, initialize_config_dir

    from prunegrid.config import build

    valid = executors()
    if name not in valid:
        raise ConfigError(f"--executor {name}: valid executors are {', '.join(valid)}")
    with initialize_config_dir(config_dir=str(_conf_dir()), version_base=None):
        cfg = compose(config_name=GRID_CONFIG, overrides=[f"+executor={name}", *overrides])
    return build(cfg.executor)


def run_main(argv: list[str]) -> int:
    """``python -m prunegrid.grid run``: write params.yaml, then run the grid with an executor."""
    parser = ArgumentParser(prog="python -m prunegrid.grid run",
                            description="Run the grid: write params.yaml from conf/grid.yaml, run every stage of "
                                        "dvc.yaml with an executor (local: `dvc repro` here; ray: Ray tasks), then "
                                        "the report.")
    parser.add_argument("overrides", nargs="*", help="grid.* overrides of conf/grid.yaml and executor.* "
                                                     "overrides of conf/executor/<name>.yaml")
    parser.add_argument("--executor", default="local", help="conf/executor/<name>.yaml: local (dvc repro here, the default) or ray")
    parser.add_argument("--address", default=None, help="Ray: the cluster to join (auto, host:6379, "
                                                        "ray://host:10001); default: start Ray here")
    args = parser.parse_args(argv)
    mine = [o for o in args.overrides if o.lstrip("+~").startswith("executor.")]
    rest = [o for o in args.overrides if o not in mine]
    if args.address:
        mine.append(f"executor.address={args.address}")
    with guard():
        from prunegrid.data.fetch import fetch

        executor = build_executor(args.executor, mine)
        root = _conf_dir().parent
        fetch(root / "data" / "fashion_mnist", root)
        data = write_params(rest)
        print(f"{PARAMS_FILE}: {len(cells(data['grid']))} cells; executor {args.executor}", file=sys.stderr)
        return executor.run(root)


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return run_main(argv[1:])
    parser = ArgumentParser(prog="python -m prunegrid.grid",
                            description="Write params.yaml (the grid lists for dvc.yaml) from conf/grid.yaml.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. grid.seeds=[1,2,3] +experiment=paper_grid "
                                                     "(`python -m prunegrid.grid run --help`: run the grid too)")
    parser.add_argument("--output", default=PARAMS_FILE, help=f"file to write (default: {PARAMS_FILE})")
    args = parser.parse_args(argv)
    with guard():  # also Hydra's errors about the overrides (unknown key, bad syntax)
        data = write_params(args.overrides, args.output)
    grid = data["grid"]
    n = len(cells(grid))
    print(f"{args.output}: {n} cells = {len(grid['backbones'])} backbones x "
          f"{1 + len(grid.get('references', [])) + len(grid['methods']['from_baseline']) + len(grid['methods']['scratch'])}"
          f" prunes (references {', '.join(r['prune'] for r in grid.get('references', [])) or '-'}) x "
          f"{len(grid['datasets'])} datasets x {len(grid['losses'])} losses x {len(grid['seeds'])} seeds; "
          f"methods from the baseline model: {', '.join(grid['methods']['from_baseline']) or '-'}; "
          f"trained from scratch: {', '.join(grid['methods']['scratch']) or '-'}"
          + (f"; trade-off cells (strengths x controls x seeds): {len(grid['tradeoff'])}" if grid.get("tradeoff") else ""))


if __name__ == "__main__":
    sys.exit(main())
