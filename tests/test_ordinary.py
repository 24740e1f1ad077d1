"""Tests for calib.attacks.ordinary (ordinary Square Attack and PGD, the reference attacks of
the detection analysis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import centred_conv as tiny_model
from tiny_models import images

from calib import checks
from calib.attacks.ordinary import margin_loss, ordinary_attack

pytestmark = pytest.mark.usefixtures("one_thread")


def test_margin_loss():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    k = torch.tensor([0, 0])
    torch.testing.assert_close(margin_loss(z, k), torch.tensor([1.0, -5.0]))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["linf", "l2"]),
       eps=st.floats(0.02, 0.5), channels=st.sampled_from([1, 3]))
def test_ordinary_square_stays_in_the_ball(seed, norm, eps, channels):
    model = tiny_model(seed % 7, channels=channels)
    x = images(seed, 5, channels=channels)
    eps = eps if norm == "linf" else 4 * eps
    out = ordinary_attack(model, x, method="square", norm=norm, eps=eps, iterations=15,
                          seed=seed, p_init=0.3)
    assert bool(checks.within_eps_ball(x, out.x_adv, eps=eps, norm=norm).all())
    assert bool((out.queries >= 1).all()) and bool((out.queries <= 16).all())
    with torch.no_grad():
        final = model(out.x_adv).argmax(1)
        clean = model(x).argmax(1)
    assert torch.equal(out.final_prediction, final)
    assert torch.equal(out.success, final != clean)
    # A sample stops being queried once it flipped: the unflipped ones used the whole budget.
    assert bool((out.queries[~out.success] == 16).all())


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
    assert a.summary()["success_rate"] == pytest.approx(float(a.success.float().mean()))
    # Successful samples needed fewer queries than the budget allows.
    assert bool((a.queries[a.success] < 61).all())


def test_ordinary_pgd_stays_in_the_ball_and_is_seeded():
    model = tiny_model(2)
    x = images(2, 16)
    a = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=10, alpha=0.05, seed=1)
    b = ordinary_attack(model, x, method="pgd", eps=0.2, iterations=10, alpha=0.05, seed=1)
    assert torch.equal(a.x_adv, b.x_adv)
    assert bool(checks.within_eps_ball(x, a.x_adv, eps=0.2, norm="linf").all())
    assert bool((a.queries == 11).all())
    assert float(a.success.float().mean()) >= 0.5


@pytest.mark.parametrize("kwargs,name", [
    ({"method": "cw"}, "method"),
    ({"norm": "l1"}, "norm"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -0.1}, "eps"),
    ({"method": "pgd", "norm": "l2"}, "norm"),
    ({"iterations": 0}, "iterations"),
    ({"seed": 1.5}, "seed"),
    ({"alpha": -1.0}, "alpha"),
    ({"p_init": 2.0}, "p_init"),
    ({"stripes_init": "yes"}, "stripes_init"),
])
def test_ordinary_attack_rejects_bad_arguments(kwargs, name):
    args = {"method": "square", "norm": "linf", "eps": 0.1, "iterations": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        ordinary_attack(tiny_model(0), images(0, 2), **args)
