"""The grid's lists as OmegaConf resolvers, registered on import.

``grid.prunes: all`` in ``conf/grid.yaml`` means every YAML in ``conf/prune/``. ``grid_prunes``
splits the methods by what their class declares (``PruningMethod.from_baseline``): those that
lighten a trained baseline and those that train from scratch. ``grid_references`` lists the
equal-budget reference cells (``prune=none`` fine-tuned for each distinct ``finetune_epochs`` of
the methods: ``none_ft1``, ...). ``grid_tradeoff`` expands ``grid.strengths`` and ``grid.controls``
into the trade-off curves' extra cells. :mod:`prunegrid.grid` checks the lists and writes
``params.yaml``; this module holds what the config needs to resolve, so the config loader imports it
without the grid's command line.

No torch at import time: Hydra imports it in every process through
``src/hydra_plugins/prunegrid_grid.py``. Reading a method's class (to learn ``from_baseline``)
imports that class, on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from prunegrid.budget import BASELINE, reference_name
from prunegrid.errors import ConfigError

LISTS = {"backbones": "backbone", "prunes": "prune", "datasets": "dataset", "losses": "loss"}
KINDS = ("all", "from_baseline", "scratch")
GRID_CONFIG = "grid"
PARAMS_FILE = "params.yaml"


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> Path:
    """The ``conf/`` directory of this checkout."""
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} not found; run from a prunegrid checkout")
    return CONF_DIR


def _conf_dir() -> Path:
    """``./conf`` when it holds ``grid.yaml`` (the project DVC runs in, as DVC's ``config_dir``), else the package's."""
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
