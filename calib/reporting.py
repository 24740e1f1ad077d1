"""Tables of the paper from attack summaries: Table 1 (main results), Table 3 (UCA vs OCA).

Inputs are the flat dicts of :meth:`calib.attacks.AttackResult.summary`, each extended with
``model`` and ``setting`` (e.g. "square-linf"). Tables are pandas DataFrames written as CSV
(machine-readable) and Markdown (for the README and the report), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
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
    rate, mean queries over all samples and over successful ones.
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
