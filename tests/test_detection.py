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
    detectors["spectral"] = det.fit_detector("spectral", feats)
    table, pairs = det.run_detection(model, detectors, clean, {
        "square-linf/ordinary": (noisy, success),
        "square-linf/oca": (clean.clone(), torch.ones(12, dtype=torch.bool)),  # untouched
    }, seed=0, batch_size=5, n_resamples=200)
    assert list(table.columns) == list(det.TABLE_COLUMNS)
    assert len(table) == 6
    noisy_rows = table[table["attack"] == "square-linf/ordinary"]
    assert (noisy_rows["n_pairs"] == 10).all() and (noisy_rows["family"] == "ordinary").all()
    assert (noisy_rows["n_test_pairs"] == 5).all()
    assert noisy_rows["auroc"].between(0, 1).all()
    assert (noisy_rows["auroc_lo"] <= noisy_rows["auroc"]).all()
    assert (noisy_rows["accuracy"] <= noisy_rows["accuracy_hi"]).all()
    delta = (noisy - clean).flatten(1)[success]
    assert noisy_rows["l2_mean"].iloc[0] == pytest.approx(float(delta.norm(dim=1).mean()))
    untouched = table[table["attack"] == "square-linf/oca"]
    assert (untouched["n_pairs"] == 0).all() and untouched["auroc"].isna().all()
    assert (untouched["family"] == "calibration").all()
    # The per-pair table: the 5 held-out pairs of each detector, with their norms.
    assert list(pairs.columns) == list(det.PAIR_COLUMNS)
    assert len(pairs) == 15 and set(pairs["setting"]) == {"square-linf"}
    one = pairs[pairs["detector"] == "lid"]
    assert set(one["image"]) <= set(range(2, 12))  # the unsuccessful samples 0, 1 form no pair
    full = (noisy - clean).flatten(1).norm(dim=1).double()
    np.testing.assert_allclose(one["l2"].to_numpy(), full[one["image"].to_numpy()].numpy())
    row = noisy_rows.set_index("detector").loc["lid"]
    assert one["accuracy"].mean() == pytest.approx(row["accuracy"])
    assert (table.drop(columns=["auroc_lo", "auroc_hi", "accuracy_lo", "accuracy_hi"])
            .equals(det.detection_table(model, detectors, clean, {
                "square-linf/ordinary": (noisy, success),
                "square-linf/oca": (clean.clone(), torch.ones(12, dtype=torch.bool))},
                seed=0, batch_size=5, n_resamples=0)
            .drop(columns=["auroc_lo", "auroc_hi", "accuracy_lo", "accuracy_hi"])))
    fig = det.detection_figure(table, title="t")
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_detectors_reject_bad_input(small_resnet):
    feats = {"logits": torch.randn(30, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"detector.*\['mahalanobis', 'lid', 'spectral'\]"):
        det.fit_detector("spectal", feats)
    with pytest.raises(ValueError, match="layers"):
        det.fit_detector("spectral", feats, layers=("logits",))
    with pytest.raises(ValueError, match="layers"):
        det.fit_detector("mahalanobis", feats, torch.zeros(30, dtype=torch.long),
                         layers=("input_mfs",))
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


# --- SpectralDefense --------------------------------------------------------------------------

def smooth_images(seed: int, n: int, size: int = 8) -> torch.Tensor:
    """Smooth (low-frequency) images: random 2x2 grids upsampled bilinearly, in [0.2, 0.8]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 2, 2, generator=gen) * 0.6 + 0.2
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=True)


def checkerboard_noise(seed: int, n: int, size: int = 8, amplitude: float = 0.1
                       ) -> torch.Tensor:
    """+-amplitude at the highest spatial frequency, with a random sign per image."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(size)
    board = ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=gen).float() * 2 - 1
    return amplitude * sign * board


def test_magnitude_spectrum_matches_numpy():
    x = images(3, 4, channels=3)
    got = det.magnitude_spectrum(x).numpy()
    want = np.abs(np.fft.fft2(x.double().numpy())).reshape(4, -1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # Shifting the image (circularly) leaves the magnitude spectrum unchanged.
    shifted = det.magnitude_spectrum(torch.roll(x, shifts=(2, 3), dims=(2, 3)))
    torch.testing.assert_close(shifted, det.magnitude_spectrum(x))
    with pytest.raises(ValueError, match="dimensions"):
        det.magnitude_spectrum(torch.zeros(3, 4))


def test_spectral_separates_high_frequency_noise():
    """Adversarial = clean + a checkerboard: InputMFS puts it in one Fourier coefficient, so the
    detector finds it almost perfectly; on identical inputs it is exactly at chance."""
    model = tiny_model(0)
    clean = smooth_images(0, 200)
    adv = (clean + checkerboard_noise(1, 200)).clamp(0, 1)
    spectral = det.fit_detector("spectral", {}, layers=("input_mfs",))
    feats_clean = det.extract_features(model, clean, layers=("input_mfs",))
    feats_adv = det.extract_features(model, adv, layers=("input_mfs",))
    assert feats_clean["input_mfs"].shape == (200, 64)
    out = det.evaluate_scores(spectral.score(feats_clean), spectral.score(feats_adv), seed=0,
                              n_resamples=300)
    assert out["auroc"] > 0.98 and out["accuracy"] > 0.9
    assert out["auroc_lo"] <= out["auroc"] <= out["auroc_hi"]
    # Identical inputs: every test image appears once per class with the same features.
    same = det.evaluate_scores(spectral.score(feats_clean), spectral.score(feats_clean),
                               seed=0)
    assert same["auroc"] == 0.5 and same["accuracy"] == 0.5
    # Two independent draws of the same distribution: near chance.
    other = det.extract_features(model, smooth_images(7, 200), layers=("input_mfs",))
    chance = det.evaluate_scores(spectral.score(feats_clean), spectral.score(other), seed=0)
    assert abs(chance["auroc"] - 0.5) < 0.15


def test_spectral_layer_mfs_reads_the_stages_after_the_stem(small_resnet):
    model = small_resnet
    x = smooth_images(0, 6, size=16)
    with torch.no_grad():
        every = model.net.forward_intermediates(model.normalize(x), intermediates_only=True)
        maps = det.stage_maps(model, x)
    assert len(maps) == len(every) - 1
    for got, want in zip(maps, every[1:], strict=True):
        torch.testing.assert_close(got, want)
    feats = det.spectral_features(model, x, batch_size=4)
    assert set(feats) == {"input_mfs", "layer_mfs"}
    assert feats["input_mfs"].shape == (6, 16 * 16)
    assert feats["layer_mfs"].shape == (6, sum(m[0].numel() for m in maps))
    assert feats["layer_mfs"].dtype == torch.float64
    torch.testing.assert_close(feats["layer_mfs"][:, :maps[0][0].numel()],
                               det.magnitude_spectrum(maps[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ImageClassifier"):
        det.spectral_features(tiny_model(0), images(0, 2))


def test_spectral_detects_noise_on_a_resnet_and_not_identical_inputs(small_resnet):
    model = small_resnet
    clean = smooth_images(0, 80, size=16)
    adv = (clean + checkerboard_noise(1, 80, size=16)).clamp(0, 1)
    detectors = {"spectral": det.fit_detector("spectral", {})}
    table, _ = det.run_detection(model, detectors, clean, {
        "pgd-linf/ordinary": (adv, torch.ones(80, dtype=torch.bool))}, seed=0,
        n_resamples=200)
    assert float(table["auroc"].iloc[0]) > 0.95
    assert float(table["linf_mean"].iloc[0]) == pytest.approx(0.1, abs=1e-6)
    # Unperturbed "adversarial" images form no pairs: nothing to detect.
    table, pairs = det.run_detection(model, detectors, clean, {
        "pgd-linf/uca": (clean.clone(), torch.ones(80, dtype=torch.bool))}, seed=0)
    assert int(table["n_pairs"].iloc[0]) == 0 and pairs.empty


def test_parse_detectors_names_the_allowed_values():
    assert det.parse_detectors("mahalanobis, lid,spectral") == ["mahalanobis", "lid",
                                                                "spectral"]
    assert det.parse_detectors(["lid"]) == ["lid"]
    with pytest.raises(ValueError, match=r"\['mahalanobis', 'lid', 'spectral'\]"):
        det.parse_detectors("mahalanobis,fourier")
    with pytest.raises(ValueError, match="more than once"):
        det.parse_detectors("lid,lid")
    with pytest.raises(ValueError, match="non-empty"):
        det.parse_detectors("lid,")
    feats = {"logits": torch.randn(30, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"\['mahalanobis', 'lid', 'spectral'\]"):
        det.fit_detectors("lid,svm", feats)


def test_config_rejects_unknown_detectors():
    from pathlib import Path

    import yaml

    from calib.config import ConfigError, check_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert params["analysis"]["detection"]["detectors"]  # the stage runs a configured list
    check_params(params)
    params["analysis"]["detection"]["detectors"] = "mahalanobis,fourier"
    with pytest.raises(ConfigError, match=r"analysis\.detection\.detectors.*spectral"):
        check_params(params)


# --- evaluation intervals ----------------------------------------------------------------------

def test_evaluation_intervals_bracket_the_values():
    from sklearn.metrics import roc_auc_score

    gen = torch.Generator().manual_seed(2)
    clean = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    adv = clean + torch.randn(300, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.4
    out = det.evaluate_scores(clean, adv, seed=1, n_resamples=500)
    assert out["auroc_lo"] < out["auroc"] < out["auroc_hi"]
    assert out["accuracy_lo"] < out["accuracy"] < out["accuracy_hi"]
    assert out["auroc_hi"] - out["auroc_lo"] < 0.2
    test, p_clean, p_adv = det.detector_probabilities(clean, adv, seed=1)
    y = np.r_[np.zeros(len(test)), np.ones(len(test))]
    assert out["auroc"] == pytest.approx(roc_auc_score(y, np.r_[p_clean, p_adv]))
    plain = det.evaluate_scores(clean, adv, seed=1)
    assert "auroc_lo" not in plain and plain["auroc"] == out["auroc"]


# --- norm-matched comparison -------------------------------------------------------------------

def synthetic_pairs(seed: int, *, n_images: int = 400, ordinary_l2=(1.0, 3.0),
                    calibration_l2=(1.0, 3.0), family_effect: float = 0.0) -> pd.DataFrame:
    """Held-out pairs of one ordinary and two calibration attacks on the same images: each
    decision is right with probability 0.3 + 0.2 * L2 (detection grows with the norm), minus
    ``family_effect`` for the calibration attacks."""
    rng = np.random.default_rng(seed)
    frames = []
    for attack, (lo, hi), effect in (("square-linf/ordinary", ordinary_l2, 0.0),
                                     ("square-linf/uca", calibration_l2, family_effect),
                                     ("square-linf/oca", calibration_l2, family_effect)):
        l2 = rng.uniform(lo, hi, n_images)
        q = np.clip(0.3 + 0.2 * l2 - effect, 0.0, 1.0)
        right_clean = rng.random(n_images) < q
        right_adv = rng.random(n_images) < q
        p_clean = np.where(right_clean, 0.3, 0.7) + rng.uniform(-0.1, 0.1, n_images)
        p_adv = np.where(right_adv, 0.7, 0.3) + rng.uniform(-0.1, 0.1, n_images)
        frames.append(pd.DataFrame({
            "detector": "lid", "attack": attack, "family": det.attack_family(attack),
            "setting": det.attack_setting(attack), "image": np.arange(n_images),
            "p_clean": p_clean, "p_adv": p_adv, **det.pair_outcomes(p_clean, p_adv),
            "linf": 0.1, "l2": l2}))
    return pd.concat(frames, ignore_index=True)


def test_matched_comparison_same_distribution_is_within_noise():
    out = det.norm_matched_comparison(synthetic_pairs(0), n_resamples=1000, seed=0)
    assert list(out["metric"]) == ["accuracy", "concordance"]
    assert (out["raw_outcome"] == "within noise").all()
    assert (out["matched_outcome"] == "within noise").all()
    row = out.iloc[0]
    # Five bins, each trimmed to the norms both families cover: nearly every pair is kept.
    assert row["strata"] == 5
    assert row["coverage_calibration"] > 0.95 and row["coverage_ordinary"] > 0.95
    assert row["matched_diff_lo"] < 0 < row["matched_diff_hi"]
    assert row["n_ordinary"] == 400 and row["n_calibration"] == 800
    assert row["l2_calibration_matched"] == pytest.approx(row["l2_ordinary_matched"], abs=0.1)
    # One stratum (no matching beyond trimming to the common L2 range): about the raw result.
    one = det.norm_matched_comparison(synthetic_pairs(0), n_bins=1, n_resamples=200)
    assert one["matched_diff"].iloc[0] == pytest.approx(one["raw_diff"].iloc[0], abs=0.01)
    assert one["raw_calibration"].iloc[0] == pytest.approx(
        synthetic_pairs(0).query("family == 'calibration'")["accuracy"].mean())
    sentences = det.matched_sentences(out)
    assert len(sentences) == 1 and "within noise" in sentences[0]


def test_matched_comparison_detects_a_family_effect_at_the_same_norm():
    out = det.norm_matched_comparison(synthetic_pairs(1, family_effect=0.2), seed=0)
    acc = out.set_index("metric").loc["accuracy"]
    assert acc["matched_outcome"] == "lower" and acc["raw_outcome"] == "lower"
    assert acc["matched_diff"] == pytest.approx(-0.2, abs=0.06)
    assert acc["matched_diff_hi"] < 0
    assert "less often" in det.matched_sentences(out)[0]


def test_matched_comparison_removes_a_pure_norm_effect():
    """Detection depends on the norm only, and the calibration attacks have smaller norms:
    the raw comparison says "lower", the norm-matched one does not."""
    pairs = synthetic_pairs(2, n_images=600, ordinary_l2=(2.0, 3.0), calibration_l2=(1.0, 2.6))
    out = det.norm_matched_comparison(pairs, n_bins=10, seed=0)
    acc = out.set_index("metric").loc["accuracy"]
    assert acc["raw_outcome"] == "lower" and acc["raw_diff"] < -0.1
    assert acc["matched_outcome"] == "within noise"
    assert abs(acc["matched_diff"]) < 0.05
    assert acc["coverage_calibration"] < 0.6 and acc["coverage_ordinary"] < 1
    assert abs(acc["l2_calibration_matched"] - acc["l2_ordinary_matched"]) < 0.1
    assert acc["l2_ordinary"] - acc["l2_calibration"] > 0.5


def test_matched_comparison_without_overlap_or_family():
    apart = synthetic_pairs(3, ordinary_l2=(3.0, 4.0), calibration_l2=(1.0, 2.0))
    out = det.norm_matched_comparison(apart, n_resamples=100)
    assert (out["matched_outcome"] == "no overlap").all() and (out["strata"] == 0).all()
    assert out["matched_diff"].isna().all() and (out["raw_outcome"] == "lower").all()
    assert "too few pairs" in det.matched_sentences(out)[0]
    assert "over all pairs" in det.matched_sentences(out)[0]
    only = synthetic_pairs(3).query("family == 'calibration'")
    out = det.norm_matched_comparison(only, n_resamples=100)
    assert (out["raw_outcome"] == "not measured").all()
    assert det.matched_sentences(out) == ["lid: one family has no held-out pairs."]


def test_matched_comparison_rejects_bad_input():
    pairs = synthetic_pairs(0, n_images=50)
    with pytest.raises(ValueError, match=r"metric.*\['accuracy', 'concordance'\]"):
        det.norm_matched_comparison(pairs, metrics=("auroc",))
    with pytest.raises(ValueError, match="columns"):
        det.norm_matched_comparison(pairs.drop(columns=["l2"]))
    with pytest.raises(ValueError, match="n_bins"):
        det.norm_matched_comparison(pairs, n_bins=0)
    with pytest.raises(ValueError, match="family"):
        det.norm_matched_comparison(pairs.assign(family="adversarial"))


def test_matched_comparison_is_seeded():
    pairs = synthetic_pairs(4, n_images=100)
    a = det.norm_matched_comparison(pairs, n_resamples=200, seed=3)
    b = det.norm_matched_comparison(pairs, n_resamples=200, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_error_bars_never_negative_when_the_estimate_is_outside_its_interval():
    import numpy as np

    from calib.analysis.detection import _error_bars

    bars = _error_bars(np.array([0.50, 0.90]), np.array([0.52, 0.80]), np.array([0.60, 0.95]))
    assert (bars >= 0).all()
    assert bars.tolist() == [[0.0, pytest.approx(0.1)], [pytest.approx(0.1), pytest.approx(0.05)]]
