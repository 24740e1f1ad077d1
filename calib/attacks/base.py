"""Shared parts of the calibration attacks: objectives, acceptance rule, bookkeeping, result.

Paper: Obadinma, Zhu, Guo, "Calibration Attacks: A Comprehensive Study of Adversarial Attacks
on Model Confidence" (TMLR; arXiv:2401.02718), §3. SPEC §3 fixes the semantics used here:

- UCA minimises the probability margin ``m = p_(1) - p_(2)``; success when ``m <= 0.1``.
- OCA maximises ``p_k`` (k the clean prediction); success when the confidence is ``>= 0.99``.
- MMA runs UCA on samples whose clean prediction equals the label and OCA on the rest.
- RCA draws a target ``t ~ U(1/K + 0.05, 0.99)`` per sample and minimises ``|c - t|``;
  success when ``|c - t| <= 0.05``.
- Acceptance rule: a candidate replaces the current best iff the objective improves AND the
  argmax is still the clean prediction ``k``. Correct classification is not required.
- A successful sample is not queried again.

Every attack evaluates objectives through :func:`score` and keeps its per-sample state in an
:class:`AttackState`, so the methods (:mod:`calib.attacks.square`, :mod:`calib.attacks.pgd`)
only differ in how they propose candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from calib import metrics
from calib.checks import (
    check_choice,
    check_deterministic,
    check_eps,
    check_images,
    check_int,
    check_labels,
    check_logits,
    check_number,
    perturbation_norms,
)
from calib.runtime import eval_mode, predict_logits

KINDS: tuple[str, ...] = ("uca", "oca", "mma", "rca")
METHODS: tuple[str, ...] = ("square", "pgd")
NORMS: tuple[str, ...] = ("linf", "l2")

#: Per-sample objective codes; MMA mixes UCA and OCA samples in one run.
MODE_UCA: int = 0
MODE_OCA: int = 1
MODE_RCA: int = 2

#: RCA targets are drawn from U(1/K + RCA_TARGET_OFFSET, RCA_TARGET_HIGH) (SPEC §3).
RCA_TARGET_OFFSET: float = 0.05
RCA_TARGET_HIGH: float = 0.99

#: What UCA minimises: the probability margin (SPEC §3), or the clean class's probability p_k
#: (the push-to-the-bound variant, see :class:`Thresholds`).
UCA_OBJECTIVES: tuple[str, ...] = ("margin", "confidence")


@dataclass(frozen=True)
class Thresholds:
    """Per-kind success thresholds (SPEC §3), and UCA's objective.

    Attributes:
        uca_margin: UCA succeeds when the probability margin ``p_(1) - p_(2)`` is at most this.
        oca_confidence: OCA succeeds when the confidence is at least this.
        rca_tolerance: RCA succeeds when ``|c - t|`` is at most this.
        uca_objective: "margin" (SPEC §3): UCA minimises the margin and stops at
            ``uca_margin``. "confidence" (push-to-the-bound variant): UCA minimises ``p_k``
            itself, has no threshold and so spends the whole budget on every UCA sample, and
            succeeds iff the final ``p_k`` is below the clean one with the label kept. The
            margin rule stops a correct sample near ``p_k = (1 + uca_margin) / 2``; this one
            shows how far towards ``1/K`` (MMA's bound ``1 - q/K``) a label-preserving attack
            gets. Only UCA samples (UCA, and MMA's correct ones) are affected.
    """

    uca_margin: float = 0.1
    oca_confidence: float = 0.99
    rca_tolerance: float = 0.05
    uca_objective: str = "margin"

    def __post_init__(self) -> None:
        check_number("uca_margin", self.uca_margin, low=0, high=1, high_open=True)
        check_number("oca_confidence", self.oca_confidence, low=0, high=1, low_open=True)
        check_number("rca_tolerance", self.rca_tolerance, low=0, high=1, high_open=True)
        check_choice("uca_objective", self.uca_objective, UCA_OBJECTIVES)


@dataclass(frozen=True)
class Scores:
    """Per-sample evaluation of one batch of logits against the clean predictions.

    All fields have shape (B,).

    Attributes:
        loss: the objective to minimise: the margin (UCA, as ``-log(1 - margin)``; with
            ``uca_objective="confidence"``, ``log p_k``), ``-log p_k`` (OCA) or ``|p_k - t|``
            (RCA); the log forms are increasing functions of the margin and of ``-p_k`` that
            keep their resolution where ``p_k`` rounds to 1 in float32.
        confidence: ``p_k``, the probability of the clean prediction ``k`` (the confidence
            whenever the label is kept).
        margin: ``p_k - max_{j != k} p_j`` (negative once the argmax has moved).
        keeps_label: the argmax is still ``k``, with ``margin > min_margin``.
        success: the sample meets its kind's threshold (never, during the run, for UCA with
            ``uca_objective="confidence"``: see :meth:`AttackState.finish`).
    """

    loss: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    keeps_label: torch.Tensor
    success: torch.Tensor


def score(logits: torch.Tensor, k: torch.Tensor, mode: torch.Tensor, target: torch.Tensor,
          thresholds: Thresholds, min_margin: float, present: tuple[int, ...] | None = None
          ) -> Scores:
    """Objective, confidence, margin, label check and success of ``logits`` (B, K).

    Args:
        logits: (B, K) model outputs.
        k: (B,) clean predictions.
        mode: (B,) objective codes (:data:`MODE_UCA`, :data:`MODE_OCA`, :data:`MODE_RCA`).
        target: (B,) RCA target confidences (ignored elsewhere).
        thresholds: success thresholds and UCA's objective.
        min_margin: the label counts as kept only if ``p_k`` beats every other class by more
            than this; a small positive value keeps the label robust to the last-bit
            differences that another batch composition can cause in the logits.
        present: the codes that occur in ``mode``, if known; a single code skips the
            per-sample selection (the attacks' inner loops call this every iteration).
    """
    z = logits.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    logp = z.log_softmax(1)
    logp_k = logp.gather(1, k[:, None]).squeeze(1)
    p_k = logp_k.exp()
    logp_rest = logp.scatter(1, k[:, None], -math.inf)
    logp_other = logp_rest.amax(1)
    margin = p_k - logp_other.exp()
    keeps = margin > min_margin
    # UCA minimises the margin; it is compared as -log(1 - margin), where
    # 1 - margin = sum_{j != k} p_j + max_{j != k} p_j is computed from log-probabilities.
    # The transform is increasing, so it accepts exactly the candidates the margin would, but
    # it keeps its resolution where p_k is within float32 rounding of 1: there the margin
    # itself is exactly 1.0 for every candidate, so a confident sample would never see an
    # improvement and the random search would stall on that plateau.
    if thresholds.uca_objective == "confidence":
        # Push-to-the-bound variant: minimise p_k (as log p_k), no threshold to stop at.
        uca_loss, uca_success = logp_k, torch.zeros_like(keeps)
    else:
        uca_loss = -torch.logaddexp(logp_rest.logsumexp(1), logp_other)
        uca_success = margin <= thresholds.uca_margin
    only = present[0] if present is not None and len(present) == 1 else None
    if only == MODE_UCA:
        return Scores(uca_loss, p_k, margin, keeps, uca_success)
    if only == MODE_OCA:
        return Scores(-logp_k, p_k, margin, keeps, p_k >= thresholds.oca_confidence)
    distance = (p_k - target.to(p_k.dtype)).abs()
    if only == MODE_RCA:
        return Scores(distance, p_k, margin, keeps, distance <= thresholds.rca_tolerance)
    is_uca, is_oca = mode == MODE_UCA, mode == MODE_OCA
    loss = torch.where(is_uca, uca_loss, torch.where(is_oca, -logp_k, distance))
    success = torch.where(
        is_uca, uca_success,
        torch.where(is_oca, p_k >= thresholds.oca_confidence,
                    distance <= thresholds.rca_tolerance))
    return Scores(loss=loss, confidence=p_k, margin=margin, keeps_label=keeps,
                  success=success)


def pushed_success(success: torch.Tensor, mode: torch.Tensor, clean_confidence: torch.Tensor,
                   final_confidence: torch.Tensor, thresholds: Thresholds) -> torch.Tensor:
    """Success per sample once a run is over: with ``uca_objective="confidence"`` a UCA
    sample (which has no threshold) succeeded iff its ``p_k`` went down; ``success``
    unchanged otherwise. Tensors (N,) or, for ``final_confidence`` and ``success``, (T, N)."""
    if thresholds.uca_objective != "confidence":
        return success
    # Compared in float32, the history's precision: an unchanged sample never counts.
    lowered = final_confidence.float() < clean_confidence.float()
    return torch.where(mode.to(success.device) == MODE_UCA, lowered, success)


def resolve_modes(kind: str, clean_prediction: torch.Tensor, labels: torch.Tensor | None
                  ) -> torch.Tensor:
    """Objective code per sample (int8, (N,)); MMA splits on ``clean_prediction == labels``."""
    n = clean_prediction.shape[0]
    device = clean_prediction.device
    if kind == "mma":
        if labels is None:
            raise ValueError("kind='mma' needs the true labels (labels=...)")
        correct = clean_prediction == labels.to(device)
        return torch.where(correct, MODE_UCA, MODE_OCA).to(torch.int8)
    code = {"uca": MODE_UCA, "oca": MODE_OCA, "rca": MODE_RCA}[kind]
    return torch.full((n,), code, dtype=torch.int8, device=device)


def rca_targets(uniform: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Map U(0, 1) draws (N,) to RCA targets ``t ~ U(1/K + 0.05, 0.99)`` (SPEC §3)."""
    low = 1.0 / num_classes + RCA_TARGET_OFFSET
    return low + (RCA_TARGET_HIGH - low) * uniform


@dataclass
class AttackHistory:
    """Per-iteration, per-sample record of one attack run (row t = after iteration t).

    Row 0 is the clean state. Samples that stopped (succeeded, or the whole batch finished
    early) repeat their last values, so row t is where the run stood after t + 1 queries
    (gradient steps + 1 for PGD) per sample: a point on this run's trajectory, not the
    outcome of a dedicated run with that budget (see :meth:`AttackResult.curve`).

    Attributes:
        confidence: (T + 1, N) float32, confidence of the current best input.
        queries: (T + 1, N) int64, queries used so far.
        success: (T + 1, N) bool, success so far.
    """

    confidence: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor


@dataclass
class AttackResult:
    """Outcome of one calibration attack on N images.

    Tensors other than ``x_adv`` and ``x_clean`` live on the CPU.

    Attributes:
        x_adv: (N, C, H, W) adversarial images, same device and dtype as the input.
        x_clean: (N, C, H, W) the clean images (the caller's tensor, not a copy).
        queries: int64 (N,) model evaluations per sample including the clean one (PGD:
            gradient steps + 1).
        success: bool (N,) the sample met its threshold.
        target: float (N,) RCA target confidences; NaN for the other kinds.
        mode: int8 (N,) objective per sample (:data:`MODE_UCA`, :data:`MODE_OCA`,
            :data:`MODE_RCA`); tells the UCA and OCA halves of an MMA run apart.
        clean_confidence, final_confidence: float (N,) confidence before and after.
        clean_margin, final_margin: float (N,) probability margin before and after.
        clean_prediction, final_prediction: int64 (N,) argmax before and after (equal by
            construction).
        kind, method, norm, eps, iterations, seed: the run's settings.
        history: per-iteration records for curves against the number of queries.
        labels: int64 (N,) true labels if they were given, else None.
        options: the method options the run used (defaults filled in).
        zero_gradient: bool (N,) white-box runs only: the input gradient at the clean image
            vanished (:func:`calib.checks.vanishing_gradients`), so gradient steps could not
            move the sample; None for black-box runs.
    """

    x_adv: torch.Tensor
    x_clean: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor
    target: torch.Tensor
    mode: torch.Tensor
    clean_confidence: torch.Tensor
    final_confidence: torch.Tensor
    clean_margin: torch.Tensor
    final_margin: torch.Tensor
    clean_prediction: torch.Tensor
    final_prediction: torch.Tensor
    kind: str
    method: str
    norm: str
    eps: float
    iterations: int
    seed: int
    history: AttackHistory
    labels: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    zero_gradient: torch.Tensor | None = None

    def linf_norm(self) -> torch.Tensor:
        """Per-sample L-inf norm of the perturbation, float64 (N,)."""
        return perturbation_norms(self.x_clean, self.x_adv, "linf")

    def l2_norm(self) -> torch.Tensor:
        """Per-sample L2 norm of the perturbation, float64 (N,)."""
        return perturbation_norms(self.x_clean, self.x_adv, "l2")

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return self.labels
        return check_labels(labels, self.queries.shape[0]).detach().cpu().long()

    def summary(self, labels: torch.Tensor | None = None, *, intervals: bool = True,
                n_resamples: int = 1000) -> dict[str, Any]:
        """Headline numbers of the run (SPEC §6) as a flat, JSON-ready dict.

        Args:
            labels: (N,) true labels; defaults to the labels given to the attack. Without
                labels, accuracy, ECE and KS are left out.
            intervals: add ``<metric>_lo`` / ``<metric>_hi``, the 95% bootstrap interval over
                the N images (:func:`calib.stats.bootstrap_metrics`, seeded: the same images
                resampled alike in every run of the same size), for the success rate,
                confidence and, with labels, accuracy, ECE and KS before and after (SPEC §10:
                every number carries an interval).
            n_resamples: bootstrap resamples.

        Returns:
            Settings, ``success_rate``, query statistics (``queries_mean`` over all samples,
            ``queries_success_mean`` / ``_median`` over successful ones, None if there are
            none), confidence before/after, perturbation norms, ``label_preserved`` (rate),
            and with labels ``accuracy``, ``ece`` and ``ks`` before/after; with
            ``intervals``, their ``_lo`` / ``_hi``.
        """
        labels = self._labels(labels)
        q = self.queries.double()
        won = self.success
        linf, l2 = self.linf_norm(), self.l2_norm()
        out: dict[str, Any] = {
            "kind": self.kind, "method": self.method, "norm": self.norm, "eps": self.eps,
            "iterations": self.iterations, "seed": self.seed, "n": int(q.numel()),
            "success_rate": float(won.double().mean()),
            "queries_mean": float(q.mean()),
            "queries_success_mean": float(q[won].mean()) if bool(won.any()) else None,
            "queries_success_median": float(q[won].median()) if bool(won.any()) else None,
            "confidence_before": float(self.clean_confidence.double().mean()),
            "confidence_after": float(self.final_confidence.double().mean()),
            "linf_mean": float(linf.mean()), "linf_max": float(linf.max()),
            "l2_mean": float(l2.mean()), "l2_max": float(l2.max()),
            "label_preserved": float((self.final_prediction == self.clean_prediction)
                                     .double().mean()),
        }
        if self.zero_gradient is not None:
            out["zero_gradient_fraction"] = float(self.zero_gradient.double().mean())
        if labels is not None:
            for when, pred, conf in (("before", self.clean_prediction, self.clean_confidence),
                                     ("after", self.final_prediction, self.final_confidence)):
                correct = (pred == labels).double()
                out[f"accuracy_{when}"] = float(correct.mean())
                out[f"ece_{when}"] = metrics.ece(conf, correct)
                out[f"ks_{when}"] = metrics.ks_error(conf, correct)
        if intervals:
            out.update(self._intervals(labels, n_resamples))
        return out

    def _intervals(self, labels: torch.Tensor | None, n_resamples: int) -> dict[str, float]:
        """``<metric>_lo`` / ``_hi`` of :meth:`summary`'s rates and calibration errors."""
        from calib.stats import bootstrap_interval, bootstrap_metrics

        out: dict[str, float] = {}
        success = self.success.double()
        for when, pred, conf in (("before", self.clean_prediction, self.clean_confidence),
                                 ("after", self.final_prediction, self.final_confidence)):
            if labels is None:
                found = {"confidence": bootstrap_interval("mean", conf.double(),
                                                          n_resamples=n_resamples, seed=0)}
                if when == "after":
                    found["success_rate"] = bootstrap_interval(
                        "success_rate", success, n_resamples=n_resamples, seed=0)
            else:
                correct = (pred == labels).double()
                found = bootstrap_metrics(conf.double().clamp(0, 1), correct,
                                          success=success if when == "after" else None,
                                          n_resamples=n_resamples, seed=0)
            for name, interval in found.items():
                key = name if name == "success_rate" else f"{name}_{when}"
                out[f"{key}_lo"], out[f"{key}_hi"] = interval.lo, interval.hi
        return out

    def curve(self, labels: torch.Tensor | None = None, *, points: int | None = None
              ) -> dict[str, np.ndarray]:
        """Metrics along this one run's trajectory, against the queries spent so far.

        Row t of the history is where this run stood after t + 1 queries per sample. That is
        not the outcome of a run *given* a budget of t + 1 queries: Square's window schedule
        is rescaled to the budget, so a shorter dedicated run is a different (usually weaker)
        attack. Budget curves come from dedicated runs (``calib.analysis.sweeps``, Fig. 2);
        this trajectory is labelled as such wherever it is shown.

        Args:
            labels: (N,) true labels (default: those given to the attack); without them the
                ECE and KS curves are left out.
            points: keep about this many rows, evenly spaced (default: every iteration).

        Returns:
            ``queries`` (queries per sample so far, the trajectory's x axis),
            ``queries_mean`` (mean queries actually used),
            ``confidence`` (mean confidence), ``success_rate`` and, with labels, ``ece`` and
            ``ks``; each a float64 array of the same length.
        """
        labels = self._labels(labels)
        h = self.history
        n_rows = h.confidence.shape[0]
        rows = np.arange(n_rows)
        if points is not None:
            if points < 2:
                raise ValueError(f"points must be >= 2, got {points}")
            rows = np.unique(np.linspace(0, n_rows - 1, points).round().astype(np.int64))
        conf = h.confidence[rows].double()
        out = {
            "queries": (rows + 1).astype(np.float64),
            "queries_mean": h.queries[rows].double().mean(1).numpy(),
            "confidence": conf.mean(1).numpy(),
            "success_rate": h.success[rows].double().mean(1).numpy(),
        }
        if labels is not None:
            # The attacks keep the clean prediction, so correctness is fixed along the run.
            correct = (self.clean_prediction == labels).double()
            out["ece"] = np.array([metrics.ece(c, correct) for c in conf])
            out["ks"] = np.array([metrics.ks_error(c, correct) for c in conf])
        return out


class AttackState:
    """Per-sample state of an attack on one chunk of B images (all tensors on their device).

    Holds the current best inputs and their objective values, the query counts and the
    history rows, and applies the acceptance rule to candidate batches.
    """

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, *, mode: torch.Tensor,
                 target: torch.Tensor, thresholds: Thresholds, min_margin: float,
                 iterations: int) -> None:
        self.x_best = x.detach().clone(memory_format=torch.contiguous_format)
        self.k = logits.detach().argmax(1)
        self.mode = mode
        self.target = target
        self.thresholds = thresholds
        self.min_margin = min_margin
        self.present = tuple(sorted(set(mode.tolist())))
        s = score(logits, self.k, mode, target, thresholds, min_margin, self.present)
        self.loss = s.loss.clone()
        self.confidence = s.confidence.clone()
        self.margin = s.margin.clone()
        self.success = s.success.clone()
        self.clean_confidence = s.confidence.clone()
        self.clean_margin = s.margin.clone()
        n, device = x.shape[0], x.device
        self.queries = torch.ones(n, dtype=torch.int64, device=device)
        self.hist_confidence = torch.empty(iterations + 1, n, dtype=torch.float32,
                                           device=device)
        self.hist_queries = torch.empty(iterations + 1, n, dtype=torch.int64, device=device)
        self.hist_success = torch.empty(iterations + 1, n, dtype=torch.bool, device=device)
        self.t = 0
        self._write_row(0)

    def active(self) -> torch.Tensor:
        """Indices (int64) of the samples still to attack."""
        return (~self.success).nonzero().squeeze(1)

    def consider(self, idx: torch.Tensor, x_new: torch.Tensor, logits: torch.Tensor, *,
                 copy_inputs: bool = True) -> tuple[torch.Tensor, Scores]:
        """Apply the acceptance rule to candidates ``x_new`` (A, C, H, W) for samples ``idx``.

        Counts one query per sample in ``idx``.

        Args:
            idx: (A,) the samples the candidates belong to.
            x_new: (A, C, H, W) candidates.
            logits: (A, K) the model's outputs on them.
            copy_inputs: copy accepted candidates into ``x_best``; a caller that knows
                which pixels changed may do it more cheaply itself.

        Returns:
            ``accepted``, bool (A,), and the candidates' :class:`Scores`.
        """
        s = score(logits, self.k[idx], self.mode[idx], self.target[idx], self.thresholds,
                  self.min_margin, self.present)
        accepted = (s.loss < self.loss[idx]) & s.keeps_label
        local = accepted.nonzero().squeeze(1)
        rows = idx[local]
        if copy_inputs:
            self.x_best.index_copy_(0, rows, x_new.detach().index_select(0, local))
        self.loss[rows] = s.loss[local]
        self.confidence[rows] = s.confidence[local]
        self.margin[rows] = s.margin[local]
        self.success[rows] = s.success[local]
        self.queries[idx] += 1
        return accepted, s

    def record(self) -> None:
        """Close an iteration: write the next history row."""
        self.t += 1
        self._write_row(self.t)

    def finish(self) -> None:
        """Repeat the last row into the rows of iterations that were not needed; with
        ``uca_objective="confidence"``, mark UCA samples successful where ``p_k`` went down
        (:func:`pushed_success`), in the history too."""
        last = self.t
        self.hist_confidence[last + 1:] = self.hist_confidence[last]
        self.hist_queries[last + 1:] = self.hist_queries[last]
        self.hist_success[last + 1:] = self.hist_success[last]
        self.success = pushed_success(self.success, self.mode, self.clean_confidence,
                                      self.confidence, self.thresholds)
        self.hist_success = pushed_success(self.hist_success, self.mode, self.clean_confidence,
                                           self.hist_confidence, self.thresholds)

    def _write_row(self, t: int) -> None:
        self.hist_confidence[t] = self.confidence
        self.hist_queries[t] = self.queries
        self.hist_success[t] = self.success


#: A method's per-chunk loop: (clean images, state factory, generator, progress bar) -> state.
ChunkAttack = Callable[[torch.Tensor, Callable[[torch.Tensor], AttackState], torch.Generator,
                        Any], AttackState]


def check_common(model: object, images: object, *, kind: object, norm: object, eps: object,
                 iterations: object, labels: object, seed: object, batch_size: object,
                 norms: tuple[str, ...] = NORMS) -> tuple[torch.Tensor, float]:
    """Validate the arguments every attack shares, before any work; returns (images, eps)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("kind", kind, KINDS)
    check_choice("norm", norm, norms)
    images = check_images(images)
    eps = check_eps(eps, str(norm))
    check_int("iterations", iterations, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed)
    if kind == "mma" and labels is None:
        raise ValueError("kind='mma' needs the true labels (labels=...): it runs UCA on "
                         "correctly classified samples and OCA on the others")
    if labels is not None:
        check_labels(labels, images.shape[0])
    return images, eps


def check_min_margin(min_margin: object) -> float:
    """Validate the label-keeping margin: a number in [0, 1)."""
    return check_number("min_margin", min_margin, low=0, high=1, high_open=True)


def execute(model: nn.Module, images: torch.Tensor, *, attack_chunk: ChunkAttack, kind: str,
            method: str, norm: str, eps: float, iterations: int, labels: torch.Tensor | None,
            seed: int, thresholds: Thresholds, min_margin: float, batch_size: int,
            show_progress: bool, options: dict[str, Any]) -> AttackResult:
    """Run ``attack_chunk`` over the images in chunks of ``batch_size`` and gather the result.

    The model is in eval mode throughout and its previous modes are restored afterwards. One
    seeded generator on the images' device drives everything: the RCA targets are drawn
    first for all N samples (so they do not depend on ``batch_size``), then the chunks are
    attacked in order.
    """
    n, device = images.shape[0], images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    uniform = torch.rand(n, generator=generator, device=device)
    states: list[AttackState] = []
    n_chunks = math.ceil(n / batch_size)
    with eval_mode(model), tqdm(total=iterations * n_chunks, desc=f"{method} {kind}",
                                disable=not show_progress, leave=False) as bar:
        check_deterministic(model, images)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            chunk_labels = None if labels is None else labels[start:stop].to(device)

            def make_state(logits: torch.Tensor, x: torch.Tensor = images[start:stop],
                           chunk_labels: torch.Tensor | None = chunk_labels,
                           u: torch.Tensor = uniform[start:stop]) -> AttackState:
                num_classes = check_logits(logits, x.shape[0])
                if chunk_labels is not None:
                    check_labels(chunk_labels, x.shape[0], num_classes=num_classes)
                k = logits.detach().argmax(1)
                mode = resolve_modes(kind, k, chunk_labels)
                target = rca_targets(u, num_classes) if kind == "rca" \
                    else torch.full_like(u, math.nan)
                return AttackState(x, logits, mode=mode, target=target, thresholds=thresholds,
                                   min_margin=min_margin, iterations=iterations)

            state = attack_chunk(images[start:stop], make_state, generator, bar)
            state.finish()
            bar.update(iterations - state.t)
            states.append(state)
    return _assemble(states, images, kind=kind, method=method, norm=norm, eps=eps,
                     iterations=iterations, seed=seed, labels=labels, options=options)


def _assemble(states: list[AttackState], images: torch.Tensor, *, kind: str, method: str,
              norm: str, eps: float, iterations: int, seed: int, labels: torch.Tensor | None,
              options: dict[str, Any]) -> AttackResult:
    def cat(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([getattr(s, name) for s in states], dim=dim).cpu()

    x_adv = torch.cat([s.x_best for s in states])
    prediction = cat("k")
    return AttackResult(
        x_adv=x_adv, x_clean=images, queries=cat("queries"), success=cat("success"),
        target=cat("target"), mode=cat("mode"),
        clean_confidence=cat("clean_confidence"), final_confidence=cat("confidence"),
        clean_margin=cat("clean_margin"), final_margin=cat("margin"),
        clean_prediction=prediction, final_prediction=prediction.clone(),
        kind=kind, method=method, norm=norm, eps=eps, iterations=iterations, seed=seed,
        history=AttackHistory(confidence=cat("hist_confidence", 1),
                              queries=cat("hist_queries", 1),
                              success=cat("hist_success", 1)),
        labels=None if labels is None else labels.detach().cpu().long(), options=options,
    )


def reevaluate(result: AttackResult, model: nn.Module, *, batch_size: int = 256
               ) -> AttackResult:
    """The outcome of ``result``'s images on ``model``, from a fresh forward pass.

    The attack's own record of what it achieved comes from inside its loop; this re-runs the
    clean images ``result.x_clean`` and the final adversarial images ``result.x_adv`` through
    ``model`` (in eval mode, in batches of ``batch_size``) and recomputes, per sample, the
    clean and final prediction, confidence and margin, and success by the run's own
    thresholds, objective (``mode``) and RCA targets. A sample whose prediction changed
    counts as failed. SPEC §10, "measured, not assumed": "labels kept" and "accuracy
    unchanged" are read off this pass, so they can fail. With another ``model`` (e.g. a
    defended one) it scores an attack made on a surrogate against that model (transfer).

    Args:
        result: an attack's outcome (N images).
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K).
        batch_size: images per forward pass.

    Returns:
        A copy of ``result`` with ``clean_*``, ``final_*`` and ``success`` recomputed; the
        queries, history and settings are the attack's own.
    """
    clean_logits = predict_logits(model, result.x_clean, batch_size=batch_size,
                                  device=result.x_clean.device)
    final_logits = predict_logits(model, result.x_adv, batch_size=batch_size,
                                  device=result.x_adv.device)
    options = result.options
    thresholds = Thresholds(**{name: options[name] for name in
                               ("uca_margin", "oca_confidence", "rca_tolerance",
                                "uca_objective") if name in options})
    k = clean_logits.argmax(1)
    mode, target = result.mode.cpu(), result.target.cpu()
    present = tuple(int(c) for c in torch.unique(mode))
    clean = score(clean_logits, k, mode, target, thresholds, 0.0, present)
    final = score(final_logits, k, mode, target, thresholds, 0.0, present)
    prediction = final_logits.argmax(1)
    success = pushed_success(final.success, mode, clean.confidence, final.confidence,
                             thresholds)
    return replace(
        result, clean_prediction=k, final_prediction=prediction,
        clean_confidence=clean.confidence.float(), final_confidence=final.confidence.float(),
        clean_margin=clean.margin.float(), final_margin=final.margin.float(),
        success=success & (prediction == k))
