"""benchmarks/bench_square.py runs at a tiny size with every query graph and reports each row."""

from __future__ import annotations

import json
import sys

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_square():
    yield load_benchmark("bench_square")
    sys.modules.pop("bench_square", None)


def test_frozen_rows_for_a_batchnorm_model_only(bench_square, tmp_path, capsys):
    out = tmp_path / "square.json"
    # tiny28 has no BatchNorm: an expected fallback, printed (below) rather than warned about
    bench_square.main(["--configs", "tiny28", "resnet18", "--n", "6", "--iterations", "3",
                       "--threads", "1", "--graphs", "frozen", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    got = {(r["config"], r["implementation"], r["graph"]) for r in rows}
    eager = {(c, i, "eager") for c in ("tiny28", "resnet18")
             for i in ("calib", "torchattacks", "paper_loop")}
    frozen = {("resnet18", i, "frozen") for i in ("calib", "torchattacks")}
    assert got == eager | frozen  # tiny28 has no BatchNorm: no frozen rows, and it says so
    assert "tiny28: no frozen rows (no BatchNorm" in printed
    for r in rows:
        assert r["queries"] > 0 and r["seconds"] > 0 and r["precision"] == "fp32"
        assert 0.0 <= r["forward_seconds"] <= r["seconds"]
    calib_rows = [r for r in rows if r["implementation"] == "calib" and
                  r["config"] == "resnet18"]
    # calib queries every image in every iteration, whatever graph answers
    assert len(calib_rows) == 2 and len({r["queries"] for r in calib_rows}) == 1
    assert "calib(fp32, frozen) / torchattacks(fp32, eager)" in printed
