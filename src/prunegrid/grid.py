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

This module imports no torch at import time: Hydra imports it in every process through
``src/hydra_plugins/prunegrid_grid.py`` so the resolvers exist wherever the config resolves.
Reading a method's class (to learn ``from_baseline``) imports that class, on demand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from prunegrid.budget import BASELINE, reference_name
from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError

LISTS = {"backbones": "backbone", "prunes": "prune", "datasets": "dataset", "losses": "loss"}
KINDS = ("all", "from_baseline", "scratch")
GRID_CONFIG = "grid"
PARAMS_FILE = "params.yaml"


def _conf_dir() -> Path:
    """``./conf`` when it holds ``grid.yaml`` (the project DVC runs in, as DVC's ``config_dir``), else the package's."""
    from prunegrid.config import conf_dir

    local = Path.cwd() / "conf"
    return local if (local / f"{GRID_CONFIG}.yaml").is_file() else conf_dir()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (_conf_dir() / group).glob("*.yaml"))


def _method_yaml(method: str) -> dict:
    return yaml.safe_load((_conf_dir() / "prune" / f"{method}.yaml").read_text()) or {}


def method_class(method: str) -> type:
    """The class ``conf/prune/<method>.yaml`` builds (its ``_target_``)."""
    from hydra.utils import get_class

    target = _method_yaml(method).get("_target_")
    if not target:
        raise ConfigError(f"conf/prune/{method}.yaml has no _target_")
    return get_class(target)


def from_baseline(method: str) -> bool:
    """Whether the method's class declares that it lightens a trained baseline."""
    return bool(getattr(method_class(method), "from_baseline", False))


def finetune_epochs(method: str) -> int:
    """The method's ``finetune_epochs``: its YAML's value, else its class's default."""
    import inspect

    data = _method_yaml(method)
    if "finetune_epochs" in data:
        return int(data["finetune_epochs"] or 0)
    param = inspect.signature(method_class(method)).parameters.get("finetune_epochs")
    return int(param.default) if param is not None and param.default is not inspect.Parameter.empty else 0


def _names(spec: Any, key: str) -> list[str]:
    group = LISTS[key]
    valid = _options(group)
    if isinstance(spec, str) and spec == "all":
        return valid
    if isinstance(spec, str) or spec is None:
        spec = [spec] if spec else []
    names = [str(v) for v in spec]
    if not names:
        raise ConfigError(f"grid.{key} is empty; name at least one of: {', '.join(valid)} (or 'all')")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"grid.{key} names unknown {group} '{unknown[0]}'; valid options: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def prunes(spec: Any, kind: str = "all") -> list[str]:
    """Methods of ``grid.prunes`` (``all`` or a list): every one, or only those (not) from a baseline."""
    if kind not in KINDS:
        raise ConfigError(f"grid_prunes kind '{kind}' must be one of {', '.join(KINDS)}")
    names = _names(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec, "prunes")
    if kind == "all":
        return names
    methods = [n for n in names if n != BASELINE]
    return [n for n in methods if from_baseline(n) == (kind == "from_baseline")]


def references(spec: Any) -> list[dict]:
    """The equal-budget reference cells of the methods in ``grid.prunes``: one per distinct
    ``finetune_epochs`` > 0, as ``{"prune": "none_ft<F>", "finetune": F}``."""
    epochs = sorted({finetune_epochs(m) for m in prunes(spec) if m != BASELINE} - {0})
    return [{"prune": reference_name(f), "finetune": f} for f in epochs]


def _plain(spec: Any) -> Any:
    return OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec


def tradeoff(strengths: Any, controls: Any, backbones: Any, datasets: Any, losses: Any, seeds: Any) -> dict:
    """The extra cells of the trade-off curves: every method of ``strengths`` at each of its values and,
    at each value, every control of ``controls`` the method offers; for every backbone, data set, loss
    and seed. Keyed by the cell's name (``resnet18-channel-r0.7-random-fashion_mnist-cross_entropy-s1``);
    each item holds what ``dvc.yaml``'s ``tradeoff`` stage needs: ``prune`` (the YAML), ``label``,
    ``args`` (the method options), ``start`` (how the cell starts from the baseline cell's model) and
    ``base`` (that model)."""
    from prunegrid.strength import CONTROLS, fmt, prune_label

    strengths, controls = _plain(strengths) or {}, _plain(controls) or []
    if not isinstance(strengths, dict):
        raise ConfigError(f"grid.strengths={strengths} must map methods to lists of strengths, e.g. "
                          "grid.strengths={channel:[0.3,0.5,0.7]}")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ConfigError(f"grid.controls names unknown control '{unknown[0]}'; valid: {', '.join(CONTROLS)}")
    out: dict[str, dict] = {}
    for method, values in strengths.items():
        if method not in _options("prune"):
            raise ConfigError(f"grid.strengths names unknown prune '{method}'; valid options: {', '.join(_options('prune'))}")
        data = _method_yaml(method)
        knob = data.get("strength")
        if not knob:
            raise ConfigError(f"grid.strengths.{method}: conf/prune/{method}.yaml names no strength "
                              "(add `strength: <option>`)")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"grid.strengths.{method} is empty; give a list of {knob} values")
        offered = getattr(method_class(method), "controls", ())
        start = "++prune.baseline_ckpt" if from_baseline(method) else "++budget.match"
        for value in dict.fromkeys(values):
            for control in [None] + [c for c in controls if c in offered]:
                sets = CONTROLS[control] if control else {}
                label = prune_label(method, {**data, knob: value, **sets}, data.get(knob))
                if label == method:
                    continue
                args = " ".join([f"prune.{knob}={fmt(value)}",
                                 *(f"prune.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items())])
                for b, d, lo, s in _product(backbones, datasets, losses, seeds):
                    base = f"models/{b}-{BASELINE}-{d}-{lo}-s{s}.pt"
                    out[f"{b}-{label}-{d}-{lo}-s{s}"] = {
                        "backbone": b, "prune": method, "label": label, "dataset": d, "loss": lo, "seed": s,
                        "args": args, "start": f"{start}={base}", "base": base}
    return out


def _product(*lists: Any):
    import itertools

    return itertools.product(*(_plain(x) for x in lists))


def _register() -> None:
    resolvers = {
        "grid_prunes": lambda spec, kind="all": OmegaConf.create(prunes(spec, kind)),
        "grid_references": lambda spec: OmegaConf.create(references(_plain(spec))),
        "grid_tradeoff": lambda *a: OmegaConf.create(tradeoff(*a)),
        "grid_baseline": lambda: BASELINE,
        "reference_name": lambda epochs: reference_name(epochs),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register()


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
