"""How calibration attacks move penultimate features and logit margins (SPEC §9: the paper's
analysis of how the attacks move model representations).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks: A Comprehensive Study of Adversarial Attacks
on Model Confidence" (TMLR; arXiv:2401.02718). Instead of a stochastic 2-D embedding we use a
deterministic linear projection (PCA fitted on clean training features) for the picture and,
for the numbers, per-sample distances in the full feature space that need no projection:

- ``d_own``: distance of the feature vector to the mean clean training feature of its
  **predicted** class (the class the attack must keep);
- ``d_other``: distance to the nearest other class mean;
- ``ratio = d_own / d_other`` (< 1: closer to its own class mean than to any other);
- ``feature_norm`` and the feature displacement ``||f(x~) - f(x)|| / ||f(x)||``;
- the logit margin ``z_(1) - z_(2)`` and the probability margin ``p_(1) - p_(2)``.

Each is measured before (clean) and after (adversarial) for every attack kind. The expectation
from the objectives (UCA shrinks the margin towards the boundary between two classes, OCA
widens it) is a hypothesis the measurements test, not an assumption of the code.

Shapes: images (N, C, H, W) in [0, 1]; features (N, D); logits (N, K); class means (K, D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from calib import data, models, paths
from calib.attacks import KINDS
from calib.attacks.grid import SETTINGS, attacked_images, read_records
from calib.checks import check_choice, check_int
from calib.io import read_json
from calib.plots import ATTACK_COLOURS, PALETTE, use_style

#: Per-sample quantities measured before and after each attack (see the module docstring).
QUANTITIES: tuple[str, ...] = ("d_own", "d_other", "ratio", "feature_norm", "logit_margin",
                               "prob_margin")


# --- the attacked set ---------------------------------------------------------------------------

@dataclass
class AttackedSet:
    """The clean attack split of one model and its adversarial versions for one setting.

    Attributes:
        setting: e.g. "square-linf".
        images: (N, C, H, W) float32 clean images in [0, 1] (the attack split, in order).
        labels: (N,) int64 true labels.
        indices: (N,) int64 positions of the images in the test split.
        adversarial: kind -> (N, C, H, W) adversarial images aligned with ``images``.
        records: the attack stage's per-sample rows of this setting (columns setting, kind,
            index, label, prediction, confidence_before, confidence_after, ...).
    """

    setting: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    adversarial: dict[str, torch.Tensor]
    records: pd.DataFrame

    def perturbed(self, kind: str) -> torch.Tensor:
        """(N,) bool: the attack changed the image at all (samples that met the success
        threshold on the clean input are returned unchanged, e.g. most OCA samples of a
        confident model)."""
        check_choice("kind", kind, list(self.adversarial))
        return (self.adversarial[kind] != self.images).flatten(1).any(1)


def load_attacked_set(model_name: str, setting: str, *, kinds: Sequence[str] = KINDS,
                      data_root: str | Path = "data/raw", root: str | Path = ".") -> AttackedSet:
    """Read the attack stage's outputs for ``model_name`` and ``setting`` (paths of
    :mod:`calib.paths`, relative to ``root``; the raw dataset under ``root / data_root``).

    Raises:
        ValueError: ``setting`` or a kind is not in the adversarial file, or the tensors do
            not match the attack split's shape.
    """
    root = Path(root)
    check_choice("setting", setting, SETTINGS)
    for kind in kinds:
        check_choice("kinds", kind, KINDS)
    all_records, adv_all = read_records(root / paths.results_dir(model_name) / "records")
    available = sorted({key.split("/")[0] for key in adv_all})
    check_choice("setting", setting, available)
    meta = read_json(root / paths.DATASET_FILE)
    splits = data.load_splits(root / paths.SPLITS_FILE)
    spec = read_json(root / paths.model_dir(model_name) / "model.json")
    test_set = data.load_split(meta["dataset"], root / data_root, "test",
                               img_size=spec["img_size"], in_chans=spec["in_chans"])
    images, labels = test_set.tensors(splits["attack"])
    adversarial = {}
    for kind in kinds:
        x_adv, _ = attacked_images(all_records, adv_all, splits["attack"], setting=setting,
                                   kind=kind)
        adversarial[kind] = check_pair(images, x_adv, name=f"adversarial['{setting}/{kind}']")
    records = all_records[all_records["setting"] == setting].reset_index(drop=True)
    return AttackedSet(setting=setting, images=images, labels=labels,
                       indices=splits["attack"].clone(), adversarial=adversarial,
                       records=records)


def check_pair(clean: torch.Tensor, other: torch.Tensor, *, name: str = "adversarial"
               ) -> torch.Tensor:
    """Validate that ``other`` has the shape of ``clean``; returns ``other``."""
    if not isinstance(other, torch.Tensor) or tuple(other.shape) != tuple(clean.shape):
        shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
        raise ValueError(f"{name} must have the shape of the clean tensor "
                         f"{tuple(clean.shape)}, got {shape}")
    return other


# --- features and logits ------------------------------------------------------------------------

@dataclass
class Embeddings:
    """Penultimate features (N, D) and logits (N, K), float32 on the CPU."""

    features: torch.Tensor
    logits: torch.Tensor


def extract(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> Embeddings:
    """Penultimate features and logits of ``images`` (N, C, H, W) in [0, 1], in batches, in
    eval mode (:func:`calib.models.extract_features`; one backbone pass for a
    :class:`calib.models.ImageClassifier`, whose logits are its head applied to the
    features).

    ``model`` must map images to logits and have ``features(x) -> (N, D)``.
    """
    feats = models.extract_features(model, images, layers=("penultimate", "logits"),
                                    batch_size=batch_size, dtype=torch.float32)
    return Embeddings(feats["penultimate"], feats["logits"])


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                ) -> torch.Tensor:
    """Mean feature per class, (K, D) float64, from clean training features (N, D).

    A class without samples (a small fitting set drawn from 100 classes) has no mean: its row
    is NaN, and the distances to it are undefined (see :func:`mean_distances`).

    Raises:
        ValueError: mismatched shapes, labels out of range, or no samples at all.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if labels.numel() == 0:
        raise ValueError("labels: no samples to fit class means to; use more images")
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features.double())
    means = sums / counts[:, None].double()
    if bool((counts == 0).any()):
        means[counts == 0] = math.nan
    return means


def top2_margin(values: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 of each row of ``values`` (N, K) -> (N,) float64."""
    top = values.double().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def mean_distances(features: torch.Tensor, means: torch.Tensor, classes: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each feature (N, D) to the mean of ``classes`` (N,) and to the
    nearest other class mean; both (N,) float64.

    Classes without a mean (NaN rows of ``means``) are skipped: the own distance of a sample
    whose class has none is NaN, and so is the other distance when no other class has one.
    """
    if features.ndim != 2 or means.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"features (N, D) and means (K, D) must share D, got "
                         f"{tuple(features.shape)} and {tuple(means.shape)}")
    if classes.shape != (features.shape[0],):
        raise ValueError(f"classes must have shape ({features.shape[0]},), "
                         f"got {tuple(classes.shape)}")
    known = ~torch.isnan(means).any(1)
    if bool(known.all()):
        dist = torch.cdist(features.double(), means.double())  # (N, K)
        own = dist.gather(1, classes[:, None]).squeeze(1)
        other = dist.scatter(1, classes[:, None], math.inf).amin(1)
        return own, other
    dist = torch.full((features.shape[0], means.shape[0]), math.nan, dtype=torch.float64)
    if bool(known.any()):
        dist[:, known] = torch.cdist(features.double(), means[known].double())
    own = dist.gather(1, classes[:, None]).squeeze(1)
    other = dist.nan_to_num(math.inf).scatter(1, classes[:, None], math.inf).amin(1)
    return own, torch.where(torch.isinf(other), math.nan, other)


def measure(emb: Embeddings, means: torch.Tensor, classes: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """Every quantity of :data:`QUANTITIES` for one set of embeddings; each (N,) float64.

    Args:
        emb: features (N, D) and logits (N, K).
        means: class means (K, D).
        classes: (N,) the class whose mean is "own": the clean prediction, which every
            calibration attack keeps.
    """
    own, other = mean_distances(emb.features, means, classes)
    return {
        "d_own": own, "d_other": other, "ratio": own / other,
        "feature_norm": emb.features.double().norm(dim=1),
        "logit_margin": top2_margin(emb.logits),
        "prob_margin": top2_margin(emb.logits.double().softmax(1)),
    }


def shift_table(clean: Embeddings, adversarial: Mapping[str, Embeddings],
                means: torch.Tensor, *, perturbed: Mapping[str, torch.Tensor] | None = None,
                labels: torch.Tensor | None = None) -> pd.DataFrame:
    """Per-sample, per-kind measurements before and after (long table, one row per sample
    and kind).

    Columns: kind, sample (position in the attacked set), prediction (clean argmax),
    ``correct`` (if labels are given), ``perturbed``, ``<q>_before`` and ``<q>_after`` for
    every quantity q, ``displacement`` (||f(x~) - f(x)|| / ||f(x)||) and ``label_kept``.

    Raises:
        ValueError: an unknown kind or embeddings whose shapes differ from the clean ones.
    """
    n = clean.features.shape[0]
    prediction = clean.logits.argmax(1)
    before = measure(clean, means, prediction)
    frames = []
    for kind, emb in adversarial.items():
        check_choice("kind", kind, KINDS)
        check_pair(clean.features, emb.features, name=f"adversarial[{kind!r}].features")
        check_pair(clean.logits, emb.logits, name=f"adversarial[{kind!r}].logits")
        after = measure(emb, means, prediction)
        moved = (emb.features.double() - clean.features.double()).norm(dim=1)
        cols: dict[str, np.ndarray] = {
            "kind": np.full(n, kind), "sample": np.arange(n),
            "prediction": prediction.numpy()}
        if labels is not None:
            cols["correct"] = (prediction == labels).numpy()
        cols["perturbed"] = (np.ones(n, dtype=bool) if perturbed is None
                             else perturbed[kind].cpu().numpy().astype(bool))
        for q in QUANTITIES:
            cols[f"{q}_before"] = before[q].numpy()
            cols[f"{q}_after"] = after[q].numpy()
        cols["displacement"] = (moved / before["feature_norm"].clamp_min(1e-12)).numpy()
        cols["label_kept"] = (emb.logits.argmax(1) == prediction).numpy()
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def summarize_shift(table: pd.DataFrame, *, setting: str, only_perturbed: bool = True
                    ) -> pd.DataFrame:
    """Tidy per-kind summary of :func:`shift_table`: one row per (kind, quantity).

    Columns: setting, kind, quantity, n (samples summarised), median_before, median_after,
    median_change (median of the per-sample after - before), mean_before, mean_after and
    frac_increased (share of samples whose value grew). ``displacement`` has no "before"
    (NaN). Samples the attack left unchanged are excluded by default: their change is zero by
    construction and would only dilute the kinds that skip already-successful inputs.
    """
    rows = []
    for kind in dict.fromkeys(table["kind"]):
        part = table[table["kind"] == kind]
        if only_perturbed:
            part = part[part["perturbed"]]
        n = len(part)
        for q in (*QUANTITIES, "displacement"):
            if q == "displacement":
                b, a = np.full(n, np.nan), part[q].to_numpy()
            else:
                b, a = part[f"{q}_before"].to_numpy(), part[f"{q}_after"].to_numpy()
            rows.append({
                "setting": setting, "kind": kind, "quantity": q, "n": n,
                "median_before": _stat(np.median, b), "median_after": _stat(np.median, a),
                "median_change": _stat(np.median, a - b),
                "mean_before": _stat(np.mean, b), "mean_after": _stat(np.mean, a),
                "frac_increased": float(np.mean(a > b)) if n and q != "displacement"
                else np.nan,
            })
    return pd.DataFrame(rows)


def pick_samples(table: pd.DataFrame, n: int, *, seed: int) -> list[int]:
    """``n`` sample positions for a figure, seeded: drawn among the samples that every kind
    perturbed (topped up with those that most kinds perturbed), returned sorted.

    Args:
        table: a long table with columns kind, sample and perturbed (as
            :func:`shift_table` or :func:`calib.analysis.saliency.saliency_shift` write).
        n: how many (all samples if there are fewer).
        seed: seeds the draw.
    """
    check_int("n", n, minimum=1)
    counts = table.groupby("sample")["perturbed"].sum()
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for level in sorted(counts.unique(), reverse=True):
        pool = counts.index[counts == level].to_numpy()
        take = min(n - len(chosen), pool.size)
        chosen += [int(i) for i in rng.choice(pool, size=take, replace=False)]
        if len(chosen) >= n:
            break
    return sorted(chosen)


def _stat(fn: object, values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(fn(values)) if values.size else float("nan")  # type: ignore[operator]


# --- 2-D projection -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PCA:
    """A linear projection fitted on clean features.

    Attributes:
        mean: (D,) float64 feature mean.
        components: (P, D) float64 orthonormal principal directions, each sign-fixed so that
            its largest-magnitude loading is positive (the SVD's sign is arbitrary; fixing it
            makes the figure identical across runs and platforms).
        explained_variance_ratio: (P,) share of the total variance along each component.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: torch.Tensor

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project features (N, D) -> (N, P) float64."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must have shape (N, {self.mean.shape[0]}), got "
                             f"{tuple(features.shape)}")
        return (features.double() - self.mean) @ self.components.T


def fit_pca(features: torch.Tensor, n_components: int = 2) -> PCA:
    """Principal components of ``features`` (N, D), deterministic and sign-fixed (float64)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {tuple(features.shape)}")
    check_int("n_components", n_components, minimum=1, maximum=min(features.shape))
    x = features.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:n_components]
    # Sign convention (as scikit-learn's svd_flip on V): the largest |loading| is positive.
    pivot = comps.abs().argmax(1)
    signs = comps.gather(1, pivot[:, None]).sign()
    signs[signs == 0] = 1.0
    var = s.square()
    return PCA(mean=mean, components=comps * signs,
               explained_variance_ratio=var[:n_components] / var.sum().clamp_min(1e-300))


# --- figures ------------------------------------------------------------------------------------

#: Up to this many classes every class mean is labelled in :func:`projection_figure`.
MAX_LABELLED_MEANS = 20


def projection_figure(pca: PCA, fit_features: torch.Tensor, fit_labels: torch.Tensor,
                      clean: Embeddings, adversarial: Mapping[str, Embeddings], *,
                      sample: torch.Tensor, means: torch.Tensor,
                      class_names: Sequence[str] = (), title: str | None = None) -> Figure:
    """One panel per attack kind: clean training features (grey, class means labelled) and
    arrows from the clean to the adversarial feature of the ``sample`` indices (M,).

    With more than :data:`MAX_LABELLED_MEANS` classes only the means of the sampled images'
    predicted classes are labelled; classes without a mean (NaN rows) are not drawn.
    """
    use_style()
    kinds = list(adversarial)
    cols = 2 if len(kinds) > 1 else 1
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.4 * rows), squeeze=False,
                             sharex=True, sharey=True)
    bg = pca.transform(fit_features).numpy()
    centres = pca.transform(means.float()).numpy()
    labelled = list(range(len(centres)))
    if len(centres) > MAX_LABELLED_MEANS:
        labelled = sorted(set(clean.logits[sample].argmax(1).tolist()))
    labelled = [c for c in labelled if np.isfinite(centres[c]).all()]
    start = pca.transform(clean.features[sample]).numpy()
    evr = pca.explained_variance_ratio.numpy()
    for ax, kind in zip(axes.flat, kinds, strict=False):
        ax.scatter(bg[:, 0], bg[:, 1], s=3, c="#c8c8c8", alpha=0.5, linewidths=0,
                   rasterized=True, label="clean training features")
        end = pca.transform(adversarial[kind].features[sample]).numpy()
        colour = ATTACK_COLOURS.get(kind, PALETTE[0])
        ax.quiver(start[:, 0], start[:, 1], end[:, 0] - start[:, 0], end[:, 1] - start[:, 1],
                  angles="xy", scale_units="xy", scale=1, color=colour, width=0.004,
                  alpha=0.8)
        ax.scatter(start[:, 0], start[:, 1], s=9, c=ATTACK_COLOURS["clean"], zorder=3,
                   label="clean test feature")
        ax.scatter(end[:, 0], end[:, 1], s=9, c=colour, zorder=3, marker="x",
                   label=f"after {kind.upper()}")
        for c in labelled:
            cx, cy = centres[c]
            name = class_names[c] if c < len(class_names) else str(c)
            ax.annotate(name, (cx, cy), fontsize=7, ha="center", color="#333333",
                        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none",
                              "pad": 0.5})
        ax.set_title(kind.upper())
        ax.legend(loc="lower right", fontsize=7, markerscale=1.5)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(f"PC1 ({evr[0]:.0%} of variance)")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"PC2 ({evr[1]:.0%} of variance)" if evr.size > 1 else "PC2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: Quantities drawn by :func:`shift_figure` and their axis labels.
SHIFT_PANELS: dict[str, str] = {
    "d_own": "distance to predicted class mean",
    "ratio": "d(own mean) / d(nearest other mean)",
    "logit_margin": "logit margin z(1) - z(2)",
    "prob_margin": "probability margin p(1) - p(2)",
}


def shift_figure(table: pd.DataFrame, *, only_perturbed: bool = True,
                 title: str | None = None) -> Figure:
    """Box plots before (clean colour) and after (kind colour) per kind, one panel per
    quantity of :data:`SHIFT_PANELS`."""
    use_style()
    kinds = list(dict.fromkeys(table["kind"]))
    fig, axes = plt.subplots(1, len(SHIFT_PANELS), figsize=(3.6 * len(SHIFT_PANELS), 3.6),
                             squeeze=False)
    for ax, (q, label) in zip(axes[0], SHIFT_PANELS.items(), strict=True):
        data_, pos, colours = [], [], []
        for i, kind in enumerate(kinds):
            part = table[table["kind"] == kind]
            if only_perturbed:
                part = part[part["perturbed"]]
            for j, when in enumerate(("before", "after")):
                values = part[f"{q}_{when}"].to_numpy()
                data_.append(values[~np.isnan(values)])  # undefined distances: no mean
                pos.append(3 * i + j)
                colours.append(ATTACK_COLOURS["clean"] if when == "before"
                               else ATTACK_COLOURS.get(kind, PALETTE[0]))
        box = ax.boxplot(data_, positions=pos, widths=0.8, patch_artist=True,
                         showfliers=False, medianprops={"color": "black"})
        for patch, colour in zip(box["boxes"], colours, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.75)
        ax.set_xticks([3 * i + 0.5 for i in range(len(kinds))])
        ax.set_xticklabels([k.upper() for k in kinds])
        ax.set_title(label, fontsize=9)
    handles = [Patch(facecolor=ATTACK_COLOURS["clean"], alpha=0.75),
               *(Patch(facecolor=ATTACK_COLOURS.get(k, PALETTE[0]), alpha=0.75) for k in kinds)]
    fig.legend(handles, ["clean (before)", *(f"after {k.upper()}" for k in kinds)],
               loc="lower center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
    return fig
