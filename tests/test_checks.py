"""Tests for calib.checks: argument validation and the attack-invariant predicates."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from calib import checks


class _Noisy(nn.Module):
    """Adds fresh noise on every call, even in eval mode: a randomised model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.randn(x.shape[0], 3)


def _images(n: int = 3, c: int = 1, h: int = 2, w: int = 2) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))


# --- argument checks -------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "match"), [
    ([[0.5]], "torch.Tensor"),
    (torch.rand(2, 3, 4), "4-D"),
    (torch.ones(2, 1, 2, 2, dtype=torch.int64), "floating-point"),
    (torch.rand(0, 1, 2, 2), "empty"),
    (torch.full((1, 1, 2, 2), math.nan), "NaN"),
    (torch.full((1, 1, 2, 2), 1.5), r"\[0, 1\]"),
    (torch.full((1, 1, 2, 2), -0.1), r"\[0, 1\]"),
])
def test_check_images_rejects(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        checks.check_images(bad)


def test_check_images_accepts_and_returns_same_tensor() -> None:
    x = _images()
    assert checks.check_images(x) is x


def test_check_choice_names_allowed_values() -> None:
    assert checks.check_choice("kind", "uca", ("uca", "oca")) == "uca"
    with pytest.raises(ValueError, match=r"kind must be one of \['uca', 'oca'\]"):
        checks.check_choice("kind", "xyz", ("uca", "oca"))


@pytest.mark.parametrize(("value", "bounds", "match"), [
    (0, {"minimum": 1}, r"steps must be a positive integer, got 0"),
    (-1, {"minimum": 0}, r"steps must be a non-negative integer, got -1"),
    (2, {"minimum": 3}, r"steps must be an integer >= 3, got 2"),
    (5, {"minimum": 1, "maximum": 4}, r"steps must be an integer in \[1, 4\], got 5"),
    (5, {"maximum": 4}, r"steps must be an integer <= 4, got 5"),
    (1.0, {}, r"steps must be an integer, got 1.0"),
    (True, {"minimum": 0}, r"steps must be a non-negative integer, got True"),
    ("3", {}, r"steps must be an integer, got '3'"),
])
def test_check_int_names_the_argument_and_range(value: object, bounds: dict, match: str
                                                ) -> None:
    with pytest.raises(ValueError, match=match):
        checks.check_int("steps", value, **bounds)


def test_check_int_accepts_integers_in_range() -> None:
    assert checks.check_int("seed", -3) == -3
    assert checks.check_int("steps", 0, minimum=0) == 0
    assert checks.check_int("k", 4, minimum=2, maximum=4) == 4


@pytest.mark.parametrize(("value", "bounds", "match"), [
    (0.0, {"low": 0, "low_open": True}, r"tau must be positive, got 0.0"),
    (-1, {"low": 0}, r"tau must be >= 0, got -1"),
    (1.0, {"low": 1, "low_open": True}, r"tau must be > 1, got 1.0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, r"tau must be in \[0, 1\), got 1.0"),
    (0, {"low": 0, "high": 1, "low_open": True}, r"tau must be in \(0, 1\], got 0"),
    (2.0, {"high": 1}, r"tau must be <= 1, got 2.0"),
    (1.0, {"high": 1, "high_open": True}, r"tau must be < 1, got 1.0"),
    (math.nan, {}, r"tau must be a number, got nan"),
    (math.nan, {"low": 0}, r"tau must be >= 0, got nan"),
    (math.inf, {"low": 0, "high": math.inf, "high_open": True}, r"tau must be in \[0, inf\)"),
    (True, {}, r"tau must be a number, got True"),
    ("0.5", {"low": 0}, r"tau must be >= 0, got '0.5'"),
])
def test_check_number_names_the_argument_and_range(value: object, bounds: dict, match: str
                                                   ) -> None:
    with pytest.raises(ValueError, match=match):
        checks.check_number("tau", value, **bounds)


def test_check_number_accepts_and_returns_floats() -> None:
    assert checks.check_number("x", 1, low=0, high=1) == 1.0
    assert isinstance(checks.check_number("x", 1, low=0, high=1), float)
    assert checks.check_number("x", math.inf, low=0) == math.inf
    assert checks.check_number("x", -2.5) == -2.5


def test_check_bool() -> None:
    assert checks.check_bool("bpda", False) is False
    with pytest.raises(ValueError, match=r"bpda must be True or False, got 'yes'"):
        checks.check_bool("bpda", "yes")
    with pytest.raises(ValueError, match="bpda"):
        checks.check_bool("bpda", 1)


@pytest.mark.parametrize(("labels", "match"), [
    (torch.zeros(2, dtype=torch.int64), r"shape \(3,\)"),
    (torch.zeros(3, 1, dtype=torch.int64), r"shape \(3,\)"),
    (torch.zeros(3), "integer"),
    (torch.tensor([0, 1, 5]), r"\[0, 4\)"),
    (torch.tensor([0, -1, 2]), r"\[0, 4\)"),
    ([0, 1, 2], "torch.Tensor"),
])
def test_check_labels_rejects(labels: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        checks.check_labels(labels, 3, num_classes=4)


@pytest.mark.parametrize(("eps", "norm"), [(0.0, "linf"), (-0.1, "l2"), (1.5, "linf"),
                                           (math.inf, "l2"), (math.nan, "linf"),
                                           ("0.1", "linf"), (True, "linf")])
def test_check_eps_rejects(eps: object, norm: str) -> None:
    with pytest.raises(ValueError, match="eps"):
        checks.check_eps(eps, norm)


def test_check_eps_allows_large_l2() -> None:
    assert checks.check_eps(3, "l2") == 3.0
    assert checks.check_eps(1, "linf") == 1.0


def test_check_logits_shape_and_values() -> None:
    assert checks.check_logits(torch.randn(4, 3), 4) == 3
    with pytest.raises(ValueError, match="K >= 2"):
        checks.check_logits(torch.randn(4, 1), 4)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        checks.check_logits(torch.randn(3, 5), 4)
    with pytest.raises(ValueError, match="NaN"):
        checks.check_logits(torch.tensor([[0.0, math.inf]]), 1)


def test_probabilities_warn_and_logits_do_not() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not checks.check_logits_not_probs(logits)
    with pytest.warns(UserWarning, match="probabilities"):
        assert checks.check_logits_not_probs(logits.softmax(1))


# --- invariant predicates --------------------------------------------------------------------

def test_perturbation_norms_and_ball() -> None:
    clean = torch.full((2, 1, 2, 2), 0.5)
    adv = clean.clone()
    adv[0, 0, 0, 0] += 0.1
    adv[1] += 0.05
    assert torch.allclose(checks.perturbation_norms(clean, adv, "linf"),
                          torch.tensor([0.1, 0.05], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(checks.perturbation_norms(clean, adv, "l2"),
                          torch.tensor([0.1, 0.1], dtype=torch.float64), atol=1e-7)
    assert checks.within_eps_ball(clean, adv, eps=0.1, norm="linf").tolist() == [True, True]
    assert checks.within_eps_ball(clean, adv, eps=0.07, norm="linf").tolist() == [False, True]
    outside = adv.clone()
    outside[1, 0, 0, 0] = 1.01
    assert checks.within_eps_ball(clean, outside, eps=1.0, norm="l2").tolist() == [True, False]
    with pytest.raises(ValueError, match="norm"):
        checks.perturbation_norms(clean, adv, "l1")


def test_label_preserved_of_identical_inputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = _images(4)
    assert checks.label_preserved(model, x, x, batch_size=3).all()


def test_label_preserved_detects_a_flip() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[1].bias.copy_(torch.tensor([-0.5, 0.5]))
    clean = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1)
    adv = torch.tensor([0.1, 0.1]).view(2, 1, 1, 1)
    assert checks.label_preserved(model, clean, adv).tolist() == [False, True]


def test_parameters_snapshot_detects_changes() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    snap = checks.parameters_snapshot(model)
    assert checks.parameters_unchanged(model, snap)
    model.train()
    model(torch.randn(4, 2))  # updates the BatchNorm running statistics (buffers)
    assert not checks.parameters_unchanged(model, snap)


def test_check_deterministic() -> None:
    x = _images(4, h=2, w=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checks.check_deterministic(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), x)
    with pytest.warns(UserWarning, match="different outputs"):
        assert not checks.check_deterministic(_Noisy(), x)


# --- gradient masking (issue: white-box attacks must say when their gradients vanish) --------

class _Quantised(nn.Module):
    """Logits rounded to integers: the forward pass works, every input gradient is 0."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(self.inner(x) * 4)


class _ClampedAbove(nn.Module):
    """Probabilities clamped at a ceiling (as a spline calibrator's output at 1): inputs whose
    clean confidence is above the ceiling get no gradient, the others keep theirs."""

    def __init__(self, inner: nn.Module, ceiling: float) -> None:
        super().__init__()
        self.inner, self.ceiling = inner, ceiling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        top = torch.softmax(logits, 1).max(1, keepdim=True).values
        return torch.where(top > self.ceiling, logits.detach(), logits)


def test_vanishing_gradients_per_sample() -> None:
    grad = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 1e-17),
                        torch.full((1, 2, 2), 1e-3), torch.full((1, 2, 2), math.nan)])
    assert checks.vanishing_gradients(grad).tolist() == [True, True, False, True]


def test_check_zero_gradients_warns_with_the_fraction_and_a_remedy() -> None:
    with pytest.warns(checks.GradientMaskingWarning, match=r"3 of 4 samples \(75\.0%\)") as rec:
        assert checks.check_zero_gradients(torch.tensor([True, True, True, False]),
                                           context="PGD L-inf UCA") == 0.75
    message = str(rec[0].message)
    assert "BPDA" in message and "black-box" in message and "PGD L-inf UCA" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checks.check_zero_gradients(torch.zeros(5, dtype=torch.bool), context="x") == 0


def test_pgd_warns_on_a_model_with_quantised_logits() -> None:
    from tiny_models import centred_conv, images

    from calib.attacks.pgd import pgd_attack

    model = _Quantised(centred_conv(0))
    with pytest.warns(checks.GradientMaskingWarning, match="PGD L-inf UCA"):
        result = pgd_attack(model, images(1, 12), kind="uca", eps=0.1, iterations=3)
    assert result.zero_gradient.tolist() == [True] * 12
    assert result.summary()["zero_gradient_fraction"] == 1.0


def test_pgd_names_only_the_masked_samples() -> None:
    from tiny_models import centred_conv, images

    from calib.attacks.pgd import pgd_attack

    inner, x = centred_conv(0), images(1, 40)
    with torch.no_grad():
        confidence = torch.softmax(inner(x), 1).max(1).values
    ceiling = float(confidence.median())
    with pytest.warns(checks.GradientMaskingWarning):
        result = pgd_attack(_ClampedAbove(inner, ceiling), x, kind="oca", eps=0.1,
                            iterations=2)
    assert torch.equal(result.zero_gradient, confidence > ceiling)


def test_pgd_on_an_ordinary_model_raises_no_masking_warning() -> None:
    from tiny_models import centred_conv, images

    from calib.attacks.pgd import pgd_attack, pgd_linf

    model, x = centred_conv(0), images(1, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checks.GradientMaskingWarning)
        result = pgd_attack(model, x, kind="uca", eps=0.1, iterations=3)
        pgd_linf(model, x, model(x).argmax(1), eps=0.1, alpha=0.02, steps=2)
    assert result.summary()["zero_gradient_fraction"] == 0.0


def test_ordinary_pgd_warns_and_adversarial_training_does_not() -> None:
    from tiny_models import centred_conv, images

    from calib.attacks.pgd import pgd_linf
    from calib.defences.training import PGDATStep

    model, x = _Quantised(centred_conv(0)), images(1, 8)
    labels = torch.zeros(8, dtype=torch.long)
    with pytest.warns(checks.GradientMaskingWarning, match="ordinary PGD"):
        pgd_linf(model, x, labels, eps=0.1, alpha=0.02, steps=2)
    trainable = centred_conv(1).train()
    step = PGDATStep(eps=0.1, alpha=0.02, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checks.GradientMaskingWarning)
        step(_Quantised(trainable), x, labels,
             torch.optim.SGD(trainable.parameters(), lr=0.0))
