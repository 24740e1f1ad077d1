"""Seeded splits: stratified partitions, train/val/test/attack indices, subsets, class counts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from calib.io import load_tensors, save_tensors


def stratified_partition(labels: Tensor, fractions: Sequence[float], *, seed: int
                         ) -> tuple[Tensor, ...]:
    """Split indices into parts with the given fractions of every class, at random (seeded).

    Within each class the samples are put in a random order (one ``torch.Generator`` seeded
    with ``seed``); part j takes ranks [round(F_{j-1} n_c), round(F_j n_c)), with F the
    cumulative fractions and n_c the class size, so the parts are disjoint and cover all
    samples.

    Args:
        labels: int64 tensor (N,).
        fractions: positive fractions summing to 1.
        seed: seed of the generator.

    Returns:
        One sorted int64 index tensor per fraction.
    """
    labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.int64).reshape(-1)
    fr = torch.as_tensor(list(fractions), dtype=torch.float64)
    if fr.numel() < 1 or bool((fr <= 0).any()) or abs(float(fr.sum()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    n = labels.numel()
    if n and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    # Grouping a random permutation by label (stable sort) gives a random order per class.
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    grouped_labels = labels[grouped]
    counts = torch.bincount(grouped_labels) if n else torch.zeros(0, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[grouped_labels]
    cum = torch.cumsum(fr, 0)
    cum[-1] = 1.0
    bounds = torch.floor(cum[:, None] * counts[None, :].double() + 0.5).long()  # (parts, K)
    part = (rank[None, :] >= bounds[:, grouped_labels]).sum(0)  # index of each sample's part
    return tuple(torch.sort(grouped[part == j]).values for j in range(fr.numel()))


#: The splits :func:`make_splits` returns, in this order.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "attack")


def make_splits(train_labels: Tensor, n_test: int, *, val_fraction: float, attack_size: int,
                seed: int) -> dict[str, Tensor]:
    """Index tensors of the pipeline's splits.

    * ``train`` / ``val``: the official training set split per class, ``val_fraction`` of each
      class (rounded) to validation, at random with a ``torch.Generator`` seeded with ``seed``;
    * ``test``: every test index;
    * ``attack``: the first ``min(attack_size, n_test)`` test images, as in the paper
      (SPEC §7: the first 500).

    Args:
        train_labels: int64 tensor (N,) of the official training labels.
        n_test: number of test images.
        val_fraction: fraction of each class held out for validation, in (0, 1).
        attack_size: number of test images to attack (>= 1).
        seed: seed of the validation split.

    Returns:
        Sorted int64 index tensors keyed by ``"train"``, ``"val"``, ``"test"``, ``"attack"``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) \
            or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in the open interval (0, 1), "
                         f"got {val_fraction!r}")
    if isinstance(attack_size, bool) or not isinstance(attack_size, int) or attack_size < 1:
        raise ValueError(f"attack_size must be an integer >= 1, got {attack_size!r}")
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    labels = torch.as_tensor(train_labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be a 1-D integer tensor, got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("train_labels is empty")
    train, val = stratified_partition(labels, (1.0 - float(val_fraction), float(val_fraction)),
                                      seed=seed)
    if train.numel() == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images")
    if val.numel() == 0:
        largest = int(torch.bincount(labels.to(torch.int64)).max())
        raise ValueError(
            f"val_fraction={val_fraction} leaves no validation images: each class's share "
            f"rounds to 0 (the largest class has {largest} images); the validation split "
            f"picks the best checkpoint and fits the recalibration methods, so raise "
            f"val_fraction or use more training images")
    return {"train": train, "val": val, "test": torch.arange(n_test),
            "attack": torch.arange(min(attack_size, n_test))}


def subsample(indices: Tensor, n: int, *, seed: int) -> Tensor:
    """A seeded random subset of ``n`` of ``indices`` (all of them if fewer), sorted."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    indices = torch.as_tensor(indices).to(torch.int64).reshape(-1)
    if n >= indices.numel():
        return torch.sort(indices).values
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(indices[torch.randperm(indices.numel(), generator=gen)[:n]]).values


def save_splits(path: str | os.PathLike[str], splits: Mapping[str, Tensor],
                metadata: Mapping[str, Any] | None = None) -> None:
    """Write index tensors (int64, 1-D) and string metadata as safetensors, atomically."""
    tensors: dict[str, Tensor] = {}
    for key, idx in splits.items():
        t = torch.as_tensor(idx)
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"split {key!r} must be a 1-D integer tensor, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
        tensors[key] = t.to(torch.int64)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_tensors(path, tensors, meta)


def load_splits(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read splits written by :func:`save_splits` (``train``, ``val``, ``test``, ``attack``)."""
    raw = load_tensors(path)
    missing = [k for k in SPLIT_NAMES if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing splits {missing}; found {sorted(raw)}")
    order = [*SPLIT_NAMES, *sorted(k for k in raw if k not in SPLIT_NAMES)]
    return {k: raw[k].to(torch.int64) for k in order}


def read_splits_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored with the splits (dataset, seed, ...)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Number of samples per class: int64 tensor (num_classes,)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    lab = torch.as_tensor(labels).to(device="cpu").reshape(-1)
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.to(torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    return torch.bincount(lab, minlength=num_classes)
