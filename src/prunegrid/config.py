"""Config helpers shared by ``train.py``, the tests, the grid and the sweeps.

Every option of a config group is one YAML in ``conf/<group>/`` with a ``name`` key equal to
its file name; :func:`build` instantiates such a node without passing ``name`` on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
        return hydra_compose(config_name=config_name, overrides=overrides)


def build(node: DictConfig | None, **kwargs: Any) -> Any:
    """Instantiate a group node (``_target_``), dropping its ``name`` label."""
    if node is None:
        return None
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("name", None)
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


def cell(cfg: DictConfig) -> dict[str, str]:
    """The cell a config describes: the option names of the cell groups, plus the seed."""
    return {**{g: str(cfg[g].name) for g in CELL_GROUPS}, "seed": str(cfg.seed)}
