"""A temporary copy of the repository in which the tests run the DVC pipeline end to end.

Shared by the end-to-end tests (``test_smoke_pipeline.py``, ``test_paper_profile.py``): what to
copy, the environment the stages run in, a checked ``run`` and the stage timings papermill
records in every executed notebook.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: What a pipeline run needs from the checkout (no results, no DVC cache, no git history).
COPY: tuple[str, ...] = ("calib", "notebooks", "profiles", "dvc.yaml", "params.yaml",
                         "pyproject.toml", ".dvc/config", ".dvcignore", ".gitignore")


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the stages: this interpreter's bin first on PATH (dvc, python),
    a fixed hash seed, no PYTHONPATH (the copy's ``calib`` is imported from its root)."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONHASHSEED"] = "0"
    out.pop("PYTHONPATH", None)
    out.update(extra or {})
    return out


def run(args: Sequence[str], cwd: Path, timeout: int = 2400,
        extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in ``cwd``; fail the test with the end of its output if it fails."""
    proc = subprocess.run(list(args), cwd=cwd, env=env(extra_env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_repo(dest: Path, *, root: Path = ROOT, items: Sequence[str] = COPY) -> Path:
    """Copy the pipeline's files from ``root`` into ``dest`` (created) and ``git init`` it."""
    dest.mkdir(parents=True)
    for item in items:
        src, dst = root / item, dest / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    run(["git", "init", "-q"], dest)
    return dest


def write_params(repo: Path, params: Mapping[str, Any]) -> None:
    """Validate ``params`` and write them as the copy's params.yaml."""
    from calib.config import check_params
    from calib.profiles import dump_params

    check_params(params)
    (repo / "params.yaml").write_text(dump_params(params), encoding="utf-8")


def stage_seconds(repo: Path) -> dict[str, float]:
    """Execution time of every executed notebook (papermill's own record), by file stem.

    Kernel start-up and DVC's own work (hashing, caching outputs) are not included.
    """
    from calib.timings import stage_times

    return {t.notebook: round(t.seconds, 1) for t in stage_times(repo / "reports" / "notebooks")}
