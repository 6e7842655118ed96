"""Config helpers shared by ``train.py``, the tests, the grid and the sweeps.

Every option of a config group is one YAML in ``conf/<group>/``. A cell is labelled by the option
chosen in each cell group (Hydra's runtime choices); a YAML may compute its own ``label`` instead
(``none`` with fine-tuning is ``none_ftF``; the generic backbones add their ``arch``).
:func:`build` instantiates a node without passing ``label`` on.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from prunegrid import cli
from prunegrid.errors import ConfigError, PrunegridError
from prunegrid.resolvers import conf_dir  # importing it registers the config resolvers
from prunegrid.strength import STRENGTH, knob, prune_label

GROUPS = ("backbone", "prune", "dataset", "loss", "optimizer", "scheduler", "finetune", "trainer", "tracking", "task")
TASK_GROUPS = ("backbone", "dataset", "loss")  # options made for one task say so (YAML key `task`, default classification)
DEFAULT_TASK = "classification"
CELL_GROUPS = ("backbone", "prune", "dataset", "loss")


def options(group: str, task: str | None = None) -> list[str]:
    """Names of the options (YAML files) of a config group; with ``task``, only the backbones, data
    sets and losses made for that task (their YAML's ``task`` key, ``classification`` when absent)."""
    names = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    if task is None:
        return names
    return [n for n in names if (OmegaConf.load(conf_dir() / group / f"{n}.yaml").get("task") or DEFAULT_TASK) == task]


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
            import difflib

            close = difflib.get_close_matches(value, options(key), n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(f'{key}={c}' for c in close)}? " if close else ""
            raise ConfigError(f"unknown {key} '{value}'; {hint}valid options: {', '.join(options(key))}")


def compose(overrides: Iterable[str] = (), config_name: str = "config", check: bool = True) -> DictConfig:
    """Compose the project config like ``train.py`` would, without running anything.

    A key that does not exist is one :class:`ConfigError` line naming the closest valid keys (or,
    for a method's option, the methods that have it); with ``check``, values are checked too
    (:func:`check_values`).
    """
    from hydra.errors import ConfigCompositionException

    overrides = list(overrides)
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except ConfigCompositionException as exc:
        bad = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", str(exc))
        if bad is None or not bad.group(1).strip("+~"):
            raise
        raise ConfigError(unknown_key(bad.group(1).lstrip("+~"), overrides, config_name)) from None
    picked = {g: str(v) for g, v in cfg.hydra.runtime.choices.items() if g in CELL_GROUPS and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
        if picked:
            cfg.choices = picked
    if check and config_name == "config":
        check_values(cfg)
    return cfg


def unknown_key(key: str, overrides: list[str], config_name: str = "config") -> str:
    """The one-line message for an override of a key the config does not have: the closest valid
    keys, or for a key of a group option (``prune.amount`` with ``prune=none``) the options that have it."""
    import difflib

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    composed = compose(rest, config_name, check=False)
    parts = key.split(".")
    depth = len(parts) - 1
    while depth > 0 and not isinstance(OmegaConf.select(composed, ".".join(parts[:depth])), DictConfig):
        depth -= 1
    parent, leaf = ".".join(parts[:depth]), parts[depth]
    node = OmegaConf.select(composed, parent) if parent else composed
    names = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    full = lambda n: f"{parent}.{n}" if parent else n  # noqa: E731
    close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)
    hidden = {"_target_", "label", "choices", STRENGTH}
    shown = [n for n in names if n not in hidden]
    if parent in GROUPS and depth == 1 and not close:
        chosen = composed.choices.get(parent) if composed.get("choices") else None
        others = {o: [str(k) for k in (OmegaConf.load(conf_dir() / parent / f"{o}.yaml") or {}) if k not in hidden]
                  for o in options(parent)}
        owners = [o for o, keys in others.items() if leaf in keys]
        near = sorted({k for keys in others.values() for k in difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6)})
        if owners:
            return (f"{parent}={chosen or 'this option'} has no option '{leaf}'; it is an option of "
                    f"{', '.join(f'{parent}={o}' for o in owners)} (options here: {', '.join(shown)})")
        if near:
            have = {k: [o for o, keys in others.items() if k in keys] for k in near}
            return (f"unknown key {key}; did you mean "
                    + " or ".join(f"{full(k)} (with {', '.join(f'{parent}={o}' for o in have[k][:3])})" for k in near) + "?")
    if close:
        return f"unknown key {key}; did you mean {' or '.join(full(c) for c in close)}?"
    where = f"keys of {parent}" if parent else "top-level keys"
    return f"unknown key {key}; {where}: {', '.join(shown[:25])}{' ...' if len(shown) > 25 else ''} (append a new key with +{key}=...)"


# key -> (kind, lowest allowed, null allowed): checked before any run (a type or range mistake is one line)
VALUE_RULES: dict[str, tuple[str, float, bool]] = {
    "seed": ("int", 0, False),
    "trainer.max_epochs": ("int", 1, False),
    "trainer.log_every_n_steps": ("int", 1, False),
    "dataset.subset": ("int", 1, True),
    "dataset.input_size": ("int", 1, False),
    "dataset.batch_size": ("int", 1, False),
    "dataset.eval_batch_size": ("int", 1, True),
    "dataset.num_workers": ("int", 0, False),
    "dataset.train_per_class": ("int", 1, True),
    "optimizer.lr": ("positive", 0, False),
    "optimizer.weight_decay": ("number", 0, True),
    "finetune.optimizer.lr": ("positive", 0, False),
    "bn_recalibration.batches": ("int", 1, False),
    "measure.threads": ("int", 1, False),
    "measure.threads_all": ("int", 1, True),
    "measure.batch_size": ("int", 1, False),
    "measure.warmup": ("int", 0, False),
    "measure.repeats": ("int", 1, False),
    "explain.n_images": ("int", 1, False),
    "explain.min_map": ("int", 1, False),
    "tracking.system_metrics_interval_s": ("positive", 0, False),
}
TEXT = {"int": "an integer >= {low:g}", "number": "a number >= {low:g}", "positive": "a number > 0"}


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the settings in :data:`VALUE_RULES`, the trainer's batch limits, and the
    chosen method's options (its class checks them when built): a mistake is one :class:`ConfigError`."""
    for key, (kind, low, nullable) in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__" or (value is None and nullable):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (isinstance(value, int) if kind == "int" else True) and (
            value > 0 if kind == "positive" else value >= low)
        if not ok:
            raise ConfigError(f"{key}={value} must be {TEXT[kind].format(low=low)}"
                              f"{' (or null)' if nullable else ''}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                  or (isinstance(value, float) and value > 1)):
            raise ConfigError(f"trainer.{key}={value} must be a number of batches >= 1, a share in (0, 1], or null")
    task = (cfg.get("task") or {}).get("name", DEFAULT_TASK)
    for group in TASK_GROUPS:
        made_for = (cfg.get(group) or {}).get("task") or DEFAULT_TASK
        if made_for != task:
            try:
                picked = choices(cfg).get(group, "?")
            except ConfigError:
                picked = "?"
            raise ConfigError(f"{group}={picked} is made for task={made_for}, and this run is task={task}; add task={made_for}, "
                              f"or choose one of: {', '.join(options(group, task))}")
    if cfg.get("prune") is not None:
        build(cfg.prune)



def build(node: DictConfig | None, **kwargs: Any) -> Any:
    """Instantiate a group node (``_target_``), dropping what labels it (``label``, ``task``, ``strength``)."""
    if node is None:
        return None
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for key in ("label", "task", STRENGTH):
        data.pop(key, None)
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


def default_strength(method: str) -> Any:
    """The strength ``conf/prune/<method>.yaml`` sets (``None``: it names no strength, or there is no such YAML)."""
    path = conf_dir() / "prune" / f"{method}.yaml"
    node = OmegaConf.load(path) if path.is_file() else {}
    k = knob(node)
    return node.get(k) if k else None


def default_option(group: str) -> str | None:
    """The option ``conf/config.yaml``'s defaults list picks for ``group`` (``loss`` -> ``cross_entropy``)."""
    for item in OmegaConf.load(conf_dir() / "config.yaml").get("defaults", []):
        if isinstance(item, DictConfig) and group in item:
            value = item[group]
            return None if value is None else str(value)
    return None


def cell(cfg: DictConfig) -> dict[str, str]:
    """The cell a config describes: the option chosen in each cell group (or the label its YAML
    computes), plus the seed. The prune label carries the method's strength when it is not the YAML's,
    and its control (:func:`prunegrid.strength.prune_label`: ``channel-r0.7-random``)."""
    picked = choices(cfg)
    out = {g: str(cfg[g].get("label") or picked[g]) for g in CELL_GROUPS}
    if not cfg.prune.get("label"):
        out["prune"] = prune_label(picked["prune"], cfg.prune, default_strength(picked["prune"]))
    return {**out, "seed": str(cfg.seed)}


def precheck(argv: list[str]) -> None:
    """Check ``train.py``'s flags and overrides before Hydra runs: a mistake is one line, exit 2.

    Unknown flags, unknown ``group=option`` values, and (for a single run of the default config)
    everything Hydra's composition rejects: unknown keys, bad override syntax.
    """
    overrides, compose_too = [a for a in argv if not a.startswith("-")], False
    try:  # Hydra's own flags, with our one-line error (private API: skip the check if it moves)
        from hydra._internal.utils import get_args_parser
    except ImportError:
        pass
    else:
        parser = get_args_parser()
        parser.error = lambda msg: cli.fail(f"{msg} (see python train.py --help)")  # type: ignore[method-assign]
        ns = parser.parse_args(argv)
        overrides = ns.overrides
        compose_too = not (ns.multirun or ns.config_path or ns.config_name or ns.config_dir)

    with cli.guard():
        check_overrides(overrides)
        if compose_too:
            compose(overrides)
