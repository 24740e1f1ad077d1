"""Tests for calib.analysis.sweeps (paper Fig. 2): eps names, sweep points, tables, figure."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import labelled_images
from tiny_models import seeded_conv as tiny_model
from torch import nn

from calib import plots
from calib.analysis import sweeps
from calib.attacks import KINDS
from calib.attacks.grid import AttackGrid, GridRun, run_grid
from calib.config import ConfigError, check_params
from calib.io import write_json
from calib.profiles import render_profile

ROOT = Path(__file__).resolve().parents[1]
EPS_GRID = (0.05, 0.2)
BUDGET = sweeps.SweepBudget(square_iterations=10, square_p_init=0.3, pgd_iterations=3,
                            pgd_alpha_fraction=0.4)
eps_values = st.floats(min_value=5e-324, max_value=1.0, allow_nan=False, allow_infinity=False)


def tiny_data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return labelled_images(n, seed)


pytestmark = pytest.mark.usefixtures("one_thread")


class Exploding(nn.Module):
    """A model that fails on any forward pass: validation must come before any attack."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was queried before the arguments were validated")


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory) -> dict:
    """A 2-eps sweep of both settings and all kinds on a tiny model, written as sweep files."""
    model = tiny_model()
    images, labels = tiny_data()
    root = tmp_path_factory.mktemp("results")
    config = sweeps.budget_config(BUDGET, settings=sweeps.SWEEP_SETTINGS, kinds=KINDS,
                                  n_images=len(labels), seed=0)
    rows = {}
    for eps in EPS_GRID:
        rows[eps] = sweeps.run_sweep_point(model, images, labels, eps=eps, budget=BUDGET)
        record = sweeps.sweep_record("tiny", eps, rows[eps], config=config)
        write_json(sweeps.sweep_file("tiny", eps, root), record)
    return {"model": model, "images": images, "labels": labels, "rows": rows,
            "folder": sweeps.sweep_dir("tiny", root)}


# --- eps names ---------------------------------------------------------------------------------

@given(eps_values)
def test_eps_name_round_trips_and_is_filesystem_safe(eps):
    name = sweeps.format_eps(eps)
    assert sweeps.parse_eps(name) == eps
    assert re.fullmatch(r"[0-9.e-]+", name), name
    path = sweeps.sweep_file("m", eps, "results")
    assert path.name == f"eps_{name}.json"
    assert sweeps.eps_from_path(path) == eps


@given(eps_values)
def test_eps_name_is_what_dvc_renders(eps):
    # dvc.yaml writes the file name as eps_${item.eps}.json: it must name the same file the
    # notebook writes.
    interpolate = pytest.importorskip("dvc.parsing.interpolate")
    assert sweeps.format_eps(eps) == interpolate.to_str(eps)


@pytest.mark.parametrize("eps", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_format_eps_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        sweeps.format_eps(eps)


@pytest.mark.parametrize("text", ["0.050", "5e-2", "-0.1", "inf", "nan", "1", "1.5", "",
                                  "0.05 ", "1e-5", 0.05])
def test_parse_eps_rejects_non_canonical_names(text):
    with pytest.raises(ValueError, match="eps"):
        sweeps.parse_eps(text)


def test_eps_from_path_rejects_other_files():
    with pytest.raises(ValueError, match=r"eps_0\.05\.json"):
        sweeps.eps_from_path("results/m/sweep/summary.json")


# --- one sweep point ---------------------------------------------------------------------------

def test_mini_sweep_gives_every_setting_and_kind(mini_sweep):
    for eps, rows in mini_sweep["rows"].items():
        assert [(r["setting"], r["kind"]) for r in rows] == \
            [(s, k) for s in sweeps.SWEEP_SETTINGS for k in KINDS]
        for r in rows:
            assert r["eps"] == eps and r["n"] == 8
            assert math.isfinite(r["ece_after"]) and math.isfinite(r["ks_after"])
            assert r["label_preserved"] == 1.0
            assert r["accuracy_after"] == r["accuracy_before"]
            assert r["linf_max"] <= eps + 1e-6
        pgd = [r for r in rows if r["setting"] == "pgd-linf"]
        assert all(r["iterations"] == BUDGET.pgd_iterations for r in pgd)


def test_sweep_point_is_deterministic(mini_sweep):
    again = sweeps.run_sweep_point(mini_sweep["model"], mini_sweep["images"],
                                   mini_sweep["labels"], eps=EPS_GRID[0], budget=BUDGET)
    assert again == mini_sweep["rows"][EPS_GRID[0]]


def test_pgd_step_scales_with_eps():
    grid = BUDGET.grid(0.05)
    assert grid.settings == sweeps.SWEEP_SETTINGS and grid.eps_linf == 0.05
    args = grid.arguments("pgd-linf")
    assert args["alpha"] == pytest.approx(0.02) and args["iterations"] == 3
    args = grid.arguments("square-linf")
    assert args["p_init"] == 0.3 and args["iterations"] == 10 and "alpha" not in args


@pytest.mark.parametrize("kwargs,name", [
    ({"eps": 0.0}, "eps"), ({"eps": -0.1}, "eps"), ({"eps": 1.5}, "eps"),
    ({"eps": 0.1, "settings": "square-l2"}, "settings"),
    ({"eps": 0.1, "settings": ""}, "settings"),
    ({"eps": 0.1, "settings": "square-linf,square-linf"}, "settings"),
    ({"eps": 0.1, "kinds": "uca,xyz"}, "kinds"),
    ({"eps": 0.1, "kinds": ["mma", "foo"]}, "kinds"),
])
def test_run_sweep_point_rejects_bad_input_before_any_attack(kwargs, name):
    images, labels = tiny_data()
    with pytest.raises(ValueError, match=name):
        sweeps.run_sweep_point(Exploding(), images, labels, budget=BUDGET, **kwargs)


@pytest.mark.parametrize("field,value", [("square_iterations", 0), ("pgd_iterations", 1.5),
                                         ("square_p_init", 0.0), ("pgd_alpha_fraction", -1),
                                         ("square_p_init", True)])
def test_budget_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        sweeps.SweepBudget(**{field: value})


def test_sweep_record_rejects_mixed_rows(mini_sweep):
    rows = mini_sweep["rows"][EPS_GRID[0]]
    with pytest.raises(ValueError, match="eps"):
        sweeps.sweep_record("tiny", EPS_GRID[1], rows, config={})
    bad = copy.deepcopy(rows)
    bad[1]["ece_before"] += 0.1
    with pytest.raises(ValueError, match="clean ece"):
        sweeps.sweep_record("tiny", EPS_GRID[0], bad, config={})
    with pytest.raises(ValueError, match="rows"):
        sweeps.sweep_record("tiny", EPS_GRID[0], [], config={})


# --- collecting and tables ---------------------------------------------------------------------

def test_collect_sweep_gives_a_tidy_table(mini_sweep):
    tidy = sweeps.collect_sweep(mini_sweep["folder"])
    assert len(tidy) == len(EPS_GRID) * len(sweeps.SWEEP_SETTINGS) * len(KINDS)
    for column in ("model", "setting", "kind", "eps", "ece", "ks", "confidence",
                   "success_rate", "clean_ece", "clean_ks", "clean_confidence"):
        assert column in tidy
    assert set(tidy["eps"]) == set(EPS_GRID)
    for eps, rows in mini_sweep["rows"].items():
        for r in rows:
            hit = tidy[(tidy["eps"] == eps) & (tidy["setting"] == r["setting"])
                       & (tidy["kind"] == r["kind"])]
            assert len(hit) == 1
            assert hit["ece"].item() == pytest.approx(r["ece_after"], abs=1e-6)
            assert hit["clean_ece"].item() == pytest.approx(r["ece_before"], abs=1e-6)


def test_eps_table_has_the_plot_columns(mini_sweep):
    tidy = sweeps.collect_sweep(mini_sweep["folder"])
    for setting in sweeps.SWEEP_SETTINGS:
        for metric in ("ece", "ks", "confidence"):
            wide = sweeps.eps_table(tidy, setting, metric)
            assert list(wide.columns) == ["eps", "clean", *KINDS]
            assert list(wide["eps"]) == sorted(EPS_GRID)
            assert wide["clean"].nunique() == 1
        wide = sweeps.eps_table(tidy, setting, "success_rate")
        assert list(wide.columns) == ["eps", *KINDS]
    with pytest.raises(ValueError, match="setting"):
        sweeps.eps_table(tidy, "square-l2")
    with pytest.raises(ValueError, match="metric"):
        sweeps.eps_table(tidy, "square-linf", "queries")


def _copy_sweep(folder, tmp_path):
    dest = tmp_path / "sweep"
    shutil.copytree(folder, dest)
    return dest


def _edit(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_collect_sweep_rejects_files_of_another_sweep(mini_sweep, tmp_path):
    folder = _copy_sweep(mini_sweep["folder"], tmp_path)
    victim = folder / f"eps_{sweeps.format_eps(EPS_GRID[1])}.json"
    _edit(victim, lambda r: r["config"].update(square_iterations=999))
    with pytest.raises(ValueError, match=r"eps_0\.2\.json.*square_iterations"):
        sweeps.collect_sweep(folder)


def test_collect_sweep_rejects_another_clean_level(mini_sweep, tmp_path):
    folder = _copy_sweep(mini_sweep["folder"], tmp_path)
    victim = folder / f"eps_{sweeps.format_eps(EPS_GRID[1])}.json"
    _edit(victim, lambda r: r["clean"].update(ece=r["clean"]["ece"] + 0.01))
    with pytest.raises(ValueError, match="clean ece"):
        sweeps.collect_sweep(folder)


def test_collect_sweep_rejects_misnamed_files(mini_sweep, tmp_path):
    folder = _copy_sweep(mini_sweep["folder"], tmp_path)
    shutil.copy(folder / "eps_0.05.json", folder / "eps_0.1.json")
    with pytest.raises(ValueError, match=r"eps_0\.1\.json"):
        sweeps.collect_sweep(folder)
    (folder / "eps_0.1.json").unlink()
    shutil.copy(folder / "eps_0.05.json", folder / "eps_0.050.json")
    with pytest.raises(ValueError, match="canonical"):
        sweeps.collect_sweep(folder)


def test_collect_sweep_needs_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep"):
        sweeps.collect_sweep(tmp_path)
    with pytest.raises(FileNotFoundError, match="sweep"):
        sweeps.collect_sweep(tmp_path / "missing")


# --- the query curve ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs() -> GridRun:
    images, labels = tiny_data()
    grid = AttackGrid(settings=sweeps.SWEEP_SETTINGS, kinds=KINDS, eps_linf=0.1,
                      square_iterations=12, square_p_init=0.3, pgd_iterations=12, pgd_alpha=0.04)
    return run_grid(tiny_model(), images, labels, grid, seed=0)


def test_query_curve_comes_from_the_history(runs):
    results, labels = runs.results, runs.labels
    curves = runs.curves(model_name="tiny", points=5)
    assert list(curves.columns[:3]) == ["model", "setting", "kind"]
    for (setting, kind), result in results.items():
        part = curves[(curves["setting"] == setting) & (curves["kind"] == kind)]
        summary = result.summary(labels)
        first, last = part.iloc[0], part.iloc[-1]
        assert first["queries"] == 1 and last["queries"] == result.iterations + 1
        assert np.all(np.diff(part["queries"]) > 0)
        assert first["ece"] == pytest.approx(summary["ece_before"], abs=1e-12)
        assert first["confidence"] == pytest.approx(summary["confidence_before"], abs=1e-12)
        assert last["ece"] == pytest.approx(summary["ece_after"], abs=1e-12)
        assert last["ks"] == pytest.approx(summary["ks_after"], abs=1e-12)
        assert last["confidence"] == pytest.approx(summary["confidence_after"], abs=1e-12)
        assert last["success_rate"] == pytest.approx(summary["success_rate"], abs=1e-12)
        assert last["queries_mean"] == pytest.approx(summary["queries_mean"], abs=1e-12)


def test_query_table_has_the_plot_columns(runs):
    results, labels = runs.results, runs.labels
    curves = runs.curves(model_name="tiny", points=6)
    for setting in sweeps.SWEEP_SETTINGS:
        wide = sweeps.query_table(curves, setting, "ece")
        assert list(wide.columns) == ["queries", "clean", *KINDS]
        assert np.all(np.diff(wide["queries"]) > 0)
        assert not wide[list(KINDS)].isna().any().any()
        assert wide["clean"].iloc[0] == pytest.approx(
            results[setting, "uca"].summary(labels)["ece_before"])
        assert list(sweeps.query_table(curves, setting, "success_rate").columns) == \
            ["queries", *KINDS]


def test_query_table_rejects_several_models(runs):
    curves = pd.concat([runs.curves(model_name=m, points=3)
                        for m in ("a", "b")])
    with pytest.raises(ValueError, match="several models"):
        sweeps.query_table(curves, "square-linf")


# --- tables from arbitrary long data (property) -------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(1e-3, 1.0, allow_nan=False), min_size=1, max_size=6, unique=True),
       st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True),
       st.integers(0, 2**31 - 1))
def test_wide_tables_keep_every_value_and_sort_x(grid, kinds, seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(grid))
    rows = [{"model": "m", "setting": "square-linf", "kind": k, "eps": grid[i],
             "queries": float(int(grid[i] * 1000) + 1), "ece": rng.random(),
             "clean_ece": 0.05} for i in order for k in kinds]
    df = pd.DataFrame(rows)
    ordered = [k for k in KINDS if k in kinds]
    wide = sweeps.eps_table(df, "square-linf", "ece")
    assert list(wide.columns) == ["eps", "clean", *ordered]
    assert np.all(np.diff(wide["eps"]) > 0)
    for r in rows:
        assert wide.loc[wide["eps"] == r["eps"], r["kind"]].item() == r["ece"]
    curves = df.drop_duplicates(["kind", "queries"])
    wide_q = sweeps.query_table(curves, "square-linf", "ece")
    assert wide_q["queries"].is_monotonic_increasing and wide_q["queries"].is_unique
    assert list(wide_q.columns) == ["queries", "clean", *ordered]


# --- figure ------------------------------------------------------------------------------------

# --- params.yaml -------------------------------------------------------------------------------

def _params(**sweep):
    """The default profile with its sweep section changed."""
    params = render_profile("default", ROOT / "profiles")
    params["sweep"].update(sweep)
    return params


def test_the_schema_accepts_the_default_sweep():
    check_params(_params())


@pytest.mark.parametrize("change,key", [
    ({"eps": [0.05, 1]}, "sweep.eps"), ({"eps": []}, "sweep.eps"),
    ({"eps": [0.05, 0.05]}, "sweep.eps"), ({"eps": [1.5]}, "sweep.eps"),
    ({"models": ["resnet", "bert"]}, "sweep.models"), ({"models": []}, "sweep.models"),
    ({"settings": "square-l2"}, "sweep.settings"), ({"kinds": "uca,abc"}, "sweep.kinds"),
    ({"n_images": 301}, "sweep.n_images"), ({"n_images": 0}, "sweep.n_images"),
    ({"square_iterations": 0}, "sweep.square_iterations"),
    ({"pgd_alpha_fraction": 0.0}, "sweep.pgd_alpha_fraction"),
])
def test_the_schema_names_the_bad_sweep_key(change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_params(_params(**change))


# --- readouts ----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=30),
       st.floats(0.05, 1.0))
def test_saturation_queries_is_the_first_budget_reaching_the_fraction(values, fraction):
    q = np.arange(1, len(values) + 1, dtype=np.float64) * 3 - 2
    curves = pd.DataFrame({"setting": "square-linf", "kind": "uca", "queries": q,
                           "ece": values})
    answer = sweeps.saturation_queries(curves, "square-linf", fraction=fraction)["uca"]
    change = np.abs(np.asarray(values) - values[0])
    i = int(np.flatnonzero(q == answer)[0])
    assert change[i] >= fraction * change[-1] - 1e-12
    assert np.all(change[:i] < fraction * change[-1] - 1e-12)


def test_saturation_queries_rejects_bad_fraction(runs):
    curves = runs.curves(model_name="tiny", points=4)
    with pytest.raises(ValueError, match="fraction"):
        sweeps.saturation_queries(curves, "square-linf", fraction=0.0)


def test_findings_read_the_tables(mini_sweep, runs):
    tidy = sweeps.collect_sweep(mini_sweep["folder"])
    curves = runs.curves(model_name="tiny", points=6)
    lines = sweeps.findings(tidy, curves, paper_eps=0.05)
    clean = tidy["clean_ece"].iloc[0]
    for setting in sweeps.SWEEP_SETTINGS:
        mine = [line for line in lines if line.startswith(setting)]
        assert len(mine) == 4, mine
        assert f"ECE {clean:.3f} clean" in mine[0]
        assert "run's trajectory (not the outcome of shorter runs)" in mine[3]
    assert len(sweeps.findings(tidy, None, paper_eps=0.3)) == 2 * len(sweeps.SWEEP_SETTINGS)


def test_pgd_history_prefix_is_a_shorter_run(mini_sweep, runs):
    """The query curve needs no re-running: for PGD, history row b is exactly a b-step run."""
    labels = runs.labels
    curves = runs.curves(model_name="tiny", points=None)
    images = mini_sweep["images"]
    rows = sweeps.run_sweep_point(mini_sweep["model"], images, labels, eps=0.1,
                                  settings="pgd-linf", budget=BUDGET)
    tidy = pd.DataFrame([{**r, "eps": 0.1, "ece": r["ece_after"]} for r in rows])
    check = sweeps.cross_check(tidy, curves, 0.1)
    assert list(check["kind"]) == list(KINDS)
    assert (check["budget"] == BUDGET.pgd_iterations + 1).all()
    assert (check["curve_queries"] == check["budget"]).all()
    np.testing.assert_allclose(check["sweep"], check["curve"], atol=1e-12)
    with pytest.raises(ValueError, match="grid"):
        sweeps.cross_check(tidy, curves, 0.3)


# --- dedicated budget runs (Fig. 2's query axis) -----------------------------------------------

BUDGETS = (4, 10)


@pytest.fixture(scope="module")
def mini_budgets(tmp_path_factory, mini_sweep) -> dict:
    """Square runs at two budgets, each its own run (as a user choosing that budget)."""
    root = tmp_path_factory.mktemp("budget-results")
    rows = {}
    for budget in BUDGETS:
        b = sweeps.SweepBudget(square_iterations=budget, square_p_init=0.3, pgd_iterations=3,
                               pgd_alpha_fraction=0.4)
        config = sweeps.budget_config(b, settings=("square-linf",), kinds=KINDS,
                                      n_images=len(mini_sweep["labels"]), seed=0)
        rows[budget] = sweeps.run_sweep_point(mini_sweep["model"], mini_sweep["images"],
                                              mini_sweep["labels"], eps=0.2,
                                              settings="square-linf", budget=b)
        record = sweeps.sweep_record("tiny", 0.2, rows[budget], config=config)
        write_json(sweeps.budget_file("tiny", budget, root), record)
    return {"rows": rows, "folder": sweeps.budget_dir("tiny", root)}


def test_budget_file_names_round_trip(tmp_path):
    path = sweeps.budget_file("m", 200, tmp_path)
    assert path == tmp_path / "m" / "budget" / "queries_200.json"
    assert sweeps.budget_from_path(path) == 200
    for bad in ("queries_0200.json", "queries_0.json", "queries_x.json", "eps_0.1.json"):
        with pytest.raises(ValueError, match=r"queries_100\.json"):
            sweeps.budget_from_path(tmp_path / bad)
    with pytest.raises(ValueError, match="budget"):
        sweeps.budget_file("m", 0, tmp_path)


def test_collect_budgets_keeps_each_dedicated_run(mini_budgets):
    tidy = sweeps.collect_budgets(mini_budgets["folder"])
    assert sorted(set(tidy["budget"])) == list(BUDGETS)
    assert set(tidy["setting"]) == {"square-linf"} and (tidy["eps"] == 0.2).all()
    for budget, rows in mini_budgets["rows"].items():
        for row in rows:
            got = tidy[(tidy["budget"] == budget) & (tidy["kind"] == row["kind"])]
            assert got["ece"].item() == pytest.approx(row["ece_after"], abs=1e-6)
    wide = sweeps.budget_table(tidy, "square-linf", "ece")
    assert list(wide["budget"]) == list(BUDGETS)
    assert list(wide.columns) == ["budget", "clean", *KINDS]


def test_collect_budgets_rejects_a_file_of_another_eps(mini_budgets, tmp_path):
    import shutil

    folder = tmp_path / "budget"
    shutil.copytree(mini_budgets["folder"], folder)
    record = json.loads((folder / "queries_10.json").read_text())
    record["config"]["seed"] = 7
    (folder / "queries_10.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="seed"):
        sweeps.collect_budgets(folder)
    (folder / "queries_10.json").rename(folder / "queries_11.json")
    with pytest.raises(ValueError, match="Square budget other than 11"):
        sweeps.collect_budgets(folder)


def test_collect_budgets_reads_only_the_listed_budgets(mini_budgets, tmp_path):
    # A budget removed from sweep.budgets leaves its file behind (DVC does not delete the
    # outputs of a stage that no longer exists): it must neither enter the figure nor stop it.
    folder = tmp_path / "budget"
    shutil.copytree(mini_budgets["folder"], folder)
    record = json.loads((folder / "queries_10.json").read_text())
    record["config"]["seed"] = 7  # from an older configuration: the full read rejects it
    stale = folder / "queries_25.json"
    stale.write_text(json.dumps(record).replace('"iterations": 10', '"iterations": 25'))
    with pytest.raises(ValueError):
        sweeps.collect_budgets(folder)
    with pytest.warns(UserWarning, match=r"queries_25\.json"):
        tidy = sweeps.collect_budgets(folder, budgets=list(BUDGETS))
    assert sorted(set(tidy["budget"])) == list(BUDGETS)
    with pytest.warns(UserWarning, match=r"queries_25\.json"):
        assert set(sweeps.collect_budgets(folder, budgets=[10])["budget"]) == {10}
    with pytest.raises(FileNotFoundError, match=r"queries_50\.json"):
        sweeps.collect_budgets(folder, budgets=[10, 50])
    with pytest.raises(ValueError, match="budget"):
        sweeps.collect_budgets(folder, budgets=[0])


def test_collect_sweep_reads_only_the_listed_eps(mini_sweep, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(mini_sweep["folder"], folder)
    record = json.loads((folder / f"eps_{EPS_GRID[0]!r}.json").read_text())
    record["eps"], record["config"]["seed"] = 0.3, 7
    (folder / "eps_0.3.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="seed"):
        sweeps.collect_sweep(folder)
    with pytest.warns(UserWarning, match=r"eps_0\.3\.json"):
        tidy = sweeps.collect_sweep(folder, eps=list(EPS_GRID))
    assert sorted(set(tidy["eps"])) == sorted(EPS_GRID)
    with pytest.raises(FileNotFoundError, match=r"eps_0\.1\.json"):
        sweeps.collect_sweep(folder, eps=[*EPS_GRID, 0.1])


def test_the_sweep_point_is_the_dedicated_run_at_the_sweeps_budget(mini_sweep, mini_budgets,
                                                                     tmp_path):
    # The pipeline runs no budget stage at sweep.square_iterations: the sweep point at the
    # budget runs' eps must be exactly that run (same attack, images, seed and schedule).
    folder = tmp_path / "budget"
    shutil.copytree(mini_budgets["folder"], folder)
    dedicated = sweeps.collect_budgets(folder)
    point = sweeps.sweep_file("tiny", 0.2, mini_sweep["folder"].parent.parent)
    assert sweeps.collect_budgets(folder, sweep_point=point).equals(dedicated)  # file wins
    (folder / f"queries_{BUDGET.square_iterations}.json").unlink()
    filled = sweeps.collect_budgets(folder, sweep_point=point)
    columns = [c for c in dedicated.columns if c != "model"]
    pd.testing.assert_frame_equal(filled[columns].reset_index(drop=True),
                                  dedicated[columns].reset_index(drop=True))
    assert set(filled["setting"]) == {"square-linf"}  # the sweep's PGD rows stay out


def test_a_sweep_point_from_another_sweep_is_refused(mini_sweep, mini_budgets, tmp_path):
    root = mini_sweep["folder"].parent.parent
    with pytest.raises(ValueError, match="eps"):
        sweeps.collect_budgets(mini_budgets["folder"],
                               sweep_point=sweeps.sweep_file("tiny", 0.05, root))
    with pytest.raises(FileNotFoundError, match="sweep stage"):
        sweeps.collect_budgets(mini_budgets["folder"], sweep_point=tmp_path / "eps_0.2.json")
    record = json.loads(sweeps.sweep_file("tiny", 0.2, root).read_text())
    record["config"]["seed"] = 7
    other = tmp_path / "eps_0.2.json"
    other.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="seed"):
        sweeps.collect_budgets(mini_budgets["folder"], sweep_point=other)


def test_saturation_budget_reads_dedicated_runs():
    rows = [{"setting": "square-linf", "kind": "uca", "budget": b, "ece": v, "clean_ece": 0.0}
            for b, v in ((25, 0.1), (50, 0.45), (100, 0.5))]
    assert sweeps.saturation_budget(pd.DataFrame(rows), "square-linf") == {"uca": 50.0}
    with pytest.raises(ValueError, match="fraction"):
        sweeps.saturation_budget(pd.DataFrame(rows), "square-linf", fraction=0)


def test_plateau_reads_the_last_step_of_the_budget_curve():
    rows = [{"setting": "square-linf", "kind": kind, "budget": b, "success_rate": v}
            for kind, values in (("uca", (0.2, 0.9, 0.95)), ("oca", (0.7, 0.7, 0.71)))
            for b, v in zip((25, 500, 1000), values, strict=True)]
    assert sweeps.plateau(pd.DataFrame(rows), "square-linf") == {
        "uca": (0.9, 0.95), "oca": (0.7, 0.71)}
    with pytest.raises(ValueError, match="at least two budgets"):
        sweeps.plateau(pd.DataFrame(rows[:1]), "square-linf")


def test_plateau_step_is_a_paired_bootstrap_that_can_say_within_noise_or_higher():
    def rows(bits_small: str, bits_large: str) -> pd.DataFrame:
        return pd.DataFrame([
            {"setting": "square-linf", "kind": "uca", "budget": b, "succeeded": bits,
             "success_rate": bits.count("1") / len(bits)}
            for b, bits in ((500, bits_small), (1000, bits_large))])

    # One image of 100 gains: within noise.
    small = "1" * 90 + "0" * 10
    step = sweeps.plateau_step(rows(small, "1" * 91 + "0" * 9), "square-linf")["uca"]
    assert step.paired and step.outcome == "within noise"
    assert step.difference.value == pytest.approx(0.01)
    assert step.difference.lo <= 0.0 <= step.difference.hi
    # Thirty images gain and none loses: a real gain.
    step = sweeps.plateau_step(rows("1" * 60 + "0" * 40, "1" * 90 + "0" * 10), "square-linf")
    assert step["uca"].outcome == "higher" and step["uca"].difference.lo > 0.1
    # Files without per-image success cannot be paired.
    with pytest.raises(ValueError, match="rerun the budget stages"):
        sweeps.plateau_step(rows(small, small).assign(succeeded=None), "square-linf")


def test_run_sweep_point_records_per_image_success_in_image_order(mini_budgets):
    bits = sweeps.success_bits(torch.tensor([True, False, True]))
    assert bits == "101"
    assert sweeps._bits_to_array(bits).tolist() == [1, 0, 1]
    for rows in mini_budgets["rows"].values():
        for row in rows:
            assert len(row["succeeded"]) == row["n"]
            assert row["succeeded"].count("1") / row["n"] == pytest.approx(row["success_rate"])
    budgets = sweeps.collect_budgets(mini_budgets["folder"])
    assert budgets["succeeded"].map(len).eq(budgets["n"]).all()


def test_figure_and_findings_use_dedicated_runs(mini_sweep, mini_budgets, runs):
    tidy = sweeps.collect_sweep(mini_sweep["folder"])
    budgets = sweeps.collect_budgets(mini_budgets["folder"])
    curves = runs.curves(model_name="tiny", points=6)
    fig = plots.sweep_figure(tidy, curves, budgets=budgets, metrics=("ece",))
    query_axes = [ax for ax in fig.axes if "against queries" in ax.get_title()]
    assert query_axes
    square = next(ax for ax in query_axes if ax.get_title().startswith("square-linf"))
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert "one long run's trajectory" in legend  # the trajectory, labelled as such
    assert any(line.get_linestyle() == ":" for line in square.get_lines())
    xs = sorted({float(x) for line in square.get_lines() if line.get_marker() == "o"
                 for x in line.get_xdata()})
    assert xs == [float(b) for b in BUDGETS]  # the markers are the dedicated runs
    lines = sweeps.findings(tidy, curves, budgets=budgets)
    assert any("in dedicated runs, the smallest budget reaching 90%" in line for line in lines)
    step = next(line for line in lines if "what more queries still buy" in line)
    assert "paired bootstrap over the same images" in step and "gains within noise" in step
    assert any("trajectory (not the outcome of shorter runs)" in line for line in lines)
