"""The MMA bound, UCA-vs-OCA query efficiency and the paper's claims checklist.

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (arXiv:2401.02718). SPEC §1 lists the
paper's claims; :func:`claims_checklist` checks each against the pipeline's own results with
an explicit, printed rule, so a claim that does not hold here shows up as a finding.

Inputs are the pipeline's committed results, read by the notebooks and passed in as plain
mappings / DataFrames (this module does no file I/O):

* ``attack_metrics``: ``{model: results/<model>/attack_metrics.json}`` (its ``"attacks"`` maps
  ``"<setting>/<kind>"`` to the summary of :meth:`calib.attacks.AttackResult.summary`);
* ``clean_metrics``: ``{model: results/<model>/clean_metrics.json}``;
* ``records``: the per-sample ``attack_records.csv`` of one or more models (with a ``model``
  column);
* ``detection``: ``results/<model>/table2.csv`` (detector, attack, auroc, accuracy);
* ``defences``: ``results/<model>/defence_metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from calib.checks import check_int, check_number

#: Verdicts used in the checklist.
VERDICTS = ("holds", "partly", "does not hold", "not measured")


def mma_bound(accuracy: float, num_classes: int) -> float:
    """The largest ECE an MMA attack can reach: ``1 - q / K`` (SPEC §9, paper §3).

    Correct samples (a fraction ``q``) pushed to confidence ``1/K`` contribute
    ``q (1 - 1/K)``; wrong ones pushed to confidence 1 contribute ``1 - q``; the sum is
    ``1 - q/K``.

    Args:
        accuracy: q in [0, 1].
        num_classes: K >= 2.
    """
    check_number("accuracy", accuracy, low=0, high=1)
    check_int("num_classes", num_classes, minimum=2)
    return 1.0 - float(accuracy) / num_classes


def ideal_mma_confidences(correct: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confidences of the ideal MMA outcome: ``1/K`` where correct, 1 where wrong; (N,) float64.

    Their ECE equals :func:`mma_bound` (a numerical check of the bound used by the tests and
    the notebook).
    """
    correct = torch.as_tensor(correct).to(torch.bool).reshape(-1)
    check_int("num_classes", num_classes, minimum=2)
    return torch.where(correct, torch.tensor(1.0 / num_classes, dtype=torch.float64),
                       torch.tensor(1.0, dtype=torch.float64))


def _attacks(attack_metrics: Mapping[str, Mapping[str, Any]]
             ) -> list[tuple[str, str, Mapping[str, Any]]]:
    rows = []
    for model, doc in attack_metrics.items():
        if "attacks" not in doc:
            raise ValueError(f"attack_metrics[{model!r}] has no 'attacks' entry; "
                             f"found {sorted(doc)}")
        rows.extend((model, key, summary) for key, summary in doc["attacks"].items())
    return rows


def mma_bound_table(attack_metrics: Mapping[str, Mapping[str, Any]], num_classes: int
                    ) -> pd.DataFrame:
    """Achieved MMA ECE and KS against the bound ``1 - q/K``, one row per model x setting."""
    rows = []
    for model, _key, s in _attacks(attack_metrics):
        if s["kind"] != "mma":
            continue
        bound = mma_bound(s["accuracy_before"], num_classes)
        rows.append({"model": model, "setting": s["setting"], "accuracy": s["accuracy_before"],
                     "classes": num_classes, "bound": bound, "ece_before": s["ece_before"],
                     "ece_after": s["ece_after"], "ks_after": s["ks_after"],
                     "fraction_of_bound": s["ece_after"] / bound,
                     "success_rate": s["success_rate"]})
    if not rows:
        raise ValueError("no MMA results in attack_metrics (attack.kinds must include 'mma')")
    return pd.DataFrame(rows).sort_values(["model", "setting"], ignore_index=True)


def query_comparison(records: pd.DataFrame) -> pd.DataFrame:
    """UCA vs OCA query efficiency (paper Table 3), with and without the free successes.

    A sample whose clean confidence already meets the success threshold succeeds at the
    first (clean) query; OCA has many such samples (confidence >= 0.99), UCA almost none, so
    the comparison is also given over the samples that needed at least one perturbation.

    Args:
        records: per-sample rows with columns model, setting, kind, queries, success.

    Returns:
        One row per model x setting: success rate and mean queries over successes for UCA
        and OCA, the same over successes that needed more than one query, and the share of
        free successes.
    """
    need = {"model", "setting", "kind", "queries", "success"}
    if missing := need - set(records.columns):
        raise ValueError(f"records lack columns {sorted(missing)}")
    rows = []
    for (model, setting), group in records.groupby(["model", "setting"], sort=True):
        row: dict[str, Any] = {"model": model, "setting": setting}
        for kind in ("uca", "oca"):
            r = group[group["kind"] == kind]
            if r.empty:
                break
            ok = r[r["success"].astype(bool)]
            worked = ok[ok["queries"] > 1]
            row[f"{kind}_success_rate"] = len(ok) / len(r)
            row[f"{kind}_queries_mean"] = ok["queries"].mean() if len(ok) else float("nan")
            row[f"{kind}_free_successes"] = (ok["queries"] <= 1).mean() if len(ok) else 0.0
            row[f"{kind}_queries_mean_perturbed"] = (worked["queries"].mean() if len(worked)
                                                     else float("nan"))
        else:
            rows.append(row)
    return pd.DataFrame(rows)


def _number(x: float | None) -> float:
    """A summary value as a float; JSON writes NaN (e.g. no successful sample) as null."""
    return float("nan") if x is None else float(x)


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _verdict(flags: Sequence[bool]) -> str:
    if not flags:
        return "not measured"
    if all(flags):
        return "holds"
    return "partly" if any(flags) else "does not hold"


def claim_ece_rise(attack_metrics: Mapping[str, Mapping[str, Any]], models: Sequence[str],
                   setting: str = "square-linf") -> dict[str, str]:
    """Claim 1: ECE and KS rise more than 10x with accuracy unchanged (black-box)."""
    parts, flags = [], []
    for model in models:
        for kind in ("uca", "oca", "mma", "rca"):
            s = attack_metrics[model]["attacks"].get(f"{setting}/{kind}")
            if s is None:
                continue
            ece_x = s["ece_after"] / max(s["ece_before"], 1e-12)
            ks_x = s["ks_after"] / max(s["ks_before"], 1e-12)
            same_acc = abs(s["accuracy_after"] - s["accuracy_before"]) < 1e-12
            flags.append(ece_x > 10 and ks_x > 10 and same_acc)
            parts.append(f"{model} {kind.upper()} ECE x{ece_x:.1f}, KS x{ks_x:.1f} "
                         f"(median {_number(s.get('queries_success_median')):.0f} queries)")
    return {"measured": f"{setting}: " + "; ".join(parts) + "; accuracy unchanged in every run",
            "verdict": _verdict(flags),
            "rule": "every attack kind on every main model: ECE and KS after/before > 10 and "
                    "accuracy unchanged"}


def claim_architectures(attack_metrics: Mapping[str, Mapping[str, Any]],
                        models: Sequence[str], setting: str = "square-linf",
                        min_success: float = 0.5) -> dict[str, str]:
    """Claim 2: the attacks work on both convolutional and attention-based models."""
    parts, flags = [], []
    for model in models:
        rates = {k: attack_metrics[model]["attacks"][f"{setting}/{k}"]["success_rate"]
                 for k in ("uca", "oca", "mma", "rca")
                 if f"{setting}/{k}" in attack_metrics[model]["attacks"]}
        mma = attack_metrics[model]["attacks"].get(f"{setting}/mma")
        flags.append(bool(rates) and min(rates.values()) >= min_success)
        parts.append(f"{model}: success " + ", ".join(f"{k.upper()} {v:.0%}"
                                                      for k, v in rates.items())
                     + (f", MMA ECE {_fmt(mma['ece_after'])}" if mma else ""))
    return {"measured": f"{setting}: " + "; ".join(parts), "verdict": _verdict(flags),
            "rule": f"every kind succeeds on >= {min_success:.0%} of the images of each model"}


def claim_uca_fewer_queries(queries: pd.DataFrame) -> dict[str, str]:
    """Claim 3: UCA needs consistently fewer queries than OCA (black-box settings)."""
    black = queries[queries["setting"].str.startswith("square")]
    flags, parts = [], []
    for _, r in black.iterrows():
        flags.append(bool(r["uca_queries_mean_perturbed"] < r["oca_queries_mean_perturbed"]))
        parts.append(f"{r['model']} {r['setting']}: UCA {r['uca_queries_mean']:.0f} vs OCA "
                     f"{r['oca_queries_mean']:.0f} (perturbed only: "
                     f"{r['uca_queries_mean_perturbed']:.0f} vs "
                     f"{r['oca_queries_mean_perturbed']:.0f}; OCA free successes "
                     f"{r['oca_free_successes']:.0%})")
    return {"measured": "; ".join(parts), "verdict": _verdict(flags),
            "rule": "mean queries over successes that needed a perturbation: UCA < OCA in "
                    "every black-box setting and model"}


def claim_detection(detection: pd.DataFrame | None) -> dict[str, str]:
    """Claim 4: calibration attacks are harder to detect than ordinary attacks."""
    if detection is None or detection.empty:
        return {"measured": "no detection results", "verdict": "not measured",
                "rule": "detection accuracy lower on calibration than on ordinary attacks"}
    det = detection.copy()
    det["ordinary"] = det["attack"].str.endswith("ordinary")
    flags, parts = [], []
    for detector, g in det.groupby("detector", sort=True):
        ordinary = g.loc[g["ordinary"], "accuracy"].mean()
        calib = g.loc[~g["ordinary"], "accuracy"].mean()
        flags.append(bool(calib < ordinary))
        parts.append(f"{detector}: accuracy {ordinary:.1%} on ordinary attacks vs "
                     f"{calib:.1%} on calibration attacks (AUROC "
                     f"{g.loc[g['ordinary'], 'auroc'].mean():.3f} vs "
                     f"{g.loc[~g['ordinary'], 'auroc'].mean():.3f})")
    return {"measured": "; ".join(parts), "verdict": _verdict(flags),
            "rule": "per detector, mean detection accuracy over calibration attacks below "
                    "that over ordinary attacks"}


def claim_mma_bound(bounds: pd.DataFrame) -> dict[str, str]:
    """Claim 5: MMA can in theory reach ECE = 1 - q/K (checked as a bound, and how close)."""
    flags = [bool(e <= b + 1e-9) for e, b in zip(bounds["ece_after"], bounds["bound"],
                                                 strict=True)]
    parts = [f"{r.model} {r.setting}: ECE {r.ece_after:.3f} of bound {r.bound:.3f} "
             f"({r.fraction_of_bound:.0%})" for r in bounds.itertuples()]
    return {"measured": "; ".join(parts), "verdict": _verdict(flags),
            "rule": "achieved MMA ECE never exceeds 1 - q/K (the ideal outcome reaches it "
                    "exactly; a label-preserving attack can only approach it)"}


def defence_summary(defences: Mapping[str, Any]) -> pd.DataFrame:
    """Per defence: clean test ECE and mean post-attack ECE/KS over every attack run."""
    rows = []
    for name, d in defences["defences"].items():
        attacks = d["attacks"].values()
        rows.append({"defence": name, "clean_ece": d["clean_test"]["ece"],
                     "ece_before_attack_subset": float(np.mean([a["ece_before"]
                                                                for a in attacks])),
                     "ece_after_mean": float(np.mean([a["ece_after"] for a in attacks])),
                     "ks_after_mean": float(np.mean([a["ks_after"] for a in attacks]))})
    return pd.DataFrame(rows).sort_values("ece_after_mean", ignore_index=True)


def claim_defences(defences: Mapping[str, Any] | None, *, limited_factor: float = 2.0
                   ) -> dict[str, str]:
    """Claim 6: defences remain limited; Compression Scaling gives the lowest post-attack ECE
    but is not better calibrated on clean data."""
    if defences is None:
        return {"measured": "no defence results", "verdict": "not measured", "rule": ""}
    table = defence_summary(defences)
    best = table.iloc[0]
    none = table[table["defence"] == "none"]
    if none.empty:
        raise ValueError("defence results lack the undefended reference 'none'")
    none = none.iloc[0]
    flags = [bool(best["ece_after_mean"] > limited_factor * none["clean_ece"])]
    cs = table[table["defence"] == "cs"]
    measured = (f"lowest mean post-attack ECE: {best['defence']} {best['ece_after_mean']:.3f} "
                f"(undefended {none['ece_after_mean']:.3f}, undefended clean ECE "
                f"{none['clean_ece']:.3f})")
    if not cs.empty:
        cs = cs.iloc[0]
        flags.append(best["defence"] == "cs")
        flags.append(bool(cs["clean_ece"] > none["clean_ece"]))
        measured += (f"; CS rank {int(table.index[table['defence'] == 'cs'][0]) + 1} of "
                     f"{len(table)}, clean ECE {cs['clean_ece']:.3f} vs undefended "
                     f"{none['clean_ece']:.3f}")
    return {"measured": measured, "verdict": _verdict(flags),
            "rule": f"the best defence's mean post-attack ECE stays above {limited_factor:g}x "
                    "the undefended clean ECE; CS has the lowest post-attack ECE; CS's clean "
                    "ECE is above the undefended model's"}


#: The paper's claims (SPEC §1), in order, with what the paper reports.
PAPER_CLAIMS: tuple[tuple[str, str], ...] = (
    ("ECE and KS rise more than 10x, accuracy unchanged, within few queries",
     "Table 1: e.g. CIFAR-100 ResNet-50 ECE 0.04 -> 0.6 under MMA"),
    ("The attacks work on convolutional and attention-based models",
     "Table 1: ResNet-50 and ViT-B/16 on three datasets"),
    ("UCA needs consistently fewer queries than OCA", "Table 3"),
    ("Calibration attacks are harder to detect than ordinary attacks",
     "Table 2: Mahalanobis accuracy 72.4% (Square) vs 44.2% (calibration attack), CIFAR-100"),
    ("MMA can in theory reach ECE = 1 - q/K", "§3 (derivation)"),
    ("Defences remain limited; Compression Scaling gives the lowest post-attack ECE but is "
     "not better calibrated on clean data", "Table 4"),
)


def claims_checklist(checks: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """Assemble the checklist: one row per paper claim with its measured evidence and verdict.

    Args:
        checks: the outputs of the ``claim_*`` functions, in the order of
            :data:`PAPER_CLAIMS`.
    """
    if len(checks) != len(PAPER_CLAIMS):
        raise ValueError(f"expected {len(PAPER_CLAIMS)} checks (one per claim), got "
                         f"{len(checks)}")
    rows = []
    for (claim, paper), check in zip(PAPER_CLAIMS, checks, strict=True):
        if check["verdict"] not in VERDICTS:
            raise ValueError(f"verdict {check['verdict']!r} not in {VERDICTS}")
        rows.append({"claim": claim, "paper": paper, "measured here": check["measured"],
                     "rule": check["rule"], "verdict": check["verdict"]})
    return pd.DataFrame(rows)


def mma_bound_figure(bounds: pd.DataFrame):  # -> matplotlib Figure
    """Achieved MMA ECE and KS per model x setting next to the bound ``1 - q/K``."""
    import matplotlib.pyplot as plt

    from calib.plots import ATTACK_COLOURS, PALETTE, use_style

    use_style()
    labels = [f"{r.model}\n{r.setting}" for r in bounds.itertuples()]
    x = np.arange(len(bounds))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(bounds) + 2), 3.8))
    ax.bar(x - 0.2, bounds["ece_after"], 0.4, color=ATTACK_COLOURS["mma"], label="ECE after MMA")
    ax.bar(x + 0.2, bounds["ks_after"], 0.4, color=PALETTE[9], label="KS after MMA")
    ax.scatter(x, bounds["ece_before"], marker="_", s=600, color="black", zorder=3,
               label="clean ECE")
    ax.scatter(x, bounds["bound"], marker="_", s=900, color=PALETTE[3], zorder=3,
               label="bound 1 - q/K")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("calibration error")
    ax.set_title("MMA: achieved calibration error against the theoretical bound")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig
