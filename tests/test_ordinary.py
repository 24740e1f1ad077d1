"""Tests for calib.attacks.ordinary (ordinary Square Attack and PGD, the reference attacks of
the detection analysis, matched to the calibration attacks: same eps, budget, stopping rule,
initialisation and proposals)."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import centred_conv as tiny_model
from tiny_models import images

from calib import checks
from calib.attacks import method_options, pgd_attack, square_attack
from calib.attacks.ordinary import margin_loss, ordinary_attack
from calib.attacks.square import p_schedule, square_side

pytestmark = pytest.mark.usefixtures("one_thread")


def changed(x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return (adv != x).flatten(1).any(1)


def test_margin_loss():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    k = torch.tensor([0, 0])
    torch.testing.assert_close(margin_loss(z, k), torch.tensor([1.0, -5.0]))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["linf", "l2"]),
       method=st.sampled_from(["square", "pgd"]), eps=st.floats(0.02, 0.5),
       channels=st.sampled_from([1, 3]))
def test_ordinary_attacks_stay_in_the_ball_and_stop_at_misclassification(seed, norm, method,
                                                                         eps, channels):
    model = tiny_model(seed % 7, channels=channels)
    x = images(seed, 5, channels=channels)
    eps = eps if norm == "linf" else 4 * eps
    out = ordinary_attack(model, x, method=method, norm=norm, eps=eps, iterations=15,
                          seed=seed, p_init=0.3)
    assert bool(checks.within_eps_ball(x, out.x_adv, eps=eps, norm=norm).all())
    assert float(out.x_adv.min()) >= 0 and float(out.x_adv.max()) <= 1
    assert bool((out.queries >= 1).all()) and bool((out.queries <= 16).all())
    with torch.no_grad():
        final = model(out.x_adv).argmax(1)
        clean = model(x).argmax(1)
    assert torch.equal(out.final_prediction, final)
    assert torch.equal(out.success, final != clean)
    # A sample stops being queried once it flipped: the unflipped ones used the whole budget.
    assert bool((out.queries[~out.success] == 16).all())
    assert bool((out.queries[out.success] >= 2).all())


def test_ordinary_pgd_stops_a_sample_as_soon_as_it_is_misclassified():
    """Runs with budgets 3 and 40 agree on every sample that flipped within 3 steps: nothing
    touches a misclassified sample again (the steps do not depend on the budget)."""
    model = tiny_model(2)
    x = images(2, 32)
    short = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=3, seed=1)
    long = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=40, seed=1)
    won = short.success
    assert 0 < int(won.sum()) < len(won)
    assert torch.equal(short.x_adv[won], long.x_adv[won])
    assert torch.equal(short.queries[won], long.queries[won])
    assert bool((long.queries[won] <= 4).all())
    # The others went on, and more of them flipped; a flipped sample's last accepted step is
    # the one that flipped it (it is queried exactly until then).
    assert int(long.success.sum()) > int(won.sum())
    assert bool((long.queries[long.success] < 41).all())


def test_ordinary_square_is_seeded_and_flips_labels():
    model = tiny_model(0)  # predicts three of its four classes on these images
    x = images(1, 24)
    kwargs = {"method": "square", "eps": 0.3, "iterations": 60, "p_init": 0.3}
    a = ordinary_attack(model, x, seed=5, **kwargs)
    b = ordinary_attack(model, x, seed=5, **kwargs)
    c = ordinary_attack(model, x, seed=6, **kwargs)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert not torch.equal(a.x_adv, c.x_adv)
    assert float(a.success.float().mean()) >= 0.5
    s = a.summary()
    assert s["success_rate"] == pytest.approx(float(a.success.float().mean()))
    assert s["options"] == {"p_init": 0.3, "stripes_init": False, "batch_size": 256}
    assert s["linf_max"] <= 0.3 + 1e-6 and s["l2_mean"] == pytest.approx(
        float(a.l2_norm().mean()))
    # Successful samples needed fewer queries than the budget allows.
    assert bool((a.queries[a.success] < 61).all())


def test_ordinary_pgd_is_seeded_and_flips_labels():
    model = tiny_model(2)
    x = images(2, 16)
    a = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=10, alpha=0.05, seed=1)
    b = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=10, alpha=0.05, seed=1)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert bool(checks.within_eps_ball(x, a.x_adv, eps=0.2, norm="linf").all())
    assert float(a.success.float().mean()) >= 0.5


def test_defaults_match_the_calibration_attacks():
    """The ordinary attacks' defaults are those of square_attack / pgd_attack, so the detection
    stage matches them by passing only what the attack stage passes (eps, budget, p_init,
    alpha)."""
    ours = {name: p.default for name, p in
            inspect.signature(ordinary_attack).parameters.items()}
    square, pgd = method_options("square"), method_options("pgd")
    assert ours["stripes_init"] is square["stripes_init"] is False
    assert ours["p_init"] == square["p_init"]
    assert ours["sparsify"] is pgd["sparsify"] is True
    assert ours["drop"] == pgd["drop_uca"]
    assert ours["backtrack_steps"] == pgd["backtrack_steps"]
    assert ours["alpha"] is pgd["alpha"] is None  # both default to eps * 20/51
    assert ours["batch_size"] == square["batch_size"] == pgd["batch_size"]


def test_square_starts_like_the_calibration_square_attack():
    """Both start at the clean image and propose one random +-eps window first, from the same
    random stream: where both accepted their first candidate, it is the same image. With the
    stripes (the unmatched reference start) every pixel moves instead."""
    model = tiny_model(0)
    x = images(1, 24)
    eps, p_init = 0.3, 0.3
    ours = ordinary_attack(model, x, method="square", eps=eps, iterations=1, p_init=p_init,
                           seed=3)
    theirs = square_attack(model, x, kind="oca", eps=eps, iterations=1, p_init=p_init, seed=3,
                           oca_confidence=1.0)  # no sample succeeds at the clean point
    a, b = changed(x, ours.x_adv), changed(x, theirs.x_adv)
    assert int((a & b).sum()) >= 1
    assert torch.equal(ours.x_adv[a & b], theirs.x_adv[a & b])
    side = square_side(p_schedule(p_init, 0, 1), 8, 8)
    moved = (ours.x_adv != x).flatten(1).sum(1)
    assert bool((moved <= side * side).all())  # one window, not the whole image
    stripes = ordinary_attack(model, x, method="square", eps=eps, iterations=1, p_init=p_init,
                              seed=3, stripes_init=True)
    assert bool(((stripes.x_adv != x).flatten(1).sum(1) > side * side).all())


def test_pgd_starts_like_the_calibration_pgd_attack():
    """No random start: the first step leaves the clean image along the gradient there, with
    the calibration PGD's sparsification, step and random stream (UCA ascends the same
    cross-entropy), so the first candidates coincide."""
    model = tiny_model(0)
    x = images(1, 24)
    ours = ordinary_attack(model, x, method="pgd", eps=0.3, iterations=1, seed=3)
    theirs = pgd_attack(model, x, kind="uca", eps=0.3, iterations=1, seed=3, uca_margin=0.0)
    a, b = changed(x, ours.x_adv), changed(x, theirs.x_adv)
    assert int((a & b).sum()) >= 1
    assert torch.equal(ours.x_adv[a & b], theirs.x_adv[a & b])
    # Zero steps of the ordinary attack would be the clean image: after one step the
    # perturbation is one sparse step of alpha (about 5% of the coordinates), not a dense
    # random start.
    frac = ((ours.x_adv != x).flatten(1).float().mean(1))[a]
    assert float(frac.max()) < 0.25


@pytest.mark.parametrize("kwargs,name", [
    ({"method": "cw"}, "method"),
    ({"norm": "l1"}, "norm"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -0.1}, "eps"),
    ({"iterations": 0}, "iterations"),
    ({"seed": 1.5}, "seed"),
    ({"alpha": -1.0}, "alpha"),
    ({"p_init": 2.0}, "p_init"),
    ({"stripes_init": "yes"}, "stripes_init"),
    ({"norm": "l2", "eps": 1.0, "stripes_init": True}, "stripes_init"),
    ({"method": "pgd", "drop": 1.0}, "drop"),
    ({"method": "pgd", "sparsify": 1}, "sparsify"),
    ({"method": "pgd", "backtrack_steps": -1}, "backtrack_steps"),
])
def test_ordinary_attack_rejects_bad_arguments(kwargs, name):
    args = {"method": "square", "norm": "linf", "eps": 0.1, "iterations": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        ordinary_attack(tiny_model(0), images(0, 2), **args)


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"\['square', 'pgd'\]"):
        ordinary_attack(tiny_model(0), images(0, 2), method="fgsm", eps=0.1, iterations=1)
