"""calib.timings: the time per stage from papermill's metadata."""

from __future__ import annotations

import json

import pytest

from calib.timings import format_seconds, format_table, main, stage_times


def _notebook(path, start, duration):
    meta = {"papermill": {"start_time": start, "duration": duration}}
    path.write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4,
                                "nbformat_minor": 5}))


def test_stage_times_in_run_order_with_total(tmp_path, capsys):
    _notebook(tmp_path / "10_train_resnet.ipynb", "2026-01-01T10:05:00", 300.4)
    _notebook(tmp_path / "00_data.ipynb", "2026-01-01T10:00:00", 22.0)
    _notebook(tmp_path / ".20_attack_resnet.partial.ipynb", "2026-01-01T10:10:00", 1.0)
    times = stage_times(tmp_path)
    assert [t.notebook for t in times] == ["00_data", "10_train_resnet"]
    table = format_table(times, markdown=True)
    assert "| total |  | 5:22 |" in table
    assert main([str(tmp_path)]) == 0
    assert "10_train_resnet" in capsys.readouterr().out


def test_format_seconds():
    assert format_seconds(59.6) == "1:00"
    assert format_seconds(3725) == "1:02:05"


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        stage_times(tmp_path)
    (tmp_path / "x.ipynb").write_text(json.dumps({"cells": [], "metadata": {}}))
    with pytest.raises(ValueError, match=r"x\.ipynb: no papermill duration"):
        stage_times(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "no papermill duration" in capsys.readouterr().err
