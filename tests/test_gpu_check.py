"""benchmarks/gpu_check.py runs end to end at CPU scale (``--tiny``) and reports every row."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from calib.precision import bf16_native

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def gpu_check():
    yield load_script()
    sys.modules.pop("gpu_check", None)


def test_tiny_run_reports_every_model_measurement_and_precision(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "outside_forward_share" in printed and "Square: time outside the forward" in printed
    report = json.loads(out.read_text())
    rows = report["rows"]
    tiny = gpu_check.TINY
    expected = {(m, "square", n, p) for m in tiny["models"] for n in tiny["sizes"]
                for p in ("fp32", "tf32", "bf16")}
    expected |= {(m, "pgd", tiny["pgd_n"], p) for m in tiny["models"]
                 for p in ("fp32", "tf32", "bf16")}
    expected |= {(m, "train", tiny["train_batch"], p) for m in tiny["models"]
                 for p in ("fp32", "tf32", "bf16")}
    got = {(r["model"], r["measurement"], r["n_images"], r["precision_requested"]) for r in rows}
    assert got == expected and len(rows) == len(expected)

    bf16 = "bf16" if bf16_native(torch.device("cpu")) else "fp32"
    used = {"fp32": "fp32", "tf32": "fp32", "bf16": bf16}  # TF32 exists only on CUDA
    for row in rows:
        assert row["precision_used"] == used[row["precision_requested"]], row
        assert row["value"] is not None and row["value"] > 0 and math.isfinite(row["value"]), row
        assert row["seconds"] > 0, row
        assert not row["note"].startswith("skipped"), row
        share = row["outside_forward_share"]
        if row["measurement"] == "square":
            assert 0.0 <= share <= 1.0, row
        else:
            assert share is None, row
    assert report["setup"]["device"] == "cpu" and report["setup"]["tiny"] is True


def test_time_guard_skips_and_says_so(gpu_check, tmp_path, capsys):
    out = tmp_path / "skipped.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--quiet", "--models", "resnet18",
                           "--precisions", "fp32", "--time-limit", "0", "--out",
                           str(out)]) == 0
    assert "skipped by the time guard" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["measurement"] for r in rows} == {"square", "pgd", "train"}
    assert all(r["value"] is None and r["note"].startswith("skipped") for r in rows)
