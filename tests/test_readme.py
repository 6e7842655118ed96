"""Every command in the README runs as written: scripts answer ``--help`` (they take minutes to hours),
``train.py`` commands compose their config (``--cfg job``: Hydra prints it instead of training), and each
error example prints exactly the line the README shows, with exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """Each command of the README's bash blocks, its trailing comment dropped, ``&&`` chains split."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def examples() -> list[tuple[str, str]]:
    """``$ command`` and the output line under it, from the README's text blocks."""
    found = []
    for block in blocks("text"):
        found += re.findall(r"^\$ (.+)\n((?:(?!\$ ).+\n?)+)", block, flags=re.M)
    return [(cmd, out.strip()) for cmd, out in found]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/never-opened.db"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def argv(command: str) -> list[str]:
    words = command.split()
    if words[0] == "bash":
        return ["bash", words[1], "--help"]
    assert words[:2] == [".venv/bin/python", "train.py"], f"the README test does not know how to run: {command}"
    return [sys.executable, "train.py", *words[2:], *([] if "--help" in words else ["--cfg", "job"])]


def test_the_readme_has_commands_and_examples():
    assert len(commands()) >= 8 and len(examples()) >= 2


@pytest.mark.parametrize("command", commands())
def test_readme_command_runs(command):
    words = command.split()
    if "-m" in words:  # Hydra refuses --cfg with a multirun: compose each job of the sweep instead
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from prunegrid.config import compose

        parsed = OverridesParser.create().parse_overrides([w for w in words[2:] if w != "-m"])
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        assert jobs, command
        for job in jobs:
            compose(job)
        return
    done = run(argv(command))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), command


@pytest.mark.parametrize("command,expected", examples())
def test_readme_error_example_prints_what_it_shows(command, expected):
    words = command.split()
    assert words[:2] == ["python", "train.py"], command
    done = run([sys.executable, "train.py", *words[2:]])
    assert done.returncode == 2
    assert done.stderr.strip() == expected
