"""Training seeds: one training path for the main model and its copies, the per-seed rows and
the spread across seeds (calib.recipe, calib.analysis.seeds)."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest
import torch
from tiny_models import centred_conv, images

from calib.analysis.seeds import SPREAD_METRICS, seed_row, seeds_figure, spread_table
from calib.attacks import run_attack
from calib.data import LabeledImages
from calib.recipe import train_from_config

matplotlib.use("Agg")

CONFIG = {"arch": "resnet10t", "pretrained": False, "img_size": 16,
          "train": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.05,
                    "weight_decay": 0.0, "warmup_epochs": 0.0, "augment_pad": 0,
                    "augment_flip": False, "imbalance_ratio": 1}}
META = {"num_classes": 3, "in_chans": 1, "mean": [0.5], "std": [0.25]}


def _data(n: int = 48) -> tuple[LabeledImages, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.5
    x[:, :, : 5 * 1, :] += (labels == 0).float().view(-1, 1, 1, 1) * 0.4  # learnable signal
    x[:, :, 6:11, :] += (labels == 1).float().view(-1, 1, 1, 1) * 0.4
    split = {"train": torch.arange(0, 36), "val": torch.arange(36, n)}
    return LabeledImages(labels, images=x.clamp(0, 1)), split


def test_train_from_config_is_seeded_and_copies_differ_only_by_seed():
    full, splits = _data()
    a = train_from_config(CONFIG, META, full, splits, seed=1, show_progress=False)
    b = train_from_config(CONFIG, META, full, splits, seed=1, show_progress=False)
    c = train_from_config(CONFIG, META, full, splits, seed=2, show_progress=False)
    x = full.tensors(torch.arange(8))[0]
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))  # same seed, same model (CPU)
        assert not torch.equal(a.model(x), c.model(x))
    assert a.spec["arch"] == "resnet10t" and a.spec["num_classes"] == 3
    assert len(a.train_set) == 36 and len(a.val_set) == 12
    assert len(a.result.history) == 1 and not a.model.training


def test_train_from_config_long_tailed():
    full, splits = _data(96)
    splits = {"train": torch.arange(0, 84), "val": torch.arange(84, 96)}
    config = {**CONFIG, "train": {**CONFIG["train"], "imbalance_ratio": 4, "batch_size": 10}}
    trained = train_from_config(config, META, full, splits, seed=0, show_progress=False)
    counts = torch.bincount(trained.train_set.labels, minlength=3)
    assert counts[0] == 28 and counts[2] == 7  # head keeps all, tail a quarter


def _rows() -> list[dict]:
    model, x = centred_conv(0, num_classes=4), images(2, 40)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:10] = (labels[:10] + 1) % 4  # some wrong predictions: MMA has both halves
    clean_logits = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    clean_labels = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(1))
    rows = []
    for s in (0, 1, 2):
        result = run_attack(model, x, kind="mma", method="square", eps=0.1 + 0.05 * s,
                            iterations=20, labels=labels, seed=s)
        rows.append(seed_row(seed=s, setting="square-linf", result=result, labels=labels,
                             clean_logits=clean_logits, clean_labels=clean_labels,
                             n_resamples=200))
    return rows


def test_seed_rows_carry_intervals():
    rows = _rows()
    for row in rows:
        assert row["kind"] == "mma" and row["n"] == 40
        for metric in ("ece_after", "success_rate", "confidence_after", "ks_after"):
            assert row[f"{metric}_lo"] <= row[metric] + 1e-12 or metric == "ece_after"
            assert row[f"{metric}_lo"] <= row[f"{metric}_hi"]
        assert 0 <= row["clean_ece"] <= 1


def test_spread_table_summarises_across_seeds():
    rows = [{"setting": "square-linf", "kind": "mma", **{m: 0.0 for m in SPREAD_METRICS},
             "ece_after": v} for v in (0.5, 0.6, 0.7)]
    table = spread_table(rows)
    ece = table[table["metric"] == "ece_after"].iloc[0]
    assert ece["seeds"] == 3 and ece["mean"] == pytest.approx(0.6)
    assert ece["sd"] == pytest.approx(0.1) and ece["range"] == pytest.approx(0.2)
    one = spread_table(rows[:1])
    assert math.isnan(one.loc[one["metric"] == "ece_after", "sd"].iloc[0])
    with pytest.raises(ValueError, match="no per-seed rows"):
        spread_table([])
    with pytest.raises(ValueError, match="lack"):
        spread_table([{"setting": "s", "kind": "k"}])


def test_seeds_figure_one_panel_per_attack():
    rows = _rows()
    rows += [{**r, "setting": "pgd-linf"} for r in rows]
    fig = seeds_figure(rows, title="t")
    assert len([ax for ax in fig.axes if ax.has_data()]) == 2
    assert isinstance(pd.DataFrame(rows), pd.DataFrame)
