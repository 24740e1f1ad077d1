"""Training seeds: how far a headline number moves when only the training seed changes.

The paper evaluates three fine-tuned versions of each model (a/b/c); SPEC §10 asks that, where
it can be afforded, the spread across independently trained models is shown next to the
per-image intervals. The ``seeds`` stage trains ``train.seeds - 1`` copies of a model exactly as
the training stage trained it (:func:`calib.recipe.train_from_config`, seeds ``seed + 1``, ...),
runs the headline attack on every copy and on the main model with the attack stage's budget and
images, and this module turns the per-seed outcomes into a table and a figure.

Two kinds of uncertainty sit side by side: each seed's 95% bootstrap interval over the attacked
images (:mod:`calib.stats`) says how precisely that one model was measured; the spread across
seeds (sample standard deviation, range) says how much the model itself varies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure

from calib import metrics
from calib.attacks import AttackResult
from calib.checks import check_int
from calib.stats import bootstrap_metrics

#: Per-seed columns whose spread across seeds is summarised.
SPREAD_METRICS: tuple[str, ...] = ("clean_accuracy", "clean_ece", "success_rate",
                                   "confidence_after", "ece_after", "ks_after")


def seed_row(*, seed: int, setting: str, result: AttackResult, labels: torch.Tensor,
             clean_logits: torch.Tensor, clean_labels: torch.Tensor, n_resamples: int = 1000
             ) -> dict[str, Any]:
    """One model's outcome: its clean test metrics and the attack's, with 95% intervals.

    Args:
        seed: the training seed of the model.
        setting: the attack's method-norm pair (e.g. "square-linf").
        result: the attack on the attacked images (N), as seen by a fresh forward pass.
        labels: (N,) true labels of the attacked images.
        clean_logits, clean_labels: (M, K) and (M,) the model on the whole test set.
        n_resamples: bootstrap resamples of the intervals (seeded with ``seed``-free 0, so
            every model's interval uses the same image resamples).
    """
    clean = metrics.summarize(clean_logits, clean_labels)
    correct = (result.final_prediction == labels.cpu()).double()
    after = bootstrap_metrics(result.final_confidence, correct, success=result.success,
                              n_resamples=n_resamples, seed=0)
    row: dict[str, Any] = {"seed": seed, "setting": setting, "kind": result.kind,
                           "n": int(labels.numel()), "clean_accuracy": clean["accuracy"],
                           "clean_ece": clean["ece"]}
    for name, key in (("success_rate", "success_rate"), ("confidence_after", "confidence"),
                      ("ece_after", "ece"), ("ks_after", "ks")):
        row.update(after[key].to_columns(name))
    return row


def spread_table(rows: Sequence[Mapping[str, Any]],
                 metrics_: Sequence[str] = SPREAD_METRICS) -> pd.DataFrame:
    """Across seeds, per (setting, kind) and metric: mean, sample sd, min, max and range.

    Args:
        rows: :func:`seed_row` outputs (one per seed and attack).
        metrics_: the per-seed columns to summarise.

    Returns:
        Columns setting, kind, metric, seeds, mean, sd, min, max, range.
    """
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("no per-seed rows to summarise")
    missing = [m for m in metrics_ if m not in frame]
    if missing:
        raise ValueError(f"rows lack {missing}; have {sorted(frame.columns)}")
    out = []
    for (setting, kind), part in frame.groupby(["setting", "kind"], sort=False):
        for metric in metrics_:
            values = part[metric].astype(float)
            out.append({"setting": setting, "kind": kind, "metric": metric,
                        "seeds": int(values.size), "mean": values.mean(),
                        "sd": values.std(ddof=1) if values.size > 1 else float("nan"),
                        "min": values.min(), "max": values.max(),
                        "range": values.max() - values.min()})
    return pd.DataFrame(out)


def seeds_figure(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Clean ECE and post-attack ECE per training seed, each with its 95% image interval.

    One panel per attack (setting/kind); x is the training seed. The shaded band is the range
    across seeds of the post-attack ECE: where the per-seed intervals are wider than the band,
    the images, not the training run, dominate the uncertainty.
    """
    frame = pd.DataFrame(list(rows))
    check_int("rows", len(frame), minimum=1)
    attacks = list(dict.fromkeys(zip(frame["setting"], frame["kind"], strict=True)))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False)
    for ax, (setting, kind) in zip(axes[0], attacks, strict=True):
        part = frame[(frame["setting"] == setting) & (frame["kind"] == kind)]
        x = list(range(len(part)))
        # A percentile interval of ECE need not contain the estimate (ECE is biased upwards
        # under resampling): that side's bar is then drawn with zero length.
        lo = (part["ece_after"] - part["ece_after_lo"]).clip(lower=0)
        hi = (part["ece_after_hi"] - part["ece_after"]).clip(lower=0)
        ax.axhspan(part["ece_after"].min(), part["ece_after"].max(), color="C3", alpha=0.12,
                   label="range across seeds")
        ax.errorbar(x, part["ece_after"], yerr=[lo, hi], fmt="o", color="C3", capsize=4,
                    label=f"{kind.upper()} ECE after (95% CI)")
        ax.plot(x, part["clean_ece"], "s", color="C0", label="clean ECE (test set)")
        ax.set_xticks(x, [f"seed {s}" for s in part["seed"]])
        ax.set_ylim(0, max(1e-3, float(part["ece_after_hi"].max())) * 1.25)
        ax.set_ylabel("ECE")
        ax.set_title(f"{setting} {kind.upper()}")
    # One legend under the panels, where it cannot cover a point.
    handles, labels_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
