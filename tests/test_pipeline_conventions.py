"""Conventions that keep the DVC + papermill pipeline honest (DESIGN.md).

* source notebooks carry no outputs and exactly one ``parameters`` cell;
* every stage passes exactly the names of its notebook's parameters cell (``-p NAME VALUE`` or
  ``-P NAME KEY``), and matrix stages pass their values by name (``${item.<name>}``);
* every params key a stage's command reads is declared in its ``params`` and vice versa;
* every calib module a stage's code imports (directly or through other calib modules) is one
  of its ``deps``, so editing it reruns the stage;
* executed notebooks are outputs; only the ``report`` stage, which renders them, reads them;
* the committed params.yaml is the default profile, and every profile validates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from calib.pipeline import parameter_names
from calib.profiles import PROFILES, profile_text, render_profile

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


#: The one stage that is not a notebook: it renders the executed notebooks into HTML.
REPORT_STAGE = "report"


def _stages() -> dict[str, dict]:
    with (ROOT / "dvc.yaml").open() as fh:
        doc = yaml.safe_load(fh)
    out = {}
    for name, stage in doc["stages"].items():
        out[name] = stage["do"] if "do" in stage else stage
    return out


def _passed_names(cmd: str) -> list[str]:
    """Names a stage passes to its notebook: ``-p NAME VALUE`` and ``-P NAME KEY``."""
    return re.findall(r"-[pP] (\w+) ", cmd + " ")


def _notebook_stages() -> dict[str, dict]:
    return {name: stage for name, stage in _stages().items() if name != REPORT_STAGE}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: a code cell carries outputs"
            assert cell.get("execution_count") is None, f"{path.name}: execution count stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exactly_one_parameters_cell(path):
    assert parameter_names(path)  # raises unless exactly one tagged cell


def test_every_stage_but_the_report_runs_a_notebook():
    for name, stage in _notebook_stages().items():
        assert stage["cmd"].startswith("python -m calib.pipeline notebooks/"), name
    assert _stages()[REPORT_STAGE]["cmd"].startswith("python -m calib.site ")


@pytest.mark.parametrize("name,stage", sorted(_notebook_stages().items()))
def test_stage_passes_exactly_the_parameters_cell(name, stage):
    cmd = stage["cmd"]
    notebook = re.search(r"notebooks/\S+\.ipynb", cmd).group(0)
    passed = _passed_names(cmd)
    assert len(passed) == len(set(passed)), f"{name}: a parameter is passed twice"
    assert sorted(passed) == sorted(parameter_names(ROOT / notebook)), name
    assert notebook in stage["deps"], f"{name}: its notebook is not a dependency"


@pytest.mark.parametrize("name,stage", sorted(_stages().items()))
def test_stage_declares_exactly_the_params_it_reads(name, stage):
    cmd = stage["cmd"]
    if "matrix" in stage:
        # A matrix stage's ${item.<name>} are its matrix values (lists of params.yaml, e.g.
        # defend.models), not keys it reads.
        cmd = re.sub(r"\$\{item\.\w+\}", "ITEM", cmd)
    # Inside a foreach over `models`, ${key} is the model name and ${item.x} is models.<key>.x.
    cmd = cmd.replace("${key}", "KEY").replace("${item.", "${models.KEY.")
    used = set(re.findall(r"\$\{([^}]+)\}", cmd))
    used |= set(re.findall(r"-P \w+ ([\w.]+)", cmd))
    declared = {re.sub(r"\$\{item\.\w+\}", "ITEM", p.replace("${key}", "KEY"))
                for p in stage.get("params", []) if isinstance(p, str)}
    covered = {u for u in used if any(u == d or u.startswith(d + ".") for d in declared)}
    assert covered == used, f"{name}: reads {sorted(used - covered)} without declaring them"
    unused = {d for d in declared if not any(u == d or u.startswith(d + ".") for u in used)}
    assert not unused, f"{name}: declares {sorted(unused)} but does not pass them"


@pytest.mark.parametrize("name,stage", sorted(
    (n, s) for n, s in _stages().items() if "matrix" in s))
def test_matrix_stages_pass_values_by_name(name, stage):
    # ${key} joins the matrix values with "-" (e.g. "resnet-0.05"); a notebook that received it
    # would have to parse it back, so it may name output files only.
    passed_values = re.findall(r"-p \w+ (\S+)", stage["cmd"])
    assert "${key}" not in passed_values, f"{name}: passes the composite ${{key}}"
    for dimension in stage["matrix"]:
        assert f"${{item.{dimension}}}" in stage["cmd"], f"{name}: does not pass {dimension}"


def test_params_key_values_reach_the_notebook_whole(tmp_path):
    from calib.pipeline import params_value

    (tmp_path / "params.yaml").write_text("defend:\n  options:\n    aaa: {tau: 4.0, bpda: true}\n")
    value = params_value(tmp_path / "params.yaml", "defend.options")
    assert value == {"aaa": {"tau": 4.0, "bpda": True}}
    with pytest.raises(KeyError, match=r"'defend\.option'.*keys there: \['options'\]"):
        params_value(tmp_path / "params.yaml", "defend.option")


def test_notebooks_read_the_data_root_parameter():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [("".join(c["source"]), c) for c in nb["cells"] if c["cell_type"] == "code"]
        for source, cell in code:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                continue
            assert '"data/raw"' not in source, f"{path.name} hard-codes data/raw; use data_root"


def test_command_line_values_read_as_yaml_scalars():
    from calib.pipeline import parse_value

    assert parse_value("true") is True and parse_value("0.05") == 0.05
    assert parse_value("data/raw") == "data/raw" and parse_value("null") is None
    assert parse_value("") == ""  # a quoted empty value ("${data.mirror}") stays a string
    assert parse_value("[a, b]") == "[a, b]"


def test_executed_notebooks_are_outputs_not_deps():
    for name, stage in _notebook_stages().items():
        for dep in stage.get("deps", []):
            assert not str(dep).startswith("reports/"), f"{name} depends on an executed notebook"


def test_committed_params_are_the_default_profile():
    assert (ROOT / "params.yaml").read_text() == profile_text("default", ROOT / "profiles")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    params = render_profile(profile, ROOT / "profiles")
    assert params["profile"] == profile


def test_params_are_validated_once_per_content(tmp_path, monkeypatch):
    """Stages of one repro skip re-validating an unchanged params file; a change is checked."""
    import shutil

    from calib import pipeline
    from calib.config import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    calls = []
    import calib.config

    real = calib.config.load_params
    monkeypatch.setattr(calib.config, "load_params", lambda p: calls.append(p) or real(p))
    pipeline.validate_params_once("params.yaml")
    pipeline.validate_params_once("params.yaml")
    assert len(calls) == 1 and pipeline.VALIDATED_STAMP.exists()
    text = (tmp_path / "params.yaml").read_text().replace("eps: 0.1 ", "eps: 2.0 ")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"attack\.eps\b"):
        pipeline.validate_params_once("params.yaml")
    assert len(calls) == 2
