"""Every YAML of every config group composes and builds; bad options fail in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from prunegrid.config import CELL_GROUPS, GROUPS, build, cell, compose, options
from prunegrid.errors import ConfigError
from tests.conftest import ROOT, all_group_params, task_of


@pytest.mark.parametrize("group,option", all_group_params())
def test_every_option_composes(group, option):
    cfg = compose([*task_of(group, option), f"{group}={option}"])
    if group != "task":
        assert "name" not in cfg[group]  # labels come from Hydra's runtime choices, not a repeated name
    if group in CELL_GROUPS:
        label = cell(cfg)[group]
        assert label == option or label.endswith(str(cfg[group].get("arch"))) or (option == "none" and label == "none")
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("option", options("loss", "classification"))
def test_every_loss_builds_and_is_differentiable(option):
    loss = build(compose([f"loss={option}"]).loss)
    logits = torch.randn(4, 3, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 2, 1]))
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and logits.grad is not None


@pytest.mark.parametrize("sched", options("scheduler"))
@pytest.mark.parametrize("opt", options("optimizer"))
def test_optimizer_and_scheduler_partials(opt, sched):
    cfg = compose([f"optimizer={opt}", f"scheduler={sched}"])
    params = [torch.nn.Parameter(torch.randn(2))]
    optimizer = build(cfg.optimizer)(params)
    scheduler = build(cfg.scheduler)(optimizer, epochs=4, steps_per_epoch=3)
    assert scheduler is None or "scheduler" in scheduler


def test_groups_exist():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet999'; .*valid options: .*resnet18"):
        compose(["backbone=resnet999"])


@pytest.mark.parametrize("group", GROUPS)
def test_a_typo_of_an_option_gets_did_you_mean(group):
    name = options(group)[0]
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    with pytest.raises(ConfigError, match=rf"unknown {group} '{typo}'; did you mean [^?]*\b{group}={name}\b[^?]*\?"):
        compose([f"{group}={typo}"])


def test_an_option_far_from_every_name_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        compose(["prune=zzzzzz"])
    assert "did you mean" not in str(err.value) and "valid options: " in str(err.value)


def test_train_py_unknown_option_is_one_line():
    proc = subprocess.run([sys.executable, "train.py", "prune=nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and "unknown prune 'nope'" in lines[0] and "none" in lines[0]
