"""Architecture/size and class-imbalance comparison (calib.analysis.comparison)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calib import metrics, plots
from calib.analysis import comparison
from calib.attacks import KINDS
from calib.plots import save_figure


def _attack_metrics(ece_after):
    return {"attacks": {f"square-linf/{k}": {
        "kind": k, "setting": "square-linf", "ece_before": 0.02, "ece_after": ece_after,
        "ks_after": ece_after, "confidence_after": 0.6, "success_rate": 0.8,
        "queries_success_median": 20.0} for k in KINDS}}


CLEAN = {"resnet": {"arch": "resnet18", "parameters": 11_000_000, "accuracy": 0.91,
                    "ece": 0.02},
         "resnet_small": {"arch": "resnet10t", "parameters": 5_000_000, "accuracy": 0.9,
                          "ece": 0.02},
         "vit": {"arch": "vit_fmnist_d6", "parameters": 2_700_000, "accuracy": 0.87,
                 "ece": 0.01},
         "resnet_lt": {"arch": "resnet18", "parameters": 11_000_000, "accuracy": 0.7,
                       "ece": 0.1, "imbalance_ratio": 100}}


def test_model_table_orders_by_family_imbalance_and_size(tmp_path):
    am = {m: _attack_metrics(0.1 * (i + 1)) for i, m in enumerate(CLEAN)}
    table = comparison.model_table(am, CLEAN)
    assert len(table) == 4 * len(CLEAN)
    order = table.drop_duplicates("model")["model"].tolist()
    assert order == ["resnet_small", "resnet", "resnet_lt", "vit"]
    assert table.loc[table["model"] == "resnet_lt", "imbalance_ratio"].eq(100).all()
    fig = plots.size_comparison(table)
    save_figure(fig, tmp_path / "size.png")
    assert (tmp_path / "size.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="lacks clean metrics"):
        comparison.model_table({"other": _attack_metrics(0.1)}, CLEAN)
    with pytest.raises(ValueError, match="no rows for setting"):
        plots.size_comparison(table, setting="pgd-l2")


def _records(seed=0, n=60):
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("resnet", "resnet_lt"):
        label = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.8, label, (label + 1) % 3)
        before = rng.uniform(0.5, 1.0, n)
        for kind in ("uca", "oca"):
            after = before * (0.6 if kind == "uca" else 1.0)
            rows.append(pd.DataFrame({"model": model, "setting": "square-linf", "kind": kind,
                                      "label": label, "prediction": pred,
                                      "confidence_before": before, "confidence_after": after,
                                      "success": rng.random(n) < 0.5}))
    return pd.concat(rows, ignore_index=True)


def test_per_class_table_matches_a_direct_computation(tmp_path):
    records = _records()
    table = comparison.per_class_table(records)
    r = records[(records["model"] == "resnet") & (records["kind"] == "uca")]
    for label in range(3):
        row = table[(table["model"] == "resnet") & (table["label"] == label)].iloc[0]
        mine = r[r["label"] == label]
        assert row["clean_accuracy"] == pytest.approx((mine["label"] == mine["prediction"]).mean())
        assert row["uca_success"] == pytest.approx(mine["success"].mean())
        assert row["n"] == len(mine)
    fig = plots.imbalance(table, balanced="resnet", long_tailed="resnet_lt",
                          train_counts=[100, 10, 1])
    save_figure(fig, tmp_path / "imb.png")
    with pytest.raises(ValueError, match="not in the per-class table"):
        plots.imbalance(table, balanced="vit", long_tailed="resnet_lt",
                        train_counts=[1, 1, 1])
    with pytest.raises(ValueError, match="lack columns"):
        comparison.per_class_table(records.drop(columns=["success"]))


def test_calibration_by_model_uses_the_project_ece():
    records = _records(1)
    out = comparison.calibration_by_model(records)
    g = records[(records["model"] == "resnet_lt") & (records["kind"] == "uca")]
    expected = metrics.ece(g["confidence_after"].to_numpy(),
                           (g["label"] == g["prediction"]).to_numpy())
    got = out[(out["model"] == "resnet_lt") & (out["kind"] == "uca")]["ece_after"].item()
    assert got == pytest.approx(expected)
