"""calib.attacks.grid: the settings vocabulary, the grid's budget, running a grid, records."""

from __future__ import annotations

import pytest
import torch
from tiny_models import labelled_images
from tiny_models import seeded_conv as tiny_model
from torch import nn

from calib.attacks import KINDS, run_attack
from calib.attacks.grid import (
    ADVERSARIAL_FILE,
    RECORD_COLUMNS,
    RECORDS_FILE,
    SETTINGS,
    AttackGrid,
    attacked_images,
    parse_names,
    read_records,
    run_grid,
    split_setting,
    write_records,
)


def tiny_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return labelled_images(n, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")

GRID = AttackGrid(settings="square-linf,square-l2,pgd-linf", kinds=KINDS, eps_linf=0.1,
                  eps_l2=0.5, square_iterations=6, square_p_init=0.3, pgd_iterations=4,
                  pgd_alpha=0.04)


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was queried before the arguments were validated")


@pytest.fixture(scope="module")
def run():
    images, labels = tiny_data()
    return run_grid(tiny_model(), images, labels, GRID, seed=3)


@pytest.mark.parametrize("value,expected", [
    ("square-linf, pgd-linf", ["square-linf", "pgd-linf"]),
    (["pgd-linf"], ["pgd-linf"]),
    ("square-l2,", ["square-l2"]),
])
def test_parse_names(value, expected):
    assert parse_names("attack.settings", value, SETTINGS) == expected


@pytest.mark.parametrize("value,pattern", [
    ("", "attack.settings is empty"),
    ("square-l1", r"attack.settings must be one of"),
    ("pgd-linf,pgd-linf", "more than once"),
])
def test_parse_names_rejects(value, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_names("attack.settings", value, SETTINGS)


def test_split_setting():
    assert split_setting("square-l2") == ("square", "l2")
    with pytest.raises(ValueError, match="setting must be one of"):
        split_setting("pgd-l2")


def test_grid_normalises_names_and_picks_the_budget_per_method_and_norm():
    assert GRID.settings == ("square-linf", "square-l2", "pgd-linf") and GRID.kinds == KINDS
    assert GRID.arguments("square-linf") == {"method": "square", "norm": "linf", "eps": 0.1,
                                             "iterations": 6, "p_init": 0.3}
    assert GRID.arguments("square-l2")["eps"] == 0.5
    assert GRID.arguments("pgd-linf") == {"method": "pgd", "norm": "linf", "eps": 0.1,
                                          "iterations": 4, "alpha": 0.04}
    assert "alpha" not in AttackGrid(pgd_alpha=None).arguments("pgd-linf")
    config = GRID.config()
    assert config["settings"] == ["square-linf", "square-l2", "pgd-linf"]
    assert set(config) == {"settings", "kinds", "eps_linf", "eps_l2", "square_iterations",
                           "square_p_init", "pgd_iterations", "pgd_alpha", "precision",
                           "query_graph"}


@pytest.mark.parametrize("field,value", [
    ("settings", ("square-l1",)), ("settings", ""), ("kinds", "uca,xyz"), ("precision", "fp16"),
    ("query_graph", "compiled"),
    ("eps_linf", 0.0), ("eps_linf", 1.5), ("eps_l2", -1.0), ("square_iterations", 0),
    ("pgd_iterations", 1.5), ("square_p_init", 0.0), ("square_p_init", True),
    ("pgd_alpha", 0.0), ("pgd_alpha", True),
])
def test_grid_rejects_bad_values(field, value):
    name = "eps" if field.startswith("eps") else field
    with pytest.raises(ValueError, match=name):
        AttackGrid(**{field: value})


def test_run_grid_is_every_attack_in_grid_order(run):
    images, labels = tiny_data()
    assert list(run.results) == [(s, k) for s in GRID.settings for k in GRID.kinds]
    # Each run is exactly what run_attack gives for that setting, with the grid's seed.
    direct = run_attack(tiny_model(), images, kind="mma", labels=labels, seed=3,
                        **GRID.arguments("square-l2"))
    assert torch.equal(direct.x_adv, run.results["square-l2", "mma"].x_adv)
    for (setting, _), result in run.results.items():
        assert result.eps == GRID.eps(split_setting(setting)[1])
        assert bool((result.final_prediction == result.clean_prediction).all())


def test_run_grid_validates_before_any_attack():
    images, labels = tiny_data()
    with pytest.raises(ValueError, match="labels"):
        run_grid(Exploding(), images, labels[:3], GRID)


def test_summaries_carry_the_given_columns(run):
    summaries = run.summaries(model="tiny")
    assert len(summaries) == len(run.results)
    assert all(s["model"] == "tiny" and s["n"] == 6 for s in summaries)
    assert [(s["setting"], s["kind"]) for s in summaries] == list(run.results)


def test_records_and_curves(run):
    records = run.records(torch.arange(10, 16))
    assert tuple(records.columns) == RECORD_COLUMNS
    assert len(records) == 6 * len(run.results) and records["index"].min() == 10
    curves = run.curves(model_name="tiny", points=4)
    for (setting, kind), result in run.results.items():
        part = curves[(curves["setting"] == setting) & (curves["kind"] == kind)]
        assert part["queries"].iloc[-1] == result.iterations + 1
        assert part["ece"].iloc[-1] == pytest.approx(result.summary()["ece_after"])


def test_records_round_trip_and_alignment(run, tmp_path):
    index = torch.arange(10, 16)
    write_records(tmp_path, run, index)
    assert (tmp_path / RECORDS_FILE).exists() and (tmp_path / ADVERSARIAL_FILE).exists()
    records, adversarial = read_records(tmp_path)
    x_adv, success = attacked_images(records, adversarial, index, setting="pgd-linf",
                                     kind="uca")
    assert torch.equal(x_adv, run.results["pgd-linf", "uca"].x_adv)
    assert torch.equal(success, run.results["pgd-linf", "uca"].success)
    with pytest.raises(ValueError, match="not aligned"):
        attacked_images(records, adversarial, index + 1, setting="pgd-linf", kind="uca")
    with pytest.raises(ValueError, match="lack 'pgd-l2/uca'"):
        attacked_images(records, adversarial, index, setting="pgd-l2", kind="uca")


def test_records_without_images(run, tmp_path):
    write_records(tmp_path, run, torch.arange(6), images=False)
    assert not (tmp_path / ADVERSARIAL_FILE).exists()
    with pytest.raises(FileNotFoundError, match="run the attack stage"):
        read_records(tmp_path)
