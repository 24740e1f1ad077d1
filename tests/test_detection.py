"""Tests for calib.analysis.detection (Mahalanobis, LID, Table 2 protocol)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import centred_conv as tiny_model
from tiny_models import images

from calib.analysis import detection as det

pytestmark = pytest.mark.usefixtures("one_thread")


# --- Mahalanobis ------------------------------------------------------------------------------

def numpy_mahalanobis(train: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Straight-from-the-paper reference: class means, pooled covariance, min distance."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(train)
    prec = np.linalg.pinv(cov, hermitian=True)
    out = np.full(len(query), np.inf)
    for mu in means:
        d = query - mu
        out = np.minimum(out, np.einsum("nd,de,ne->n", d, prec, d))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(1, 6), classes=st.integers(1, 4),
       per_class=st.integers(3, 12))
def test_mahalanobis_matches_numpy(seed, dim, classes, per_class):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    train = rng.normal(size=(len(labels), dim)) * rng.uniform(0.5, 2, size=dim) + labels[:, None]
    query = rng.normal(size=(7, dim)) * 2
    g = det.fit_class_gaussians(torch.from_numpy(train), torch.from_numpy(labels))
    got = det.mahalanobis_score(torch.from_numpy(query), g).numpy()
    np.testing.assert_allclose(got, numpy_mahalanobis(train, labels, query),
                               rtol=1e-7, atol=1e-9)
    # A class mean is at distance 0 from its own class.
    assert float(det.mahalanobis_score(g.means, g).abs().max()) < 1e-9


def test_mahalanobis_is_invariant_to_invertible_linear_maps():
    """The Mahalanobis distance does not depend on the features' basis (full rank case)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    train = torch.randn(120, 5, generator=gen, dtype=torch.float64) + labels[:, None]
    query = torch.randn(10, 5, generator=gen, dtype=torch.float64) * 3
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 3 * torch.eye(5)
    base = det.mahalanobis_score(query, det.fit_class_gaussians(train, labels))
    mapped = det.mahalanobis_score(query @ a.T, det.fit_class_gaussians(train @ a.T, labels))
    torch.testing.assert_close(base, mapped, rtol=1e-6, atol=1e-8)


def test_mahalanobis_rejects_bad_labels():
    f = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels"):
        det.fit_class_gaussians(f, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        det.fit_class_gaussians(f, torch.tensor([0, 0, -1, 2, 2, 2]))


def test_mahalanobis_fits_only_the_classes_present():
    # A small fitting set drawn from many classes: empty classes get no Gaussian, and the
    # score is the same as when the labels are renumbered 0..K'-1.
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    sparse = torch.tensor([5, 5, 5, 5, 50, 50, 50, 50, 99, 99, 99, 99])
    dense = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    g = det.fit_class_gaussians(f, sparse)
    assert g.classes.tolist() == [5, 50, 99] and g.means.shape == (3, 3)
    query = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(det.mahalanobis_score(query, g),
                               det.mahalanobis_score(query, det.fit_class_gaussians(f, dense)))


# --- LID -------------------------------------------------------------------------------------

def test_lid_is_lower_on_a_low_dimensional_subspace():
    gen = torch.Generator().manual_seed(0)
    dim = 16
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))[0]
    flat_ref = torch.randn(2000, 2, generator=gen, dtype=torch.float64) @ basis.T
    flat_q = torch.randn(200, 2, generator=gen, dtype=torch.float64) @ basis.T
    full_ref = torch.randn(2000, dim, generator=gen, dtype=torch.float64)
    full_q = torch.randn(200, dim, generator=gen, dtype=torch.float64)
    flat = det.lid_mle(flat_q, flat_ref, k=20).median()
    full = det.lid_mle(full_q, full_ref, k=20).median()
    assert 1.3 < float(flat) < 3.0  # about the subspace's dimension, 2
    assert float(full) > 3 * float(flat)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), k=st.integers(2, 10))
def test_lid_is_invariant_to_similarity_transforms(seed, scale, k):
    """LID depends on distance ratios only: scaling, rotating and shifting change nothing."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    q = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    shift = torch.randn(3, generator=gen, dtype=torch.float64)
    base = det.lid_mle(q, ref, k=k)
    moved = det.lid_mle(scale * q @ rot + shift, scale * ref @ rot + shift, k=k)
    assert bool(torch.isfinite(base).all()) and bool((base > 0).all())
    torch.testing.assert_close(base, moved, rtol=1e-6, atol=1e-9)


def test_lid_matches_the_formula_and_excludes_self():
    ref = torch.tensor([[0.0], [1.0], [2.0], [4.0]], dtype=torch.float64)
    q = torch.tensor([[0.0]], dtype=torch.float64)
    # Neighbours of 0 excluding itself: 1, 2, 4 -> -1 / mean(log(1/4), log(2/4), log(1)).
    expected = -1.0 / ((math.log(0.25) + math.log(0.5) + 0.0) / 3)
    got = det.lid_mle(q, ref, k=3, exclude_self=True)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="k"):
        det.lid_mle(q, ref, k=4, exclude_self=True)  # only 3 other points
    with pytest.raises(ValueError, match="k"):
        det.lid_mle(q, ref, k=1)


# --- evaluation protocol ---------------------------------------------------------------------

def test_evaluation_separable_scores_give_auroc_one():
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(200, 2, generator=gen, dtype=torch.float64)
    adv = clean + 5.0
    out = det.evaluate_scores(clean, adv, seed=0)
    assert out["auroc"] == 1.0 and out["accuracy"] == 1.0
    assert out["n_pairs"] == 200 and out["n_test_pairs"] == 100


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_evaluation_identical_distributions_give_chance(seed):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    adv = torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    out = det.evaluate_scores(clean, adv, seed=seed)
    assert abs(out["auroc"] - 0.5) < 0.06
    assert abs(out["accuracy"] - 0.5) < 0.06


def test_evaluation_is_seeded_and_keeps_pairs_together():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(60, 1, generator=gen, dtype=torch.float64)
    adv = clean + 0.3 * torch.randn(60, 1, generator=gen, dtype=torch.float64) + 0.5
    assert det.evaluate_scores(clean, adv, seed=3) == det.evaluate_scores(clean, adv, seed=3)
    # Identical pairs: every test image appears once as clean and once as adversarial with the
    # same score, so the classifier cannot beat chance on them: AUROC exactly 0.5.
    same = det.evaluate_scores(clean, clean.clone(), seed=0)
    assert same["auroc"] == 0.5 and same["accuracy"] == 0.5
    empty = det.evaluate_scores(clean[:1], adv[:1])
    assert empty["n_pairs"] == 1 and math.isnan(empty["auroc"])
    with pytest.raises(ValueError, match="shape"):
        det.evaluate_scores(clean, adv[:5])


# --- detectors on a real (small) timm model ------------------------------------------------

@pytest.fixture(scope="module")
def small_resnet():
    from calib.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("resnet10t", num_classes=3, in_chans=1, img_size=16, mean=[0.5],
                             std=[0.25])
    return model.eval()


def test_detection_table_end_to_end(small_resnet):
    model = small_resnet
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(60, 1, 16, 16, generator=gen)
    train_labels = torch.arange(3).repeat(20)
    feats = det.extract_features(model, train, layers=det.LAYERS, batch_size=16)
    assert set(feats) == set(det.LAYERS)
    assert all(f.shape[0] == 60 and f.dtype == torch.float64 for f in feats.values())
    # One backbone pass gives exactly what the model's own forward and features() give.
    with torch.no_grad():
        torch.testing.assert_close(feats["logits"], model(train).double(), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(feats["penultimate"], model.features(train).double(),
                                   rtol=1e-5, atol=1e-5)
    detectors = {"mahalanobis": det.fit_detector("mahalanobis", feats, train_labels),
                 "lid": det.fit_detector("lid", feats, k=5)}
    clean = torch.rand(12, 1, 16, 16, generator=gen)
    noisy = (clean + 0.5 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    success = torch.ones(12, dtype=torch.bool)
    success[:2] = False
    table = det.detection_table(model, detectors, clean, {
        "square-linf/ordinary": (noisy, success),
        "square-linf/oca": (clean.clone(), torch.ones(12, dtype=torch.bool)),  # untouched
    }, seed=0, batch_size=5)
    assert list(table.columns) == ["detector", "attack", "family", "n_pairs", "auroc",
                                   "accuracy", "linf_mean", "l2_mean"]
    assert len(table) == 4
    noisy_rows = table[table["attack"] == "square-linf/ordinary"]
    assert (noisy_rows["n_pairs"] == 10).all() and (noisy_rows["family"] == "ordinary").all()
    assert noisy_rows["auroc"].between(0, 1).all()
    untouched = table[table["attack"] == "square-linf/oca"]
    assert (untouched["n_pairs"] == 0).all() and untouched["auroc"].isna().all()
    assert (untouched["family"] == "calibration").all()
    fig = det.detection_figure(table, title="t")
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_detectors_reject_bad_input(small_resnet):
    feats = {"logits": torch.randn(30, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="detector"):
        det.fit_detector("spectral", feats)
    with pytest.raises(ValueError, match="layers"):
        det.fit_detector("lid", feats, layers=("conv1",))
    with pytest.raises(ValueError, match="labels"):
        det.fit_detector("mahalanobis", feats, layers=("logits",))
    with pytest.raises(ValueError, match="k"):
        det.fit_detector("lid", feats, layers=("logits",), k=40)
    with pytest.raises(ValueError, match="layers"):
        det.extract_features(small_resnet, torch.rand(2, 1, 16, 16), layers=("pool5",))
    with pytest.raises(ValueError, match="penultimate"):
        det.extract_features(tiny_model(0), images(0, 2), layers=("penultimate",))
    with pytest.raises(ValueError, match="intermediate"):
        det.extract_features(tiny_model(0), images(0, 2), layers=("intermediate",))
    logits_only = det.extract_features(tiny_model(0), images(0, 3), layers=("logits",))
    assert logits_only["logits"].shape == (3, 4)


def test_family_summary_skips_missing_results():
    table = pd.DataFrame({"detector": ["lid"] * 3, "attack": ["a/ordinary", "b/uca", "c/oca"],
                          "family": ["ordinary", "calibration", "calibration"],
                          "n_pairs": [10, 8, 0], "auroc": [0.9, 0.7, math.nan],
                          "accuracy": [0.8, 0.6, math.nan]})
    fam = det.family_summary(table).set_index("family")
    assert fam.loc["calibration", "attacks"] == 1  # the NaN row is skipped
    assert fam.loc["ordinary", "accuracy"] == pytest.approx(0.8)
    rec = det.table_records(table)
    assert rec["lid|c/oca"]["auroc"] is None and rec["lid|a/ordinary"]["n_pairs"] == 10


def test_attack_family():
    assert det.attack_family("pgd-linf/ordinary") == "ordinary"
    assert det.attack_family("square-linf/uca") == "calibration"
