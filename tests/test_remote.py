"""Sharing results: metrics files DVC reads hold scalars only, the trained models are DVC
artifacts, and ``make pull`` / ``make push`` (``calib.remote``) move the cache through a remote.

The pipeline's own push/pull round trip (a smoke run pushed from one clone, pulled into a
second, ``dvc repro`` with nothing to do) is in ``test_smoke_pipeline.py``; here a one-stage
DVC repository shows the same in seconds.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pipeline_repo import env

from calib import io
from calib.profiles import PROFILES, render_profile
from calib.remote import REMOTE_EXAMPLES, RemoteError, check_remote, how_to_add_a_remote

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


# --- metrics files: scalars for DVC, the rest beside them ---------------------------------------

def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, doc


def test_split_keeps_numbers_and_moves_the_rest():
    doc = {"model": "resnet", "accuracy": 0.91, "n": 500, "kept": True, "nan": math.nan,
           "environment": {"torch": "2.14.1", "device": "cpu"},
           "train_class_counts": [6000, 6000],
           "attacks": {"square-linf/uca": {"setting": "square-linf", "success_rate": 0.97}},
           "empty": {}}
    scalars, info = io.split_metrics(doc)
    assert scalars == {"accuracy": 0.91, "n": 500, "kept": True,
                       "attacks": {"square-linf/uca": {"success_rate": 0.97}}}
    assert all(isinstance(v, bool | int | float) for _, v in _leaves(scalars))
    assert info["environment"] == {"torch": "2.14.1", "device": "cpu"}
    assert info["attacks"] == {"square-linf/uca": {"setting": "square-linf"}}
    assert info["empty"] == {} and math.isnan(info["nan"])
    assert "environment" not in scalars and "train_class_counts" not in scalars


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=False, allow_infinity=False, width=32),
                       st.text(max_size=5), st.lists(st.integers(), max_size=3))
_json_doc = st.recursive(
    st.dictionaries(st.text(min_size=1, max_size=4), _json_leaf, max_size=4),
    lambda children: st.dictionaries(st.text(min_size=1, max_size=4),
                                     st.one_of(_json_leaf, children), max_size=4),
    max_leaves=12)


@given(_json_doc)
def test_merge_inverts_split(doc):
    doc = json.loads(json.dumps(io._to_jsonable(doc)))  # as write_json would store it
    scalars, info = io.split_metrics(doc)
    assert all(isinstance(v, bool | int | float) for _, v in _leaves(scalars))
    assert io.merge_metrics(scalars, info) == doc


def test_write_and_read_metrics(tmp_path):
    path = tmp_path / "results" / "clean_metrics.json"
    doc = {"accuracy": 0.9, "arch": "resnet18", "environment": {"torch": "2.14.1"}}
    io.write_metrics(path, doc)
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert io.info_path(path) == tmp_path / "results" / "clean_info.json"
    assert json.loads(io.info_path(path).read_text()) == {
        "arch": "resnet18", "environment": {"torch": "2.14.1"}}
    assert io.read_metrics(path) == doc


def test_metrics_file_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"_metrics\.json"):
        io.info_path(tmp_path / "scores.json")
    with pytest.raises(FileNotFoundError, match="has its stage run"):
        io.read_metrics(tmp_path / "absent_metrics.json")


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _stage_bodies() -> dict[str, dict]:
    return {name: (s["do"] if "do" in s else s) for name, s in _dvc_yaml()["stages"].items()}


def _entries(items) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def test_every_metrics_file_has_its_info_sibling_declared():
    for name, stage in _stage_bodies().items():
        for metrics in _entries(stage.get("metrics")):
            assert metrics.endswith(io.METRICS_SUFFIX), (name, metrics)
            sibling = metrics[: -len(io.METRICS_SUFFIX)] + io.INFO_SUFFIX
            assert sibling in _entries(stage.get("outs")), f"{name}: {sibling} is not an out"
        for dep in _entries(stage.get("deps")):
            if dep.endswith(io.METRICS_SUFFIX):  # a reader of metrics reads both halves
                sibling = dep[: -len(io.METRICS_SUFFIX)] + io.INFO_SUFFIX
                assert sibling in _entries(stage["deps"]), f"{name}: {sibling} is not a dep"


def test_notebooks_write_and_read_metrics_through_calib_io():
    """A metrics file written with write_json would put names and lists in front of DVC."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                         if c["cell_type"] == "code")
        bad = re.findall(r"(?:write|read)_json\([^\n]*_metrics\.json", code)
        assert not bad, f"{path.name}: use write_metrics/read_metrics: {bad}"


# --- the trained models as DVC artifacts ------------------------------------------------------

def test_every_trained_model_is_an_artifact():
    artifacts = _dvc_yaml()["artifacts"]
    for profile in PROFILES:
        models = render_profile(profile)["models"]
        assert set(models) <= set(artifacts), (profile, sorted(set(models) - set(artifacts)))
    for name, spec in artifacts.items():
        assert spec["path"] == f"models/{name}" and spec["type"] == "model", name
        assert spec.get("desc"), f"artifact {name} has no description"


def test_dvc_reads_the_artifacts():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        declared = {name for per_file in repo.artifacts.read().values() for name in per_file}
    assert declared == set(_dvc_yaml()["artifacts"])


# --- calib.remote: pull and push ----------------------------------------------------------------

def _sh(args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _remote_cli(action: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return _sh([sys.executable, "-m", "calib.remote", action, *extra], cwd, check=False)


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    """A git + DVC repository with one stage whose output is cached (like a checkpoint)."""
    repo = tmp_path / "lab"
    repo.mkdir()
    _sh(["git", "init", "-q"], repo)
    _sh(["dvc", "init", "-q"], repo)
    _sh(["dvc", "config", "core.analytics", "false"], repo)
    (repo / "params.yaml").write_text("scale: 3\n")
    (repo / "make_model.py").write_text(
        "import pathlib, yaml\n"
        "s = yaml.safe_load(open('params.yaml'))['scale']\n"
        "pathlib.Path('models').mkdir(exist_ok=True)\n"
        "pathlib.Path('models/weights.bin').write_bytes(bytes(range(256)) * s)\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python make_model.py\n    deps: [make_model.py]\n"
        "    params: [scale]\n    outs: [models]\n")
    _sh(["dvc", "repro", "-q"], repo)
    _sh([*GIT, "add", "-A"], repo)
    _sh([*GIT, "commit", "-q", "-m", "trained"], repo)
    return repo


def test_pull_without_a_remote_says_how_to_add_one(tiny_repo):
    proc = _remote_cli("pull", tiny_repo)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "no DVC remote is configured" in proc.stderr
    for _, command in REMOTE_EXAMPLES:  # every kind, one line each, as the README shows them
        assert command in proc.stderr


def test_push_without_a_remote_says_the_same(tiny_repo):
    proc = _remote_cli("push", tiny_repo)
    assert proc.returncode == 1 and "dvc remote add -d lab" in proc.stderr


def test_outside_a_dvc_repository(tmp_path):
    proc = _remote_cli("pull", tmp_path)
    assert proc.returncode == 1 and "not a DVC repository" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_remote_choice(tiny_repo, tmp_path):
    with pytest.raises(RemoteError, match="no DVC remote"):
        check_remote(tiny_repo)
    _sh(["dvc", "remote", "add", "a", str(tmp_path / "a")], tiny_repo)
    assert check_remote(tiny_repo) == "a"  # the only one, even if not the default
    _sh(["dvc", "remote", "add", "b", str(tmp_path / "b")], tiny_repo)
    with pytest.raises(RemoteError, match="several remotes"):
        check_remote(tiny_repo)
    with pytest.raises(RemoteError, match="'c' is not configured"):
        check_remote(tiny_repo, "c")
    _sh(["dvc", "remote", "default", "b"], tiny_repo)
    assert check_remote(tiny_repo) == "b"


def test_push_then_pull_into_a_fresh_clone(tiny_repo, tmp_path):
    remote = tmp_path / "shared-remote"
    _sh(["dvc", "remote", "add", "-d", "lab", str(remote)], tiny_repo)
    _sh([*GIT, "commit", "-q", "-am", "remote"], tiny_repo)
    pushed = _remote_cli("push", tiny_repo)
    assert pushed.returncode == 0, pushed.stderr

    clone = tmp_path / "reader"
    _sh(["git", "clone", "-q", str(tiny_repo), str(clone)], tmp_path)
    assert not (clone / "models").exists()
    pulled = _remote_cli("pull", clone)
    assert pulled.returncode == 0, pulled.stderr
    assert "`dvc repro` has nothing to rerun" in pulled.stdout
    assert (clone / "models/weights.bin").read_bytes() == bytes(range(256)) * 3
    repro = _sh(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro, repro


def test_pull_reports_what_the_remote_lacks(tiny_repo, tmp_path):
    _sh(["dvc", "remote", "add", "-d", "lab", str(tmp_path / "empty-remote")], tiny_repo)
    _sh([*GIT, "commit", "-q", "-am", "remote"], tiny_repo)
    clone = tmp_path / "reader"
    _sh(["git", "clone", "-q", str(tiny_repo), str(clone)], tmp_path)
    pulled = _remote_cli("pull", clone)
    assert pulled.returncode != 0  # DVC's own failure: the files are not on the remote
    assert "Traceback" not in pulled.stderr


def test_make_pull_and_push_call_the_checked_commands():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^pull:.*\n\tpython -m calib.remote pull$", makefile, re.M)
    assert re.search(r"^push:.*\n\tpython -m calib.remote push$", makefile, re.M)


def test_readme_shows_each_kind_of_remote_in_one_line():
    readme = (ROOT / "README.md").read_text()
    for _, command in REMOTE_EXAMPLES:
        assert command in readme, command
    assert "make pull" in readme and "make push" in readme
    assert how_to_add_a_remote().count("dvc remote add") == len(REMOTE_EXAMPLES)
