"""calib.timings: the time per stage from papermill's metadata."""

from __future__ import annotations

import json

import pytest

from calib.timings import format_seconds, format_table, group_by_kind, main, stage_kind, stage_times


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


def test_group_by_kind_sums_each_kind_of_stage(tmp_path, capsys):
    assert stage_kind("30_defend_resnet-aaa") == "30_defend"
    assert stage_kind("40_budget_vit-25") == "40_budget"
    assert stage_kind("00_data") == "00_data"
    _notebook(tmp_path / "00_data.ipynb", "2026-01-01T10:00:00", 8.0)
    _notebook(tmp_path / "30_defend_resnet-none.ipynb", "2026-01-01T10:01:00", 90.0)
    _notebook(tmp_path / "30_defend_resnet-aaa.ipynb", "2026-01-01T10:03:00", 150.0)
    grouped = group_by_kind(stage_times(tmp_path))
    assert [(g.notebook, g.seconds) for g in grouped] == [
        ("00_data", 8.0), ("30_defend (2 stages)", 240.0)]
    assert grouped[1].start_time == "2026-01-01T10:01:00"
    assert main([str(tmp_path), "--by-kind"]) == 0
    out = capsys.readouterr().out
    assert "30_defend (2 stages)" in out and "4:08" in out
