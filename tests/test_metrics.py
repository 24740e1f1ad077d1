"""calib.metrics: ECE, KS, reliability bins, NLL, Brier — by hand on bin edges, against
torchmetrics away from them, and as properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import multiclass_calibration_error

from calib import metrics


def test_ece_hand_computed_simple():
    # Two samples in bin (0.8667, 0.9333]: conf 0.9 both, one correct -> |0.5 - 0.9| * 2/4;
    # two in bin (0.2, 0.2667]: conf 0.25, none correct -> |0 - 0.25| * 2/4.
    conf = [0.9, 0.9, 0.25, 0.25]
    correct = [1, 0, 0, 0]
    assert metrics.ece(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.25)


def test_bin_edges_follow_lo_lt_c_le_hi():
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    # A confidence exactly on an edge belongs to the bin below it; 0 goes to the first bin.
    idx = metrics.bin_indices(torch.stack([edges[0], edges[1], edges[7], edges[15]]), 15)
    assert idx.tolist() == [0, 0, 6, 14]
    # Just above an edge goes to the next bin.
    idx = metrics.bin_indices(edges[1:2] + 1e-9, 15)
    assert idx.tolist() == [1]


def test_ece_on_edges_by_hand():
    e = torch.linspace(0, 1, 16, dtype=torch.float64)
    conf = torch.stack([e[0], e[1], e[1], e[15], e[15], e[15]])
    correct = torch.tensor([0, 1, 0, 1, 1, 0])
    # bin 0 holds {0, 1/15, 1/15}: acc 1/3, mean conf 2/45; bin 14 holds {1, 1, 1}: acc 2/3.
    expected = (3 / 6) * abs(1 / 3 - 2 / 45) + (3 / 6) * abs(2 / 3 - 1.0)
    assert metrics.ece(conf, correct) == pytest.approx(expected, abs=1e-12)
    bins = metrics.reliability_bins(conf, correct)
    assert bins.counts[0] == 3 and bins.counts[14] == 3 and sum(bins.counts) == 6
    assert math.isnan(bins.accuracy[5]) and bins.accuracy[14] == pytest.approx(2 / 3)


def test_perfectly_calibrated_and_worst_case():
    assert metrics.ece([1.0] * 4, [1] * 4) == 0.0
    assert metrics.ece([1.0] * 4, [0] * 4) == 1.0
    assert metrics.ks_error([1.0] * 4, [0] * 4) == pytest.approx(1.0)


def test_ks_hand_computed():
    conf = [0.2, 0.6, 0.9]
    correct = [0, 1, 1]
    # sorted: cumulative acc/N: 0, 1/3, 2/3; cumulative conf/N: .0667, .2667, .5667
    expected = max(abs(0 - 0.2 / 3), abs(1 / 3 - 0.8 / 3), abs(2 / 3 - 1.7 / 3))
    assert metrics.ks_error(conf, correct) == pytest.approx(expected)


def _away_from_edges(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n * 2, k, generator=gen, dtype=torch.float64) * 3
    probs = logits.softmax(-1)
    conf = probs.max(-1).values
    dist = (conf * 15 - (conf * 15).round()).abs()
    keep = dist > 1e-4
    target = torch.randint(0, k, (n * 2,), generator=gen)
    return probs[keep][:n], target[keep][:n]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 10])
def test_ece_matches_torchmetrics_away_from_edges(seed, k):
    probs, target = _away_from_edges(400, k, seed)
    conf, pred = probs.max(-1)
    ours = metrics.ece(conf, pred == target)
    ref = multiclass_calibration_error(probs.float(), target, num_classes=k, n_bins=15,
                                       norm="l1")
    assert ours == pytest.approx(float(ref), abs=1e-5)


def test_numpy_and_torch_inputs_agree():
    conf = np.array([0.3, 0.55, 0.91, 0.99])
    correct = np.array([False, True, True, True])
    assert metrics.ece(conf, correct) == metrics.ece(torch.tensor(conf), torch.tensor(correct))
    assert isinstance(metrics.ks_error(conf, correct), float)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60))
def test_ece_and_ks_are_in_unit_interval(samples):
    conf = [c for c, _ in samples]
    correct = [int(a) for _, a in samples]
    assert 0.0 <= metrics.ece(conf, correct) <= 1.0
    assert 0.0 <= metrics.ks_error(conf, correct) <= 1.0 + 1e-12
    bins = metrics.reliability_bins(conf, correct)
    assert sum(bins.counts) == len(samples)


def test_nll_brier_accuracy_summary():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    p = logits.double().softmax(-1)
    assert metrics.nll(logits, labels) == pytest.approx(
        float(-(p[torch.arange(3), labels]).log().mean()))
    onehot = torch.nn.functional.one_hot(labels, 2).double()
    assert metrics.brier(logits, labels) == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()))
    assert metrics.accuracy(logits.argmax(1), labels) == pytest.approx(1 / 3)
    s = metrics.summarize(logits, labels)
    assert set(s) >= {"accuracy", "confidence", "ece", "ks", "nll", "brier", "n"}


@pytest.mark.parametrize("bad", [[1.2], [-0.1], [float("nan")]])
def test_bad_confidences_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.ece(bad, [1])


def test_length_mismatch_and_bad_bins():
    with pytest.raises(ValueError, match="length"):
        metrics.ece([0.5, 0.6], [1])
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece([0.5], [1], n_bins=0)
