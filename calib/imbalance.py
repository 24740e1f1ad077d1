"""Long-tailed (class-imbalanced) training subsets, as in CIFAR-100-LT (SPEC §9).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (arXiv:2401.02718), class-imbalance analysis
(CIFAR-100-LT, imbalance ratio 100); the exponential profile follows Cao et al. (NeurIPS 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor

from calib.data import class_counts


def long_tailed_counts(available: Tensor, imbalance_ratio: float) -> Tensor:
    """Per-class sizes of an exponentially long-tailed subset (Cao et al. 2019, CIFAR-LT).

    Class ``c`` keeps ``floor(n_max * ratio ** (-c / (K - 1)))`` images, with ``n_max`` the
    smallest available class size, so class 0 is the head and class K-1 the tail with
    ``n_max / ratio`` images (the paper's CIFAR-100-LT uses ratio 100; SPEC §9).

    A class with no images at all (a small seeded subset of a 100-class training split need
    not hold every class) keeps none and is left out of ``n_max``; the others keep their
    place in the profile (class ``c`` still gets the size of position ``c``).

    Args:
        available: int64 tensor (K,) of the images available per class.
        imbalance_ratio: head-to-tail size ratio, >= 1 (1 = balanced).

    Returns:
        int64 tensor (K,): >= 1 for every class with images, 0 for the empty ones.
    """
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, int | float) \
            or not float(imbalance_ratio) >= 1.0:
        raise ValueError(f"imbalance_ratio must be a number >= 1 (1 = balanced), "
                         f"got {imbalance_ratio!r}")
    available = torch.as_tensor(available).to(torch.int64).reshape(-1)
    k = available.numel()
    present = available > 0
    if k < 2 or int(available.min()) < 0 or int(present.sum()) < 1:
        raise ValueError(f"need at least 2 classes and some images, got {available.tolist()}")
    n_max = int(available[present].min())
    exponent = torch.arange(k, dtype=torch.float64) / (k - 1)
    counts = torch.floor(n_max * float(imbalance_ratio) ** (-exponent)).to(torch.int64)
    return torch.where(present, counts.clamp(min=1), torch.zeros_like(counts))


def long_tailed_subset(indices: Tensor, labels: Tensor, *, imbalance_ratio: float,
                       num_classes: int, seed: int) -> Tensor:
    """A seeded long-tailed subset of ``indices`` (see :func:`long_tailed_counts`).

    Args:
        indices: int64 tensor (N,) of candidate image indices (e.g. ``splits["train"]``).
        labels: int64 tensor (N,) with the label of each candidate.
        imbalance_ratio: head-to-tail ratio, >= 1; 1 returns ``indices`` sorted.
        num_classes: K.
        seed: seed of the per-class random choice.

    Returns:
        Sorted int64 tensor of the kept indices.
    """
    indices = torch.as_tensor(indices).to(torch.int64).reshape(-1)
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if indices.shape != labels.shape:
        raise ValueError(f"indices and labels differ in length: {indices.numel()} vs "
                         f"{labels.numel()}")
    counts = long_tailed_counts(class_counts(labels, num_classes), imbalance_ratio)
    if float(imbalance_ratio) == 1.0:
        return torch.sort(indices).values
    gen = torch.Generator().manual_seed(int(seed))
    # One random permutation, then the first counts[c] of each class in that order.
    perm = torch.randperm(indices.numel(), generator=gen)
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)
    sorted_labels = shuffled[order]
    starts = torch.searchsorted(sorted_labels, torch.arange(num_classes))
    rank = torch.arange(indices.numel()) - starts[sorted_labels]
    keep = rank < counts[sorted_labels]
    return torch.sort(indices[perm[order[keep]]]).values
