"""One command-line style for every entry point: ``--help`` works, a mistake is one line ``prunegrid: error: ...``, exit 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunegrid import cli
from prunegrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# entry point -> a word its --help must show (from the description)
ENTRY_POINTS = {
    "train.py": "Configuration groups",  # Hydra's own --help
    "prunegrid.grid": "params.yaml",
    "prunegrid.report": "comparison grid",
    "prunegrid.sweep": "Optuna",
    "prunegrid.data.crops": "Letterboxed crops",
    "prunegrid.data.gan": "GAN augmentation",
    "prunegrid.explain": "Grad-CAM",
    "prunegrid.pretrain": "transfer",
    "prunegrid.data.fetch": "Fashion-MNIST",
    "prunegrid.ui": "MLflow UI",
    "prunegrid.progress": "counting",
    "prunegrid.head": "PostgreSQL",
}


SUBPROCESS = {"train.py", "prunegrid.grid"}   # the rest run in process, exactly as ``python -m`` would (runpy)


def run(entry: str, *args: str, capsys=None) -> subprocess.CompletedProcess:
    """The entry point's exit code, stdout and stderr: in a fresh process for :data:`SUBPROCESS`
    (Hydra's own start-up, ``-m`` wiring), else in this one through ``runpy`` (seconds saved per call)."""
    if entry in SUBPROCESS or capsys is None:
        cmd = [sys.executable, entry] if entry.endswith(".py") else [sys.executable, "-m", entry]
        env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
        return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    import runpy
    import warnings

    capsys.readouterr()
    code = 0
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # runpy: "found in sys.modules" for an imported module
        mp.setattr(sys, "argv", [entry, *args])
        try:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return subprocess.CompletedProcess([entry, *args], code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str = "") -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("prunegrid: error: ") and lines[0][len("prunegrid: error: "):].strip(), \
        proc.stderr[-2000:]
    assert needle in lines[0]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_help(entry, capsys):
    proc = run(entry, "--help", capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not entry.endswith(".py"):
        assert proc.stdout.startswith("usage: ")
    assert ENTRY_POINTS[entry] in proc.stdout


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_flag_is_one_line(entry, capsys):
    assert_one_line_error(run(entry, "--no-such-flag", capsys=capsys))  # or "required: ..." where arguments are required


@pytest.mark.parametrize("override, needle", [("backbone=nope", "unknown backbone 'nope'"),
                                               ("trainer.max_epochz=1", "did you mean trainer.max_epochs?")])
def test_train_bad_override_is_one_line(override, needle):
    assert_one_line_error(run("train.py", override), needle)


def test_report_script_help():
    script = Path(sys.executable).parent / "prunegrid-report"
    assert script.is_file(), "scripts/setup.sh installs the package (pip install -e .), with its prunegrid-report script"
    proc = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: prunegrid-report")


# -- the helpers, in process --------------------------------------------------------------------
def test_parser_error_is_one_line(capsys):
    p = cli.ArgumentParser(prog="prog", description="d")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--n", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prunegrid: error: argument --n: invalid int value: 'x' (see prog --help)\n"


def test_guard_turns_user_errors_into_one_line(capsys):
    with pytest.raises(SystemExit) as exc, cli.guard():
        raise ConfigError("bad value; use a good one\nsecond line\n\nmore detail")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prunegrid: error: bad value; use a good one second line\n"


def test_guard_lets_bugs_through():
    with pytest.raises(KeyError), cli.guard():
        raise KeyError("a bug keeps its stack trace")


def test_guard_knows_hydra_override_errors(capsys):
    from hydra.errors import ConfigCompositionException, InstantiationException

    with pytest.raises(SystemExit), cli.guard():
        raise ConfigCompositionException("Could not override 'x.y'.\nTo append to your config use +x.y=1")
    assert capsys.readouterr().err == ("prunegrid: error: Could not override 'x.y'. To append to your config use "
                                       "+x.y=1\n")
    assert not cli.is_user_error(InstantiationException("an error in our own code"))


@pytest.mark.parametrize("text", ["size", "=3", "size=[1"])
def test_key_value_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.key_value(text)


def test_key_value_accepts():
    assert cli.key_value("dataset.root=/a/b") == "dataset.root=/a/b"
    assert cli.key_value("classes={person: [Man]}") == "classes={person: [Man]}"
