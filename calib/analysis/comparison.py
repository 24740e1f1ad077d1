"""Architecture, model size and class imbalance under calibration attacks (SPEC §9).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (arXiv:2401.02718), characteristic
analyses: model size/architecture effects and class-imbalanced training (CIFAR-100-LT,
ratio 100). Every model in the pipeline is trained and attacked the same way; these helpers
join the per-model results into tables and figures. No file I/O here: the notebook reads
``results/<model>/clean_metrics.json``, ``attack_metrics.json`` and the per-sample
``records/attack_records.csv`` and passes them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from calib import metrics
from calib.attacks import KINDS
from calib.plots import ATTACK_COLOURS, PALETTE, use_style


def model_table(attack_metrics: Mapping[str, Mapping[str, Any]],
                clean_metrics: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per model x setting x kind: architecture, size, training imbalance, clean and
    attacked calibration.

    Args:
        attack_metrics: ``{model: attack_metrics.json}``.
        clean_metrics: ``{model: clean_metrics.json}`` (arch, parameters, accuracy, ece and,
            for long-tailed models, imbalance_ratio).
    """
    from calib.models import family_of

    rows = []
    for model, doc in attack_metrics.items():
        if model not in clean_metrics:
            raise ValueError(f"model {model!r} lacks clean metrics; have {sorted(clean_metrics)}")
        clean = clean_metrics[model]
        for s in doc["attacks"].values():
            rows.append({
                "model": model, "family": family_of(clean["arch"]), "arch": clean["arch"],
                "parameters_m": clean["parameters"] / 1e6,
                "imbalance_ratio": clean.get("imbalance_ratio", 1),
                "clean_accuracy": clean["accuracy"], "clean_ece": clean["ece"],
                "setting": s["setting"], "attack": s["kind"].upper(),
                "ece_before": s["ece_before"], "ece_after": s["ece_after"],
                "ks_after": s["ks_after"], "confidence_after": s["confidence_after"],
                "success_rate": s["success_rate"],
                "queries_success_median": s.get("queries_success_median", float("nan"))})
    if not rows:
        raise ValueError("attack_metrics holds no attack results")
    return pd.DataFrame(rows).sort_values(["family", "imbalance_ratio", "parameters_m",
                                           "setting", "attack"], ignore_index=True)


def size_figure(table: pd.DataFrame, *, setting: str = "square-linf",
                balanced_only: bool = True) -> Figure:
    """ECE after each attack and success rate per model, grouped by family (small -> large).

    Args:
        table: :func:`model_table`.
        setting: which attack setting to show.
        balanced_only: leave out long-tailed models (they have their own figure).
    """
    use_style()
    t = table[table["setting"] == setting]
    if balanced_only:
        t = t[t["imbalance_ratio"] == 1]
    if t.empty:
        raise ValueError(f"no rows for setting {setting!r}; "
                         f"have {sorted(table['setting'].unique())}")
    families = sorted(t["family"].unique())
    fig, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 6.4), squeeze=False,
                             sharey="row")
    width = 0.8 / len(KINDS)
    for col, family in enumerate(families):
        f = t[t["family"] == family]
        models = (f.drop_duplicates("model").sort_values("parameters_m")[["model", "arch",
                                                                        "parameters_m",
                                                                        "clean_ece"]])
        x = np.arange(len(models))
        for row, (metric, label) in enumerate((("ece_after", "ECE after attack"),
                                               ("success_rate", "success rate"))):
            ax = axes[row, col]
            for i, kind in enumerate(KINDS):
                vals = [f[(f["model"] == m) & (f["attack"] == kind.upper())][metric].mean()
                        for m in models["model"]]
                ax.bar(x + (i - 1.5) * width, vals, width, color=ATTACK_COLOURS[kind],
                       label=kind.upper())
            if metric == "ece_after":
                ax.scatter(x, models["clean_ece"], marker="_", s=900, color="black",
                           label="clean ECE", zorder=3)
            ax.set_xticks(x, [f"{m}\n{a}\n{p:.2f}M params" for m, a, p in
                              zip(models["model"], models["arch"], models["parameters_m"],
                                  strict=True)], fontsize=8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{family} family ({setting})")
    axes[0, 0].legend(ncol=5, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def per_class_table(records: pd.DataFrame, *, setting: str = "square-linf") -> pd.DataFrame:
    """Per model x true class: clean accuracy and confidence, and per attack kind the success
    rate and mean confidence after the attack.

    Args:
        records: per-sample rows (model, setting, kind, label, prediction,
            confidence_before, confidence_after, success).
    """
    need = {"model", "setting", "kind", "label", "prediction", "confidence_before",
            "confidence_after", "success"}
    if missing := need - set(records.columns):
        raise ValueError(f"records lack columns {sorted(missing)}")
    r = records[records["setting"] == setting]
    if r.empty:
        raise ValueError(f"no records for setting {setting!r}")
    clean = (r[r["kind"] == r["kind"].iloc[0]]
             .assign(correct=lambda d: d["label"] == d["prediction"])
             .groupby(["model", "label"])
             .agg(n=("correct", "size"), clean_accuracy=("correct", "mean"),
                  clean_confidence=("confidence_before", "mean")))
    parts = [clean]
    for kind, g in r.groupby("kind"):
        agg = g.groupby(["model", "label"]).agg(
            **{f"{kind}_success": ("success", "mean"),
               f"{kind}_confidence": ("confidence_after", "mean")})
        parts.append(agg)
    return pd.concat(parts, axis=1).reset_index()


def calibration_by_model(records: pd.DataFrame, *, setting: str = "square-linf"
                         ) -> pd.DataFrame:
    """ECE before and after each attack per model from per-sample records (15 bins, SPEC §6)."""
    rows = []
    for (model, kind), g in records[records["setting"] == setting].groupby(["model", "kind"]):
        correct = (g["label"] == g["prediction"]).to_numpy()
        rows.append({"model": model, "kind": kind,
                     "ece_before": metrics.ece(g["confidence_before"].to_numpy(), correct),
                     "ece_after": metrics.ece(g["confidence_after"].to_numpy(), correct)})
    return pd.DataFrame(rows)


def imbalance_figure(per_class: pd.DataFrame, *, balanced: str, long_tailed: str,
                     train_counts: Sequence[int], kinds: Sequence[str] = ("uca", "oca"),
                     class_names: Sequence[str] | None = None) -> Figure:
    """Head-to-tail view of the balanced and the long-tailed model.

    Panels: training images per class (log scale); clean accuracy and confidence per class;
    per attack kind, the success rate per class.
    """
    use_style()
    for name in (balanced, long_tailed):
        if name not in set(per_class["model"]):
            raise ValueError(f"model {name!r} not in the per-class table; have "
                             f"{sorted(per_class['model'].unique())}")
    classes = np.arange(len(train_counts))
    labels = list(class_names) if class_names is not None else [str(c) for c in classes]
    fig, axes = plt.subplots(1, 2 + len(kinds), figsize=(4.2 * (2 + len(kinds)), 3.8))
    axes[0].bar(classes, train_counts, color=PALETTE[7])
    axes[0].set_yscale("log")
    axes[0].set_title(f"{long_tailed}: training images per class")
    styles = {balanced: ("-", PALETTE[0]), long_tailed: ("--", PALETTE[3])}
    for model, (ls, colour) in styles.items():
        m = per_class[per_class["model"] == model].sort_values("label")
        axes[1].plot(m["label"], m["clean_accuracy"], ls, color=colour, marker="o", ms=3,
                     label=f"{model} accuracy")
        axes[1].plot(m["label"], m["clean_confidence"], ls, color=colour, marker="^", ms=3,
                     alpha=0.6, label=f"{model} confidence")
        for ax, kind in zip(axes[2:], kinds, strict=True):
            ax.plot(m["label"], m[f"{kind}_success"], ls, color=colour, marker="o", ms=3,
                    label=model)
            ax.set_title(f"{kind.upper()} success rate per class")
    axes[1].set_title("clean accuracy and confidence")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(classes, labels, rotation=60, fontsize=7, ha="right")
        ax.set_xlabel("class (head -> tail)")
    fig.tight_layout()
    return fig
