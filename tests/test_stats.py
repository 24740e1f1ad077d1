"""calib.stats: batched bootstrap statistics against calib.metrics on every resample, seeded
determinism, coverage, paired comparisons, BCa against scipy, input validation, formatting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from calib import metrics, stats
from calib.constants import N_BINS

# --- helpers -----------------------------------------------------------------------------------


def _calibration_data(n: int, seed: int, *, shift: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences in [0.5, 1] and correctness drawn as Bernoulli(conf - shift)."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = (torch.rand(n, generator=g, dtype=torch.float64) < conf - shift).double()
    return conf, correct


@st.composite
def resampling_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Confidences with ties and values on bin edges (0, 1, k / n_bins), 0/1 correctness,
    n_bins in [1, 20] and a few bootstrap resamples."""
    n_bins = draw(st.integers(1, 20))
    n = draw(st.integers(1, 30))
    edges = [k / n_bins for k in range(n_bins + 1)]
    pool = draw(st.lists(st.one_of(st.sampled_from(edges), st.floats(0, 1)), min_size=1,
                         max_size=6))
    conf = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)),
                        dtype=torch.float64)
    correct = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    idx = stats.bootstrap_indices(n, draw(st.integers(1, 6)), draw(st.integers(0, 1000)))
    return conf, correct, idx, n_bins


# --- batched statistics equal the scalar metrics on every resample -----------------------------


@settings(max_examples=60, deadline=None)
@given(resampling_cases())
def test_batched_statistics_equal_calib_metrics_on_each_resample(case):
    conf, correct, idx, n_bins = case
    ece = stats.resampled_ece(conf, correct, idx, n_bins)
    ks = stats.resampled_ks(conf, correct, idx)
    acc = stats.resampled_mean(correct, idx)
    mean_conf = stats.resampled_mean(conf, idx)
    for b, row in enumerate(idx):
        assert ece[b].item() == pytest.approx(metrics.ece(conf[row], correct[row], n_bins),
                                              abs=1e-12)
        assert ks[b].item() == pytest.approx(metrics.ks_error(conf[row], correct[row]),
                                             abs=1e-12)
        assert acc[b].item() == pytest.approx(correct[row].double().mean().item(), abs=1e-12)
        assert mean_conf[b].item() == pytest.approx(conf[row].mean().item(), abs=1e-12)


def test_ks_follows_the_order_within_ties_exactly_as_metrics_does():
    # Four tied confidences: the running gap, hence KS, depends on the order of the tied
    # samples; the batched version must keep each resample's own order (a stable sort).
    conf = torch.full((4,), 0.5, dtype=torch.float64)
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    idx = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1], [0, 2, 1, 3]])
    expected = [metrics.ks_error(conf[row], correct[row]) for row in idx]
    assert stats.resampled_ks(conf, correct, idx).tolist() == pytest.approx(expected, abs=0)
    assert len(set(expected)) > 1


@pytest.mark.parametrize("ties", ["none", "same correctness", "mixed correctness"])
def test_ks_counting_and_sorting_paths_equal_metrics(ties):
    # No ties, or ties whose samples agree in correctness: one sort of the n samples and
    # per-resample counts; ties that differ in correctness: a stable sort of every resample.
    g = torch.Generator().manual_seed(11)
    conf = torch.rand(200, generator=g, dtype=torch.float64)
    correct = (torch.rand(200, generator=g, dtype=torch.float64) < conf).double()
    if ties != "none":
        conf = (conf * 10).round() / 10
        if ties == "same correctness":
            correct = (conf > 0.45).double()
    idx = stats.bootstrap_indices(200, 30, seed=2)
    expected = [metrics.ks_error(conf[row], correct[row]) for row in idx]
    assert stats.resampled_ks(conf, correct, idx).tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 2, N_BINS, 100])
def test_ece_on_bin_edges_and_extremes(n_bins):
    # Every confidence on an edge (lo < c <= hi puts it in the bin below), plus 0 and 1.
    conf = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).repeat(3)
    correct = (torch.arange(conf.numel()) % 2).double()
    idx = stats.bootstrap_indices(conf.numel(), 50, seed=3)
    batched = stats.resampled_ece(conf, correct, idx, n_bins)
    expected = [metrics.ece(conf[row], correct[row], n_bins) for row in idx]
    assert batched.tolist() == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 2.5]), st.booleans()),
                min_size=1, max_size=25),
       st.integers(0, 1000))
def test_batched_auroc_equals_sklearn_on_each_resample(pairs, seed):
    scores = torch.tensor([s for s, _ in pairs], dtype=torch.float64)
    labels = torch.tensor([y for _, y in pairs])
    idx = stats.bootstrap_indices(len(pairs), 8, seed)
    batched = stats.resampled_auroc(scores, labels, idx)
    for b, row in enumerate(idx):
        y = labels[row].numpy()
        if y.all() or not y.any():
            assert math.isnan(batched[b])
        else:
            assert batched[b].item() == pytest.approx(roc_auc_score(y, scores[row].numpy()),
                                                      abs=1e-12)


def test_pair_auroc_keeps_each_pair_together():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(40, generator=g, dtype=torch.float64)
    adv = clean + 0.5 + torch.randn(40, generator=g, dtype=torch.float64)
    idx = stats.bootstrap_indices(40, 20, seed=1)
    batched = stats.resampled_pair_auroc(clean, adv, idx)
    for b, row in enumerate(idx):
        y = np.r_[np.zeros(40), np.ones(40)]
        s = torch.cat([clean[row], adv[row]]).numpy()
        assert batched[b].item() == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_chunked_evaluation_equals_one_chunk(monkeypatch):
    conf, correct = _calibration_data(300, seed=2)
    whole = stats.bootstrap_metrics(conf, correct, success=correct, n_resamples=200)
    bca = stats.bootstrap_interval("ks", conf, correct, n_resamples=200, method="bca")
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1000)  # 3 resamples per chunk
    chunked = stats.bootstrap_metrics(conf, correct, success=correct, n_resamples=200)
    for k, iv in whole.items():
        assert chunked[k].lo == pytest.approx(iv.lo, abs=1e-12)
        assert chunked[k].hi == pytest.approx(iv.hi, abs=1e-12)
    again = stats.bootstrap_interval("ks", conf, correct, n_resamples=200, method="bca")
    assert (again.lo, again.hi) == pytest.approx((bca.lo, bca.hi), abs=1e-12)


# --- indices, values, determinism --------------------------------------------------------------


def test_bootstrap_indices_shape_range_and_seed():
    idx = stats.bootstrap_indices(7, 50, seed=4)
    assert idx.shape == (50, 7) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) <= 6
    assert torch.equal(idx, stats.bootstrap_indices(7, 50, seed=4))
    assert not torch.equal(idx, stats.bootstrap_indices(7, 50, seed=5))
    assert stats.bootstrap_indices(1, 3).tolist() == [[0], [0], [0]]


def test_value_is_the_full_sample_statistic():
    conf, correct = _calibration_data(500, seed=0)
    success = correct.flip(0)
    res = stats.bootstrap_metrics(conf, correct, success=success, n_resamples=100)
    assert set(res) == {"accuracy", "confidence", "ece", "ks", "success_rate"}
    assert res["accuracy"].value == pytest.approx(float(correct.mean()), abs=1e-12)
    assert res["confidence"].value == pytest.approx(float(conf.mean()), abs=1e-12)
    assert res["ece"].value == pytest.approx(metrics.ece(conf, correct), abs=1e-12)
    assert res["ks"].value == pytest.approx(metrics.ks_error(conf, correct), abs=1e-12)
    assert res["success_rate"].value == pytest.approx(float(success.mean()), abs=1e-12)
    for iv in res.values():
        assert iv.lo <= iv.hi and iv.level == 0.95
    # numpy arrays and lists are accepted as well
    from_numpy = stats.bootstrap_metrics(conf.numpy(), correct.numpy().astype(bool).tolist(),
                                         n_resamples=100)
    assert from_numpy["ece"] == res["ece"]


def test_same_seed_same_intervals_different_seed_different():
    conf, correct = _calibration_data(300, seed=1)
    first = stats.bootstrap_metrics(conf, correct, n_resamples=300, seed=7)
    again = stats.bootstrap_metrics(conf, correct, n_resamples=300, seed=7)
    other = stats.bootstrap_metrics(conf, correct, n_resamples=300, seed=8)
    assert first == again
    for k in first:
        assert first[k].value == other[k].value
        assert (first[k].lo, first[k].hi) != (other[k].lo, other[k].hi)


def test_percentile_interval_covers_a_known_mean_about_95_percent_of_the_time(one_thread):
    true_p, n, reps = 0.3, 400, 200
    covered = 0
    for rep in range(reps):
        g = torch.Generator().manual_seed(10_000 + rep)
        sample = torch.rand(n, generator=g) < true_p
        covered += stats.bootstrap_interval("accuracy", sample, n_resamples=1000,
                                            seed=rep).contains(true_p)
    assert 0.88 <= covered / reps <= 0.99


def test_level_widens_the_interval():
    conf, correct = _calibration_data(300, seed=3)
    narrow = stats.bootstrap_interval("ece", conf, correct, level=0.5)
    wide = stats.bootstrap_interval("ece", conf, correct, level=0.99)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi and wide.level == 0.99


def test_custom_batched_and_per_resample_statistics():
    conf, correct = _calibration_data(120, seed=4)
    named = stats.bootstrap_interval("ece", conf, correct, n_resamples=200, seed=1)
    looped = stats.bootstrap_interval(stats.per_resample(metrics.ece), conf, correct,
                                      n_resamples=200, seed=1)
    assert (looped.value, looped.lo, looped.hi) == pytest.approx(
        (named.value, named.lo, named.hi), abs=1e-12)

    def brier_of_confidence(c: torch.Tensor, a: torch.Tensor, idx: torch.Tensor
                            ) -> torch.Tensor:
        return ((c[idx] - a[idx]) ** 2).mean(1)

    iv = stats.bootstrap_interval(brier_of_confidence, conf, correct, n_resamples=200)
    assert iv.value == pytest.approx(float(((conf - correct) ** 2).mean()))
    assert iv.lo < iv.value < iv.hi


# --- BCa ---------------------------------------------------------------------------------------


def test_bca_matches_scipy_on_a_skewed_mean():
    from scipy.stats import bootstrap

    x = np.random.default_rng(0).exponential(size=80)
    ours = stats.bootstrap_interval("mean", x, n_resamples=20_000, method="bca")
    theirs = bootstrap((x,), np.mean, n_resamples=20_000, method="BCa",
                       rng=np.random.default_rng(1)).confidence_interval
    # Different resamples: agreement up to Monte-Carlo error (~0.005 here).
    assert ours.lo == pytest.approx(theirs.low, abs=0.015)
    assert ours.hi == pytest.approx(theirs.high, abs=0.015)
    # Right-skewed data: BCa moves the interval right of the percentile one.
    pct = stats.bootstrap_interval("mean", x, n_resamples=20_000)
    assert ours.lo > pct.lo and ours.hi > pct.hi


def test_acceleration_of_the_mean_is_the_classic_skewness_formula():
    x = torch.tensor([0.1, 0.4, 0.2, 3.0, 0.7, 1.1], dtype=torch.float64)
    prepared = stats._prepare("mean", x, n_bins=N_BINS, device=None)
    d = x - x.mean()
    expected = float((d ** 3).sum() / (6 * (d ** 2).sum() ** 1.5))
    assert stats._acceleration([prepared.jackknife()]) == pytest.approx(expected)
    # The jackknife is the leave-one-out statistic.
    loo = torch.stack([torch.cat([x[:i], x[i + 1:]]).mean() for i in range(6)])
    assert prepared.jackknife().tolist() == pytest.approx(loo.tolist(), abs=1e-12)


def test_bca_degenerate_inputs_stay_finite():
    ones = torch.ones(50)
    iv = stats.bootstrap_interval("accuracy", ones, method="bca", n_resamples=200)
    assert (iv.value, iv.lo, iv.hi) == (1.0, 1.0, 1.0)
    assert stats.bootstrap_interval("mean", [0.5], method="bca").width == 0.0


# --- paired comparisons ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_identical_conditions_are_within_noise(method):
    conf, correct = _calibration_data(200, seed=5)
    for name, inputs in [("ece", (conf, correct)), ("ks", (conf, correct)),
                         ("accuracy", correct), ("confidence", conf)]:
        cmp = stats.paired_difference(name, inputs, inputs, n_resamples=200, method=method)
        assert cmp.outcome == "within noise"
        assert (cmp.difference.value, cmp.difference.lo, cmp.difference.hi) == (0, 0, 0)
        assert cmp.a == cmp.b and cmp.paired


def test_tiny_difference_on_few_images_is_within_noise():
    correct_a = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1])
    correct_b = correct_a.clone()
    correct_b[2] = 1  # one image of twenty flips: a - b = -0.05
    cmp = stats.paired_difference("accuracy", correct_a, correct_b)
    assert cmp.difference.value == pytest.approx(-0.05)
    assert cmp.outcome == "within noise"


def test_large_difference_is_higher_or_lower_with_a_minus_b_sign():
    conf, correct = _calibration_data(300, seed=6)
    overconfident = (conf + 0.3).clamp(max=1.0)  # same predictions, far more confident
    worse = stats.paired_difference("ece", (overconfident, correct), (conf, correct))
    assert worse.outcome == "higher" and worse.difference.lo > 0
    better = stats.paired_difference("ece", (conf, correct), (overconfident, correct))
    assert better.outcome == "lower" and better.difference.hi < 0
    assert better.difference.value == pytest.approx(-worse.difference.value)
    success_a = torch.rand(300, generator=torch.Generator().manual_seed(0)) < 0.9
    success_b = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.2
    assert stats.paired_difference("success_rate", success_a, success_b).outcome == "higher"


def test_paired_is_tighter_than_unpaired_for_correlated_conditions():
    # Defended confidences track the undefended ones image by image (shared difficulty);
    # the per-image difference is small and steady, the spread across images large.
    g = torch.Generator().manual_seed(7)
    conf_a = 0.3 + 0.7 * torch.rand(300, generator=g, dtype=torch.float64)
    conf_b = (conf_a - 0.02 + 0.01 * torch.randn(300, generator=g, dtype=torch.float64)
              ).clamp(0, 1)
    paired = stats.paired_difference("confidence", conf_a, conf_b)
    unpaired = stats.unpaired_difference("confidence", conf_a, conf_b)
    assert paired.difference.value == pytest.approx(unpaired.difference.value)
    assert paired.difference.width < unpaired.difference.width / 5
    assert paired.outcome == "higher" and unpaired.outcome == "within noise"
    assert not unpaired.paired
    # BCa works for both designs too.
    assert stats.paired_difference("confidence", conf_a, conf_b,
                                   method="bca").outcome == "higher"
    assert stats.unpaired_difference("confidence", conf_a, conf_b[:250],
                                     method="bca").difference.lo < 0


def test_paired_metrics_share_resamples_with_paired_difference():
    conf, correct = _calibration_data(150, seed=8)
    conf_b, correct_b = _calibration_data(150, seed=9, shift=0.1)
    res = stats.paired_metrics(conf, correct, conf_b, correct_b, a_success=correct,
                               b_success=correct_b, n_resamples=200, seed=3)
    assert set(res) == {"accuracy", "confidence", "ece", "ks", "success_rate"}
    one = stats.paired_difference("ks", (conf, correct), (conf_b, correct_b),
                                  n_resamples=200, seed=3)
    assert res["ks"] == one


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "match"), [
    (lambda: stats.bootstrap_metrics([0.5, 0.6], [1]), "correct has 1 samples"),
    (lambda: stats.bootstrap_metrics([0.5], [1], success=[1, 0]), "success has 2 samples"),
    (lambda: stats.bootstrap_metrics([], []), "confidences is empty"),
    (lambda: stats.bootstrap_metrics([0.5, math.nan], [1, 0]), "confidences contains NaN"),
    (lambda: stats.bootstrap_metrics([0.5, 1.5], [1, 0]), r"confidences must lie in \[0, 1\]"),
    (lambda: stats.bootstrap_metrics([0.5, 0.7], [1, 0.5]), "correct must hold only 0/1"),
    (lambda: stats.bootstrap_metrics([0.5], [1], n_resamples=0),
     "n_resamples must be a positive integer"),
    (lambda: stats.bootstrap_metrics([0.5], [1], level=1.0), r"level must be in \(0.0, 1.0\)"),
    (lambda: stats.bootstrap_metrics([0.5], [1], level=0), "level must be in"),
    (lambda: stats.bootstrap_metrics([0.5], [1], seed=-1), "seed must be"),
    (lambda: stats.bootstrap_metrics([0.5], [1], n_bins=0), "n_bins must be"),
    (lambda: stats.bootstrap_metrics([0.5], [1], method="bootstrap-t"), "method must be one"),
    (lambda: stats.bootstrap_interval("auc", [0.5], [1]), "statistic must be one of"),
    (lambda: stats.bootstrap_interval("ece", [0.5]), "2 array"),
    (lambda: stats.bootstrap_interval("mean", [1.0, math.inf]), "values must be finite"),
    (lambda: stats.bootstrap_interval("mean", ["a", "b"]), "values must be a 1-D array"),
    (lambda: stats.paired_difference("accuracy", [1, 0, 1], [1, 0]),
     "a_inputs has 3 samples but b_inputs has 2"),
    (lambda: stats.paired_difference("ece", ([0.5], [1]), ([0.5], [2])),
     "b_correct must hold only 0/1"),
    (lambda: stats.paired_metrics([0.5], [1], [0.5], [1], a_success=[1]),
     "a_success and b_success"),
    (lambda: stats.bootstrap_indices(0), "n must be a positive integer"),
    (lambda: stats.resampled_mean([1.0, 2.0], torch.tensor([[0, 2]])), r"idx must index"),
    (lambda: stats.resampled_mean([1.0, 2.0], torch.tensor([0, 1])), "idx must be an int64"),
    (lambda: stats.resampled_ece([0.5], [1], torch.zeros(1, 1, dtype=torch.int64), 0),
     "n_bins must be"),
])
def test_bad_inputs_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- formatting --------------------------------------------------------------------------------


def test_interval_formatting_and_columns():
    iv = stats.Interval(0.4351, 0.41249, 0.4589)
    assert str(iv) == "0.435 [0.412, 0.459]"
    assert f"{iv:.2f}" == "0.44 [0.41, 0.46]"
    rate = stats.Interval(0.976, 0.9621, 0.988)
    assert f"{rate:.1%}" == "97.6% [96.2, 98.8]"
    assert f"{rate:.0%}" == "98% [96, 99]"
    assert iv.to_columns("ece") == {"ece": 0.4351, "ece_lo": 0.41249, "ece_hi": 0.4589}
    assert iv.contains(0.42) and not iv.contains(0.5)
    assert iv.width == pytest.approx(0.4589 - 0.41249)
    assert str(stats.Interval(math.nan, math.nan, math.nan)) == "nan [nan, nan]"
    assert not stats.Interval(math.nan, math.nan, math.nan).contains(0.0)


def test_comparison_outcome_string_and_columns():
    assert stats.outcome_of(stats.Interval(0.1, 0.05, 0.2)) == "higher"
    assert stats.outcome_of(stats.Interval(-0.1, -0.2, -0.05)) == "lower"
    assert stats.outcome_of(stats.Interval(0.1, 0.0, 0.2)) == "within noise"
    assert stats.outcome_of(stats.Interval(math.nan, math.nan, math.nan)) == "within noise"
    cmp = stats.paired_difference("accuracy", [1, 1, 1, 1], [0, 0, 0, 0], n_resamples=10)
    assert str(cmp) == ("accuracy: a = 1.000 [1.000, 1.000], b = 0.000 [0.000, 0.000], "
                        "a - b = 1.000 [1.000, 1.000] (higher)")
    cols = cmp.to_columns("acc")
    assert cols["acc_diff"] == 1.0 and cols["acc_diff_lo"] == 1.0
    assert cols["acc_a"] == 1.0 and cols["acc_b_hi"] == 0.0 and cols["acc_outcome"] == "higher"
