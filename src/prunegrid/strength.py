"""A method's strength and its controls: what a trade-off curve varies, and how its cells are named.

Every method YAML that can be made stronger or weaker names its knob once, ``strength: <option>``
(``channel`` and ``slimming``: ``ratio``; ``l1_*``: ``amount``; ``layer_importance``: ``k``); the
grid's trade-off preset sweeps that option (``grid.strengths.<method>``), so a new method joins
with no code change.

The controls asked for by Blalock, Gonzalez Ortiz, Frankle & Guttag ("What is the State of Neural
Network Pruning?", MLSys 2020) and Liu, Sun, Zhou, Huang & Darrell ("Rethinking the Value of Network
Pruning", ICLR 2019) are options of the methods themselves: :data:`CONTROLS` maps each to the method
options it sets. A method's class lists the ones it offers (``PruningMethod.controls``).

A cell's prune label carries both (:func:`prune_label`): ``channel-r0.7``, ``channel-r0.7-random``,
``channel-scratch``; the plain method name when the strength is its YAML's and no control is set, so
the default grid's cells keep their names.

No torch here: the grid's resolvers import this module in every Hydra process.
"""

from __future__ import annotations

from typing import Any, Mapping

STRENGTH = "strength"
RANDOM = "random"
SCRATCH = "scratch"
CONTROLS: dict[str, dict[str, Any]] = {RANDOM: {"importance": RANDOM}, SCRATCH: {"reinit": True}}
"""Each control: the method options it sets (``prune.importance=random``; ``prune.reinit=true``, Scratch-E)."""


def knob(node: Mapping) -> str | None:
    """The option a method YAML names as its strength (``None``: it has none)."""
    value = node.get(STRENGTH)
    return str(value) if value else None


def control_of(options: Mapping) -> str | None:
    """Which control a method's options select (``None``: the method itself)."""
    for name, sets in CONTROLS.items():
        if all(options.get(k) == v for k, v in sets.items()):
            return name
    return None


def fmt(value: Any) -> str:
    """A strength as a label part: ``0.7`` -> ``0.7``, ``6`` -> ``6``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def prune_label(method: str, options: Mapping, default: Any = None) -> str:
    """The cell label of ``method`` with ``options``: its strength unless it is ``default`` (the YAML's),
    then its control. ``channel`` at ratio 0.7 with random ranking: ``channel-r0.7-random``."""
    parts = [method]
    k = knob(options)
    if k is not None and options.get(k) != default:
        parts.append(f"{k[0]}{fmt(options.get(k))}")
    control = control_of(options)
    if control:
        parts.append(control)
    return "-".join(parts)
