"""benchmarks/precision_check.py checks each model on the grid its stages run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def precision_check():
    yield load_benchmark("precision_check")
    sys.modules.pop("precision_check", None)


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_model_gets_its_attack_stage_grid(precision_check, params):
    main = precision_check.grid_for_model("resnet", params)
    assert main.settings == tuple(params["attack"]["settings"].split(","))
    assert main.square_iterations == params["attack"]["square_iterations"]
    small = precision_check.grid_for_model("resnet_small", params)
    assert small.settings == (params["models"]["resnet_small"]["attack_settings"],)
    # A seed copy is not a key of models: the attack stage's grid, overrides applied.
    copy = precision_check.grid_for_model("resnet_seeds/seed_1", params, settings="square-linf",
                                          kinds="mma", eps_linf=None)
    assert copy.settings == ("square-linf",) and copy.kinds == ("mma",)
    assert copy.eps_linf == params["attack"]["eps"]


def test_overrides_replace_the_grid_and_are_validated(precision_check, params):
    point = precision_check.grid_for_model("resnet", params, settings="square-linf",
                                           eps_linf=0.02, square_iterations=200)
    assert (point.settings, point.eps_linf, point.square_iterations) == (
        ("square-linf",), 0.02, 200)
    with pytest.raises(ValueError, match="settings"):
        precision_check.grid_for_model("resnet", params, settings="square-linf2")
