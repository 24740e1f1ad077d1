"""Architecture, model size and class imbalance under calibration attacks (SPEC §9).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (arXiv:2401.02718), characteristic
analyses: model size/architecture effects and class-imbalanced training (CIFAR-100-LT,
ratio 100). Every model in the pipeline is trained and attacked the same way; these helpers
join the per-model results into tables and figures. No file I/O here: the notebook reads
``results/<model>/clean_metrics.json``, ``attack_metrics.json`` and the per-sample
``records/attack_records.csv`` and passes them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from calib import metrics


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


