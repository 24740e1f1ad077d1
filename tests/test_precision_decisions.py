"""benchmarks/precision_decisions.py counts every candidate of a Square run and tells a query
model that decides like fp32 from one that does not."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import images, seeded_conv
from torch import nn

from calib.attacks import base
from calib.attacks.square import square_attack

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("precision_decisions")
    sys.modules.pop("precision_decisions", None)


class Noisy(nn.Module):
    """``model`` with an error of size up to ``scale`` added to its logits, a rapidly varying
    but deterministic function of them: a stand-in for a low-precision query's rounding."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return z + self.scale * torch.sin(997.0 * z)


def observe(bench, query_model: nn.Module, kind: str):
    model, x = seeded_conv(0), images(3, 12)
    observer = bench.DecisionObserver(query_model, label_band=0.02)
    with observer.attached() as counts:
        result = square_attack(model, x, kind=kind, eps=0.3, iterations=15, seed=0,
                               labels=model(x).argmax(1))
    return counts, result


@pytest.mark.parametrize("kind", ["oca", "rca"])
def test_every_candidate_is_counted_and_an_exact_query_model_never_differs(bench, kind):
    model = seeded_conv(0)
    counts, result = observe(bench, model, kind)
    # One candidate per query after the clean one.
    assert counts.candidates == int(result.queries.sum()) - result.queries.numel() > 0
    assert counts.differ == counts.a_missed == 0
    assert counts.max_logit_error == 0.0
    assert counts.b_missed[0] == 0  # delta 0 already reproduces every fp32 decision
    # Scheme A re-queries what the query model accepts, here exactly what fp32 accepts
    # (plus label-check near-ties), so never less than fp32's accepts.
    assert counts.a_requery >= counts.accept > 0


def test_a_noisy_query_model_differs_and_needs_a_larger_delta(bench):
    counts, _ = observe(bench, Noisy(seeded_conv(0), scale=0.5), "rca")
    assert counts.differ > 0
    assert counts.max_logit_error > 0.1
    assert counts.b_missed[0] > 0  # at delta 0 a rejection misses something fp32 accepts
    assert counts.b_missed[-1] <= counts.b_missed[0]
    assert counts.b_requery == sorted(counts.b_requery)  # larger delta, more re-queries


def test_the_observer_leaves_the_attack_and_the_method_as_they_were(bench):
    model, x = seeded_conv(0), images(3, 12)
    plain = square_attack(model, x, kind="oca", eps=0.3, iterations=15, seed=0)
    original = base.AttackState.consider
    observed = bench.DecisionObserver(Noisy(model, 0.5), 0.02)
    with observed.attached():
        watched = square_attack(model, x, kind="oca", eps=0.3, iterations=15, seed=0)
    assert base.AttackState.consider is original
    assert torch.equal(plain.x_adv, watched.x_adv)
    assert torch.equal(plain.queries, watched.queries)


def test_the_command_prints_one_row_per_square_run(bench, tmp_path, capsys):
    out = tmp_path / "decisions.json"
    result = bench.main(["--arch", "resnet10t", "--images", "4", "--square-iterations", "3",
                         "--kinds", "oca,rca", "--batch", "4", "--threads", "1",
                         "--out", str(out)])
    # params.yaml's Square settings only (PGD is white-box: its steps are gradients)
    assert [(r["setting"], r["kind"]) for r in result["rows"]] == [
        ("square-linf", "oca"), ("square-linf", "rca"), ("square-l2", "oca"),
        ("square-l2", "rca")]
    for r in result["rows"]:
        assert 0 <= r["accept"] <= 1 and 0 <= r["a_share"] <= 1
        assert r["a_speedup_bound"] == pytest.approx(1 / (result["ratio"] + r["a_share"]))
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert "| square-l2 | RCA |" in capsys.readouterr().out


def test_bad_options_fail_before_any_work(bench):
    with pytest.raises(SystemExit):
        bench.main(["--arch", "resnet10t", "--label-band", "-1"])
    with pytest.raises(SystemExit):
        bench.main(["--arch", "resnet10t", "--images", "-2"])


def test_confirming_with_an_exact_query_model_reproduces_fp32_and_counts_the_requeries(bench):
    model, x = seeded_conv(0), images(3, 12)
    plain = square_attack(model, x, kind="rca", eps=0.3, iterations=15, seed=0)
    rule = bench.ConfirmAccepted(model, label_band=0.02)
    with rule.attached():
        confirmed = square_attack(model, x, kind="rca", eps=0.3, iterations=15, seed=0)
    assert torch.equal(plain.x_adv, confirmed.x_adv)
    assert torch.equal(plain.success, confirmed.success)
    extra = confirmed.queries - plain.queries
    assert int(extra.sum()) == rule.requeried > 0  # every fp32 re-query is counted
    assert (extra >= 0).all()


def test_confirming_a_noisy_query_model_never_reports_what_fp32_does_not_see(bench):
    """A noisy query model alone accepts steps that fp32 sees differently; confirmed, every
    stored outcome is fp32's, so a fresh fp32 re-read agrees with the attack's own record."""
    model, x = seeded_conv(0), images(3, 24)
    noisy = Noisy(model, scale=0.5)
    unconfirmed = square_attack(noisy, x, kind="uca", eps=0.3, iterations=30, seed=0)
    rule = bench.ConfirmAccepted(model, label_band=0.02)
    original = base.AttackState.consider
    with rule.attached():
        confirmed = square_attack(noisy, x, kind="uca", eps=0.3, iterations=30, seed=0)
    assert base.AttackState.consider is original

    def disagreement(result):
        again = base.reevaluate(result, model)
        return int((again.success != result.success).sum()
                   + (again.final_prediction != again.clean_prediction).sum()
                   + (again.final_confidence - result.final_confidence).abs().gt(1e-5).sum())

    assert disagreement(unconfirmed) > 0
    assert disagreement(confirmed) == 0
