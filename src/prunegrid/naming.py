"""Names made from class names: metric keys and folder names that keep any script.

MLflow keys may hold Unicode word characters, ``-``, ``.``, space, ``:`` and ``/``; folder names
must not hold path separators. Class names are kept as they are wherever those rules allow
(``화재`` stays ``화재``); anything else becomes ``_``. Two class names never share a name: when
two collide after that (``Cat`` and ``cat`` as keys, ``a/b`` and ``a_b`` as folders), the later
one gets a suffix ``_2``, ``_3``, ...
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, Iterable

MAX_PART = 200  # MLflow keys are at most 250 characters; the part before the class name is short


def unique(names: Iterable[str]) -> list[str]:
    """``names`` with later duplicates suffixed ``_2``, ``_3``, ... (a suffix never takes another name)."""
    names = list(names)
    given, used, out = set(names), set(), []
    for name in names:
        new, k = name, 1
        while new in used or (new != name and new in given):
            k += 1
            new = f"{name}_{k}"
        used.add(new)
        out.append(new)
    return out


def _safe(name: str, bad: str, fallback: str, lower: bool) -> str:
    text = unicodedata.normalize("NFC", str(name))
    text = re.sub(bad, "_", text.lower() if lower else text).strip("_ .")
    return text[:MAX_PART] or fallback


def key_part(name: str) -> str:
    """A class name as part of a metric key: Unicode word characters kept, lower case
    (``T-shirt/top`` -> ``t_shirt_top``, ``화재`` -> ``화재``)."""
    return _safe(name, r"[^\w]+", "class", lower=True)


def dir_part(name: str) -> str:
    """A class name as a folder name: path separators and control characters become ``_``
    (``T-shirt/top`` -> ``T-shirt_top``, ``비화재`` -> ``비화재``)."""
    return _safe(name, r"[^\w.\- ]+", "class", lower=False)


def unique_parts(classes: Iterable[str], part: Callable[[str], str]) -> list[str]:
    """``part`` of every class, made unique (see :func:`unique`)."""
    return unique(part(c) for c in classes)
