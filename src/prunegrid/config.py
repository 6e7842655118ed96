"""Config helpers shared by ``train.py``, the tests, the grid and the sweeps.

Every option of a config group is one YAML in ``conf/<group>/``. A cell is labelled by the option
chosen in each cell group (Hydra's runtime choices); a YAML may compute its own ``label`` instead
(``none`` with fine-tuning is ``none_ftF``; the generic backbones add their ``arch``).
:func:`build` instantiates a node without passing ``label`` on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import prunegrid.grid  # noqa: F401  (registers the config resolvers, e.g. reference_name)
from prunegrid.errors import ConfigError, PrunegridError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("backbone", "prune", "dataset", "loss", "optimizer", "scheduler", "trainer", "tracking")
CELL_GROUPS = ("backbone", "prune", "dataset", "loss")


def conf_dir() -> Path:
    """The ``conf/`` directory of this checkout."""
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} not found; run from a prunegrid checkout")
    return CONF_DIR


def options(group: str) -> list[str]:
    """Names of the options (YAML files) of a config group."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def check_overrides(overrides: Iterable[str]) -> None:
    """Reject ``group=option`` overrides naming an option that does not exist, in one line.

    Hydra's own message spans several lines and a stack trace hint; this runs first so the
    user sees which options are valid.
    """
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or "," in value or value.startswith(("choice(", "range(")):
            continue
        if value and value != "null" and value not in options(key):
            raise ConfigError(f"unknown {key} '{value}'; valid options: {', '.join(options(key))}")


def compose(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the project config like ``train.py`` would, without running anything."""
    overrides = list(overrides)
    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    picked = {g: str(v) for g, v in cfg.hydra.runtime.choices.items() if g in CELL_GROUPS and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
        if picked:
            cfg.choices = picked
    return cfg


def build(node: DictConfig | None, **kwargs: Any) -> Any:
    """Instantiate a group node (``_target_``), dropping its ``name`` label."""
    if node is None:
        return None
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("label", None)
    try:
        return instantiate(data, **kwargs)
    except InstantiationException as exc:  # keep our one-line errors one line
        if isinstance(exc.__cause__, PrunegridError):
            raise exc.__cause__ from None
        raise


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a resolved config with dotted keys (``prune.amount``), for MLflow params."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each cell group: recorded by :func:`compose`, else Hydra's runtime choices
    (``train.py``, multirun jobs)."""
    if cfg.get("choices"):
        return {k: str(v) for k, v in cfg.choices.items()}
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("the config was not composed by Hydra; compose it with prunegrid.config.compose")
    return {g: str(v) for g, v in HydraConfig.get().runtime.choices.items() if g in CELL_GROUPS}


def with_choices(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the option chosen in each cell group recorded under ``choices`` (logged as the
    ``choices.*`` params), whether it came from :func:`compose` or from ``@hydra.main``."""
    if not cfg.get("choices"):
        picked = choices(cfg)
        with open_dict(cfg):
            cfg.choices = picked
    return cfg


def cell(cfg: DictConfig) -> dict[str, str]:
    """The cell a config describes: the option chosen in each cell group (or the label its YAML
    computes), plus the seed."""
    picked = choices(cfg)
    return {**{g: str(cfg[g].get("label") or picked[g]) for g in CELL_GROUPS}, "seed": str(cfg.seed)}
