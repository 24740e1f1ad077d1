"""Detectability of calibration attacks versus ordinary attacks (paper Table 2, SPEC §9).

Obadinma et al. (arXiv:2401.02718, Table 2) claim that calibration attacks are harder to
detect than ordinary adversarial attacks, e.g. Mahalanobis detection accuracy on CIFAR-100
falls from 72.4% for Square Attack to 44.2% for the calibration attack. This module holds
the two feature-space detectors and the evaluation protocol:

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
- **Protocol** (Ma et al.; also Harder et al.'s SpectralDefense code, which implements the
  three detectors of the paper's Table 2): for one attack, each attacked image whose attack
  succeeded (and that was actually perturbed) gives a pair: its clean version (label 0)
  and its adversarial version (label 1). The pairs are split 50/50 by a seeded permutation
  (both versions of an image on the same side), a logistic regression on the standardised
  per-layer detector scores is fit on one half, and AUROC and accuracy are reported on the
  other.

Feature tensors are float64 on the CPU: the detectors' linear algebra (a D x D covariance
pseudo-inverse, pairwise distances) wants the precision, and it is not a hot path.

Example:
    >>> feats = extract_features(model, train_images, layers=LAYERS)
    >>> maha = fit_detector("mahalanobis", feats, train_labels)
    >>> lid = fit_detector("lid", feats, k=20)
    >>> table = detection_table(model, {"mahalanobis": maha, "lid": lid}, test_images,
    ...                         {"square-linf/ordinary": (x_adv, success)}, seed=0)
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

from calib import models
from calib.checks import check_choice, check_images, check_int

#: Detectors this module implements.
DETECTORS: tuple[str, ...] = ("mahalanobis", "lid")
#: Layers the detectors can read (:data:`calib.models.FEATURE_LAYERS`).
LAYERS: tuple[str, ...] = models.FEATURE_LAYERS
#: The layers each detector uses by default.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "mahalanobis": ("intermediate", "penultimate"),
    "lid": ("intermediate", "penultimate", "logits"),
}
#: Suffix of the attack names of ordinary (misclassification) attacks, e.g. "pgd-linf/ordinary".
ORDINARY_SUFFIX: str = "/ordinary"


# --- features --------------------------------------------------------------------------------

def extract_features(model: nn.Module, images: torch.Tensor, *,
                     layers: Sequence[str] = LAYERS, batch_size: int = 256
                     ) -> dict[str, torch.Tensor]:
    """Float64 features of ``images`` (N, C, H, W) in [0, 1] at the named layers, for the
    detectors (:func:`calib.models.extract_features`, which reads every layer of a
    :class:`calib.models.ImageClassifier` from one backbone pass; "intermediate" is the
    second-to-last backbone stage, global-average-pooled, ``layer3`` of a ResNet-18).

    Returns:
        layer -> float64 (N, D_layer) on the CPU. The model runs in eval mode (restored after).
    """
    return models.extract_features(model, images, layers=layers, batch_size=batch_size,
                                   dtype=torch.float64)


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
    """A fitted feature-space detector: per-layer scores (N, L) for a logistic regression.

    Attributes:
        name: "mahalanobis" or "lid".
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
        """Per-layer scores, float64 (N, L), of features from :func:`extract_features`."""
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise ValueError(f"features lack layer(s) {missing} that the {self.name} detector "
                             f"scores")
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
        name: "mahalanobis" (needs ``labels``) or "lid".
        features: layer -> (N, D) clean features (:func:`extract_features`).
        labels: (N,) true labels of the clean images (Mahalanobis class means).
        layers: layers to use (default :data:`DEFAULT_LAYERS` of the detector).
        k: LID neighbours.

    Raises:
        ValueError: unknown detector or layer, missing labels or features, too few samples.
    """
    check_choice("detector", name, DETECTORS)
    layers = tuple(DEFAULT_LAYERS[name] if layers is None else layers)
    if not layers:
        raise ValueError("layers must not be empty")
    for layer in layers:
        check_choice("layers item", layer, LAYERS)
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


# --- evaluation ------------------------------------------------------------------------------

def evaluate_scores(clean_scores: torch.Tensor, adv_scores: torch.Tensor, *, seed: int = 0
                    ) -> dict[str, float | int]:
    """AUROC and accuracy of a logistic regression telling adversarial from clean scores.

    Row i of ``clean_scores`` and ``adv_scores`` (both (P, L), or (P,)) is one pair: the
    clean and the adversarial version of one image. A seeded permutation puts half of the
    pairs (both versions together) in the training half and the rest in the test half; the
    scores are standardised (fit on the training half) and a logistic regression is fit to
    them; AUROC (of its probabilities) and accuracy (at 0.5) are measured on the test half.

    Returns:
        ``n_pairs``, ``n_test_pairs``, ``auroc`` and ``accuracy`` (NaN with fewer than 2
        pairs: nothing to train and test on).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clean = torch.as_tensor(clean_scores).double().cpu()
    adv = torch.as_tensor(adv_scores).double().cpu()
    clean = clean[:, None] if clean.ndim == 1 else clean
    adv = adv[:, None] if adv.ndim == 1 else adv
    if clean.ndim != 2 or clean.shape != adv.shape:
        raise ValueError(f"clean_scores and adv_scores must have the same shape (P, L), got "
                         f"{tuple(clean.shape)} and {tuple(adv.shape)}")
    if not (bool(torch.isfinite(clean).all()) and bool(torch.isfinite(adv).all())):
        raise ValueError("detector scores must be finite")
    check_int("seed", seed)
    n = clean.shape[0]
    if n < 2:
        return {"n_pairs": n, "n_test_pairs": 0, "auroc": math.nan, "accuracy": math.nan}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    train, test = perm[:half], perm[half:]

    def stack(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = torch.cat([clean[rows], adv[rows]]).numpy()
        y = np.concatenate([np.zeros(len(rows)), np.ones(len(rows))])
        return x, y

    x_train, y_train = stack(train)
    x_test, y_test = stack(test)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    clf.fit(x_train, y_train)
    prob = clf.predict_proba(x_test)[:, 1]
    return {"n_pairs": n, "n_test_pairs": len(test),
            "auroc": float(roc_auc_score(y_test, prob)),
            "accuracy": float(((prob > 0.5) == (y_test == 1)).mean())}


def attack_family(attack: str) -> str:
    """"ordinary" for names ending in ``/ordinary`` (e.g. "pgd-linf/ordinary"), else
    "calibration"."""
    return "ordinary" if attack.endswith(ORDINARY_SUFFIX) else "calibration"


def detection_table(model: nn.Module, detectors: Mapping[str, Detector],
                    clean_images: torch.Tensor,
                    attacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                    seed: int = 0, batch_size: int = 256) -> pd.DataFrame:
    """Paper Table 2: every detector against every attack, on the attacked images.

    Args:
        model: the attacked classifier (features come from it).
        detectors: label -> fitted :class:`Detector`.
        clean_images: (N, C, H, W) the attacked images, clean.
        attacks: attack name (e.g. "square-linf/ordinary", "pgd-linf/uca") -> (x_adv
            (N, C, H, W) aligned with ``clean_images``, success bool (N,)). Only samples that
            succeeded AND were actually perturbed (x_adv != clean somewhere; a calibration
            attack that succeeds at the clean point leaves the image untouched) form pairs.
        seed: seed of the 50/50 split (the same split for every detector of an attack).
        batch_size: feature-extraction batch size.

    Returns:
        One row per (detector, attack): detector, attack, family ("ordinary" or
        "calibration"), n_pairs, auroc, accuracy (test half), and the mean L-inf and L2 norm
        of the perturbations of the pairs.
    """
    if not detectors:
        raise ValueError("detectors must not be empty")
    clean_images = check_images(clean_images, name="clean_images")
    n = clean_images.shape[0]
    layers = tuple(dict.fromkeys(layer for d in detectors.values() for layer in d.layers))
    clean_feats = extract_features(model, clean_images, layers=layers, batch_size=batch_size)
    clean_scores = {name: d.score(clean_feats) for name, d in detectors.items()}
    rows = []
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
        used = success & (delta.abs().amax(1) > 0)
        idx = used.nonzero().squeeze(1)
        feats = extract_features(model, x_adv[idx.to(x_adv.device)], layers=layers,
                                 batch_size=batch_size) if idx.numel() else None
        linf = float(delta[idx].abs().amax(1).mean()) if idx.numel() else math.nan
        l2 = float(delta[idx].norm(dim=1).mean()) if idx.numel() else math.nan
        for name, det in detectors.items():
            if feats is None:
                res = {"n_pairs": 0, "auroc": math.nan, "accuracy": math.nan}
            else:
                res = evaluate_scores(clean_scores[name][idx], det.score(feats), seed=seed)
            rows.append({"detector": name, "attack": attack, "family": attack_family(attack),
                         "n_pairs": int(res["n_pairs"]), "auroc": res["auroc"],
                         "accuracy": res["accuracy"], "linf_mean": linf, "l2_mean": l2})
    return pd.DataFrame(rows, columns=["detector", "attack", "family", "n_pairs", "auroc",
                                       "accuracy", "linf_mean", "l2_mean"])


def family_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean detection accuracy and AUROC per detector and attack family (NaN rows skipped).

    Columns: detector, family, attacks (how many attack sets with a result), accuracy, auroc.
    """
    ok = table.dropna(subset=["accuracy", "auroc"])
    out = ok.groupby(["detector", "family"], sort=False).agg(
        attacks=("attack", "size"), accuracy=("accuracy", "mean"), auroc=("auroc", "mean"))
    return out.reset_index()


def table_records(table: pd.DataFrame) -> dict[str, dict[str, object]]:
    """"<detector>|<attack>" -> row as a JSON-ready dict (NaN -> None), for metrics files."""
    clean = table.astype(object).where(table.notna(), None)
    return {f"{r['detector']}|{r['attack']}": {k: v for k, v in r.items()
                                               if k not in ("detector", "attack")}
            for r in clean.to_dict("records")}


# --- figure ----------------------------------------------------------------------------------

def detection_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Grouped bars of detection accuracy and AUROC per attack, one bar per detector.

    Ordinary attacks come first on a grey background and with hatched bars; calibration
    attacks follow. The dashed line is chance (0.5).
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
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.75 * len(attacks) + 2), 6.4),
                             sharex=True)
    for ax, metric, label in zip(axes, ("accuracy", "auroc"),
                                 ("detection accuracy", "detection AUROC"), strict=True):
        if n_ordinary:
            ax.axvspan(-0.5, n_ordinary - 0.5, color="#eeeeee", zorder=0)
        for j, det in enumerate(detectors):
            sub = table[table["detector"] == det].set_index("attack")
            vals = np.array([sub[metric].get(a, np.nan) for a in attacks], dtype=float)
            pos = x - 0.4 + width * (j + 0.5)
            for fam, hatch in (("ordinary", "//"), ("calibration", None)):
                sel = np.array([attack_family(a) == fam for a in attacks])
                ax.bar(pos[sel], np.nan_to_num(vals[sel]), width=width, color=PALETTE[j],
                       edgecolor="white", hatch=hatch, zorder=2)
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
    axes[1].set_xticks(x, attacks, rotation=35, ha="right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
