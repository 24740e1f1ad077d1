"""Tables of the paper from attack summaries: Table 1 (main results), Table 3 (UCA vs OCA),
Table 4 (defences under attack).

Inputs are the flat dicts of :meth:`calib.attacks.AttackResult.summary`, each extended with
``model`` and ``setting`` (e.g. "square-linf"). Tables are pandas DataFrames written as CSV
(machine-readable) and Markdown (for the README and the report), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from calib.io import write_text

#: Order of the attack kinds in every table and figure.
KIND_ORDER = ("uca", "oca", "mma", "rca")


def setting_name(method: str, norm: str) -> str:
    """"square" + "linf" -> "square-linf" (the label used in tables and file names)."""
    return f"{method}-{norm}"


def table1(summaries: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Main results (paper Table 1): per model x setting x attack, before -> after.

    Columns: model, setting, attack, accuracy/confidence/ECE/KS before and after, success
    rate, mean queries over all samples, mean and median queries over successful ones, and
    the mean L-inf and L2 norms of the perturbations.
    """
    rows = []
    for s in summaries:
        rows.append({
            "model": s["model"], "setting": s["setting"], "attack": s["kind"].upper(),
            "acc_before": s.get("accuracy_before"), "acc_after": s.get("accuracy_after"),
            "conf_before": s["confidence_before"], "conf_after": s["confidence_after"],
            "ece_before": s.get("ece_before"), "ece_after": s.get("ece_after"),
            "ks_before": s.get("ks_before"), "ks_after": s.get("ks_after"),
            "success_rate": s["success_rate"], "queries_mean": s["queries_mean"],
            "queries_success_mean": s["queries_success_mean"],
            "queries_success_median": s["queries_success_median"],
            "linf_mean": s.get("linf_mean"), "l2_mean": s.get("l2_mean"),
        })
    df = pd.DataFrame(rows)
    return _sorted(df)


def table3(summaries: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """UCA vs OCA query efficiency (paper Table 3): queries over successes and success rate."""
    rows = [{
        "model": s["model"], "setting": s["setting"], "attack": s["kind"].upper(),
        "success_rate": s["success_rate"],
        "queries_success_mean": s["queries_success_mean"],
        "queries_success_median": s["queries_success_median"],
        "queries_mean": s["queries_mean"],
    } for s in summaries if s["kind"] in ("uca", "oca")]
    return _sorted(pd.DataFrame(rows))


def table4(summaries: Iterable[Mapping[str, Any]], *,
           defence_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Defences under attack (paper Table 4): per model x defence x setting x attack.

    Inputs are the summaries of :func:`calib.defences.evaluate.evaluate_defence` (attack
    summaries with ``model``, ``defence``, ``setting`` and ``white_box`` added).

    Columns: model, defence, setting, attack, white_box (how white-box PGD got its gradients
    through the defence: "exact", "bpda", ...; empty for black-box settings), accuracy /
    confidence / ECE / KS before (the defended model on the clean images) and after the
    attack, success rate and mean queries.

    Args:
        summaries: flat dicts, one per (model, defence, setting, attack).
        defence_order: order of the defences within a model; defences not listed follow in
            order of first appearance (default: first appearance throughout).
    """
    rows = [{
        "model": s["model"], "defence": s["defence"], "setting": s["setting"],
        "attack": s["kind"].upper(), "white_box": s.get("white_box"),
        "acc_before": s.get("accuracy_before"), "acc_after": s.get("accuracy_after"),
        "conf_before": s["confidence_before"], "conf_after": s["confidence_after"],
        "ece_before": s.get("ece_before"), "ece_after": s.get("ece_after"),
        "ks_before": s.get("ks_before"), "ks_after": s.get("ks_after"),
        "success_rate": s["success_rate"], "queries_mean": s["queries_mean"],
    } for s in summaries]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    listed = list(defence_order or [])
    seen = listed + [d for d in dict.fromkeys(df["defence"]) if d not in listed]
    rank = {d: i for i, d in enumerate(seen)}
    kinds = {k.upper(): i for i, k in enumerate(KIND_ORDER)}
    df = df.assign(_d=df["defence"].map(rank), _k=df["attack"].map(kinds))
    df = df.sort_values(["model", "_d", "setting", "_k"], kind="stable")
    return df.drop(columns=["_d", "_k"]).reset_index(drop=True)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    order = {k.upper(): i for i, k in enumerate(KIND_ORDER)}
    df = df.assign(_k=df["attack"].map(order)).sort_values(["model", "setting", "_k"])
    return df.drop(columns="_k").reset_index(drop=True)


def to_markdown(df: pd.DataFrame, *, digits: int = 3) -> str:
    """A GitHub Markdown table with numbers rounded to ``digits``."""
    return df.to_markdown(index=False, floatfmt=f".{digits}f", missingval="-") + "\n"


def write_table(df: pd.DataFrame, stem: str | os.PathLike[str], *, digits: int = 4) -> None:
    """Write ``stem``.csv and ``stem``.md atomically."""
    stem = Path(stem)
    write_text(stem.with_suffix(".csv"), df.to_csv(index=False, float_format=f"%.{digits}f"))
    write_text(stem.with_suffix(".md"), to_markdown(df, digits=3))
