"""CONTRACT.md (in the repository) names every key the code logs and every column the grid writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prunegrid import tracking
from prunegrid.report import grid as g

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (ROOT / "CONTRACT.md").read_text()
README = (ROOT / "README.md").read_text()
NAMED = set(re.findall(r"`([^`]+)`", CONTRACT))

RUN_KEYS = [*tracking.REQUIRED_METRICS, *tracking.ONNX_METRICS, *tracking.VAL_FINAL_METRICS,
            *tracking.EXPLAIN_METRICS, *tracking.GRID_BUDGET_METRICS.values(), *tracking.GRID_SPEEDUPS.values(),
            tracking.infer_key("_onnx", "_batch"), tracking.infer_key("_onnx", "_mt"), "model/size_mb_onnx",
            *tracking.DETECTION_REQUIRED_METRICS, *tracking.DETECTION_VAL_FINAL_METRICS]
TAGS = [*tracking.TAGS, tracking.MEMORY_STATUS, tracking.TAG_MEASURE_DEVICE, tracking.TAG_ONNX_STATUS,
        tracking.TAG_CAM_AGREEMENT_STATUS, tracking.TAG_DEPLOY_STATUS]
COLUMNS = [*g.BASE_COLUMNS, *g.RELATIVE, "infer_speedup_onnx", "infer_ms_onnx", "cam_agreement", "budget_epochs",
           "ref_prune", "ref_budget_epochs", "converged", *g.DETECTION_RELATIVE, "map50", "map", "detect_ms",
           "detect_peak_mb", "detect_increase_mb"]


@pytest.mark.parametrize("key", sorted(set(RUN_KEYS)))
def test_every_logged_key_is_in_the_contract(key):
    base = re.sub(r"_(q25|q75|iqr)$", "", key)      # spread suffixes are named once, after their key
    assert base in NAMED, base
    assert base == key or key in NAMED or key[len(base):] in NAMED, key


@pytest.mark.parametrize("tag", TAGS)
def test_every_tag_is_in_the_contract(tag):
    assert tag in CONTRACT


@pytest.mark.parametrize("column", COLUMNS)
def test_every_grid_column_is_in_the_contract(column):
    assert column in CONTRACT


def test_readme_says_what_the_measurement_columns_mean():
    for phrase in ("`memory/infer_peak_mb`", "fresh process", "interleaved", "`infer_speedup_onnx`",
                   "not measurably faster", "measurably slower", "CONTRACT.md", "bench_noise.py", "min_map"):
        assert phrase in README, phrase
