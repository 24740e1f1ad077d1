"""Bootstrap intervals and paired comparisons over evaluated images (SPEC §10).

Every rate or calibration error the project reports carries a 95% bootstrap interval over the
evaluated images, and a difference a verdict relies on is tested with a *paired* bootstrap: both
conditions (e.g. undefended vs defended, clean vs attacked) are resampled with the SAME image
indices, so what the images have in common cancels out of the difference (Efron & Tibshirani
1993, "An Introduction to the Bootstrap", ch. 13-14 for percentile and BCa intervals, §11 for
the jackknife).

Design:

* :func:`bootstrap_indices` draws the resampled image indices, ``[B, n]`` int64, from a seeded
  CPU :class:`torch.Generator` (the same indices whatever the device they are moved to).
* The ``resampled_*`` functions evaluate a statistic on every resample at once, vectorised over
  the ``B`` rows of ``idx`` (no Python loop per resample): means via a gather, ECE via
  ``index_add_`` over (resample, bin) pairs, KS and AUROC from how often each sample occurs in
  each resample (one sort of the ``n`` samples, then cumulative sums over the counts; KS falls
  back to a per-row stable sort where tied confidences differ in correctness, to reproduce
  :func:`calib.metrics.ks_error`'s handling of ties exactly). On each row they agree with
  the scalar functions of :mod:`calib.metrics` (and with ``sklearn.metrics.roc_auc_score``) up
  to float rounding.
* :func:`bootstrap_interval`, :func:`bootstrap_metrics`, :func:`paired_difference`,
  :func:`unpaired_difference` and :func:`paired_metrics` turn those into :class:`Interval` and
  :class:`Comparison` results. ``Interval.value`` is the statistic on the full sample (never the
  bootstrap mean); ``lo`` and ``hi`` are percentile or BCa bounds.

Statistics are named (see :data:`STATISTICS`) or given as a batched callable
``fn(*inputs, idx) -> Tensor[B]`` whose inputs are float64 tensors ``[n]`` and ``idx`` is
``[B, m]``; :func:`per_resample` wraps a scalar function into one (a loop, for the rare
statistic that does not vectorise). All statistics are computed in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from calib.checks import check_choice, check_int, check_number
from calib.constants import N_BINS
from calib.metrics import bin_indices

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[bool]
#: A batched statistic: ``fn(*inputs, idx)`` with inputs float64 ``[n]`` and idx ``[B, m]``
#: returning float64 ``[B]`` (row ``b`` = the statistic on ``[x[idx[b]] for x in inputs]``).
BatchedStatistic = Callable[..., torch.Tensor]
Method = Literal["percentile", "bca"]
Outcome = Literal["higher", "lower", "within noise"]

METHODS: tuple[str, ...] = ("percentile", "bca")

#: Elements (rows x resample size) evaluated per chunk: bounds the temporaries of a statistic
#: to a few tens of MB whatever ``n_resamples`` is.
_CHUNK_ELEMENTS = 1 << 22


# --- result types ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap confidence interval.

    Attributes:
        value: the statistic on the full sample (not the bootstrap mean).
        lo, hi: the interval's bounds.
        level: its nominal coverage (0.95: a 95% interval).

    ``str(iv)`` gives ``"0.435 [0.412, 0.459]"``; ``format(iv, ".2f")`` any float format, and a
    percent format gives the rate variant: ``f"{iv:.1%}"`` -> ``"97.6% [96.2, 98.8]"``.
    """

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        if spec.endswith("%"):
            inner = spec[:-1] + "f"
            v, lo, hi = (format(100.0 * x, inner) for x in (self.value, self.lo, self.hi))
            return f"{v}% [{lo}, {hi}]"
        v, lo, hi = (format(x, spec) for x in (self.value, self.lo, self.hi))
        return f"{v} [{lo}, {hi}]"

    def __str__(self) -> str:
        return format(self, "")

    @property
    def width(self) -> float:
        """``hi - lo``."""
        return self.hi - self.lo

    def contains(self, x: float) -> bool:
        """True if ``lo <= x <= hi`` (False when a bound is NaN)."""
        return self.lo <= x <= self.hi

    def to_columns(self, prefix: str) -> dict[str, float]:
        """``{prefix: value, prefix_lo: lo, prefix_hi: hi}``, for a results table row."""
        return {prefix: self.value, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def outcome_of(difference: Interval) -> Outcome:
    """"higher" if the interval lies above 0, "lower" if below, else "within noise" (it
    contains 0, or a bound is NaN: nothing can be concluded)."""
    if difference.lo > 0:
        return "higher"
    if difference.hi < 0:
        return "lower"
    return "within noise"


@dataclass(frozen=True)
class Comparison:
    """Condition ``a`` against condition ``b`` on one statistic.

    Attributes:
        statistic: the statistic's name.
        a, b: each condition's statistic with its interval (from the same resamples as the
            difference when ``paired``).
        difference: ``a - b`` with its interval.
        outcome: "higher" (a > b), "lower" (a < b) or "within noise" (the interval of the
            difference contains 0); see :func:`outcome_of`.
        paired: whether both conditions were resampled with the same image indices.
    """

    statistic: str
    a: Interval
    b: Interval
    difference: Interval
    outcome: Outcome
    paired: bool = True

    def __str__(self) -> str:
        return (f"{self.statistic}: a = {self.a}, b = {self.b}, a - b = {self.difference} "
                f"({self.outcome})")

    def to_columns(self, prefix: str) -> dict[str, float | str]:
        """Columns ``prefix_a``, ``prefix_b``, ``prefix_diff`` (each with ``_lo``/``_hi``) and
        ``prefix_outcome``."""
        return {**self.a.to_columns(f"{prefix}_a"), **self.b.to_columns(f"{prefix}_b"),
                **self.difference.to_columns(f"{prefix}_diff"),
                f"{prefix}_outcome": self.outcome}


# --- inputs ------------------------------------------------------------------------------------

def _as_input(x: object, name: str, kind: str = "real") -> torch.Tensor:
    """``x`` as a flat float64 CPU tensor, checked: non-empty, no NaN; ``kind`` "prob" also
    requires [0, 1], "binary" requires 0/1 values, "real" finite values."""
    try:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        t = t.to(device="cpu", dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a 1-D array of numbers, got {type(x).__name__}"
                         ) from err
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: the bootstrap needs at least one sample")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN ({int(torch.isnan(t).sum())} of {t.numel()})")
    if kind == "prob" and bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1], got values in "
                         f"[{float(t.min()):.4g}, {float(t.max()):.4g}]")
    if kind == "binary" and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (or False/True) values")
    if kind == "real" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (got infinite values)")
    return t


def _check_same_length(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    n = tensors[0].numel()
    for t, name in zip(tensors[1:], names[1:], strict=True):
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} samples but {names[0]} has {n}: the "
                             f"inputs of one condition must be aligned, one entry per image")
    return n


def _check_idx(idx: object, n: int) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype != torch.int64:
        got = (f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
               if isinstance(idx, torch.Tensor) else type(idx).__name__)
        raise ValueError(f"idx must be an int64 tensor [B, m] (see bootstrap_indices), "
                         f"got {got}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"idx must index the {n} samples, i.e. lie in [0, {n - 1}], got "
                         f"values in [{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_options(n_resamples: int, seed: int, level: float, method: str, n_bins: int
                   ) -> None:
    check_int("n_resamples", n_resamples, minimum=1)
    check_int("seed", seed, minimum=0)
    check_number("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice("method", method, METHODS)
    check_int("n_bins", n_bins, minimum=1)


# --- resampling --------------------------------------------------------------------------------

def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Indices of ``n_resamples`` bootstrap resamples of ``n`` items (drawn with replacement).

    The indices come from a CPU :class:`torch.Generator` seeded with ``seed``, so they are the
    same on every machine and for every ``device`` they are then moved to.

    Returns:
        int64 tensor ``[n_resamples, n]``; row ``b`` is resample ``b``.
    """
    n = check_int("n", n, minimum=1)
    n_resamples = check_int("n_resamples", n_resamples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Drawn as int32 where n allows (the same values as an int64 draw, written faster).
    small = n < 2 ** 31
    idx = torch.randint(0, n, (n_resamples, n), generator=gen,
                        dtype=torch.int32 if small else torch.int64).long()
    return idx if device is None else idx.to(device)


def _jackknife_indices(n: int, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), n - 1]``: row ``r`` lists ``0..n-1`` without ``rows[r]``."""
    base = torch.arange(n - 1, device=rows.device)[None, :]
    return base + (base >= rows[:, None]).long()


# --- batched statistics (kernels: validated float64 inputs, idx [B, m]) ------------------------

def _mean_kernel(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return values[idx].mean(1)


def _ece_kernel(conf: torch.Tensor, corr: torch.Tensor, idx: torch.Tensor, n_bins: int
                ) -> torch.Tensor:
    rows, m = idx.shape
    bins = bin_indices(conf, n_bins).to(idx.device)  # [n], the SPEC's (lo, hi] rule
    key = (torch.arange(rows, device=idx.device)[:, None] * n_bins + bins[idx]).reshape(-1)
    size = rows * n_bins
    sum_conf = torch.zeros(size, dtype=torch.float64, device=idx.device)
    sum_conf.index_add_(0, key, conf[idx].reshape(-1))
    sum_acc = torch.zeros(size, dtype=torch.float64, device=idx.device)
    sum_acc.index_add_(0, key, corr[idx].reshape(-1))
    # sum_b |n_b acc_b - n_b conf_b| / m = sum_b (n_b / m) |acc_b - conf_b|
    return (sum_acc - sum_conf).view(rows, n_bins).abs().sum(1) / m


def _sorted_counts(idx: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """How often each sample occurs in each resample, columns in sorted order: float64
    ``[B, n]`` with ``out[b, rank[i]]`` = the number of times ``i`` occurs in ``idx[b]``."""
    pos = rank[idx]
    counts = torch.zeros(idx.shape[0], rank.numel(), dtype=torch.float64, device=idx.device)
    return counts.scatter_add_(1, pos, torch.ones(pos.shape, dtype=torch.float64,
                                                  device=idx.device))


def _ks_kernel(conf: torch.Tensor, corr: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    m = idx.shape[1]
    order = torch.argsort(conf, stable=True)
    c_s, a_s = conf[order], corr[order]
    if bool(((c_s[1:] == c_s[:-1]) & (a_s[1:] != a_s[:-1])).any()):
        # Equal confidences with different correctness: the running gap inside such a tie
        # depends on the order of its samples, which metrics.ks_error takes from its input
        # (a stable sort); a stable sort of each resample reproduces that exactly.
        c_sorted, perm = torch.sort(conf[idx], dim=1, stable=True)
        a_sorted = corr[idx].gather(1, perm)
        gap = torch.cumsum(a_sorted, 1) / m - torch.cumsum(c_sorted, 1) / m
        return gap.abs().amax(1)
    # Otherwise sort once: a resample is a count per sample, in confidence order. A run of
    # copies of one sample moves the gap monotonically, so its extremes are the run's ends,
    # which are the cumulative sums at each sample (a sample drawn 0 times repeats a value).
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    counts = _sorted_counts(idx, rank)
    return torch.cumsum(counts * (a_s - c_s), 1).abs().amax(1) / m


def _auroc_counts(scores: torch.Tensor, labels: torch.Tensor,
                  counts_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mann-Whitney AUROC of resamples given as counts ``[B, N]`` of the ``N`` samples
    (``counts_of(rank)`` returns them in score order): U = sum over positives of the negatives
    below them plus half the tied ones. NaN for a resample without both classes."""
    order = torch.argsort(scores)
    s_s, y_s = scores[order], labels[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    counts = counts_of(rank)
    group = torch.cat([torch.zeros(1, dtype=torch.int64, device=s_s.device),
                       torch.cumsum((s_s[1:] != s_s[:-1]).long(), 0)])  # tie group of each
    n_groups = int(group[-1]) + 1
    pos, neg = counts * y_s, counts * (1 - y_s)
    if n_groups < scores.numel():  # ties: sum the counts per tie group
        pos = torch.zeros(counts.shape[0], n_groups, dtype=torch.float64,
                          device=counts.device).index_add_(1, group, pos)
        neg = torch.zeros_like(pos).index_add_(1, group, counts * (1 - y_s))
    below = torch.cumsum(neg, 1) - neg
    u = (pos * (below + 0.5 * neg)).sum(1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    both = (n_pos > 0) & (n_neg > 0)
    return torch.where(both, u / (n_pos * n_neg).clamp_min(1), torch.nan)


def _auroc_kernel(scores: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor
                  ) -> torch.Tensor:
    return _auroc_counts(scores, labels, lambda rank: _sorted_counts(idx, rank))


def _pair_auroc_kernel(negative: torch.Tensor, positive: torch.Tensor, idx: torch.Tensor
                       ) -> torch.Tensor:
    n = negative.numel()
    scores = torch.cat([negative, positive])
    labels = torch.cat([torch.zeros_like(negative), torch.ones_like(positive)])
    # Item i (clean) and item n + i (adversarial) are drawn together, as often as image i.
    both = torch.cat([idx, idx + n], 1)
    return _auroc_counts(scores, labels, lambda rank: _sorted_counts(both, rank))


@dataclass(frozen=True)
class _Statistic:
    kernel: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]  # argument names, for messages
    kinds: tuple[str, ...]  # "prob" | "binary" | "real", see _as_input
    binned: bool = False


#: The named statistics and the inputs each takes (in order).
STATISTICS: dict[str, _Statistic] = {
    "accuracy": _Statistic(_mean_kernel, ("correct",), ("binary",)),
    "confidence": _Statistic(_mean_kernel, ("confidences",), ("prob",)),
    "success_rate": _Statistic(_mean_kernel, ("success",), ("binary",)),
    "mean": _Statistic(_mean_kernel, ("values",), ("real",)),
    "ece": _Statistic(_ece_kernel, ("confidences", "correct"), ("prob", "binary"), binned=True),
    "ks": _Statistic(_ks_kernel, ("confidences", "correct"), ("prob", "binary")),
    "auroc": _Statistic(_auroc_kernel, ("scores", "labels"), ("real", "binary")),
    "pair_auroc": _Statistic(_pair_auroc_kernel, ("negative_scores", "positive_scores"),
                             ("real", "real")),
}


def resampled_mean(values: ArrayLike, idx: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``[n]`` on each resample of ``idx`` ``[B, m]`` -> float64 ``[B]``.

    Accuracy is the mean of ``correct``, mean confidence of ``confidences``, a success (or
    detection-accuracy) rate the mean of a per-image bool.
    """
    v = _as_input(values, "values")
    return _mean_kernel(v.to(idx.device), _check_idx(idx, v.numel()))


def resampled_ece(confidences: ArrayLike, correct: ArrayLike, idx: torch.Tensor,
                  n_bins: int = N_BINS) -> torch.Tensor:
    """ECE (:func:`calib.metrics.ece`, SPEC §6 binning) of each resample -> float64 ``[B]``.

    One ``index_add_`` over (resample, bin) keys sums confidence and correctness per bin for all
    ``B`` resamples at once.

    Args:
        confidences: ``[n]`` in [0, 1].
        correct: ``[n]`` 0/1.
        idx: ``[B, m]`` int64 indices into the ``n`` samples (:func:`bootstrap_indices`).
        n_bins: equal-width bins on [0, 1].
    """
    check_int("n_bins", n_bins, minimum=1)
    conf = _as_input(confidences, "confidences", "prob")
    corr = _as_input(correct, "correct", "binary")
    n = _check_same_length([conf, corr], ["confidences", "correct"])
    idx = _check_idx(idx, n)
    return _ece_kernel(conf.to(idx.device), corr.to(idx.device), idx, n_bins)


def resampled_ks(confidences: ArrayLike, correct: ArrayLike, idx: torch.Tensor
                 ) -> torch.Tensor:
    """KS calibration error (:func:`calib.metrics.ks_error`) of each resample -> ``[B]``.

    ``max_i |cumsum(a)_i / m - cumsum(s)_i / m|`` in confidence order, from per-sample counts
    after one sort of the ``n`` samples. Where equal confidences differ in correctness the value
    depends on the order inside the tie; the scalar function takes it from its input (a stable
    sort), and so does this one then, sorting each resample (stable) instead: same numbers,
    ``O(B m log m)`` time.

    Args:
        confidences: ``[n]`` in [0, 1].
        correct: ``[n]`` 0/1.
        idx: ``[B, m]`` int64 indices into the ``n`` samples.
    """
    conf = _as_input(confidences, "confidences", "prob")
    corr = _as_input(correct, "correct", "binary")
    n = _check_same_length([conf, corr], ["confidences", "correct"])
    idx = _check_idx(idx, n)
    return _ks_kernel(conf.to(idx.device), corr.to(idx.device), idx)


def resampled_auroc(scores: ArrayLike, labels: ArrayLike, idx: torch.Tensor) -> torch.Tensor:
    """AUROC of ``scores`` ``[n]`` for 0/1 ``labels`` ``[n]`` on each resample -> ``[B]``.

    Rank-based: Mann-Whitney U / (n_pos n_neg), ties counting one half, which equals
    ``sklearn.metrics.roc_auc_score``; from per-sample counts after one sort of the ``n``
    scores, ``O(B n)``. NaN for a resample holding only one class.
    """
    s = _as_input(scores, "scores")
    y = _as_input(labels, "labels", "binary")
    n = _check_same_length([s, y], ["scores", "labels"])
    idx = _check_idx(idx, n)
    return _auroc_kernel(s.to(idx.device), y.to(idx.device), idx)


def resampled_pair_auroc(negative_scores: ArrayLike, positive_scores: ArrayLike,
                         idx: torch.Tensor) -> torch.Tensor:
    """AUROC of paired scores on each resample of the pairs -> ``[B]``.

    Entry ``i`` of ``negative_scores`` and ``positive_scores`` (both ``[n]``) belong to one
    image (e.g. a detector's score on its clean and its adversarial version); a resample draws
    images, keeping each pair together, so both classes are always present.
    """
    neg = _as_input(negative_scores, "negative_scores")
    pos = _as_input(positive_scores, "positive_scores")
    n = _check_same_length([neg, pos], ["negative_scores", "positive_scores"])
    idx = _check_idx(idx, n)
    return _pair_auroc_kernel(neg.to(idx.device), pos.to(idx.device), idx)


def per_resample(fn: Callable[..., float]) -> BatchedStatistic:
    """Wrap a scalar statistic ``fn(*inputs) -> float`` (inputs resampled ``[m]`` tensors) into
    a batched one, looping over the resamples. For statistics that do not vectorise; prefer a
    vectorised function where one exists (a loop of 1,000 calls per interval)."""

    def batched(*inputs_and_idx: torch.Tensor) -> torch.Tensor:
        *inputs, idx = inputs_and_idx
        return torch.tensor([float(fn(*(x[row] for x in inputs))) for row in idx],
                            dtype=torch.float64)

    batched.__name__ = getattr(fn, "__name__", "per_resample")
    return batched


# --- engine ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Prepared:
    name: str
    kernel: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    n: int

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """The statistic on each row of ``idx``, evaluated in chunks of rows -> ``[B]``."""
        rows = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[1]))
        out = [self.kernel(*self.inputs, idx[i:i + rows]).to(torch.float64).reshape(-1)
               for i in range(0, idx.shape[0], rows)]
        return torch.cat(out).cpu()

    def full(self) -> float:
        """The statistic on the full sample."""
        return float(self(torch.arange(self.n, device=self.inputs[0].device)[None, :])[0])

    def jackknife(self) -> torch.Tensor:
        """Leave-one-out values ``[n]`` (for the BCa acceleration); chunked like ``__call__``."""
        if self.n < 2:
            return torch.zeros(0, dtype=torch.float64)
        device = self.inputs[0].device
        rows = max(1, _CHUNK_ELEMENTS // (self.n - 1))
        out = [self(_jackknife_indices(self.n, torch.arange(i, min(i + rows, self.n),
                                                            device=device)))
               for i in range(0, self.n, rows)]
        return torch.cat(out)


def _prepare(statistic: str | BatchedStatistic, inputs: object, *, n_bins: int,
             device: torch.device | str | None, label: str = "") -> _Prepared:
    """Validate ``inputs`` (one array, or a tuple of arrays) for ``statistic``."""
    arrays = inputs if isinstance(inputs, tuple) else (inputs,)
    if not arrays:
        raise ValueError(f"{label or 'inputs'} must hold at least one array")
    if isinstance(statistic, str):
        check_choice("statistic", statistic, tuple(STATISTICS))
        spec = STATISTICS[statistic]
        if len(arrays) != len(spec.inputs):
            raise ValueError(
                f"{label or 'inputs'} for statistic {statistic!r} must be "
                f"{len(spec.inputs)} array(s) ({', '.join(spec.inputs)}), got {len(arrays)}")
        names = tuple(f"{label}{a}" for a in spec.inputs)
        kinds = spec.kinds
        kernel = functools.partial(spec.kernel, n_bins=n_bins) if spec.binned else spec.kernel
        name = statistic
    elif callable(statistic):
        names = tuple(f"{label}inputs[{i}]" for i in range(len(arrays)))
        kinds = ("real",) * len(arrays)
        kernel = statistic
        name = getattr(statistic, "__name__", "statistic")
    else:
        raise ValueError(f"statistic must be one of {list(STATISTICS)} or a batched callable "
                         f"fn(*inputs, idx) -> [B], got {statistic!r}")
    tensors = tuple(_as_input(x, nm, kd) for x, nm, kd in zip(arrays, names, kinds,
                                                              strict=True))
    n = _check_same_length(tensors, names)
    if device is not None:
        tensors = tuple(t.to(device) for t in tensors)
    return _Prepared(name, kernel, tensors, n)


def _acceleration(jackknives: Sequence[torch.Tensor]) -> float:
    """BCa acceleration from the leave-one-out values of each independent sample (Efron &
    Tibshirani 1993, eq. 14.15; the multi-sample form as in scipy.stats.bootstrap)."""
    num = den = 0.0
    for theta in jackknives:
        theta = theta[torch.isfinite(theta)]
        n = theta.numel()
        if n < 2:
            continue
        u = (n - 1) * (theta.mean() - theta)
        num += float((u ** 3).sum()) / n ** 3
        den += float((u ** 2).sum()) / n ** 2
    a = num / (6.0 * den ** 1.5) if den > 0 else 0.0
    return a if math.isfinite(a) else 0.0


def _interval(value: float, boot: torch.Tensor, level: float, method: str,
              jackknives: Sequence[torch.Tensor] = ()) -> Interval:
    """Percentile or BCa interval from the bootstrap values ``boot`` ``[B]`` (NaN resamples,
    e.g. an AUROC of a one-class resample, are left out)."""
    boot = boot[~torch.isnan(boot)]
    if boot.numel() == 0 or math.isnan(value):
        return Interval(value, math.nan, math.nan, level)
    alpha = (1.0 - level) / 2.0
    probs = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    if method == "bca":
        b = boot.numel()
        # Fraction of resamples below the estimate, ties counting one half; clamped so that a
        # bootstrap distribution entirely on one side gives a finite bias correction.
        p = (float((boot < value).sum()) + 0.5 * float((boot == value).sum())) / b
        p = min(max(p, 0.5 / b), 1.0 - 0.5 / b)
        z0 = float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
        a = _acceleration(jackknives)
        z = torch.special.ndtri(probs) + z0
        probs = torch.special.ndtr(z0 + z / (1.0 - a * z)).clamp(0.0, 1.0)
    lo, hi = torch.quantile(boot, probs).tolist()
    return Interval(value, lo, hi, level)


# --- public API --------------------------------------------------------------------------------

def bootstrap_interval(statistic: str | BatchedStatistic, *inputs: ArrayLike,
                       n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                       method: Method = "percentile", n_bins: int = N_BINS,
                       device: torch.device | str | None = None) -> Interval:
    """Bootstrap interval of one statistic over the evaluated images.

    Args:
        statistic: a name in :data:`STATISTICS` ("accuracy", "confidence", "success_rate",
            "mean", "ece", "ks", "auroc", "pair_auroc") or a batched callable
            ``fn(*inputs, idx) -> [B]``.
        *inputs: the statistic's inputs, each ``[n]`` (one entry per image), e.g.
            ``confidences, correct`` for "ece".
        n_resamples: bootstrap resamples (SPEC §10: >= 1,000 for reported numbers).
        seed: seeds :func:`bootstrap_indices`.
        level: nominal coverage, in (0, 1).
        method: "percentile", or "bca" (bias-corrected and accelerated; Efron & Tibshirani
            1993, ch. 14), which adds a jackknife of ``n`` leave-one-out evaluations.
        n_bins: ECE bins.
        device: where to evaluate (None: the CPU); the indices are the same on every device.
    """
    _check_options(n_resamples, seed, level, method, n_bins)
    stat = _prepare(statistic, tuple(inputs), n_bins=n_bins, device=device)
    idx = bootstrap_indices(stat.n, n_resamples, seed, device)
    jack = (stat.jackknife(),) if method == "bca" else ()
    return _interval(stat.full(), stat(idx), level, method, jack)


def bootstrap_metrics(confidences: ArrayLike, correct: ArrayLike, *,
                      success: ArrayLike | None = None, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95, n_bins: int = N_BINS,
                      method: Method = "percentile", device: torch.device | str | None = None
                      ) -> dict[str, Interval]:
    """Intervals of accuracy, mean confidence, ECE and KS (and the success rate) of one
    condition, all from the same resamples of the ``n`` images.

    Args:
        confidences: ``[n]`` max softmax probability per image, in [0, 1].
        correct: ``[n]`` 0/1, prediction correct.
        success: optional ``[n]`` 0/1 per image (e.g. the attack succeeded on it).
        n_resamples, seed, level, n_bins, method, device: see :func:`bootstrap_interval`.

    Returns:
        ``{"accuracy", "confidence", "ece", "ks"[, "success_rate"]: Interval}``.
    """
    _check_options(n_resamples, seed, level, method, n_bins)
    conf = _as_input(confidences, "confidences", "prob")
    corr = _as_input(correct, "correct", "binary")
    checked = [conf, corr] + ([_as_input(success, "success", "binary")] if success is not None
                              else [])
    n = _check_same_length(checked, ["confidences", "correct", "success"][:len(checked)])
    arrays = {"accuracy": (corr,), "confidence": (conf,), "ece": (conf, corr), "ks": (conf, corr)}
    if success is not None:
        arrays["success_rate"] = (checked[2],)
    stats = {k: _prepare(k, v, n_bins=n_bins, device=device) for k, v in arrays.items()}
    idx = bootstrap_indices(n, n_resamples, seed, device)
    return {k: _interval(s.full(), s(idx), level, method,
                         (s.jackknife(),) if method == "bca" else ())
            for k, s in stats.items()}


def paired_difference(statistic: str | BatchedStatistic, a_inputs: ArrayLike | tuple,
                      b_inputs: ArrayLike | tuple, *, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95, method: Method = "percentile",
                      n_bins: int = N_BINS, device: torch.device | str | None = None
                      ) -> Comparison:
    """Paired bootstrap of ``statistic(a) - statistic(b)`` over the SAME images.

    Entry ``i`` of every input of ``a`` and of ``b`` must be the same image (e.g. undefended
    and defended model, or clean and attacked version, of image ``i``). Each resample draws one
    set of image indices and evaluates both conditions on it, so the difference's interval
    reflects only how the conditions differ, not which images happened to be drawn.

    Args:
        statistic: see :func:`bootstrap_interval`.
        a_inputs, b_inputs: each condition's inputs: one array (statistics of one input), or
            a tuple of arrays, e.g. ``(confidences, correct)`` for "ece"; all ``[n]``.
        n_resamples, seed, level, method, n_bins, device: see :func:`bootstrap_interval`.

    Returns:
        A :class:`Comparison` of a against b; ``outcome`` is "within noise" when the interval
        of ``a - b`` contains 0.
    """
    _check_options(n_resamples, seed, level, method, n_bins)
    a = _prepare(statistic, a_inputs, n_bins=n_bins, device=device, label="a_")
    b = _prepare(statistic, b_inputs, n_bins=n_bins, device=device, label="b_")
    if a.n != b.n:
        raise ValueError(f"a_inputs has {a.n} samples but b_inputs has {b.n}: a paired "
                         f"comparison needs both conditions on the same images "
                         f"(use unpaired_difference for different image sets)")
    idx = bootstrap_indices(a.n, n_resamples, seed, device)
    boot_a, boot_b = a(idx), b(idx)
    value_a, value_b = a.full(), b.full()
    jack_a = a.jackknife() if method == "bca" else None
    jack_b = b.jackknife() if method == "bca" else None
    diff = _interval(value_a - value_b, boot_a - boot_b, level, method,
                     (jack_a - jack_b,) if method == "bca" else ())
    return Comparison(
        statistic=a.name,
        a=_interval(value_a, boot_a, level, method, (jack_a,) if jack_a is not None else ()),
        b=_interval(value_b, boot_b, level, method, (jack_b,) if jack_b is not None else ()),
        difference=diff, outcome=outcome_of(diff), paired=True)


def unpaired_difference(statistic: str | BatchedStatistic, a_inputs: ArrayLike | tuple,
                        b_inputs: ArrayLike | tuple, *, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, method: Method = "percentile",
                        n_bins: int = N_BINS, device: torch.device | str | None = None
                        ) -> Comparison:
    """Bootstrap of ``statistic(a) - statistic(b)`` for two INDEPENDENT image sets (they may
    differ in size): each condition is resampled on its own. On the same images use
    :func:`paired_difference`, which is never looser and usually much tighter.

    Arguments as for :func:`paired_difference`; a's indices use ``seed``, b's ``seed + 1``.
    """
    _check_options(n_resamples, seed, level, method, n_bins)
    a = _prepare(statistic, a_inputs, n_bins=n_bins, device=device, label="a_")
    b = _prepare(statistic, b_inputs, n_bins=n_bins, device=device, label="b_")
    boot_a = a(bootstrap_indices(a.n, n_resamples, seed, device))
    boot_b = b(bootstrap_indices(b.n, n_resamples, seed + 1, device))
    value_a, value_b = a.full(), b.full()
    jack_a = a.jackknife() if method == "bca" else None
    jack_b = b.jackknife() if method == "bca" else None
    diff = _interval(value_a - value_b, boot_a - boot_b, level, method,
                     (jack_a - value_b, value_a - jack_b) if method == "bca" else ())
    return Comparison(
        statistic=a.name,
        a=_interval(value_a, boot_a, level, method, (jack_a,) if jack_a is not None else ()),
        b=_interval(value_b, boot_b, level, method, (jack_b,) if jack_b is not None else ()),
        difference=diff, outcome=outcome_of(diff), paired=False)


def paired_metrics(a_confidences: ArrayLike, a_correct: ArrayLike, b_confidences: ArrayLike,
                   b_correct: ArrayLike, *, a_success: ArrayLike | None = None,
                   b_success: ArrayLike | None = None, n_resamples: int = 1000, seed: int = 0,
                   level: float = 0.95, n_bins: int = N_BINS, method: Method = "percentile",
                   device: torch.device | str | None = None) -> dict[str, Comparison]:
    """:func:`paired_difference` of accuracy, confidence, ECE and KS (and the success rate)
    between conditions a and b on the same ``n`` images, all from the same resamples.

    Returns:
        ``{"accuracy", "confidence", "ece", "ks"[, "success_rate"]: Comparison}``.
    """
    if (a_success is None) != (b_success is None):
        raise ValueError("a_success and b_success must be given together (or neither)")
    pairs = {"accuracy": (a_correct, b_correct), "confidence": (a_confidences, b_confidences),
             "ece": ((a_confidences, a_correct), (b_confidences, b_correct)),
             "ks": ((a_confidences, a_correct), (b_confidences, b_correct))}
    if a_success is not None:
        pairs["success_rate"] = (a_success, b_success)
    return {k: paired_difference(k, a, b, n_resamples=n_resamples, seed=seed, level=level,
                                 method=method, n_bins=n_bins, device=device)
            for k, (a, b) in pairs.items()}
