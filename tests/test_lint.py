"""The package, tests, benchmarks and the notebooks' code cells are ruff-clean (``make lint``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("calib", "tests", "benchmarks", "notebooks")


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; run `make setup`")
    return [found]


def test_ruff_is_clean_including_notebooks():
    done = subprocess.run([*_ruff(), "check", *TARGETS], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_reads_the_notebooks(tmp_path):
    # A notebook with an unused import must fail: notebooks are really checked, not excluded.
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os\n"))
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    done = subprocess.run([*_ruff(), "check", "bad.ipynb"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "F401" in done.stdout
