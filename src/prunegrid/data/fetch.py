"""Restore the default data set (Fashion-MNIST) under ``data/`` without internet where possible.

``data.dvc`` tracks the exact bytes of Debian's ``dataset-fashion-mnist`` package. In order:
a configured DVC remote (``dvc pull``), the installed Debian package, the package fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` (no root needed), and last
torchvision's download (other bytes: ``dvc status`` will then show the data as changed).

    python -m prunegrid.data.fetch [--dest data/fashion_mnist]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prunegrid.cli import ArgumentParser, guard
from prunegrid.data.sources import FASHION_MNIST_FILES
from prunegrid.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = [f for pair in FASHION_MNIST_FILES.values() for f in pair]


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def _run(cmd: list[str], cwd: Path | None = None) -> bool:
    try:
        return subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except FileNotFoundError:
        return False


def _copy(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(src / f, dest / f)


def from_debian_package(dest: Path) -> bool:
    """``apt-get download`` + ``dpkg -x``: works without root once the apt lists exist."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ok = _run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp_path)
        if not ok and _run(["apt-get", "update", "-qq"]):
            ok = _run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp_path)
        debs = list(tmp_path.glob("dataset-fashion-mnist_*.deb"))
        if not ok or not debs or not _run(["dpkg", "-x", str(debs[0]), str(tmp_path / "x")]):
            return False
        src = tmp_path / "x" / DEBIAN_DIR.relative_to("/")
        if not _complete(src):
            return False
        _copy(src, dest)
        return True


def from_torchvision(dest: Path) -> bool:
    import gzip

    import torchvision

    try:
        torchvision.datasets.FashionMNIST(str(dest / "_download"), download=True)
    except Exception:
        return False
    raw = dest / "_download" / "FashionMNIST" / "raw"
    for f in FILES:
        gz = raw / f
        if not gz.is_file():
            with open(raw / f[:-3], "rb") as fin, gzip.open(gz, "wb") as fout:
                fout.write(fin.read())
        shutil.copyfile(gz, dest / f)
    shutil.rmtree(dest / "_download", ignore_errors=True)
    return True


def fetch(dest: Path, project_root: Path) -> str:
    """Put the four Fashion-MNIST files in ``dest``; return where they came from (:class:`DataError` if no source works)."""
    if _complete(dest):
        return "already present"
    if (project_root / "data.dvc").is_file() and _run([sys.executable, "-m", "dvc", "pull", "-q", "data.dvc"], cwd=project_root) \
            and _complete(dest):
        return "DVC remote"
    if _complete(DEBIAN_DIR):
        _copy(DEBIAN_DIR, dest)
        return str(DEBIAN_DIR)
    if from_debian_package(dest):
        return "Debian package dataset-fashion-mnist (apt-get download)"
    dest.mkdir(parents=True, exist_ok=True)
    if from_torchvision(dest):
        return "torchvision download (bytes differ from data.dvc)"
    raise DataError("cannot get Fashion-MNIST: no DVC remote, no Debian package and no internet; "
                    f"copy the four *-ubyte.gz files into {dest}")


def sync_dvc_cache(project_root: Path) -> None:
    """Record the restored files in the DVC cache so ``dvc status`` and ``dvc repro`` see them."""
    if (project_root / "data.dvc").is_file() and (project_root / ".dvc").is_dir():
        _run([sys.executable, "-m", "dvc", "commit", "-f", "-q", "data.dvc"], cwd=project_root)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m prunegrid.data.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="project root (holds data.dvc)")
    parser.add_argument("--dest", default=None, help="target dir (default ROOT/data/fashion_mnist)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    dest = Path(args.dest) if args.dest else root / "data" / "fashion_mnist"
    with guard():
        origin = fetch(dest, root)
    sync_dvc_cache(root)
    print(f"Fashion-MNIST in {dest} ({origin})")


if __name__ == "__main__":
    main()
