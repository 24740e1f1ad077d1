"""The paper's claims checked on our results, each by a rule that can fail.

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (arXiv:2401.02718). SPEC §1 lists the
paper's claims; each ``claim_*`` function judges one of them with a printed rule, and
:func:`claims_checklist` gathers them. SPEC §10 sets the standard: every rule has an input
under which it fails (``tests/test_claims.py`` builds one per rule, next to one where it
holds), every number a verdict relies on carries a 95% bootstrap interval over the evaluated
images (:mod:`calib.stats`, seeded, 1,000 resamples), and a comparison of two conditions on the
same images uses the paired bootstrap. A threshold is met only when the whole interval lies on
its side; an interval that contains it is "within noise", and the verdict says so.

Verdicts: "holds" (every part met beyond noise), "does not hold" (every part failed beyond
noise), "partly" (anything in between, including "within noise"), "not measured".

Inputs are the pipeline's results, read by the notebook and passed in as DataFrames or plain
mappings (this module reads no files; :func:`push_to_bound` is its one attack run):

* ``records``: per-sample rows of :data:`calib.attacks.grid.RECORD_COLUMNS` (the attack
  stage's ``results/<model>/records/attack_records.csv``) with a ``model`` column, and for the
  MMA bound an ``objective`` column ("margin", or "confidence" for :func:`push_to_bound`);
* ``attack_metrics``: ``{model: results/<model>/attack_metrics.json}``;
* ``detection``: ``results/<model>/table2.csv`` (detector, attack, n_pairs, accuracy, ...);
* ``defence_records``: ``{defence: results/<model>/defences/<defence>/attack_records.csv}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from calib import metrics, stats
from calib.attacks import run_attack
from calib.attacks.base import Thresholds, reevaluate
from calib.attacks.grid import AttackGrid, GridRun
from calib.checks import check_int, check_number
from calib.precision import resolve_precision, with_precision

#: Verdicts used in the checklist.
VERDICTS = ("holds", "partly", "does not hold", "not measured")

#: Bootstrap resamples behind every interval (SPEC §10: at least 1,000).
N_RESAMPLES = 1000

#: Claim 1: ECE and KS must rise by more than this factor.
RISE_FACTOR = 10.0
#: Claim 2: every attack kind must succeed on more than this share of the images.
MIN_SUCCESS = 0.5
#: Claim 5: the closest label-preserving MMA run must reach this share of ``1 - q/K``.
REACH_FRACTION = 0.9
#: Claim 6: a defence that keeps post-attack ECE below this share of the undefended model's
#: (on the same images and attacks) counts as effective, against "defences remain limited".
LIMITED_FRACTION = 0.5

#: The undefended reference and Compression Scaling in the defence records.
NO_DEFENCE = "none"
COMPRESSION_SCALING = "cs"

KIND_ORDER = ("uca", "oca", "mma", "rca")
_RECORD_NEEDS = ("model", "setting", "kind", "index", "label", "prediction",
                 "confidence_before", "confidence_after", "queries", "success")

#: A condition judged on an interval: True (met beyond noise), False (failed beyond noise) or
#: None (the interval contains the threshold: within noise).
Outcome = bool | None


# --- judging intervals -------------------------------------------------------------------------

def above(interval: stats.Interval, threshold: float) -> Outcome:
    """True if the whole interval lies above ``threshold``, False if it lies below, None if it
    contains it (within noise; also when a bound is NaN)."""
    if interval.lo > threshold:
        return True
    if interval.hi < threshold:
        return False
    return None


def _from_comparison(outcome: str, wanted: str) -> Outcome:
    """A :class:`calib.stats.Comparison` outcome against the one a claim predicts."""
    if outcome == "within noise":
        return None
    return outcome == wanted


def verdict(outcomes: Sequence[Outcome]) -> str:
    """"holds" if every outcome is True, "does not hold" if every one is False, "partly" for
    anything else (a mix, or something within noise), "not measured" without outcomes."""
    if not outcomes:
        return "not measured"
    if all(o is True for o in outcomes):
        return "holds"
    if all(o is False for o in outcomes):
        return "does not hold"
    return "partly"


def _noise(outcomes: Sequence[Outcome]) -> str:
    n = sum(o is None for o in outcomes)
    return f", {n} within noise" if n else ""


def _x(interval: stats.Interval) -> str:
    """A ratio with its interval: ``x3.0 [2.6, 3.5]``."""
    return f"x{interval.value:.1f} [{interval.lo:.1f}, {interval.hi:.1f}]"


def _check_columns(df: pd.DataFrame, need: Sequence[str], name: str) -> None:
    if missing := sorted(set(need) - set(df.columns)):
        raise ValueError(f"{name} lack columns {missing}")


def _runs(records: pd.DataFrame, setting: str) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(model, kind, rows) of every run of ``setting`` in the records, kinds in paper order."""
    for model in sorted(records["model"].unique()):
        for kind in KIND_ORDER:
            g = records[(records["model"] == model) & (records["setting"] == setting)
                        & (records["kind"] == kind)]
            if not g.empty:
                yield model, kind, g


def _arrays(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence after, confidence before and correctness (clean prediction == label; the
    attacks keep the prediction) of a run's rows, float64."""
    correct = (g["prediction"].to_numpy() == g["label"].to_numpy()).astype(np.float64)
    return (g["confidence_after"].to_numpy(np.float64),
            g["confidence_before"].to_numpy(np.float64), correct)


# --- batched statistics for calib.stats --------------------------------------------------------

def _ece_ratio(after: torch.Tensor, before: torch.Tensor, correct: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """ECE after / ECE before on each resample (the same images in both)."""
    return (stats.resampled_ece(after, correct, idx)
            / stats.resampled_ece(before, correct, idx).clamp_min(1e-12))


def _ks_ratio(after: torch.Tensor, before: torch.Tensor, correct: torch.Tensor,
              idx: torch.Tensor) -> torch.Tensor:
    """KS after / KS before on each resample."""
    return (stats.resampled_ks(after, correct, idx)
            / stats.resampled_ks(before, correct, idx).clamp_min(1e-12))


def _fraction_of_bound(num_classes: int) -> stats.BatchedStatistic:
    """ECE / (1 - q/K) on each resample, q the resample's accuracy."""

    def fraction_of_bound(conf: torch.Tensor, correct: torch.Tensor, idx: torch.Tensor
                          ) -> torch.Tensor:
        bound = 1.0 - stats.resampled_mean(correct, idx) / num_classes
        return stats.resampled_ece(conf, correct, idx) / bound

    return fraction_of_bound


def _mean_ece(*inputs_and_idx: torch.Tensor) -> torch.Tensor:
    """Mean ECE over several runs on the same images: inputs ``conf_1, correct_1, conf_2,
    correct_2, ...`` (each [n]), then ``idx``."""
    *inputs, idx = inputs_and_idx
    return torch.stack([stats.resampled_ece(c, k, idx)
                        for c, k in zip(inputs[::2], inputs[1::2], strict=True)]).mean(0)


def _mean_ece_ratio(*inputs_and_idx: torch.Tensor) -> torch.Tensor:
    """Mean ECE of the first half of the runs over that of the second half (paired)."""
    *inputs, idx = inputs_and_idx
    half = len(inputs) // 2
    return _mean_ece(*inputs[:half], idx) / _mean_ece(*inputs[half:], idx).clamp_min(1e-12)


# --- claim 5: the MMA bound --------------------------------------------------------------------

def mma_bound(accuracy: float, num_classes: int) -> float:
    """The largest ECE an MMA attack can reach: ``1 - q / K`` (SPEC §9, paper §3).

    Correct samples (a fraction ``q``) pushed to confidence ``1/K`` contribute
    ``q (1 - 1/K)``; wrong ones pushed to confidence 1 contribute ``1 - q``; the sum is
    ``1 - q/K``. Any confidences at all give at most this (a max-softmax is at least 1/K), so
    "MMA stays below the bound" decides nothing; how close MMA gets does.

    Args:
        accuracy: q in [0, 1].
        num_classes: K >= 2.
    """
    check_number("accuracy", accuracy, low=0, high=1)
    check_int("num_classes", num_classes, minimum=2)
    return 1.0 - float(accuracy) / num_classes


def ideal_mma_confidences(correct: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confidences of the ideal MMA outcome: ``1/K`` where correct, 1 where wrong; (N,) float64.

    Their ECE equals :func:`mma_bound` (a numerical check of the bound used by the tests).
    """
    correct = torch.as_tensor(correct).to(torch.bool).reshape(-1)
    check_int("num_classes", num_classes, minimum=2)
    return torch.where(correct, torch.tensor(1.0 / num_classes, dtype=torch.float64),
                       torch.tensor(1.0, dtype=torch.float64))


def stopping_rule_ece(accuracy: float, *, uca_margin: float = Thresholds.uca_margin,
                      oca_confidence: float = Thresholds.oca_confidence) -> float:
    """The ECE at which MMA's success thresholds let it stop: ``q (1 - m)/2 + (1 - q) c_o``.

    UCA stops a correct sample as soon as its margin ``p_k - p_2`` is at most ``m``; at a
    two-way tie (``p_k + p_2 = 1``, where a margin search ends) that is ``p_k = (1 + m)/2``
    (0.55 for m = 0.1), a gap of ``(1 - m)/2`` to its accuracy of 1. OCA stops a wrong sample at
    confidence ``c_o`` (0.99), a gap of ``c_o``. The two land in different bins, so the ECE is
    the weighted sum of the gaps. K does not enter: the bound's ``1/K`` needs the whole
    softmax flat, which the margin rule never asks for.

    This is what the thresholds settle for, not a ceiling: a step that overshoots the
    threshold, or a margin under ``m`` with the mass spread over three or more classes, ends
    below ``(1 + m)/2``, so a run can exceed it; the only hard ceiling is :func:`mma_bound`.
    :func:`push_to_bound` drops the UCA threshold to see how far towards ``1/K`` an attack gets.

    Args:
        accuracy: q in [0, 1].
        uca_margin: UCA's success margin m, in [0, 1).
        oca_confidence: OCA's success confidence c_o, in (0, 1].
    """
    check_number("accuracy", accuracy, low=0, high=1)
    check_number("uca_margin", uca_margin, low=0, high=1, high_open=True)
    check_number("oca_confidence", oca_confidence, low=0, high=1, low_open=True)
    q = float(accuracy)
    return q * (1.0 - uca_margin) / 2.0 + (1.0 - q) * oca_confidence


def push_to_bound(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  index: torch.Tensor, *, setting: str, eps_linf: float, eps_l2: float,
                  iterations: int, square_p_init: float, pgd_alpha: float | None,
                  precision: str = "fp32", seed: int = 0, batch_size: int = 256,
                  show_progress: bool = False
                  ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """MMA with UCA's ``uca_objective="confidence"``: how close a label-preserving attack gets
    to ``1 - q/K``.

    Correct samples minimise ``p_k`` for the whole budget (no stop at the margin threshold;
    the label must still be kept at every accepted step), wrong ones run OCA as usual. The
    outcome is re-measured in a fresh forward pass (:func:`calib.attacks.base.reevaluate`).

    Args:
        model: the classifier (images in [0, 1] -> logits).
        images: (N, C, H, W) clean images on the model's device; labels: (N,) true labels.
        index: (N,) their test-set indices (the records' ``index`` column).
        setting: "method-norm", e.g. "square-linf" (:data:`calib.attacks.grid.SETTINGS`).
        eps_linf, eps_l2, square_p_init, pgd_alpha: as in the attack stage
            (:class:`calib.attacks.grid.AttackGrid`).
        iterations: the budget (Square queries or PGD steps, whichever ``setting`` runs).
        precision: what the attack's queries run in (:mod:`calib.precision`); the outcome is
            re-read in fp32.
        seed, batch_size, show_progress: passed to :func:`calib.attacks.run_attack`.

    Returns:
        The per-sample records (:data:`calib.attacks.grid.RECORD_COLUMNS` plus ``objective``
        = "confidence") and the run's :meth:`~calib.attacks.AttackResult.summary`.
    """
    grid = AttackGrid(settings=setting, kinds="mma", eps_linf=eps_linf, eps_l2=eps_l2,
                      square_iterations=iterations, square_p_init=square_p_init,
                      pgd_iterations=iterations, pgd_alpha=pgd_alpha, precision=precision)
    labels = labels.detach().cpu().long()
    queried = with_precision(model, resolve_precision(grid.precision, images.device))
    start = time.perf_counter()
    result = run_attack(queried, images, kind="mma", labels=labels, seed=seed,
                        batch_size=batch_size, show_progress=show_progress,
                        uca_objective="confidence", **grid.arguments(setting))
    result = reevaluate(result, model, batch_size=batch_size)
    run = GridRun(grid, {(setting, "mma"): result}, labels, time.perf_counter() - start)
    return run.records(index).assign(objective="confidence"), result.summary(labels)


def mma_bound_table(records: pd.DataFrame, num_classes: int, *,
                    uca_margin: float = Thresholds.uca_margin,
                    oca_confidence: float = Thresholds.oca_confidence,
                    n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """MMA's ECE against the bound ``1 - q/K``, one row per model x setting x UCA objective.

    Args:
        records: per-sample rows (module docstring); only ``kind == "mma"`` rows are used; an
            ``objective`` column tells the push variant apart (absent: "margin").
        num_classes: K.
        uca_margin, oca_confidence: the thresholds of :func:`stopping_rule_ece`.
        n_resamples, seed: the bootstrap.

    Returns:
        Columns model, setting, objective, n, accuracy, classes, bound, stop_ece (what the
        thresholds settle for), stop_fraction (of the bound), ece_before, ece_after and
        ks_after (with ``_lo``/``_hi``), fraction_of_bound (ECE / (1 - q/K), with its
        interval), conf_correct_after (mean confidence of the correct samples after the
        attack, against 1/K for the bound and (1 + m)/2 for the thresholds), success_rate.
    """
    _check_columns(records, _RECORD_NEEDS, "records")
    mma = records[records["kind"] == "mma"]
    if mma.empty:
        raise ValueError("no MMA results in the records (attack.kinds must include 'mma')")
    if "objective" not in mma.columns:
        mma = mma.assign(objective="margin")
    rows = []
    for (model, setting, objective), g in mma.groupby(["model", "setting", "objective"],
                                                     sort=True):
        after, before, correct = _arrays(g)
        q = float(correct.mean())
        bound = mma_bound(q, num_classes)
        stop = stopping_rule_ece(q, uca_margin=uca_margin, oca_confidence=oca_confidence)
        boot = stats.bootstrap_metrics(after, correct,
                                       success=g["success"].astype(bool).to_numpy(),
                                       n_resamples=n_resamples, seed=seed)
        fraction = stats.bootstrap_interval(_fraction_of_bound(num_classes), after, correct,
                                            n_resamples=n_resamples, seed=seed)
        rows.append({"model": model, "setting": setting, "objective": objective, "n": len(g),
                     "accuracy": q, "classes": num_classes, "bound": bound, "stop_ece": stop,
                     "stop_fraction": stop / bound,
                     "ece_before": metrics.ece(torch.from_numpy(before),
                                               torch.from_numpy(correct)),
                     **boot["ece"].to_columns("ece_after"),
                     **boot["ks"].to_columns("ks_after"),
                     **fraction.to_columns("fraction_of_bound"),
                     "conf_correct_after": (float(after[correct == 1].mean()) if q > 0
                                            else float("nan")),
                     **boot["success_rate"].to_columns("success_rate")})
    return pd.DataFrame(rows).sort_values(["model", "setting", "objective"], ignore_index=True)


def mma_push_comparison(records: pd.DataFrame, *, n_resamples: int = N_RESAMPLES,
                        seed: int = 0) -> pd.DataFrame:
    """MMA with UCA's margin objective against the push variant on the same images (paired).

    Args:
        records: per-sample rows with ``objective``; per model x setting, the "confidence"
            rows are paired with the "margin" rows of the same images (``index``).

    Returns:
        One row per model x setting with both: n (images both ran on), ece_margin,
        ece_confidence and ece_gain (confidence - margin), each with its interval,
        gain_outcome ("higher": the push variant is more miscalibrated beyond noise), and the
        mean confidence of the correct samples under each.
    """
    _check_columns(records, (*_RECORD_NEEDS, "objective"), "records")
    mma = records[records["kind"] == "mma"]
    rows = []
    for (model, setting), g in mma.groupby(["model", "setting"], sort=True):
        push = g[g["objective"] == "confidence"]
        margin = g[g["objective"] == "margin"]
        if push.empty or margin.empty:
            continue
        both = push.merge(margin, on="index", suffixes=("_push", "_margin"))
        if not (both["prediction_push"] == both["prediction_margin"]).all():
            raise ValueError(f"{model} {setting}: the two MMA runs disagree on the clean "
                             "predictions (a different model or stale records?)")
        correct = (both["prediction_push"] == both["label_push"]).to_numpy(np.float64)
        conf_push = both["confidence_after_push"].to_numpy(np.float64)
        conf_margin = both["confidence_after_margin"].to_numpy(np.float64)
        cmp = stats.paired_difference("ece", (conf_push, correct), (conf_margin, correct),
                                      n_resamples=n_resamples, seed=seed)
        ok = correct == 1
        rows.append({"model": model, "setting": setting, "n": len(both),
                     **cmp.b.to_columns("ece_margin"), **cmp.a.to_columns("ece_confidence"),
                     **cmp.difference.to_columns("ece_gain"), "gain_outcome": cmp.outcome,
                     "conf_correct_margin": float(conf_margin[ok].mean()) if ok.any()
                     else float("nan"),
                     "conf_correct_confidence": float(conf_push[ok].mean()) if ok.any()
                     else float("nan")})
    return pd.DataFrame(rows)


def claim_mma_bound(bounds: pd.DataFrame, *, reach: float = REACH_FRACTION) -> dict[str, str]:
    """Claim 5: MMA can in theory reach ECE = 1 - q/K, judged on how close it gets.

    Per model, the MMA run (any setting, either UCA objective) with the highest fraction of
    the bound is judged on the interval of that fraction against ``reach``.
    """
    outcomes, parts = [], []
    for model, g in bounds.groupby("model", sort=True):
        best = g.loc[g["fraction_of_bound"].idxmax()]
        iv = stats.Interval(best["fraction_of_bound"], best["fraction_of_bound_lo"],
                            best["fraction_of_bound_hi"])
        outcomes.append(above(iv, reach))
        how = "min-p_k variant" if best["objective"] == "confidence" else "MMA"
        parts.append(f"{iv:.0%} on {model} ({how}, {best['setting']})")
    if not outcomes:
        return {"measured": "no MMA results", "verdict": "not measured", "rule": ""}
    lo, hi = bounds["stop_fraction"].min(), bounds["stop_fraction"].max()
    stop = f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%}–{hi:.0%}"
    measured = (f"Closest to 1 − q/K: {'; '.join(parts)}; the success thresholds settle for "
                f"{stop}.")
    return {"measured": measured, "verdict": verdict(outcomes),
            "rule": f"per main model, the label-preserving MMA run closest to 1 − q/K (either "
                    f"UCA objective, any setting) reaches {reach:.0%} of it: holds if the 95% "
                    f"interval of ECE / (1 − q/K) lies above {reach:.0%} for every model, does "
                    f"not hold if below for every model, partly otherwise"}


# --- claim 1: ECE and KS rise ------------------------------------------------------------------

def ece_rise_table(records: pd.DataFrame, attack_metrics: Mapping[str, Mapping[str, Any]],
                   setting: str, *, n_resamples: int = N_RESAMPLES, seed: int = 0
                   ) -> pd.DataFrame:
    """ECE and KS after / before each attack kind on the same images (paired intervals).

    Args:
        records: per-sample rows of the main models.
        attack_metrics: ``{model: attack_metrics.json}``: accuracy before and after, from the
            attack stage's fresh forward pass of the final images.
        setting: the attack setting judged.

    Returns:
        One row per model x kind: n, ece_before, ece_after, ece_ratio and ks_ratio (with
        intervals), accuracy_unchanged and the median queries of the successful samples.
    """
    _check_columns(records, _RECORD_NEEDS, "records")
    rows = []
    for model, kind, g in _runs(records, setting):
        after, before, correct = _arrays(g)
        s = attack_metrics.get(model, {}).get("attacks", {}).get(f"{setting}/{kind}")
        unchanged = (s is not None
                     and abs(s["accuracy_after"] - s["accuracy_before"]) < 1e-12)
        won = g["success"].astype(bool).to_numpy()
        rows.append({"model": model, "setting": setting, "kind": kind, "n": len(g),
                     "ece_before": metrics.ece(torch.from_numpy(before),
                                               torch.from_numpy(correct)),
                     "ece_after": metrics.ece(torch.from_numpy(after),
                                              torch.from_numpy(correct)),
                     **stats.bootstrap_interval(_ece_ratio, after, before, correct,
                                                n_resamples=n_resamples, seed=seed
                                                ).to_columns("ece_ratio"),
                     **stats.bootstrap_interval(_ks_ratio, after, before, correct,
                                                n_resamples=n_resamples, seed=seed
                                                ).to_columns("ks_ratio"),
                     "accuracy_unchanged": bool(unchanged),
                     "queries_success_median": (float(np.median(g["queries"][won]))
                                                if won.any() else float("nan"))})
    return pd.DataFrame(rows)


def _interval(row: Mapping[str, Any], prefix: str) -> stats.Interval:
    return stats.Interval(float(row[prefix]), float(row[f"{prefix}_lo"]),
                          float(row[f"{prefix}_hi"]))


def claim_ece_rise(rise: pd.DataFrame, *, factor: float = RISE_FACTOR) -> dict[str, str]:
    """Claim 1: ECE and KS rise more than ``factor`` x with accuracy unchanged."""
    outcomes = []
    for r in rise.to_dict("records"):
        ece_ok, ks_ok = above(_interval(r, "ece_ratio"), factor), \
            above(_interval(r, "ks_ratio"), factor)
        if not r["accuracy_unchanged"] or ece_ok is False or ks_ok is False:
            outcomes.append(False)
        else:
            outcomes.append(True if (ece_ok and ks_ok) else None)
    if rise.empty:
        return {"measured": "no attack records", "verdict": "not measured", "rule": ""}
    weakest = rise.loc[rise["ece_ratio"].idxmin()]
    changed = int((~rise["accuracy_unchanged"].astype(bool)).sum())
    measured = (f"Weakest rise: {weakest['model']} {weakest['kind'].upper()} ECE "
                f"{_x(_interval(weakest, 'ece_ratio'))} (KS "
                f"{_x(_interval(weakest, 'ks_ratio'))}); {sum(o is True for o in outcomes)} of "
                f"{len(outcomes)} runs above {factor:g}x{_noise(outcomes)}, accuracy "
                f"{'unchanged in every run' if not changed else f'changed in {changed} runs'}.")
    return {"measured": measured, "verdict": verdict(outcomes),
            "rule": f"every attack kind on every main model ({rise['setting'].iloc[0]}): the "
                    f"paired 95% intervals of ECE after/before and KS after/before lie above "
                    f"{factor:g}, and accuracy is unchanged in a fresh forward pass; "
                    "'few queries' is not judged (median queries in ece_rise.md)"}


# --- claim 2: both architectures ---------------------------------------------------------------

def success_table(records: pd.DataFrame, setting: str, *, n_resamples: int = N_RESAMPLES,
                  seed: int = 0) -> pd.DataFrame:
    """Success rate with its interval per model x kind in ``setting``."""
    _check_columns(records, _RECORD_NEEDS, "records")
    rows = []
    for model, kind, g in _runs(records, setting):
        iv = stats.bootstrap_interval("success_rate", g["success"].astype(bool).to_numpy(),
                                      n_resamples=n_resamples, seed=seed)
        rows.append({"model": model, "setting": setting, "kind": kind, "n": len(g),
                     **iv.to_columns("success_rate")})
    return pd.DataFrame(rows)


def claim_architectures(success: pd.DataFrame, *, min_success: float = MIN_SUCCESS
                        ) -> dict[str, str]:
    """Claim 2: the attacks work on both convolutional and attention-based models."""
    if success.empty:
        return {"measured": "no attack records", "verdict": "not measured", "rule": ""}
    outcomes = []
    for _, g in success.groupby("model", sort=True):
        per_kind = [above(_interval(r, "success_rate"), min_success)
                    for r in g.to_dict("records")]
        outcomes.append(False if False in per_kind else
                        (True if all(per_kind) else None))
    low = success.loc[success["success_rate"].idxmin()]
    measured = (f"Lowest success rate: {low['model']} {low['kind'].upper()} "
                f"{_interval(low, 'success_rate'):.0%}; {sum(o is True for o in outcomes)} of "
                f"{len(outcomes)} models above {min_success:.0%} for every kind"
                f"{_noise(outcomes)}.")
    return {"measured": measured, "verdict": verdict(outcomes),
            "rule": f"on each main model ({success['setting'].iloc[0]}), every attack kind's "
                    f"success rate has its 95% interval above {min_success:.0%}"}


# --- claim 3: UCA vs OCA queries ---------------------------------------------------------------

def query_comparison(records: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, seed: int = 0
                     ) -> pd.DataFrame:
    """UCA vs OCA query efficiency (paper Table 3), paired on the images both succeed on.

    Query means over each attack's own successes compare different images (OCA succeeds at
    the clean query on every image the model is already sure of; UCA fails on others), so
    the difference is taken image by image over the images BOTH attacks succeed on, with a
    paired bootstrap interval; the same over the images both had to perturb (queries > 1 for
    both) follows.

    Args:
        records: per-sample rows with model, setting, kind, index, queries, success.

    Returns:
        One row per model x setting with UCA and OCA runs: n, each attack's success rate
        (with interval), n_both, uca_queries, oca_queries and queries_diff (UCA - OCA, with
        intervals) and its outcome ("lower": UCA needs fewer), and n_perturbed,
        queries_diff_perturbed (with interval) and its outcome.
    """
    _check_columns(records, ("model", "setting", "kind", "index", "queries", "success"),
                   "records")
    rows = []
    for (model, setting), group in records.groupby(["model", "setting"], sort=True):
        u, o = group[group["kind"] == "uca"], group[group["kind"] == "oca"]
        if u.empty or o.empty:
            continue
        both = u.merge(o, on="index", suffixes=("_uca", "_oca"))
        won = both["success_uca"].astype(bool) & both["success_oca"].astype(bool)
        row: dict[str, Any] = {"model": model, "setting": setting, "n": len(both)}
        for kind, r in (("uca", u), ("oca", o)):
            row.update(stats.bootstrap_interval(
                "success_rate", r["success"].astype(bool).to_numpy(), n_resamples=n_resamples,
                seed=seed).to_columns(f"{kind}_success_rate"))
        for suffix, keep in (("", won),
                             ("_perturbed", won & (both["queries_uca"] > 1)
                              & (both["queries_oca"] > 1))):
            row[f"n_both{suffix}"] = int(keep.sum())
            if keep.sum() == 0:
                row.update({f"queries_diff{suffix}": float("nan"),
                            f"queries_diff{suffix}_lo": float("nan"),
                            f"queries_diff{suffix}_hi": float("nan"),
                            f"outcome{suffix}": "not measured"})
                continue
            cmp = stats.paired_difference(
                "mean", both.loc[keep, "queries_uca"].to_numpy(np.float64),
                both.loc[keep, "queries_oca"].to_numpy(np.float64),
                n_resamples=n_resamples, seed=seed)
            if not suffix:
                row.update({**cmp.a.to_columns("uca_queries"),
                            **cmp.b.to_columns("oca_queries")})
            row.update({**cmp.difference.to_columns(f"queries_diff{suffix}"),
                        f"outcome{suffix}": cmp.outcome})
        rows.append(row)
    return pd.DataFrame(rows)


def claim_uca_fewer_queries(queries: pd.DataFrame) -> dict[str, str]:
    """Claim 3: UCA needs consistently fewer queries than OCA (black-box settings)."""
    black = queries[queries["setting"].str.startswith("square")
                    & (queries["outcome"] != "not measured")] if len(queries) else queries
    rule = ("per black-box setting and main model, the mean of UCA − OCA queries over the "
            "images both attacks succeed on (paired bootstrap): UCA fewer (interval below 0) "
            "everywhere holds, more everywhere does not hold; partly otherwise")
    if black.empty:
        return {"measured": "No black-box setting has an image on which both UCA and OCA "
                            "succeed.", "verdict": "not measured", "rule": rule}
    outcomes = [_from_comparison(o, "lower") for o in black["outcome"]]
    lo, hi = black.loc[black["queries_diff"].idxmin()], black.loc[black["queries_diff"].idxmax()]

    def one(r: pd.Series) -> str:
        return f"{_interval(r, 'queries_diff'):+.0f} ({r['model']} {r['setting']})"

    span = one(lo) if lo.name == hi.name else f"from {one(lo)} to {one(hi)}"
    measured = (f"UCA − OCA mean queries on images both succeed on: {span}; UCA fewer in "
                f"{sum(o is True for o in outcomes)} of {len(outcomes)} runs"
                f"{_noise(outcomes)}.")
    return {"measured": measured, "verdict": verdict(outcomes), "rule": rule}


# --- claim 4: detection ------------------------------------------------------------------------

#: Columns of :func:`detection_comparison`, as ``table2_matched.csv`` names them.
DETECTION_COLUMNS: tuple[str, ...] = (
    "detector", "n_calibration", "n_ordinary", "raw_calibration", "raw_ordinary", "raw_diff",
    "raw_diff_lo", "raw_diff_hi", "raw_outcome", "l2_calibration_matched",
    "l2_ordinary_matched", "matched_calibration", "matched_ordinary", "matched_diff",
    "matched_diff_lo", "matched_diff_hi", "matched_outcome")


def detection_comparison(matched: pd.DataFrame) -> pd.DataFrame:
    """Detection accuracy on calibration against ordinary attacks, per detector: the accuracy
    rows of the detection stage's comparison (``table2_matched.csv``), the evidence
    :func:`claim_detection` reads.

    Both differences (calibration - ordinary) come from the detection stage's paired bootstrap
    over images (an image carries all of its pairs; :func:`calib.analysis.detection.
    norm_matched_comparison`): ``raw_*`` over every pair, unmatched, and ``matched_*`` on
    strata of equal L2 norm. Nothing is recomputed here, so the claims and Table 2 cannot
    disagree about the same difference.

    Returns:
        One row per detector with :data:`DETECTION_COLUMNS`.

    Raises:
        ValueError: a column of :data:`DETECTION_COLUMNS` (or ``metric``) missing.
    """
    _check_columns(matched, ("metric", *DETECTION_COLUMNS), "matched")
    rows = matched[matched["metric"] == "accuracy"]
    return rows[list(DETECTION_COLUMNS)].sort_values("detector").reset_index(drop=True)


def claim_detection(matched: pd.DataFrame | None) -> dict[str, str]:
    """Claim 4: calibration attacks are harder to detect than ordinary attacks.

    Decided at matched perturbation norm (SPEC §10, matched comparisons): an ordinary attack
    with a larger perturbation is easier to detect whatever its objective, so the detection
    accuracy of the two families is compared on the same L2-norm distribution
    (:func:`calib.analysis.detection.norm_matched_comparison`, ``table2_matched.csv``).

    Args:
        matched: the norm-matched comparison, rows per (detector, metric); the "accuracy"
            rows decide (``matched_diff`` = calibration - ordinary, its interval and
            ``matched_outcome``).
    """
    rule = ("per detector, detection accuracy on calibration attacks below that on ordinary "
            "attacks at matched L2 norm (strata of equal norm, paired bootstrap over images; "
            "interval below 0)")
    if matched is None or matched.empty:
        return {"measured": "no detection results", "verdict": "not measured", "rule": rule}
    _check_columns(matched, ("detector", "metric", "matched_diff", "matched_diff_lo",
                             "matched_diff_hi", "matched_outcome", "raw_diff"), "matched")
    rows = matched[matched["metric"] == "accuracy"].to_dict("records")
    outcomes: list[Outcome] = []
    parts = []
    for r in rows:
        if r["matched_outcome"] == "no overlap":
            parts.append(f"{r['detector']}: no common norm range")
            continue
        outcomes.append(_from_comparison(str(r["matched_outcome"]), "lower"))
        parts.append(f"{r['detector']} {100 * r['matched_diff']:+.1f} "
                     f"[{100 * r['matched_diff_lo']:+.1f}, {100 * r['matched_diff_hi']:+.1f}] "
                     f"points (unmatched {100 * r['raw_diff']:+.1f})")
    return {"measured": "Detection accuracy at matched L2 norm, calibration minus ordinary "
                        f"attacks: {'; '.join(parts)}{_noise(outcomes)}.",
            "verdict": verdict(outcomes), "rule": rule}


# --- claim 6: defences -------------------------------------------------------------------------

def _defence_inputs(rec: pd.DataFrame, runs: Sequence[tuple[str, str]]
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Per run (conf after, correct) flattened, the indices, and the clean confidence and
    correctness (the defended model on the clean images, from the first run)."""
    inputs, index = [], None
    clean = correct0 = None
    for setting, kind in runs:
        g = rec[(rec["setting"] == setting) & (rec["kind"] == kind)]
        after, before, correct = _arrays(g)
        idx = g["index"].to_numpy()
        if index is None:
            index, clean, correct0 = idx, before, correct
        elif not np.array_equal(idx, index):
            raise ValueError(f"run {setting}/{kind} holds other images than {runs[0][0]}/"
                             f"{runs[0][1]}")
        inputs += [after, correct]
    return inputs, index, clean, correct0


def defence_comparison(defence_records: Mapping[str, pd.DataFrame], *,
                       reference: str = NO_DEFENCE, n_resamples: int = N_RESAMPLES,
                       seed: int = 0) -> pd.DataFrame:
    """Every defence against the undefended model on the same images and attack runs.

    The post-attack ECE of a defence is averaged over the attack runs (setting x kind) it
    shares with ``reference``; each resample draws one set of images for both models and all
    runs (paired bootstrap).

    Args:
        defence_records: ``{defence: its attack_records.csv}`` (the defended model's clean
            and post-attack confidence per image and run); must include ``reference``.

    Returns:
        One row per defence (``reference`` first): runs, n, ece_after (mean over the runs),
        ratio (to the undefended model's), diff (defence - undefended) with outcome
        ("lower": the defence lowers post-attack ECE beyond noise), clean_ece (the defended
        model on the same images, unattacked) and clean_diff with clean_outcome; each number
        with its 95% interval. The reference row's outcomes read "reference".
    """
    if reference not in defence_records:
        raise ValueError(f"defence records lack the undefended reference {reference!r}; "
                         f"found {sorted(defence_records)}")
    need = ("setting", "kind", "index", "label", "prediction", "confidence_before",
            "confidence_after")
    for name, rec in defence_records.items():
        _check_columns(rec, need, f"records of defence {name!r}")
    ref = defence_records[reference]
    ref_runs = set(zip(ref["setting"], ref["kind"], strict=True))
    rows = []
    for name in [reference, *sorted(d for d in defence_records if d != reference)]:
        rec = defence_records[name]
        runs = sorted(ref_runs & set(zip(rec["setting"], rec["kind"], strict=True)))
        if not runs:
            raise ValueError(f"defence {name!r} shares no attack run with {reference!r}")
        d_in, d_idx, d_clean, d_correct = _defence_inputs(rec, runs)
        r_in, r_idx, r_clean, r_correct = _defence_inputs(ref, runs)
        if not np.array_equal(d_idx, r_idx):
            raise ValueError(f"defence {name!r} was attacked on other images than "
                             f"{reference!r}: a paired comparison needs the same images")
        opts = {"n_resamples": n_resamples, "seed": seed}
        cmp = stats.paired_difference(_mean_ece, tuple(d_in), tuple(r_in), **opts)
        ratio = stats.bootstrap_interval(_mean_ece_ratio, *d_in, *r_in, **opts)
        clean = stats.paired_difference("ece", (d_clean, d_correct), (r_clean, r_correct),
                                        **opts)
        own = name == reference
        rows.append({"defence": name, "runs": len(runs), "n": len(d_idx),
                     **cmp.a.to_columns("ece_after"), **ratio.to_columns("ratio"),
                     **cmp.difference.to_columns("diff"),
                     "outcome": "reference" if own else cmp.outcome,
                     **clean.a.to_columns("clean_ece"),
                     **clean.difference.to_columns("clean_diff"),
                     "clean_outcome": "reference" if own else clean.outcome})
    return pd.DataFrame(rows)


def _cs_against_others(defence_records: Mapping[str, pd.DataFrame], table: pd.DataFrame, *,
                       cs: str, n_resamples: int, seed: int) -> pd.DataFrame:
    """Paired differences CS - other defence of mean post-attack ECE (same runs, images)."""
    rows = []
    for other in table["defence"]:
        if other == cs:
            continue
        runs = sorted(set(zip(defence_records[cs]["setting"], defence_records[cs]["kind"],
                              strict=True))
                      & set(zip(defence_records[other]["setting"],
                                defence_records[other]["kind"], strict=True)))
        a_in, a_idx, *_ = _defence_inputs(defence_records[cs], runs)
        b_in, b_idx, *_ = _defence_inputs(defence_records[other], runs)
        if not np.array_equal(a_idx, b_idx):
            raise ValueError(f"{cs!r} and {other!r} were attacked on other images")
        cmp = stats.paired_difference(_mean_ece, tuple(a_in), tuple(b_in),
                                      n_resamples=n_resamples, seed=seed)
        rows.append({"other": other, **cmp.difference.to_columns("cs_minus_other"),
                     "outcome": cmp.outcome})
    return pd.DataFrame(rows)


def claim_defences(defence_records: Mapping[str, pd.DataFrame] | None, *,
                   reference: str = NO_DEFENCE, cs: str = COMPRESSION_SCALING,
                   limited_fraction: float = LIMITED_FRACTION,
                   n_resamples: int = N_RESAMPLES, seed: int = 0
                   ) -> tuple[dict[str, str], pd.DataFrame]:
    """Claim 6: defences remain limited; Compression Scaling gives the lowest post-attack ECE
    but is not better calibrated on clean data. Three parts, each on the same images:

    1. limited: no defence's mean post-attack ECE is below ``limited_fraction`` of the
       undefended model's (paired interval of the ratio: above it for every defence holds the
       part, below it for any defence breaks it);
    2. CS lowest: CS's mean post-attack ECE is below every other defence's (paired
       differences below 0; any above breaks it);
    3. CS clean: CS's ECE on the clean images is above the undefended model's (paired).

    Returns:
        The check (measured, verdict, rule) and :func:`defence_comparison`'s table with the
        CS-against-each-defence differences joined on (``cs_minus_other``).
    """
    rule = (f"on the same images and attack runs (paired bootstrap): (1) no defence keeps the "
            f"mean post-attack ECE below {limited_fraction:.0%} of the undefended model's "
            f"(interval of the ratio); (2) CS's post-attack ECE is below every other "
            f"defence's; (3) CS's clean ECE is above the undefended model's; holds if all "
            f"three hold beyond noise")
    if not defence_records:
        return ({"measured": "no defence results", "verdict": "not measured", "rule": rule},
                pd.DataFrame())
    table = defence_comparison(defence_records, reference=reference, n_resamples=n_resamples,
                               seed=seed)
    others = table[table["defence"] != reference]
    if others.empty:
        return ({"measured": "no defence besides the undefended model",
                 "verdict": "not measured", "rule": rule}, table)
    ratio_ok = [above(_interval(r, "ratio"), limited_fraction) for r in others.to_dict("records")]
    limited: Outcome = False if False in ratio_ok else (True if all(ratio_ok) else None)
    best = others.loc[others["ece_after"].idxmin()]
    measured = (f"Best defence {best['defence']} keeps {_interval(best, 'ratio'):.0%} of the "
                f"undefended post-attack ECE")
    outcomes: list[Outcome] = [limited]
    if cs in set(table["defence"]):
        vs = _cs_against_others(defence_records, table, cs=cs, n_resamples=n_resamples,
                                seed=seed)
        table = table.merge(vs.rename(columns={"other": "defence", "outcome": "cs_outcome"}),
                            on="defence", how="left")
        # CS is not compared with itself: say so rather than leave a NaN in the text column
        table.loc[table["defence"] == cs, "cs_outcome"] = "CS itself"
        lowest = [_from_comparison(o, "lower") for o in vs["outcome"]]
        outcomes.append(False if False in lowest else (True if all(lowest) else None))
        rival = vs.loc[vs["cs_minus_other"].idxmax()]
        cs_row = table[table["defence"] == cs].iloc[0]
        outcomes.append(_from_comparison(cs_row["clean_outcome"], "higher"))
        measured += (f"; CS minus the closest other ({rival['other']}) "
                     f"{_interval(rival, 'cs_minus_other'):+.3f}; CS clean ECE minus "
                     f"undefended {_interval(cs_row, 'clean_diff'):+.3f}")
    return ({"measured": measured + ".", "verdict": verdict(outcomes), "rule": rule}, table)


# --- the checklist -----------------------------------------------------------------------------

#: The paper's claims (SPEC §1), in order: the claim, what the paper reports as far as SPEC
#: quotes it ("not extracted" otherwise), and the detail tables (results/claims/).
PAPER_CLAIMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ECE and KS rise more than 10x, accuracy unchanged, within few queries",
     "not extracted", ("ece_rise.md",)),
    ("The attacks work on convolutional and attention-based models",
     "not extracted", ("success.md",)),
    ("UCA needs consistently fewer queries than OCA", "not extracted",
     ("queries_uca_oca.md",)),
    ("Calibration attacks are harder to detect than ordinary attacks",
     "Mahalanobis detection accuracy 72.4% (Square Attack) vs 44.2% (calibration attack), "
     "CIFAR-100", ("detection.md",)),
    ("MMA can in theory reach ECE = 1 - q/K", "1 − q/K (derivation; no measured value "
     "extracted)", ("mma_bound.md", "mma_push.md")),
    ("Defences remain limited; Compression Scaling gives the lowest post-attack ECE but is "
     "not better calibrated on clean data", "not extracted", ("defences.md",)),
)

#: The checklist's columns as the Markdown table shows them; the rule goes to rules.md.
CHECKLIST_COLUMNS = ("claim", "verdict", "measured here", "paper", "sources")


def claims_checklist(checks: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """Assemble the checklist: one row per paper claim with its verdict and evidence.

    Args:
        checks: the outputs of the ``claim_*`` functions, in the order of
            :data:`PAPER_CLAIMS`.

    Returns:
        Columns :data:`CHECKLIST_COLUMNS` and ``rule``; ``sources`` names the detail tables
        and the rules (``results/claims/<table>.md``).
    """
    if len(checks) != len(PAPER_CLAIMS):
        raise ValueError(f"expected {len(PAPER_CLAIMS)} checks (one per claim), got "
                         f"{len(checks)}")
    rows = []
    for (claim, paper, sources), check in zip(PAPER_CLAIMS, checks, strict=True):
        if check["verdict"] not in VERDICTS:
            raise ValueError(f"verdict {check['verdict']!r} not in {VERDICTS}")
        # Named, not linked: the checklist is shown in results/claims/ and on the report's
        # index, where a relative link would point to two different places.
        links = ", ".join(f"results/claims/{s}" for s in (*sources, "rules.md"))
        rows.append({"claim": claim, "verdict": check["verdict"],
                     "measured here": check["measured"], "paper": paper, "sources": links,
                     "rule": check["rule"]})
    return pd.DataFrame(rows, columns=[*CHECKLIST_COLUMNS, "rule"])

