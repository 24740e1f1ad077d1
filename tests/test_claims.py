"""MMA bound, model comparison and the claims checklist (calib.analysis.claims)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calib import metrics
from calib.analysis import claims


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(2, 100), seed=st.integers(0, 10_000))
def test_ideal_mma_outcome_reaches_exactly_the_bound(n, k, seed):
    correct = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7
    conf = claims.ideal_mma_confidences(correct, k)
    q = float(correct.double().mean())
    assert metrics.ece(conf, correct) == pytest.approx(claims.mma_bound(q, k), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 100), k=st.integers(2, 20), seed=st.integers(0, 10_000))
def test_no_label_preserving_outcome_exceeds_the_bound(n, k, seed):
    """Any confidences in [1/K, 1] (a max-softmax is never below 1/K) stay under 1 - q/K."""
    gen = torch.Generator().manual_seed(seed)
    correct = torch.rand(n, generator=gen) < 0.6
    conf = 1.0 / k + (1 - 1.0 / k) * torch.rand(n, generator=gen, dtype=torch.float64)
    q = float(correct.double().mean())
    assert metrics.ece(conf, correct) <= claims.mma_bound(q, k) + 1e-9


def test_mma_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="accuracy"):
        claims.mma_bound(1.5, 10)
    with pytest.raises(ValueError, match="num_classes"):
        claims.mma_bound(0.5, 1)


def _summary(kind, *, ece_before=0.02, ece_after=0.3, ks_before=0.01, ks_after=0.2,
             success=0.9, acc=0.9, setting="square-linf"):
    return {"kind": kind, "setting": setting, "accuracy_before": acc, "accuracy_after": acc,
            "ece_before": ece_before, "ece_after": ece_after, "ks_before": ks_before,
            "ks_after": ks_after, "success_rate": success, "confidence_after": 0.6,
            "queries_success_median": 30.0}


def _metrics(**per_kind):
    return {"attacks": {f"square-linf/{k}": _summary(k, **v) for k, v in per_kind.items()}}


def test_mma_bound_table_and_claim():
    am = {"m": _metrics(mma={"ece_after": 0.5, "acc": 0.9})}
    table = claims.mma_bound_table(am, 10)
    assert table.loc[0, "bound"] == pytest.approx(0.91)
    assert table.loc[0, "fraction_of_bound"] == pytest.approx(0.5 / 0.91)
    assert claims.claim_mma_bound(table)["verdict"] == "holds"
    with pytest.raises(ValueError, match="no MMA results"):
        claims.mma_bound_table({"m": _metrics(uca={})}, 10)


def test_ece_rise_verdicts():
    strong = {k: {"ece_after": 0.5, "ks_after": 0.4} for k in ("uca", "oca", "mma", "rca")}
    assert claims.claim_ece_rise({"m": _metrics(**strong)}, ["m"])["verdict"] == "holds"
    mixed = dict(strong, oca={"ece_after": 0.05, "ks_after": 0.05})
    assert claims.claim_ece_rise({"m": _metrics(**mixed)}, ["m"])["verdict"] == "partly"
    weak = {k: {"ece_after": 0.05, "ks_after": 0.05} for k in ("uca", "oca")}
    assert claims.claim_ece_rise({"m": _metrics(**weak)}, ["m"])["verdict"] == "does not hold"


def test_ece_rise_tolerates_missing_medians():
    """A run with no successful sample has a null median in its JSON summary."""
    metrics_ = _metrics(uca={"ece_after": 0.5, "ks_after": 0.4})
    metrics_["attacks"]["square-linf/uca"]["queries_success_median"] = None
    out = claims.claim_ece_rise({"m": metrics_}, ["m"])
    assert "median nan queries" in out["measured"]


def test_query_comparison_separates_free_successes():
    rows = []
    # OCA: half the samples succeed at the clean query, the rest after 101 queries.
    for i in range(10):
        rows.append({"model": "m", "setting": "square-linf", "kind": "oca",
                     "queries": 1 if i < 5 else 101, "success": True})
        rows.append({"model": "m", "setting": "square-linf", "kind": "uca",
                     "queries": 61, "success": i < 8})
    q = claims.query_comparison(pd.DataFrame(rows))
    r = q.iloc[0]
    assert r["oca_queries_mean"] == pytest.approx(51)
    assert r["oca_queries_mean_perturbed"] == pytest.approx(101)
    assert r["oca_free_successes"] == pytest.approx(0.5)
    assert r["uca_success_rate"] == pytest.approx(0.8)
    # UCA beats OCA once free successes are set aside, loses on the raw mean.
    assert claims.claim_uca_fewer_queries(q)["verdict"] == "holds"
    with pytest.raises(ValueError, match="lack columns"):
        claims.query_comparison(pd.DataFrame({"model": ["m"]}))


def test_detection_claim():
    det = pd.DataFrame({"detector": ["lid"] * 3, "attack": ["square-linf/ordinary",
                                                             "square-linf/uca", "pgd-linf/oca"],
                        "auroc": [0.9, 0.6, 0.55], "accuracy": [0.85, 0.6, 0.5]})
    out = claims.claim_detection(det)
    assert out["verdict"] == "holds" and "85.0%" in out["measured"]
    det.loc[0, "accuracy"] = 0.4
    assert claims.claim_detection(det)["verdict"] == "does not hold"
    assert claims.claim_detection(None)["verdict"] == "not measured"


def _defence(clean_ece, after):
    return {"clean_test": {"ece": clean_ece}, "attacks": {
        "square-linf/uca": {"ece_before": 0.03, "ece_after": after, "ks_after": after}}}


def test_defence_claim():
    d = {"defences": {"none": _defence(0.03, 0.3), "cs": _defence(0.08, 0.1),
                      "temperature": _defence(0.02, 0.25)}}
    out = claims.claim_defences(d)
    assert out["verdict"] == "holds", out
    d["defences"]["temperature"] = _defence(0.02, 0.05)
    assert claims.claim_defences(d)["verdict"] == "partly"


def test_checklist_needs_one_check_per_claim():
    checks = [{"measured": "x", "verdict": "holds", "rule": "r"}] * len(claims.PAPER_CLAIMS)
    table = claims.claims_checklist(checks)
    assert list(table["verdict"]) == ["holds"] * len(claims.PAPER_CLAIMS)
    with pytest.raises(ValueError, match="one per claim"):
        claims.claims_checklist(checks[:2])
    with pytest.raises(ValueError, match="verdict"):
        claims.claims_checklist([{"measured": "x", "verdict": "maybe", "rule": ""}]
                                * len(claims.PAPER_CLAIMS))
