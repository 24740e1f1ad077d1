"""make compare (calib.reproduction): a reproduction's numbers against the committed intervals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_repo import env

from calib.reproduction import compare, compare_tables, interval_metrics, main, report

ROOT = Path(__file__).resolve().parents[1]


def _table(ece: tuple[float, float], acc: tuple[float, float] = (0.9, 0.91)) -> pd.DataFrame:
    return pd.DataFrame({"model": ["resnet", "vit"], "attack": ["UCA", "UCA"],
                         "ece": list(ece), "ece_lo": [e - 0.02 for e in ece],
                         "ece_hi": [e + 0.02 for e in ece], "accuracy": list(acc),
                         "n": [500, 500]})


def test_interval_metrics_are_the_columns_with_both_bounds():
    assert interval_metrics(_table((0.4, 0.5))) == ["ece"]


def test_inside_outside_and_missing():
    ref = _table((0.40, 0.50))
    new = _table((0.41, 0.55))  # resnet inside, vit outside
    checks = compare_tables("results/t.csv", ref, new)
    assert [(c.row, c.inside) for c in checks] == [("resnet / UCA", True), ("vit / UCA", False)]
    missing = compare_tables("results/t.csv", ref, new[new["model"] == "resnet"])
    assert missing[1].value is None and not missing[1].inside
    text = report(checks)
    assert text.startswith("1 of 2 headline numbers in 1 tables lie inside")
    assert "vit / UCA] ece: 0.55 against 0.5 [0.48, 0.52]" in text


def test_rows_must_be_identifiable():
    ref = pd.concat([_table((0.4, 0.5)), _table((0.4, 0.5))])
    with pytest.raises(ValueError, match="not unique"):
        compare_tables("t", ref, ref)


def test_compare_folders_and_a_reference_without_intervals(tmp_path):
    ref_dir, new_dir = tmp_path / "ref", tmp_path / "new"
    (ref_dir / "resnet").mkdir(parents=True)
    (new_dir / "resnet").mkdir(parents=True)
    _table((0.4, 0.5)).to_csv(ref_dir / "resnet/table1.csv", index=False)
    _table((0.4, 0.5)).to_csv(new_dir / "resnet/table1.csv", index=False)
    pd.DataFrame({"a": [1.0]}).to_csv(ref_dir / "plain.csv", index=False)
    tables = [(str(p.relative_to(ref_dir)), p.read_text()) for p in ref_dir.rglob("*.csv")]
    checks = compare(tables, new_dir)
    assert len(checks) == 2 and all(c.inside for c in checks)
    assert "regenerate" in report([])


def test_cli_against_a_git_revision(tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "results/resnet").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _table((0.4, 0.5)).to_csv(repo / "results/resnet/table1.csv", index=False)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "results"], cwd=repo, check=True)
    _table((0.45, 0.5)).to_csv(repo / "results/resnet/table1.csv", index=False)  # reproduced
    monkeypatch.chdir(repo)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 of 2 headline numbers") and "resnet / UCA] ece: 0.45" in out
    assert main(["--strict"]) == 1
    assert main(["--reference", "no-such-rev"]) == 2
    assert "git cannot read" in capsys.readouterr().err


def test_make_compare_runs_the_module():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ncompare: setup\n\tpython -m calib.reproduction\n" in makefile
    proc = subprocess.run([sys.executable, "-m", "calib.reproduction", "--reference-dir",
                           "/nonexistent"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
