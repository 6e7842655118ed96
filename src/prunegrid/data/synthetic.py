"""Training-only extra images (e.g. the filtered GAN samples of Jin & Song (Layer Importance Evaluation)) read from an ImageFolder tree.

``dataset.synthetic=PATH`` points at ``PATH/<class>/*.png``; the folders are matched to the data
set's classes *by name* (so the label indices follow the data set, not the folder order), and the
DataModule concatenates these images to the training split only.
"""

from __future__ import annotations

from pathlib import Path

from prunegrid.data.sources import IMAGE_EXTENSIONS, ImageFiles
from prunegrid.errors import DataError
from prunegrid.naming import dir_part, unique_parts


def class_dirnames(classes: list[str]) -> list[str]:
    """The folder of each class: its name in any script, path separators and odd characters as ``_``
    (``T-shirt/top`` -> ``T-shirt_top``, ``비화재`` -> ``비화재``); distinct (``_2``, ... on a collision)."""
    return unique_parts(classes, dir_part)


def synthetic_folder(root: str | Path, classes: list[str]) -> ImageFiles:
    """The images of ``root/<class_dirnames(classes)[i]>/`` labelled with class ``i``.

    Every class folder must name a class of the data set (a class may have no folder).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset.synthetic={root} is not a directory; give the output dir of prunegrid.data.gan")
    index = {d: i for i, d in enumerate(class_dirnames(classes))}
    folders = sorted(d for d in root_path.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in folders if d.name not in index]
    if unknown or not folders:
        raise DataError(f"dataset.synthetic={root}: class folders {unknown or '(none)'} do not match the data set's "
                        f"classes {sorted(index)}; generate them for this data set")
    samples = [(p, index[d.name]) for d in folders for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"dataset.synthetic={root} has no images; rerun prunegrid.data.gan or set dataset.synthetic=null")
    return ImageFiles(samples)
