"""benchmarks/bench_attack_stage.py times each run of the attack grid and accounts for all of it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attack_stage.py"


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("bench_attack_stage")
    sys.modules.pop("bench_attack_stage", None)


def test_every_run_of_the_params_grid_is_timed_and_the_shares_add_up(bench, tmp_path, capsys):
    out = tmp_path / "stage.json"
    rows = bench.main(["--arch", "resnet10t", "--images", "6", "--square-iterations", "3",
                       "--pgd-iterations", "2", "--threads", "1", "--out", str(out)])
    settings = ("square-linf", "square-l2", "pgd-linf")  # params.yaml's attack grid
    kinds = ("uca", "oca", "mma", "rca")
    assert [(r["setting"], r["kind"]) for r in rows] == [(s, k) for s in settings for k in kinds]
    assert math.isclose(sum(r["share_of_grid"] for r in rows), 1.0, rel_tol=1e-9)
    for r in rows:
        assert 0 < r["forward_seconds"] <= r["seconds"]
        assert r["outside_share"] == pytest.approx(1 - r["forward_seconds"] / r["seconds"])
        assert r["images_forwarded"] >= 6  # at least the clean query of every image
        assert 0 < r["images_per_call"] <= 6
        assert 0.0 <= r["success_rate"] <= 1.0
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "| all |" in printed and "| square-l2 | MMA |" in printed


def test_overrides_narrow_the_grid(bench):
    rows = bench.main(["--arch", "resnet10t", "--images", "4", "--settings", "square-l2",
                       "--kinds", "uca", "--square-iterations", "2", "--threads", "1"])
    assert [(r["setting"], r["kind"]) for r in rows] == [("square-l2", "uca")]


def test_a_missing_trained_model_says_how_to_make_it(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"dvc repro -s train@nosuch"):
        bench.main(["--model", "nosuch", "--params", str(SCRIPT.parents[1] / "params.yaml")])
