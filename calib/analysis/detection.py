"""Detectability of calibration attacks versus ordinary attacks (paper Table 2, SPEC §9-10).

Obadinma et al. (arXiv:2401.02718, Table 2) claim that calibration attacks are harder to
detect than ordinary adversarial attacks, e.g. Mahalanobis detection accuracy on CIFAR-100
falls from 72.4% for Square Attack to 44.2% for the calibration attack. This module holds
the three detectors of that table, the evaluation protocol and the norm-matched comparison:

- **Mahalanobis** (Lee, Lee, Lee, Shin, "A simple unified framework for detecting
  out-of-distribution samples and adversarial attacks", NeurIPS 2018): class-conditional
  Gaussians with one tied covariance, fit on the features of CLEAN training images; the
  score of an input at a layer is its minimum squared Mahalanobis distance to the class
  means. We use two layers, the penultimate features and one intermediate stage (global
  average pooled, as Lee et al. do), without Lee et al.'s input pre-processing.
- **LID** (Ma et al., "Characterizing adversarial subspaces using local intrinsic
  dimensionality", ICLR 2018): the maximum-likelihood estimate
  ``LID(x) = -(1/k sum_i log(d_i / d_k))^-1`` from the distances ``d_1 <= ... <= d_k`` of
  x's features to its k nearest neighbours in a reference set of CLEAN training features
  (Ma et al. use the other clean images of a minibatch; a fixed, larger clean reference set
  estimates the same quantity and makes it independent of batch composition). We
  use three layers: an intermediate stage, the penultimate features and the logits.
- **SpectralDefense** (Harder, Pfreundt, Keuper, Keuper, "SpectralDefense: Detecting
  Adversarial Attacks on CNNs in the Fourier Domain", IJCNN 2021, arXiv:2103.03000): the
  magnitude Fourier spectrum ``|FFT2|`` of the input image per channel ("InputMFS") and of
  the feature maps of the network's stages ("LayerMFS"), flattened and concatenated; the
  detector is the logistic regression of the protocol below trained directly on these
  features (Harder et al.'s code: a logistic regression on the same flattened spectra). It
  has nothing to fit on clean images alone. LayerMFS reads every stage the backbone reports
  (``forward_intermediates``) except the first, the stem of a ResNet (``layer1`` to
  ``layer4`` of a ResNet-18), as Harder et al. read VGG-16's activations from its second block
  on. Differences from their code: the features are standardised before the regression (as
  for the other detectors), and both spectra form one detector (they report InputMFS and
  LayerMFS separately; ``layers=("input_mfs",)`` gives the former alone).
- **Protocol** (Ma et al.; also Harder et al.'s SpectralDefense code, which implements the
  three detectors): for one attack, each attacked image whose attack succeeded (and that was
  actually perturbed) gives a pair: its clean version (label 0) and its adversarial version
  (label 1). The pairs are split 50/50 by a seeded permutation (both versions of an image on
  the same side), a logistic regression on the standardised detector features (per-layer
  scores; spectra) is fit on one half, and AUROC and accuracy are reported on the other, each
  with a 95% bootstrap interval over the test pairs (:mod:`calib.stats`; it covers the test
  sample, not the choice of split).
- **Norm-matched comparison** (SPEC §10, "Matched comparisons"): calibration attacks move
  images less (smaller L2 norms at the same L-inf eps), and any detector finds larger
  perturbations more easily, so "calibration attacks are harder to detect" may be a norm
  effect. :func:`norm_matched_comparison` compares the two families' detection of test pairs
  inside strata of the same attack setting and L2-norm bin, weighting both families' rates
  by the same stratum weights (direct standardisation), with a paired bootstrap over the
  attacked images for the family difference.

Feature tensors are float64 on the CPU: the detectors' linear algebra (a D x D covariance
pseudo-inverse, pairwise distances) wants the precision, and it is not a hot path.

Example:
    >>> feats = extract_features(model, train_images, layers=LAYERS)
    >>> detectors = fit_detectors(["mahalanobis", "lid", "spectral"], feats, train_labels)
    >>> table, pairs = run_detection(model, detectors, test_images,
    ...                              {"square-linf/ordinary": (x_adv, success)}, seed=0)
    >>> matched = norm_matched_comparison(pairs, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from calib import models, stats
from calib.checks import check_choice, check_choices, check_images, check_int
from calib.runtime import eval_mode, model_device

#: Detectors this module implements.
DETECTORS: tuple[str, ...] = ("mahalanobis", "lid", "spectral")
#: Layers the feature-space detectors (Mahalanobis, LID) can read
#: (:data:`calib.models.FEATURE_LAYERS`).
LAYERS: tuple[str, ...] = models.FEATURE_LAYERS
#: SpectralDefense's feature sets: the input's and the stages' magnitude Fourier spectra.
SPECTRAL_LAYERS: tuple[str, ...] = ("input_mfs", "layer_mfs")
#: Everything :func:`extract_features` can compute.
ALL_LAYERS: tuple[str, ...] = LAYERS + SPECTRAL_LAYERS
#: The layers each detector may use.
ALLOWED_LAYERS: dict[str, tuple[str, ...]] = {
    "mahalanobis": LAYERS, "lid": LAYERS, "spectral": SPECTRAL_LAYERS}
#: The layers each detector uses by default.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "mahalanobis": ("intermediate", "penultimate"),
    "lid": ("intermediate", "penultimate", "logits"),
    "spectral": ("input_mfs", "layer_mfs"),
}
#: Suffix of the attack names of ordinary (misclassification) attacks, e.g. "pgd-linf/ordinary".
ORDINARY_SUFFIX: str = "/ordinary"
#: Bootstrap resamples of the reported intervals (SPEC §10: at least 1,000).
N_RESAMPLES: int = 1000
#: Per-pair outcomes the norm-matched comparison compares: "accuracy" (the pair's share of
#: correct decisions at 0.5: 0, 1/2 or 1; its mean is the detection accuracy) and
#: "concordance" (the detector ranks the adversarial version above its own clean version;
#: ties 1/2; the paired analogue of AUROC).
MATCHED_METRICS: tuple[str, ...] = ("accuracy", "concordance")


def parse_detectors(names: str | Sequence[str]) -> list[str]:
    """``"mahalanobis,lid,spectral"`` (as params.yaml holds it) or a sequence -> list.

    Raises:
        ValueError: an unknown, empty or repeated name, naming the allowed ones.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out = [str(n).strip() for n in items]
    if not out or any(not n for n in out):
        raise ValueError(f"detectors must be a non-empty comma-separated list of "
                         f"{list(DETECTORS)}, got {names!r}")
    for name in out:
        check_choice("detector", name, DETECTORS)
    if len(set(out)) != len(out):
        raise ValueError(f"detectors lists a name more than once: {names!r}")
    return out


# --- features --------------------------------------------------------------------------------

def extract_features(model: nn.Module, images: torch.Tensor, *,
                     layers: Sequence[str] = LAYERS, batch_size: int = 256
                     ) -> dict[str, torch.Tensor]:
    """Float64 features of ``images`` (N, C, H, W) in [0, 1] at the named layers, for the
    detectors.

    Layers of :data:`LAYERS` come from :func:`calib.models.extract_features`, which reads
    every layer of a :class:`calib.models.ImageClassifier` from one backbone pass
    ("intermediate" is the second-to-last backbone stage, global-average-pooled, ``layer3`` of
    a ResNet-18); those of :data:`SPECTRAL_LAYERS` from :func:`spectral_features`.

    Returns:
        layer -> float64 (N, D_layer) on the CPU. The model runs in eval mode (restored after).
    """
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of {list(ALL_LAYERS)}, "
                         f"got {layers!r}")
    for layer in layers:
        check_choice("layers item", layer, ALL_LAYERS)
    plain = [layer for layer in layers if layer in LAYERS]
    spectral = [layer for layer in layers if layer in SPECTRAL_LAYERS]
    out: dict[str, torch.Tensor] = {}
    if plain:
        out.update(models.extract_features(model, images, layers=plain,
                                           batch_size=batch_size, dtype=torch.float64))
    if spectral:
        out.update(spectral_features(model, images, layers=spectral, batch_size=batch_size))
    return {layer: out[layer] for layer in layers}


# --- SpectralDefense -------------------------------------------------------------------------

def magnitude_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``|FFT2|`` over the last two dimensions of ``x`` (N, ..., H, W), flattened per sample:
    float64 (N, prod(...) * H * W). Harder et al.'s "MFS" (magnitude Fourier spectrum); the
    fft-shift they apply reorders the entries and changes nothing for a linear classifier."""
    if x.ndim < 3:
        raise ValueError(f"x must be (N, ..., H, W) with at least 3 dimensions, got "
                         f"{tuple(x.shape)}")
    return torch.fft.fft2(x.detach().double()).abs().flatten(1)


def stage_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps (B, C_s, H_s, W_s) LayerMFS reads: every stage of the backbone's
    ``forward_intermediates`` except the first (a ResNet's stem), or the only one if there
    is one. Needs a :class:`calib.models.ImageClassifier` (normalisation inside)."""
    if not isinstance(model, models.ImageClassifier):
        raise ValueError("layer 'layer_mfs' needs an ImageClassifier (a timm backbone with "
                         "forward_intermediates); use layers=('input_mfs',) for other models")
    maps = model.net.forward_intermediates(model.normalize(x), intermediates_only=True)
    maps = [m for m in maps if m.ndim == 4]
    if not maps:
        raise ValueError("the backbone gives no spatial feature maps for layer 'layer_mfs'")
    return maps[1:] if len(maps) > 1 else maps


@torch.no_grad()
def spectral_features(model: nn.Module, images: torch.Tensor, *,
                      layers: Sequence[str] = SPECTRAL_LAYERS, batch_size: int = 256
                      ) -> dict[str, torch.Tensor]:
    """SpectralDefense features (Harder et al. 2021) of ``images`` (N, C, H, W) in [0, 1].

    Args:
        model: the classifier; "layer_mfs" needs a :class:`calib.models.ImageClassifier`.
        images: (N, C, H, W) in [0, 1]; batches are moved to the model's device.
        layers: "input_mfs": :func:`magnitude_spectrum` of the image itself, (N, C * H * W);
            "layer_mfs": that of each map of :func:`stage_maps`, concatenated,
            (N, sum_s C_s * H_s * W_s).
        batch_size: images per forward pass.

    Returns:
        layer -> float64 (N, D) on the CPU; computed in one vectorised FFT per batch and map.
    """
    images = check_images(images)
    check_choices("layers", layers, SPECTRAL_LAYERS)
    check_int("batch_size", batch_size, minimum=1)
    if "layer_mfs" in layers and not isinstance(model, models.ImageClassifier):
        raise ValueError("layer 'layer_mfs' needs an ImageClassifier (a timm backbone with "
                         "forward_intermediates); use layers=('input_mfs',) for other models")
    device = model_device(model)
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with eval_mode(model):
        for chunk in images.split(batch_size):
            x = chunk.to(device)
            if "input_mfs" in layers:
                out["input_mfs"].append(magnitude_spectrum(x).cpu())
            if "layer_mfs" in layers:
                out["layer_mfs"].append(torch.cat(
                    [magnitude_spectrum(m) for m in stage_maps(model, x)], 1).cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


# --- Mahalanobis -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassGaussians:
    """Class-conditional Gaussians with a tied covariance (Lee et al. 2018).

    Attributes:
        means: float64 (K, D) means of the K classes that occur in the fitting data.
        precision: float64 (D, D) pseudo-inverse of the tied (pooled within-class) covariance.
        classes: int64 (K,) the label of each row of ``means``.
    """

    means: torch.Tensor
    precision: torch.Tensor
    classes: torch.Tensor


def fit_class_gaussians(features: torch.Tensor, labels: torch.Tensor) -> ClassGaussians:
    """Fit class means and the tied covariance to clean ``features`` (N, D), ``labels`` (N,).

    The covariance is the maximum-likelihood pooled within-class covariance
    ``1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T`` (as sklearn's EmpiricalCovariance on
    class-centred features in Lee et al.'s code); its pseudo-inverse copes with the dead
    (constant) dimensions ReLU features often have. A Gaussian is fitted to each class that
    occurs in ``labels``; a class without samples (a small fitting set drawn from 100 classes)
    has none and the score is the distance to the nearest of the others.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"features must be a 2-D tensor (N, D), got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 \
            or labels.shape[0] != features.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({features.shape[0]},)")
    f = features.double().cpu()
    y = labels.long().cpu()
    if int(y.min()) < 0:
        raise ValueError("labels must be >= 0")
    classes, rows = torch.unique(y, sorted=True, return_inverse=True)
    counts = torch.bincount(rows, minlength=classes.numel())
    sums = torch.zeros(classes.numel(), f.shape[1], dtype=f.dtype).index_add_(0, rows, f)
    means = sums / counts[:, None].double()
    centred = f - means[rows]
    cov = centred.T @ centred / f.shape[0]
    precision = torch.linalg.pinv(cov, hermitian=True)
    return ClassGaussians(means=means, precision=precision, classes=classes)


def mahalanobis_score(features: torch.Tensor, gaussians: ClassGaussians) -> torch.Tensor:
    """Minimum squared Mahalanobis distance to the class means, float64 (N,) from (N, D).

    ``min_c (f - mu_c)^T P (f - mu_c)``; Lee et al.'s confidence score is its negative.
    """
    f = features.double().cpu()
    if f.ndim != 2 or f.shape[1] != gaussians.means.shape[1]:
        raise ValueError(f"features must have shape (N, {gaussians.means.shape[1]}), got "
                         f"{tuple(f.shape)}")
    diff = f[:, None, :] - gaussians.means[None]  # (N, K, D)
    dist = torch.einsum("nkd,de,nke->nk", diff, gaussians.precision, diff)
    return dist.amin(1)


# --- LID -------------------------------------------------------------------------------------

def lid_mle(queries: torch.Tensor, reference: torch.Tensor, *, k: int = 20,
            exclude_self: bool = False) -> torch.Tensor:
    """Maximum-likelihood LID estimate (Ma et al. 2018) of each query, float64 (N,).

    ``LID(x) = -(1/k sum_{i=1..k} log(d_i / d_k))^-1`` with ``d_1 <= ... <= d_k`` the
    Euclidean distances from ``x`` to its k nearest neighbours among ``reference``.

    Args:
        queries: (N, D) features.
        reference: (M, D) clean features, M > k (M > k + 1 with ``exclude_self``).
        k: number of neighbours (Ma et al.: 10-20 for small images).
        exclude_self: drop each query's nearest neighbour (use when the queries are
            themselves in ``reference``).
    """
    check_int("k", k, minimum=2)
    q, r = queries.double().cpu(), reference.double().cpu()
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference must be (N, D) and (M, D), got "
                         f"{tuple(q.shape)} and {tuple(r.shape)}")
    need = k + int(exclude_self)
    if r.shape[0] < need:
        raise ValueError(f"reference has {r.shape[0]} rows; k={k} needs at least {need}")
    dist = torch.cdist(q, r).topk(need, dim=1, largest=False).values[:, int(exclude_self):]
    # Duplicated points (distance 0) would give log(0); a floor keeps the estimate finite
    # (and near 0, the right limit for a point with many exact copies).
    dist = dist.clamp_min(1e-12)
    mean_log = (dist / dist[:, -1:]).log().mean(1).clamp_max(-1e-12)
    return -1.0 / mean_log


# --- detectors -------------------------------------------------------------------------------

@dataclass
class Detector:
    """A fitted detector: per-sample features (N, L) for the protocol's logistic regression.

    Attributes:
        name: "mahalanobis", "lid" or "spectral".
        layers: the layers it scores, in column order.
        gaussians: Mahalanobis: layer -> :class:`ClassGaussians`.
        reference: LID: layer -> clean reference features (M, D).
        k: LID neighbours.
    """

    name: str
    layers: tuple[str, ...]
    gaussians: dict[str, ClassGaussians] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    k: int = 20

    def score(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Detector features, float64 (N, L), from features of :func:`extract_features`:
        one score per layer (Mahalanobis, LID) or the concatenated spectra (SpectralDefense,
        L = their total size)."""
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise ValueError(f"features lack layer(s) {missing} that the {self.name} detector "
                             f"scores")
        if self.name == "spectral":
            return torch.cat([features[layer].double().cpu() for layer in self.layers], 1)
        if self.name == "mahalanobis":
            cols = [mahalanobis_score(features[layer], self.gaussians[layer])
                    for layer in self.layers]
        else:
            cols = [lid_mle(features[layer], self.reference[layer], k=self.k)
                    for layer in self.layers]
        return torch.stack(cols, 1)


def fit_detector(name: str, features: Mapping[str, torch.Tensor],
                 labels: torch.Tensor | None = None, *, layers: Sequence[str] | None = None,
                 k: int = 20) -> Detector:
    """Fit a detector on the features of CLEAN training images.

    Args:
        name: "mahalanobis" (needs ``labels``), "lid" or "spectral" (SpectralDefense: nothing
            to fit on clean images, ``features`` and ``labels`` are not read; its regression
            is trained by the protocol, :func:`evaluate_scores`).
        features: layer -> (N, D) clean features (:func:`extract_features`).
        labels: (N,) true labels of the clean images (Mahalanobis class means).
        layers: layers to use (default :data:`DEFAULT_LAYERS` of the detector; allowed:
            :data:`ALLOWED_LAYERS`).
        k: LID neighbours.

    Raises:
        ValueError: unknown detector (naming the allowed ones) or layer, missing labels or
            features, too few samples.
    """
    check_choice("detector", name, DETECTORS)
    layers = tuple(DEFAULT_LAYERS[name] if layers is None else layers)
    if not layers:
        raise ValueError("layers must not be empty")
    for layer in layers:
        check_choice("layers item", layer, ALLOWED_LAYERS[name])
    if name == "spectral":
        return Detector(name, layers)
    for layer in layers:
        if layer not in features:
            raise ValueError(f"features lack layer {layer!r}")
    if name == "mahalanobis":
        if labels is None:
            raise ValueError("labels are required for detector='mahalanobis' (class means)")
        return Detector(name, layers, gaussians={
            layer: fit_class_gaussians(features[layer], labels) for layer in layers})
    check_int("k", k, minimum=2)
    n = min(features[layer].shape[0] for layer in layers)
    if n < k:
        raise ValueError(f"lid needs at least k={k} reference samples, got {n}")
    return Detector(name, layers, reference={layer: features[layer].double().cpu()
                                             for layer in layers}, k=k)


def fit_detectors(names: str | Sequence[str], features: Mapping[str, torch.Tensor],
                  labels: torch.Tensor | None = None, *, k: int = 20) -> dict[str, Detector]:
    """:func:`fit_detector` for each of ``names`` (:func:`parse_detectors`), default layers."""
    return {name: fit_detector(name, features, labels, k=k) for name in parse_detectors(names)}


# --- evaluation ------------------------------------------------------------------------------

def _as_pairs(clean_scores: torch.Tensor, adv_scores: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.as_tensor(clean_scores).double().cpu()
    adv = torch.as_tensor(adv_scores).double().cpu()
    clean = clean[:, None] if clean.ndim == 1 else clean
    adv = adv[:, None] if adv.ndim == 1 else adv
    if clean.ndim != 2 or clean.shape != adv.shape:
        raise ValueError(f"clean_scores and adv_scores must have the same shape (P, L), got "
                         f"{tuple(clean.shape)} and {tuple(adv.shape)}")
    if not (bool(torch.isfinite(clean).all()) and bool(torch.isfinite(adv).all())):
        raise ValueError("detector scores must be finite")
    return clean, adv


def detector_probabilities(clean_scores: torch.Tensor, adv_scores: torch.Tensor, *,
                           seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The protocol's logistic regression and its outputs on the held-out pairs.

    Row i of ``clean_scores`` and ``adv_scores`` (both (P, L), or (P,)) is one pair: the
    clean and the adversarial version of one image. A seeded permutation puts half of the
    pairs (both versions together) in the training half and the rest in the test half; the
    features are standardised (fit on the training half) and a logistic regression (L2
    penalty, C = 1) is fit to them.

    Returns:
        (test rows int64 (T,), P(adversarial) of their clean versions (T,), of their
        adversarial versions (T,)); T = P - P // 2, empty with fewer than 2 pairs.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clean, adv = _as_pairs(clean_scores, adv_scores)
    check_int("seed", seed)
    n = clean.shape[0]
    if n < 2:
        return torch.zeros(0, dtype=torch.int64), np.zeros(0), np.zeros(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, test = perm[:n // 2], perm[n // 2:]
    x_train = torch.cat([clean[train], adv[train]]).numpy()
    y_train = np.concatenate([np.zeros(len(train)), np.ones(len(train))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(x_train, y_train)
    return (test, clf.predict_proba(clean[test].numpy())[:, 1],
            clf.predict_proba(adv[test].numpy())[:, 1])


def pair_outcomes(p_clean: np.ndarray, p_adv: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair outcomes of a detector on held-out pairs (see :data:`MATCHED_METRICS`):
    "accuracy" ``((p_clean <= 0.5) + (p_adv > 0.5)) / 2`` and "concordance"
    ``[p_adv > p_clean] + [p_adv == p_clean] / 2``; float64 arrays in {0, 1/2, 1}."""
    pc, pa = np.asarray(p_clean, dtype=np.float64), np.asarray(p_adv, dtype=np.float64)
    return {"accuracy": ((pc <= 0.5).astype(float) + (pa > 0.5).astype(float)) / 2,
            "concordance": (pa > pc).astype(float) + 0.5 * (pa == pc)}


def _evaluate(clean_scores: torch.Tensor, adv_scores: torch.Tensor, *, seed: int,
              n_resamples: int) -> tuple[dict[str, float | int], torch.Tensor, np.ndarray,
                                         np.ndarray]:
    from sklearn.metrics import roc_auc_score

    check_int("n_resamples", n_resamples, minimum=0)
    test, p_clean, p_adv = detector_probabilities(clean_scores, adv_scores, seed=seed)
    n = torch.as_tensor(clean_scores).shape[0]
    res: dict[str, float | int] = {"n_pairs": n, "n_test_pairs": len(test),
                                   "auroc": math.nan, "accuracy": math.nan}
    if n_resamples:
        res.update({"auroc_lo": math.nan, "auroc_hi": math.nan, "accuracy_lo": math.nan,
                    "accuracy_hi": math.nan})
    if len(test) == 0:
        return res, test, p_clean, p_adv
    y = np.concatenate([np.zeros(len(test)), np.ones(len(test))])
    res["auroc"] = float(roc_auc_score(y, np.concatenate([p_clean, p_adv])))
    correct = pair_outcomes(p_clean, p_adv)["accuracy"]
    res["accuracy"] = float(correct.mean())
    if n_resamples:
        auroc = stats.bootstrap_interval("pair_auroc", p_clean, p_adv,
                                         n_resamples=n_resamples, seed=seed)
        acc = stats.bootstrap_interval("mean", correct, n_resamples=n_resamples, seed=seed)
        res.update({"auroc_lo": auroc.lo, "auroc_hi": auroc.hi, "accuracy_lo": acc.lo,
                    "accuracy_hi": acc.hi})
    return res, test, p_clean, p_adv


def evaluate_scores(clean_scores: torch.Tensor, adv_scores: torch.Tensor, *, seed: int = 0,
                    n_resamples: int = 0) -> dict[str, float | int]:
    """AUROC and accuracy of the protocol's logistic regression telling adversarial from
    clean scores (:func:`detector_probabilities`), measured on the test half.

    Args:
        clean_scores, adv_scores: (P, L) or (P,) detector features of the P pairs.
        seed: seed of the split (and of the bootstrap).
        n_resamples: with a positive number, add 95% bootstrap intervals over the test pairs
            (each pair resampled as a whole): ``auroc_lo``/``_hi`` (statistic "pair_auroc")
            and ``accuracy_lo``/``_hi`` (the mean of the per-pair accuracy).

    Returns:
        ``n_pairs``, ``n_test_pairs``, ``auroc`` and ``accuracy`` (NaN with fewer than 2
        pairs: nothing to train and test on), and the intervals if asked for.
    """
    return _evaluate(clean_scores, adv_scores, seed=seed, n_resamples=n_resamples)[0]


def attack_family(attack: str) -> str:
    """"ordinary" for names ending in ``/ordinary`` (e.g. "pgd-linf/ordinary"), else
    "calibration"."""
    return "ordinary" if attack.endswith(ORDINARY_SUFFIX) else "calibration"


def attack_setting(attack: str) -> str:
    """The "method-norm" part of an attack name: "pgd-linf/uca" -> "pgd-linf"."""
    return attack.split("/", 1)[0]


#: Columns of the table :func:`run_detection` returns (Table 2).
TABLE_COLUMNS: tuple[str, ...] = (
    "detector", "attack", "family", "n_pairs", "n_test_pairs", "auroc", "auroc_lo", "auroc_hi",
    "accuracy", "accuracy_lo", "accuracy_hi", "linf_mean", "l2_mean")
#: Columns of the per-pair table :func:`run_detection` returns (held-out pairs only).
PAIR_COLUMNS: tuple[str, ...] = (
    "detector", "attack", "family", "setting", "image", "p_clean", "p_adv", "accuracy",
    "concordance", "linf", "l2")


def run_detection(model: nn.Module, detectors: Mapping[str, Detector],
                  clean_images: torch.Tensor,
                  attacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                  seed: int = 0, batch_size: int = 256, n_resamples: int = N_RESAMPLES
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paper Table 2: every detector against every attack, on the attacked images.

    Args:
        model: the attacked classifier (features come from it).
        detectors: label -> fitted :class:`Detector`.
        clean_images: (N, C, H, W) the attacked images, clean.
        attacks: attack name (e.g. "square-linf/ordinary", "pgd-linf/uca") -> (x_adv
            (N, C, H, W) aligned with ``clean_images``, success bool (N,)). Only samples that
            succeeded AND were actually perturbed (x_adv != clean somewhere; a calibration
            attack that succeeds at the clean point leaves the image untouched) form pairs.
        seed: seed of the 50/50 split (the same split for every detector of an attack) and
            of the bootstrap.
        batch_size: feature-extraction batch size.
        n_resamples: bootstrap resamples of the intervals (0: none, NaN bounds).

    Returns:
        ``(table, pairs)``. ``table`` (:data:`TABLE_COLUMNS`): one row per (detector,
        attack): family ("ordinary" or "calibration"), n_pairs, n_test_pairs, AUROC and
        accuracy on the test half with their 95% bootstrap intervals, and the mean L-inf and
        L2 norm of the perturbations of the pairs. ``pairs`` (:data:`PAIR_COLUMNS`): one row
        per (detector, held-out pair): its setting, image (row of ``clean_images``), the
        regression's P(adversarial) of both versions, the per-pair outcomes of
        :func:`pair_outcomes` and the perturbation's L-inf and L2 norms; the input of
        :func:`norm_matched_comparison`.
    """
    if not detectors:
        raise ValueError("detectors must not be empty")
    check_int("n_resamples", n_resamples, minimum=0)
    clean_images = check_images(clean_images, name="clean_images")
    n = clean_images.shape[0]
    layers = tuple(dict.fromkeys(layer for d in detectors.values() for layer in d.layers))
    clean_feats = extract_features(model, clean_images, layers=layers, batch_size=batch_size)
    clean_scores = {name: d.score(clean_feats) for name, d in detectors.items()}
    rows, pair_frames = [], []
    for attack, (x_adv, success) in attacks.items():
        x_adv = check_images(x_adv, name=f"x_adv of {attack!r}")
        if x_adv.shape != clean_images.shape:
            raise ValueError(f"x_adv of {attack!r} has shape {tuple(x_adv.shape)}, expected "
                             f"{tuple(clean_images.shape)}")
        success = torch.as_tensor(success).bool().cpu()
        if success.shape != (n,):
            raise ValueError(f"success of {attack!r} must have shape ({n},), got "
                             f"{tuple(success.shape)}")
        delta = (x_adv.detach().double() - clean_images.detach().double()).flatten(1).cpu()
        linf_all, l2_all = delta.abs().amax(1), delta.norm(dim=1)
        used = success & (linf_all > 0)
        idx = used.nonzero().squeeze(1)
        feats = extract_features(model, x_adv[idx.to(x_adv.device)], layers=layers,
                                 batch_size=batch_size) if idx.numel() else None
        linf = float(linf_all[idx].mean()) if idx.numel() else math.nan
        l2 = float(l2_all[idx].mean()) if idx.numel() else math.nan
        family = attack_family(attack)
        for name, det in detectors.items():
            if feats is None:
                res: dict[str, float | int] = {"n_pairs": 0, "n_test_pairs": 0}
            else:
                res, test, p_clean, p_adv = _evaluate(
                    clean_scores[name][idx], det.score(feats), seed=seed,
                    n_resamples=n_resamples)
                image = idx[test]
                pair_frames.append(pd.DataFrame({
                    "detector": name, "attack": attack, "family": family,
                    "setting": attack_setting(attack), "image": image.numpy(),
                    "p_clean": p_clean, "p_adv": p_adv, **pair_outcomes(p_clean, p_adv),
                    "linf": linf_all[image].numpy(), "l2": l2_all[image].numpy()}))
            rows.append({"detector": name, "attack": attack, "family": family, **res,
                         "linf_mean": linf, "l2_mean": l2})
    table = pd.DataFrame(rows).reindex(columns=list(TABLE_COLUMNS))
    table[["n_pairs", "n_test_pairs"]] = table[["n_pairs", "n_test_pairs"]].astype(int)
    pairs = (pd.concat(pair_frames, ignore_index=True) if pair_frames
             else pd.DataFrame(columns=list(PAIR_COLUMNS)))
    return table, pairs.reindex(columns=list(PAIR_COLUMNS))


def detection_table(model: nn.Module, detectors: Mapping[str, Detector],
                    clean_images: torch.Tensor,
                    attacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                    seed: int = 0, batch_size: int = 256, n_resamples: int = N_RESAMPLES
                    ) -> pd.DataFrame:
    """The table of :func:`run_detection` (same arguments), without the per-pair outcomes."""
    return run_detection(model, detectors, clean_images, attacks, seed=seed,
                         batch_size=batch_size, n_resamples=n_resamples)[0]


def family_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean detection accuracy and AUROC per detector and attack family (NaN rows skipped),
    with the mean L2 norm of the perturbations when the table has it.

    Columns: detector, family, attacks (how many attack sets with a result), accuracy, auroc
    [, l2_mean].
    """
    ok = table.dropna(subset=["accuracy", "auroc"])
    agg = {"attacks": ("attack", "size"), "accuracy": ("accuracy", "mean"),
           "auroc": ("auroc", "mean")}
    if "l2_mean" in table.columns:
        agg["l2_mean"] = ("l2_mean", "mean")
    out = ok.groupby(["detector", "family"], sort=False).agg(**agg)
    return out.reset_index()


def table_records(table: pd.DataFrame) -> dict[str, dict[str, object]]:
    """"<detector>|<attack>" -> row as a JSON-ready dict (NaN -> None), for metrics files."""
    clean = table.astype(object).where(table.notna(), None)
    return {f"{r['detector']}|{r['attack']}": {k: v for k, v in r.items()
                                               if k not in ("detector", "attack")}
            for r in clean.to_dict("records")}


# --- norm-matched comparison -----------------------------------------------------------------

def norm_strata(pairs: pd.DataFrame, *, n_bins: int = 5) -> pd.Series:
    """Stratum label "<setting>|<bin>" of each pair: the L2 norms of each attack setting's
    pairs (both families pooled) are cut at their quantiles into at most ``n_bins`` bins (bins
    with equal edges merge)."""
    check_int("n_bins", n_bins, minimum=1)
    out = pd.Series("", index=pairs.index, dtype=object)
    for setting, group in pairs.groupby("setting", sort=True):
        l2 = group["l2"].to_numpy(dtype=np.float64)
        edges = np.unique(np.quantile(l2, np.linspace(0, 1, n_bins + 1)))
        bins = np.searchsorted(edges[1:-1], l2, side="right")
        out.loc[group.index] = [f"{setting}|{b}" for b in bins]
    return out


def _weighted_rate(weights: np.ndarray):
    """Batched statistic for :mod:`calib.stats`: inputs are per-image sums (J arrays) then
    per-image counts (J arrays) of J strata; the value is ``sum_j w_j sums_j / counts_j`` on
    each resample of the images (NaN where a stratum is empty: that resample is dropped)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    j = len(weights)

    def weighted_rate(*arrays_and_idx: torch.Tensor) -> torch.Tensor:
        *arrays, idx = arrays_and_idx
        sums = torch.stack([a[idx].sum(1) for a in arrays[:j]], 1)
        counts = torch.stack([a[idx].sum(1) for a in arrays[j:]], 1)
        return (sums / counts * w.to(sums.device)).sum(1)

    return weighted_rate


def _per_image(group: pd.DataFrame, metric: str, strata: Sequence[str], images: np.ndarray
               ) -> tuple[np.ndarray, ...]:
    """Per-image sums of ``metric`` then per-image counts, one array (len(images),) per
    stratum of ``strata`` (in order)."""
    pos = np.searchsorted(images, group["image"].to_numpy())
    sums, counts = [], []
    for s in strata:
        sel = (group["stratum"] == s).to_numpy()
        sums.append(np.bincount(pos[sel], weights=group[metric].to_numpy()[sel],
                                minlength=len(images)).astype(np.float64))
        counts.append(np.bincount(pos[sel], minlength=len(images)).astype(np.float64))
    return (*sums, *counts)


def norm_matched_comparison(pairs: pd.DataFrame, *, n_bins: int = 5, min_pairs: int = 5,
                            metrics: Sequence[str] = MATCHED_METRICS,
                            n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Calibration vs ordinary detection at matched perturbation size (SPEC §10).

    Detection gets easier as perturbations grow, and at the same L-inf eps the calibration
    attacks change images less (smaller L2 norms) than ordinary ones, so a raw comparison of
    detection rates mixes the family with the norm. Here each held-out pair of
    :func:`run_detection` is put in a stratum of its attack setting and L2-norm bin
    (:func:`norm_strata`), trimmed to the L2 range both families cover in it; strata where
    both families have at least ``min_pairs`` pairs are kept (the common support), each
    weighted by its share of the kept pairs; and each
    family's rate is the weighted mean of its per-stratum rates (direct standardisation):
    both families are then measured on the same norm distribution. The family difference
    (calibration minus ordinary) gets a 95% paired bootstrap interval over the attacked
    images (:func:`calib.stats.paired_difference`; an image carries all of its pairs, of
    every attack, into a resample) and an outcome: "lower" (calibration attacks detected
    less often at matched norm), "higher", or "within noise" (the interval contains 0).

    Args:
        pairs: the per-pair table of :func:`run_detection` (:data:`PAIR_COLUMNS`).
        n_bins: L2 bins per attack setting.
        min_pairs: least pairs of each family for a stratum to count.
        metrics: per-pair outcomes compared (:data:`MATCHED_METRICS`).
        n_resamples, seed: the bootstrap's.

    Returns:
        One row per (detector, metric): ``n_calibration``/``n_ordinary`` (held-out pairs),
        ``strata`` (kept), ``coverage_calibration``/``_ordinary`` (share of each family's
        pairs inside the kept strata), the mean L2 norm of each family over all pairs
        (``l2_calibration``, ``l2_ordinary``) and at matched weights (``..._matched``), the
        raw rates (all pairs pooled) and their difference with interval and outcome
        (``raw_*``), and the matched rates with intervals and their difference with interval
        and outcome (``matched_*``; outcome "no overlap" when no stratum is kept).
    """
    need = set(PAIR_COLUMNS) - {"p_clean", "p_adv"}
    if not isinstance(pairs, pd.DataFrame) or not need <= set(pairs.columns):
        got = sorted(pairs.columns) if isinstance(pairs, pd.DataFrame) else type(pairs)
        raise ValueError(f"pairs must be the per-pair table of run_detection with columns "
                         f"{sorted(need)}, got {got}")
    metrics = list(metrics)
    if not metrics:
        raise ValueError(f"metrics must not be empty; allowed: {list(MATCHED_METRICS)}")
    for metric in metrics:
        check_choice("metric", metric, MATCHED_METRICS)
    check_int("n_bins", n_bins, minimum=1)
    check_int("min_pairs", min_pairs, minimum=1)
    check_int("n_resamples", n_resamples, minimum=1)
    check_int("seed", seed, minimum=0)
    bad = sorted(set(pairs["family"]) - {"ordinary", "calibration"})
    if bad:
        raise ValueError(f"family must be 'ordinary' or 'calibration', got {bad}")
    rows = []
    for detector, group in pairs.groupby("detector", sort=False):
        group = group.assign(stratum=norm_strata(group, n_bins=n_bins).to_numpy())
        # Common support inside each stratum: the L2 range both families cover there (a
        # quantile bin can straddle a gap between the families' norms).
        lim = group.groupby(["stratum", "family"])["l2"].agg(["min", "max"]).unstack("family")
        lo = group["stratum"].map(lim["min"].max(axis=1, skipna=False))
        hi = group["stratum"].map(lim["max"].min(axis=1, skipna=False))
        group.loc[~((group["l2"] >= lo) & (group["l2"] <= hi)), "stratum"] = ""
        fam = {f: group[group["family"] == f] for f in ("calibration", "ordinary")}
        counts = group[group["stratum"] != ""].groupby(["stratum", "family"]).size()
        counts = counts.unstack(fill_value=0) if len(counts) else pd.DataFrame()
        counts = counts.reindex(columns=["calibration", "ordinary"], fill_value=0)
        kept = counts[(counts["calibration"] >= min_pairs) & (counts["ordinary"] >= min_pairs)]
        strata = list(kept.index)
        weights = (kept.sum(1) / kept.to_numpy().sum()).to_numpy() if strata else np.zeros(0)
        images = np.unique(group["image"].to_numpy())
        row: dict[str, object] = {
            "detector": detector, "n_calibration": len(fam["calibration"]),
            "n_ordinary": len(fam["ordinary"]), "strata": len(strata)}
        for f in ("calibration", "ordinary"):
            inside = fam[f]["stratum"].isin(strata)
            row[f"coverage_{f}"] = float(inside.mean()) if len(fam[f]) else math.nan
            row[f"l2_{f}"] = float(fam[f]["l2"].mean()) if len(fam[f]) else math.nan
            per = fam[f][inside].groupby("stratum")["l2"].mean().reindex(strata)
            row[f"l2_{f}_matched"] = float((per.to_numpy() * weights).sum()) if strata \
                else math.nan
        both = len(fam["calibration"]) and len(fam["ordinary"])
        for metric in metrics:
            out = dict(row, metric=metric)
            for kind in ("raw", "matched"):
                names = (["all"] if kind == "raw" else strata)
                if not both or not names:
                    out.update({f"{kind}_calibration": math.nan, f"{kind}_ordinary": math.nan,
                                f"{kind}_diff": math.nan, f"{kind}_diff_lo": math.nan,
                                f"{kind}_diff_hi": math.nan,
                                f"{kind}_outcome": "not measured" if not both
                                else "no overlap"})
                    continue
                w = np.ones(1) if kind == "raw" else weights
                inputs = {}
                for f in ("calibration", "ordinary"):
                    g = fam[f].assign(stratum="all") if kind == "raw" else fam[f]
                    inputs[f] = _per_image(g, metric, names, images)
                cmp = stats.paired_difference(_weighted_rate(w), inputs["calibration"],
                                              inputs["ordinary"], n_resamples=n_resamples,
                                              seed=seed)
                out.update({f"{kind}_calibration": cmp.a.value,
                            f"{kind}_ordinary": cmp.b.value,
                            **cmp.difference.to_columns(f"{kind}_diff"),
                            f"{kind}_outcome": cmp.outcome})
                if kind == "matched":
                    out.update({**cmp.a.to_columns("matched_calibration"),
                                **cmp.b.to_columns("matched_ordinary")})
            rows.append(out)
    columns = ["detector", "metric", "n_calibration", "n_ordinary", "strata",
               "coverage_calibration", "coverage_ordinary", "l2_calibration", "l2_ordinary",
               "l2_calibration_matched", "l2_ordinary_matched", "raw_calibration",
               "raw_ordinary", "raw_diff", "raw_diff_lo", "raw_diff_hi", "raw_outcome",
               "matched_calibration", "matched_calibration_lo", "matched_calibration_hi",
               "matched_ordinary", "matched_ordinary_lo", "matched_ordinary_hi",
               "matched_diff", "matched_diff_lo", "matched_diff_hi", "matched_outcome"]
    return pd.DataFrame(rows).reindex(columns=columns)


def matched_sentences(matched: pd.DataFrame, *, metric: str = "accuracy") -> list[str]:
    """One sentence per detector stating the raw and the norm-matched family difference of
    ``metric`` and what the matched one means ("within noise" when its interval contains
    0)."""
    meaning = {"lower": "calibration attacks are detected less often than ordinary ones of "
                        "the same size",
               "higher": "calibration attacks are detected more often than ordinary ones of "
                         "the same size",
               "within noise": "no difference between the families at matched size (within "
                               "noise)",
               "no overlap": "too few pairs of both families share an L2 range to compare them "
                             "at matched size",
               "not measured": "one family has no held-out pairs"}
    out = []
    for r in matched[matched["metric"] == metric].itertuples(index=False):
        if r.raw_outcome == "not measured":
            out.append(f"{r.detector}: {meaning['not measured']}.")
            continue
        raw = (f"{r.detector}: {metric} calibration - ordinary = {r.raw_diff:+.3f} "
               f"[{r.raw_diff_lo:+.3f}, {r.raw_diff_hi:+.3f}] over all pairs (mean L2 "
               f"{r.l2_calibration:.2f} vs {r.l2_ordinary:.2f})")
        if r.matched_outcome in ("no overlap", "not measured"):
            out.append(f"{raw}; {meaning[r.matched_outcome]}.")
            continue
        out.append(
            f"{raw}, {r.matched_diff:+.3f} [{r.matched_diff_lo:+.3f}, "
            f"{r.matched_diff_hi:+.3f}] at matched L2 ({r.l2_calibration_matched:.2f} vs "
            f"{r.l2_ordinary_matched:.2f}; {r.strata} strata holding "
            f"{r.coverage_calibration:.0%} / {r.coverage_ordinary:.0%} of the pairs): "
            f"{meaning[r.matched_outcome]}.")
    return out


# --- figure ----------------------------------------------------------------------------------

def _error_bars(value: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Matplotlib's (2, n) error lengths of intervals [lo, hi] around ``value``, never
    negative: a percentile bootstrap interval need not contain the point estimate (a small
    sample's AUROC or ECE), and then that side's bar is drawn with zero length."""
    return np.clip(np.stack([value - lo, hi - value]), 0.0, None)


def detection_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Grouped bars of detection accuracy and AUROC per attack, one bar per detector.

    Ordinary attacks come first on a grey background and with hatched bars; calibration
    attacks follow. Error bars are the 95% bootstrap intervals (columns ``*_lo``/``*_hi``,
    when present); each attack's label carries the mean L2 norm of its perturbations
    (``l2_mean``, when present). The dashed line is chance (0.5).
    """
    from calib.plots import PALETTE, use_style

    need = {"detector", "attack", "family", "auroc", "accuracy"}
    if not need <= set(table.columns):
        raise ValueError(f"table lacks columns {sorted(need - set(table.columns))}")
    use_style()
    attacks = list(dict.fromkeys(table["attack"]))
    attacks = ([a for a in attacks if attack_family(a) == "ordinary"]
               + [a for a in attacks if attack_family(a) != "ordinary"])
    n_ordinary = sum(attack_family(a) == "ordinary" for a in attacks)
    detectors = list(dict.fromkeys(table["detector"]))
    width = 0.8 / max(1, len(detectors))
    x = np.arange(len(attacks))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.75 * len(attacks) + 2), 6.8),
                             sharex=True)
    for ax, metric, label in zip(axes, ("accuracy", "auroc"),
                                 ("detection accuracy", "detection AUROC"), strict=True):
        if n_ordinary:
            ax.axvspan(-0.5, n_ordinary - 0.5, color="#eeeeee", zorder=0)
        bounds = {f"{metric}_lo", f"{metric}_hi"} <= set(table.columns)
        for j, det in enumerate(detectors):
            sub = table[table["detector"] == det].set_index("attack")
            vals = np.array([sub[metric].get(a, np.nan) for a in attacks], dtype=float)
            pos = x - 0.4 + width * (j + 0.5)
            for fam, hatch in (("ordinary", "//"), ("calibration", None)):
                sel = np.array([attack_family(a) == fam for a in attacks])
                ax.bar(pos[sel], np.nan_to_num(vals[sel]), width=width, color=PALETTE[j],
                       edgecolor="white", hatch=hatch, zorder=2)
            if bounds:
                lo = np.array([sub[f"{metric}_lo"].get(a, np.nan) for a in attacks], float)
                hi = np.array([sub[f"{metric}_hi"].get(a, np.nan) for a in attacks], float)
                ok = np.isfinite(vals) & np.isfinite(lo) & np.isfinite(hi)
                ax.errorbar(pos[ok], vals[ok], yerr=_error_bars(vals[ok], lo[ok], hi[ok]),
                            fmt="none", ecolor="#333333", elinewidth=0.8, capsize=1.5,
                            zorder=4)
        ax.axhline(0.5, ls="--", color="#555555", lw=1, zorder=3)
        ax.set_ylim(0, 1.12)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel(label)
        if n_ordinary:
            ax.text(-0.4, 1.11, "ordinary", fontsize=8, va="top", color="#555555")
            ax.text(n_ordinary - 0.4, 1.11, "calibration attacks", fontsize=8, va="top",
                    color="#555555")
    handles = [Patch(facecolor=PALETTE[j], label=det) for j, det in enumerate(detectors)]
    handles.append(Patch(facecolor="#bbbbbb", edgecolor="white", hatch="//",
                         label="ordinary attack"))
    axes[0].legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncols=len(handles), fontsize=8)
    labels = attacks
    if "l2_mean" in table.columns:
        l2 = table.drop_duplicates("attack").set_index("attack")["l2_mean"]
        labels = [f"{a} (L2 {l2[a]:.2f})" if np.isfinite(l2.get(a, np.nan)) else a
                  for a in attacks]
    axes[1].set_xticks(x, labels, rotation=35, ha="right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
