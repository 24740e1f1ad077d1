"""Every calib module a stage's code imports is one of the stage's DVC dependencies.

A stage reruns only when a dependency changes, so a module it imports but does not list (for
example ``calib/constants.py``, which holds the 15 ECE bins) could change its results without
DVC noticing. The imports are derived from the code, not listed by hand: the notebook's code
cells (or the ``python -m calib.<module>`` a stage runs), followed transitively through calib's
own imports (module-level and inside functions).
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "calib"

#: Imported by every stage's runner, not by its code: they decide whether a stage runs and
#: with which values, never what it computes (a change to them cannot change an output).
RUNNER_MODULES = frozenset({"calib.pipeline", "calib.config"})


def module_file(module: str) -> Path | None:
    """The source file of a calib module (``calib.attacks`` -> calib/attacks/__init__.py)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST, current: str | None = None) -> set[str]:
    """calib modules an AST imports (``from calib import data`` counts calib.data)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and current:  # relative import inside calib
                parts = current.split(".")[: -node.level]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            out.add(base)
            for alias in node.names:  # `from calib import data` imports the module calib.data
                if module_file(f"{base}.{alias.name}") is not None:
                    out.add(f"{base}.{alias.name}")
    return out


@cache
def closure(module: str) -> frozenset[str]:
    """``module`` and every calib module it imports, transitively, with parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
        path = module_file(name)
        if path is None:
            raise AssertionError(f"{name} is imported but has no source file")
        # Relative imports resolve against the package: the module itself for __init__.py.
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        todo += sorted(imported_modules(tree, f"{package}.__init__"))
    return frozenset(seen)


def notebook_tree(path: Path) -> ast.Module:
    nb = json.loads(path.read_text(encoding="utf-8"))
    source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    return ast.parse(source)


def stage_modules(stage: dict) -> set[str]:
    """calib modules a stage's code imports, transitively, without the runner's."""
    cmd = stage["cmd"]
    roots: set[str] = set()
    notebook = re.search(r"notebooks/\S+\.ipynb", cmd)
    if notebook:
        roots |= imported_modules(notebook_tree(ROOT / notebook.group(0)))
    roots |= {m for m in re.findall(r"python -m (calib(?:\.\w+)+)", cmd)
              if m not in RUNNER_MODULES}
    out: set[str] = set()
    for root in roots:
        out |= closure(root)
    return out - RUNNER_MODULES


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _stages() -> dict[str, dict]:
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: stage.get("do", stage) for name, stage in doc["stages"].items()}


@pytest.mark.parametrize("name,stage", sorted(_stages().items()))
def test_stage_depends_on_every_calib_module_it_imports(name, stage):
    deps = [str(d) for d in stage.get("deps", [])]
    missing = sorted(
        str(module_file(m).relative_to(ROOT)) for m in stage_modules(stage)
        if not covered(str(module_file(m).relative_to(ROOT)), deps))
    assert not missing, f"stage {name!r} imports but does not depend on: {missing}"


@pytest.mark.parametrize("name,stage", sorted(_stages().items()))
def test_stage_depends_on_no_calib_module_it_does_not_import(name, stage):
    used = {str(module_file(m).relative_to(ROOT)) for m in stage_modules(stage)}
    extra = [d for d in map(str, stage.get("deps", []))
             if d.startswith(f"{PACKAGE}/") and not any(covered(u, [d]) for u in used)]
    assert not extra, f"stage {name!r} depends on calib code it never imports: {extra}"


def test_the_derivation_sees_imports_inside_functions(tmp_path):
    tree = ast.parse("def f():\n    from calib.constants import N_BINS\n    return N_BINS\n")
    assert imported_modules(tree) == {"calib.constants"}
    assert "calib.constants" in closure("calib.metrics")  # metrics imports the ECE bins


def test_a_missing_dependency_is_reported():
    stage = {"cmd": "python -m calib.pipeline notebooks/20_attack.ipynb out.ipynb",
             "deps": ["notebooks/20_attack.ipynb"]}
    with pytest.raises(AssertionError, match=r"calib/constants\.py"):
        test_stage_depends_on_every_calib_module_it_imports("example", stage)
