"""The claims checklist (calib.analysis.claims) and UCA's push-to-the-bound objective.

SPEC §10: every rule of the checklist is tested on a constructed input under which it holds
and on one under which it fails (and, where intervals decide, one that is within noise).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import centred_conv, images

from calib import metrics
from calib.analysis import claims
from calib.attacks import method_options, run_attack
from calib.attacks.base import MODE_UCA, Thresholds, reevaluate, score

K = 10
N_RESAMPLES = 200  # enough for the clear-cut inputs below; the pipeline uses 1,000

pytestmark = pytest.mark.usefixtures("one_thread")


# --- constructed per-sample records ------------------------------------------------------------

def _records(n: int = 200, *, model: str = "m", setting: str = "square-linf", kind: str = "mma",
             accuracy: float = 0.9, before: float | np.ndarray = 0.92,
             after_correct: float | np.ndarray = 0.5, after_wrong: float | np.ndarray = 0.995,
             queries: int | np.ndarray = 50, success: bool | np.ndarray = True,
             seed: int = 0) -> pd.DataFrame:
    """``n`` images, the first ``accuracy * n`` correct, with the given confidences."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, K, n)
    correct = np.arange(n) < round(accuracy * n)
    prediction = np.where(correct, label, (label + 1) % K)
    jitter = rng.uniform(-0.01, 0.01, n)
    return pd.DataFrame({
        "model": model, "setting": setting, "kind": kind, "index": np.arange(n), "label": label,
        "prediction": prediction, "confidence_before": np.clip(before + jitter, 0, 1),
        "confidence_after": np.clip(np.where(correct, after_correct, after_wrong) + jitter,
                                    1.0 / K, 1),
        "target": np.nan, "queries": queries, "success": success, "linf": 0.1, "l2": 1.0})


def _all_kinds(**per_kind) -> pd.DataFrame:
    """Records of every attack kind for two models; ``per_kind[kind]`` overrides its inputs."""
    return pd.concat([_records(model=m, kind=k, seed=i, **per_kind.get(k, {}))
                      for i, (m, k) in enumerate((m, k) for m in ("resnet", "vit")
                                                 for k in claims.KIND_ORDER)],
                     ignore_index=True)


def _metrics(models=("resnet", "vit"), *, acc_after: float = 0.9) -> dict:
    return {m: {"attacks": {f"square-linf/{k}": {"accuracy_before": 0.9,
                                                 "accuracy_after": acc_after}
                            for k in claims.KIND_ORDER}} for m in models}


# --- judging intervals -------------------------------------------------------------------------

def test_above_and_verdict_are_three_way():
    iv = claims.stats.Interval
    assert claims.above(iv(0.7, 0.6, 0.8), 0.5) is True
    assert claims.above(iv(0.3, 0.2, 0.4), 0.5) is False
    assert claims.above(iv(0.5, 0.4, 0.6), 0.5) is None
    assert claims.above(iv(0.5, float("nan"), float("nan")), 0.5) is None
    assert claims.verdict([True, True]) == "holds"
    assert claims.verdict([False, False]) == "does not hold"
    assert claims.verdict([True, None]) == "partly"
    assert claims.verdict([None]) == "partly"
    assert claims.verdict([]) == "not measured"


# --- claim 5: the MMA bound --------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(2, 100), seed=st.integers(0, 10_000))
def test_ideal_mma_outcome_reaches_exactly_the_bound(n, k, seed):
    correct = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7
    conf = claims.ideal_mma_confidences(correct, k)
    q = float(correct.double().mean())
    assert metrics.ece(conf, correct) == pytest.approx(claims.mma_bound(q, k), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 100), k=st.integers(2, 20), seed=st.integers(0, 10_000))
def test_no_outcome_exceeds_the_bound_so_staying_under_it_decides_nothing(n, k, seed):
    """Any confidences in [1/K, 1] stay under 1 - q/K: why the rule judges the reach instead."""
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
    with pytest.raises(ValueError, match="uca_margin"):
        claims.stopping_rule_ece(0.9, uca_margin=1.0)


def test_stopping_rule_ece_is_the_ece_of_samples_stopped_at_the_thresholds():
    q, m, c = 0.9, 0.1, 0.99
    correct = torch.arange(1000) < 900
    conf = torch.where(correct, torch.tensor((1 + m) / 2, dtype=torch.float64),
                       torch.tensor(c, dtype=torch.float64))
    stop = claims.stopping_rule_ece(q, uca_margin=m, oca_confidence=c)
    assert stop == pytest.approx(0.9 * 0.45 + 0.1 * 0.99)
    assert metrics.ece(conf, correct) == pytest.approx(stop)
    assert stop < claims.mma_bound(q, 10)


def test_mma_bound_table_reports_reach_with_intervals():
    recs = _records(after_correct=0.55, after_wrong=0.99)
    table = claims.mma_bound_table(recs, K, n_resamples=N_RESAMPLES)
    r = table.iloc[0]
    assert r["objective"] == "margin" and r["n"] == 200
    assert r["bound"] == pytest.approx(0.91)
    assert r["fraction_of_bound"] == pytest.approx(r["ece_after"] / r["bound"])
    assert r["fraction_of_bound_lo"] <= r["fraction_of_bound"] <= r["fraction_of_bound_hi"]
    # Stopped at the thresholds: the reach is what the thresholds settle for.
    assert r["fraction_of_bound"] == pytest.approx(r["stop_fraction"], abs=0.01)
    assert r["conf_correct_after"] == pytest.approx(0.55, abs=0.01)
    with pytest.raises(ValueError, match="no MMA results"):
        claims.mma_bound_table(_records(kind="uca"), K)


def test_mma_claim_holds_near_the_bound_and_fails_at_the_thresholds():
    ideal = pd.concat([_records(model=m, after_correct=1.0 / K, after_wrong=1.0, seed=i)
                       for i, m in enumerate(("resnet", "vit"))])
    near = claims.claim_mma_bound(claims.mma_bound_table(ideal, K, n_resamples=N_RESAMPLES))
    assert near["verdict"] == "holds", near
    stopped = pd.concat([_records(model=m, after_correct=0.55, after_wrong=0.99, seed=i)
                         for i, m in enumerate(("resnet", "vit"))])
    far = claims.claim_mma_bound(claims.mma_bound_table(stopped, K, n_resamples=N_RESAMPLES))
    assert far["verdict"] == "does not hold", far
    assert "settle for 55%" in far["measured"] and "[" in far["measured"]


def test_mma_claim_uses_the_push_variant_when_it_gets_closer():
    margin = _records(model="resnet", after_correct=0.55, after_wrong=0.99)
    push = _records(model="resnet", after_correct=1.0 / K, after_wrong=0.99
                    ).assign(objective="confidence")
    both = pd.concat([margin.assign(objective="margin"), push])
    check = claims.claim_mma_bound(claims.mma_bound_table(both, K, n_resamples=N_RESAMPLES))
    assert check["verdict"] == "holds" and "min-p_k variant" in check["measured"]
    cmp = claims.mma_push_comparison(both, n_resamples=N_RESAMPLES)
    assert cmp.loc[0, "gain_outcome"] == "higher" and cmp.loc[0, "n"] == 200
    assert cmp.loc[0, "conf_correct_confidence"] < cmp.loc[0, "conf_correct_margin"]
    bad = both.copy()
    bad.loc[bad["objective"] == "confidence", "prediction"] += 1
    with pytest.raises(ValueError, match="disagree"):
        claims.mma_push_comparison(bad)


# --- claim 1: ECE and KS rise ------------------------------------------------------------------

# Every image correct: the accuracy is the same in every resample, so ECE before is exactly
# 1 - 0.95 and the ratios are sharp.
STRONG = {"accuracy": 1.0, "before": 0.95, "after_correct": 0.3}  # ECE and KS x14
FLAT = {"accuracy": 1.0, "before": 0.95, "after_correct": 0.9}  # x2


def test_ece_rise_holds_for_a_large_rise_and_fails_for_none():
    strong = _all_kinds(**dict.fromkeys(claims.KIND_ORDER, STRONG))
    rise = claims.ece_rise_table(strong, _metrics(), "square-linf", n_resamples=N_RESAMPLES)
    assert len(rise) == 8 and (rise["ece_ratio_lo"] > 10).all()
    assert claims.claim_ece_rise(rise)["verdict"] == "holds"
    flat = _all_kinds(**dict.fromkeys(claims.KIND_ORDER, FLAT))
    rise = claims.ece_rise_table(flat, _metrics(), "square-linf", n_resamples=N_RESAMPLES)
    out = claims.claim_ece_rise(rise)
    assert out["verdict"] == "does not hold" and "Weakest rise" in out["measured"]


def test_ece_rise_fails_where_accuracy_changed_and_is_partly_for_a_mix():
    strong = _all_kinds(**dict.fromkeys(claims.KIND_ORDER, STRONG))
    rise = claims.ece_rise_table(strong, _metrics(acc_after=0.8), "square-linf",
                                 n_resamples=N_RESAMPLES)
    out = claims.claim_ece_rise(rise)
    assert out["verdict"] == "does not hold" and "changed in 8 runs" in out["measured"]
    mixed = _all_kinds(**{**dict.fromkeys(claims.KIND_ORDER, STRONG), "oca": FLAT})
    rise = claims.ece_rise_table(mixed, _metrics(), "square-linf", n_resamples=N_RESAMPLES)
    assert claims.claim_ece_rise(rise)["verdict"] == "partly"


# --- claim 2: both architectures ---------------------------------------------------------------

def test_architectures_holds_when_every_kind_succeeds_and_fails_when_none_does():
    ok = claims.success_table(_all_kinds(), "square-linf", n_resamples=N_RESAMPLES)
    assert claims.claim_architectures(ok)["verdict"] == "holds"
    low = np.arange(200) < 20  # 10% success
    bad = claims.success_table(_all_kinds(**{k: {"success": low} for k in claims.KIND_ORDER}),
                               "square-linf", n_resamples=N_RESAMPLES)
    out = claims.claim_architectures(bad)
    assert out["verdict"] == "does not hold" and "10% [" in out["measured"]
    half = np.arange(200) % 2 == 0  # 50%: the interval contains the threshold
    noisy = claims.success_table(_all_kinds(oca={"success": half}), "square-linf",
                                 n_resamples=N_RESAMPLES)
    out = claims.claim_architectures(noisy)
    assert out["verdict"] == "partly" and "within noise" in out["measured"]


# --- claim 3: UCA vs OCA queries ---------------------------------------------------------------

def _queries(uca_q, oca_q, *, uca_ok=True, oca_ok=True, model="m", setting="square-linf"):
    return pd.concat([_records(model=model, setting=setting, kind="uca", queries=uca_q,
                               success=uca_ok),
                      _records(model=model, setting=setting, kind="oca", queries=oca_q,
                               success=oca_ok)], ignore_index=True)


def test_queries_are_compared_on_the_images_both_attacks_succeed_on():
    n = 200
    # OCA succeeds for free on half the images and needs 101 queries on the rest; UCA needs 61
    # everywhere but fails on the images OCA got for free.
    free = np.arange(n) < n // 2
    recs = _queries(np.full(n, 61), np.where(free, 1, 101), uca_ok=~free)
    q = claims.query_comparison(recs, n_resamples=N_RESAMPLES)
    r = q.iloc[0]
    assert r["n_both"] == n // 2
    assert r["queries_diff"] == pytest.approx(-40) and r["outcome"] == "lower"
    # Means over each attack's own successes would say the opposite (61 vs 51).
    assert recs[recs["kind"] == "oca"]["queries"].mean() < 61
    assert claims.claim_uca_fewer_queries(q)["verdict"] == "holds"


def test_uca_fewer_queries_fails_when_uca_needs_more_and_is_partly_within_noise():
    more = claims.query_comparison(_queries(80, 20), n_resamples=N_RESAMPLES)
    out = claims.claim_uca_fewer_queries(more)
    assert out["verdict"] == "does not hold" and "+60 [+60, +60]" in out["measured"]
    rng = np.random.default_rng(1)
    same = claims.query_comparison(_queries(rng.integers(1, 100, 200), rng.integers(1, 100, 200)),
                                   n_resamples=N_RESAMPLES)
    assert same.loc[0, "outcome"] == "within noise"
    assert claims.claim_uca_fewer_queries(same)["verdict"] == "partly"
    white = claims.query_comparison(_queries(10, 50, setting="pgd-linf"))
    assert claims.claim_uca_fewer_queries(white)["verdict"] == "not measured"
    with pytest.raises(ValueError, match="lack columns"):
        claims.query_comparison(pd.DataFrame({"model": ["m"]}))


# --- claim 4: detection ------------------------------------------------------------------------

def _matched(*rows: tuple[str, float, float, float, str]) -> pd.DataFrame:
    """Rows of table2_matched.csv: (detector, diff, lo, hi, outcome), accuracy metric."""
    return pd.DataFrame([{"detector": d, "metric": "accuracy", "matched_diff": diff,
                          "matched_diff_lo": lo, "matched_diff_hi": hi,
                          "matched_outcome": outcome, "raw_diff": diff - 0.1}
                         for d, diff, lo, hi, outcome in rows])


def test_detection_claim_is_decided_at_matched_norm():
    holds = _matched(("mahalanobis", -0.3, -0.35, -0.25, "lower"),
                     ("lid", -0.2, -0.3, -0.1, "lower"))
    out = claims.claim_detection(holds)
    assert out["verdict"] == "holds" and "-30.0 [-35.0, -25.0] points" in out["measured"]
    assert "matched L2 norm" in out["rule"]
    fails = _matched(("mahalanobis", 0.2, 0.1, 0.3, "higher"))
    assert claims.claim_detection(fails)["verdict"] == "does not hold"
    # A raw gap that vanishes at matched norm (a norm effect) is not evidence.
    noise = _matched(("mahalanobis", 0.01, -0.04, 0.06, "within noise"))
    out = claims.claim_detection(noise)
    assert out["verdict"] == "partly" and "within noise" in out["measured"]
    none = _matched(("lid", float("nan"), float("nan"), float("nan"), "no overlap"))
    assert claims.claim_detection(none)["verdict"] == "not measured"
    assert claims.claim_detection(None)["verdict"] == "not measured"
    with pytest.raises(ValueError, match="matched"):
        claims.claim_detection(pd.DataFrame({"detector": ["x"]}))


def test_detection_comparison_shows_what_the_rule_reads():
    # The claims' table is the detection stage's paired comparison, accuracy rows only: the
    # same numbers as table2_matched.csv, so the two reports cannot disagree.
    table2 = pd.DataFrame([{c: 0.0 for c in claims.DETECTION_COLUMNS}
                           | {"detector": d, "metric": m, "raw_diff": v, "raw_outcome": "lower",
                              "matched_outcome": "within noise"}
                           for d, v in (("spectral", -0.02), ("lid", -0.04))
                           for m in ("accuracy", "concordance")])
    table = claims.detection_comparison(table2)
    assert list(table.columns) == list(claims.DETECTION_COLUMNS)
    assert list(table["detector"]) == ["lid", "spectral"]
    assert list(table["raw_diff"]) == [-0.04, -0.02]
    with pytest.raises(ValueError, match="matched"):
        claims.detection_comparison(table2.drop(columns="raw_diff_lo"))


# --- claim 6: defences -------------------------------------------------------------------------

def _defence(after_correct: float, *, before: float = 0.92, n: int = 200) -> pd.DataFrame:
    """Records of one defended model: two runs, the same images as every other defence."""
    return pd.concat([_records(n, setting=s, kind=k, before=before, after_correct=after_correct,
                               seed=0)
                      for s, k in (("square-linf", "uca"), ("pgd-linf", "mma"))],
                     ignore_index=True)


def test_defence_claim_holds_when_defences_fall_short_and_cs_leads():
    # Post-attack ECE: undefended ~0.55 (correct samples at 0.5), CS ~0.41 (75% of it, the
    # lowest), temperature ~0.50; clean, CS's 0.75 against accuracy 0.9 is the worse one.
    records = {"none": _defence(0.5, before=0.9), "cs": _defence(0.65, before=0.75),
               "temperature": _defence(0.55, before=0.9)}
    check, table = claims.claim_defences(records, n_resamples=N_RESAMPLES)
    assert check["verdict"] == "holds", check
    assert list(table["defence"]) == ["none", "cs", "temperature"]
    cs = table.set_index("defence").loc["cs"]
    assert cs["ratio_lo"] > 0.5 and cs["outcome"] == "lower" and cs["clean_outcome"] == "higher"
    assert cs["cs_outcome"] == "CS itself"  # no NaN in a text column of the committed table
    assert check["measured"].startswith("Best defence cs keeps")


def test_defence_claim_fails_when_a_defence_works_and_cs_is_neither_lowest_nor_worse_clean():
    records = {"none": _defence(0.5, before=0.8), "cs": _defence(0.6, before=0.9),
               "temperature": _defence(0.88, before=0.9)}
    check, table = claims.claim_defences(records, n_resamples=N_RESAMPLES)
    assert check["verdict"] == "does not hold", check
    t = table.set_index("defence")
    assert t.loc["temperature", "ratio_hi"] < 0.5 and t.loc["cs", "clean_outcome"] == "lower"


def test_defence_claim_says_within_noise():
    records = {"none": _defence(0.5), "cs": _defence(0.5), "temperature": _defence(0.55)}
    check, table = claims.claim_defences(records, n_resamples=N_RESAMPLES)
    assert table.set_index("defence").loc["cs", "outcome"] == "within noise"
    assert check["verdict"] == "partly"


def test_defences_must_share_images_with_the_undefended_model():
    other = _defence(0.5)
    other["index"] += 1000
    with pytest.raises(ValueError, match="other images"):
        claims.defence_comparison({"none": _defence(0.5), "cs": other})
    with pytest.raises(ValueError, match="undefended reference"):
        claims.defence_comparison({"cs": _defence(0.5)})
    assert claims.claim_defences({})[0]["verdict"] == "not measured"


# --- the checklist -----------------------------------------------------------------------------

def test_checklist_columns_sources_and_paper_quotes():
    checks = [{"measured": "x", "verdict": "holds", "rule": "r"}] * len(claims.PAPER_CLAIMS)
    table = claims.claims_checklist(checks)
    assert list(table.columns) == [*claims.CHECKLIST_COLUMNS, "rule"]
    assert list(table["verdict"]) == ["holds"] * len(claims.PAPER_CLAIMS)
    assert all("results/claims/rules.md" in s and "](" not in s for s in table["sources"])
    # Only SPEC-sourced values are quoted (SPEC §1: Mahalanobis 72.4% -> 44.2%).
    quoted = table[table["paper"] != "not extracted"]["paper"].tolist()
    assert any("72.4%" in p and "44.2%" in p for p in quoted)
    assert not table["paper"].str.contains("0.6|0.04").any()
    with pytest.raises(ValueError, match="one per claim"):
        claims.claims_checklist(checks[:2])
    with pytest.raises(ValueError, match="verdict"):
        claims.claims_checklist([{"measured": "x", "verdict": "maybe", "rule": ""}]
                                * len(claims.PAPER_CLAIMS))


# --- UCA's push-to-the-bound objective ---------------------------------------------------------

@pytest.mark.parametrize("method", ["square", "pgd"])
def test_confidence_objective_lowers_p_k_further_at_the_same_budget(method):
    model, x = centred_conv(0), images(1, 48)
    y = model(x).argmax(1)  # every sample correct: MMA runs UCA on all of them
    runs = {obj: run_attack(model, x, kind="mma", method=method, eps=0.2, iterations=60,
                            labels=y, uca_objective=obj)
            for obj in ("margin", "confidence")}
    margin, push = runs["margin"], runs["confidence"]
    assert push.final_confidence.mean() < margin.final_confidence.mean() - 0.01
    assert (push.final_confidence <= margin.final_confidence + 0.02).float().mean() > 0.9
    fresh = reevaluate(push, model)
    assert bool((fresh.final_prediction == fresh.clean_prediction).all())  # labels kept
    assert push.options["uca_objective"] == "confidence"
    # No early stop: every sample spends the budget; success = p_k lowered.
    assert bool((push.queries == 61).all())
    assert bool(torch.equal(push.success, push.final_confidence < push.clean_confidence))
    assert bool(torch.equal(fresh.success, push.success))
    assert not bool(push.history.success[0].any())
    assert bool(torch.equal(push.history.success[-1], push.success))


def test_confidence_objective_leaves_oca_samples_alone():
    model, x = centred_conv(0), images(1, 32)
    y = (model(x).argmax(1) + 1) % 4  # every sample wrong: MMA runs OCA on all of them
    a = run_attack(model, x, kind="mma", eps=0.2, iterations=30, labels=y)
    b = run_attack(model, x, kind="mma", eps=0.2, iterations=30, labels=y,
                   uca_objective="confidence")
    assert torch.equal(a.final_confidence, b.final_confidence)
    assert torch.equal(a.success, b.success)


def test_confidence_objective_scores_p_k_and_never_stops():
    logits = torch.tensor([[2.0, 1.9, 0.0], [3.0, 0.0, 0.0]])
    k = torch.tensor([0, 0])
    mode = torch.full((2,), MODE_UCA, dtype=torch.int8)
    target = torch.full((2,), float("nan"))
    s = score(logits, k, mode, target, Thresholds(uca_objective="confidence"), 0.0)
    assert torch.allclose(s.loss, logits.log_softmax(1)[:, 0])
    assert not bool(s.success.any())
    assert bool(score(logits, k, mode, target, Thresholds(), 0.0).success[0])
    with pytest.raises(ValueError, match="uca_objective"):
        Thresholds(uca_objective="probability")
    for method in ("square", "pgd"):
        assert method_options(method)["uca_objective"] == "margin"


def test_push_to_bound_records_feed_the_bound_table():
    model, x = centred_conv(0), images(1, 24)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 4  # four wrong samples run OCA
    recs, summary = claims.push_to_bound(
        model, x, y, torch.arange(100, 124), setting="square-linf", eps_linf=0.2, eps_l2=1.0,
        iterations=20, square_p_init=0.3, pgd_alpha=None)
    assert summary["label_preserved"] == 1.0
    assert (recs["objective"] == "confidence").all()
    assert list(recs["index"]) == list(range(100, 124))
    table = claims.mma_bound_table(recs.assign(model="tiny"), 4, n_resamples=N_RESAMPLES)
    assert table.loc[0, "objective"] == "confidence"
    assert table.loc[0, "ece_after"] <= table.loc[0, "bound"] + 1e-9
