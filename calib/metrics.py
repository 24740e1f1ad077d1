"""Calibration metrics: ECE, KS error, reliability bins, accuracy, NLL, Brier (SPEC §6).

Pure functions. Inputs may be torch tensors or numpy arrays (any device); outputs are plain
Python floats (or a small dataclass for the reliability bins), so results serialise directly.

Binning (SPEC §6): ``n_bins`` equal-width bins on [0, 1]; a confidence ``c`` falls in bin ``b``
iff ``lo_b < c <= hi_b`` and a confidence of exactly 0 goes to the first bin. This differs from
netcal (``lo <= c < hi``) and torchmetrics (which gives ``c == 1`` an extra bin) only on the
edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from calib.constants import N_BINS

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike | list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device="cpu", dtype=dtype).reshape(-1)


def _check_pair(confidences: ArrayLike, correct: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    conf = _as_tensor(confidences)
    corr = _as_tensor(correct)
    if conf.numel() != corr.numel():
        raise ValueError(
            f"confidences and correct differ in length: {conf.numel()} vs {corr.numel()}")
    if conf.numel() == 0:
        raise ValueError("metrics need at least one sample")
    if torch.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidences must lie in [0, 1] (got values outside or NaN)")
    return conf, corr


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def bin_indices(confidences: ArrayLike, n_bins: int = N_BINS) -> torch.Tensor:
    """Bin index (int64, shape (N,)) of each confidence: ``lo < c <= hi``, c = 0 in bin 0."""
    _check_n_bins(n_bins)
    conf = _as_tensor(confidences)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # right=False: inner[i-1] < c <= inner[i]  ->  exactly the SPEC's (lo, hi] rule.
    return torch.bucketize(conf, inner_edges, right=False)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram.

    Attributes:
        edges: bin edges, length ``n_bins + 1``.
        counts: samples per bin, length ``n_bins``.
        accuracy: mean correctness per bin (NaN for empty bins).
        confidence: mean confidence per bin (NaN for empty bins).
        ece: expected calibration error computed from these bins.
    """

    edges: list[float]
    counts: list[int]
    accuracy: list[float]
    confidence: list[float]
    ece: float

    def to_dict(self) -> dict[str, object]:
        return {"edges": self.edges, "counts": self.counts, "accuracy": self.accuracy,
                "confidence": self.confidence, "ece": self.ece}


def reliability_bins(confidences: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS
                     ) -> ReliabilityBins:
    """Reliability-diagram bins and the ECE they imply.

    Args:
        confidences: (N,) max softmax probability per sample, in [0, 1].
        correct: (N,) 1/True where the prediction is correct.
        n_bins: number of equal-width bins (paper: 15).
    """
    conf, corr = _check_pair(confidences, correct)
    idx = bin_indices(conf, n_bins)
    counts = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, corr)
    nonempty = counts > 0
    mean_conf = torch.where(nonempty, sum_conf / counts.clamp_min(1), torch.nan)
    mean_acc = torch.where(nonempty, sum_acc / counts.clamp_min(1), torch.nan)
    gaps = (sum_acc - sum_conf).abs()  # n_b * |acc_b - conf_b|
    ece_value = float(gaps.sum() / conf.numel())
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    return ReliabilityBins(
        edges=edges.tolist(), counts=counts.long().tolist(), accuracy=mean_acc.tolist(),
        confidence=mean_conf.tolist(), ece=ece_value,
    )


def ece(confidences: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float:
    """Expected calibration error, ``sum_b (n_b / N) |acc_b - conf_b|`` (Guo et al. 2017).

    Args:
        confidences: (N,) confidences in [0, 1].
        correct: (N,) 1/True where the prediction is correct.
        n_bins: number of equal-width bins (paper: 15).
    """
    return reliability_bins(confidences, correct, n_bins).ece


def ks_error(confidences: ArrayLike, correct: ArrayLike) -> float:
    """Kolmogorov-Smirnov calibration error (Gupta et al. 2021), binning-free.

    Sort by confidence; KS = max_i |sum_{j<=i} a_j / N - sum_{j<=i} s_j / N|.

    Args:
        confidences: (N,) confidences in [0, 1].
        correct: (N,) 1/True where the prediction is correct.
    """
    conf, corr = _check_pair(confidences, correct)
    order = torch.argsort(conf, stable=True)
    n = conf.numel()
    gap = torch.cumsum(corr[order], 0) / n - torch.cumsum(conf[order], 0) / n
    return float(gap.abs().max())


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of ``predictions`` (N,) equal to ``labels`` (N,)."""
    pred = _as_tensor(predictions, torch.int64)
    lab = _as_tensor(labels, torch.int64)
    if pred.numel() != lab.numel() or pred.numel() == 0:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    return float((pred == lab).double().mean())


def _logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    z = z.to(device="cpu", dtype=torch.float64)
    y = _as_tensor(labels, torch.int64)
    if z.ndim != 2 or z.shape[0] != y.numel():
        raise ValueError(f"logits must be (N, K) with N = len(labels); got {tuple(z.shape)}")
    return z, y


def nll(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under softmax(``logits`` (N, K))."""
    z, y = _logits_labels(logits, labels)
    return float(F.cross_entropy(z, y))


def brier(logits: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score: mean over samples of ``sum_k (p_k - 1[y = k])^2``."""
    z, y = _logits_labels(logits, labels)
    p = z.softmax(-1)
    onehot = F.one_hot(y, z.shape[1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(-1).mean())


def confidence_and_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax of ``logits`` (N, K); both (N,)."""
    probs = (logits if logits.is_floating_point() else logits.float()).softmax(-1)
    conf, pred = probs.max(-1)
    return conf, pred


def summarize(logits: ArrayLike, labels: ArrayLike, n_bins: int = N_BINS) -> dict[str, float]:
    """Accuracy, average confidence, ECE, KS, NLL and Brier of ``logits`` (N, K)."""
    z, y = _logits_labels(logits, labels)
    conf, pred = confidence_and_prediction(z)
    correct = (pred == y).double()
    return {
        "accuracy": float(correct.mean()),
        "confidence": float(conf.double().mean()),
        "ece": ece(conf, correct, n_bins),
        "ks": ks_error(conf, correct),
        "nll": nll(z, y),
        "brier": brier(z, y),
        "n": int(y.numel()),
    }
