"""Sanity checks on inputs, models and attack outputs (in the spirit of auto-attack's checks).

The ``check_*`` functions validate arguments and raise :class:`ValueError` (or warn) before
any expensive work starts; each message names the argument and what it may be. The scalar
vocabulary (:func:`check_choice`, :func:`check_int`, :func:`check_number`, :func:`check_bool`)
serves every module's options. The predicates (:func:`label_preserved`, :func:`within_eps_ball`,
:func:`parameters_unchanged`, ...) verify the invariants every calibration attack promises
(SPEC §3): the predicted label is kept, the perturbation stays inside the eps-ball and [0, 1],
and the attacked model is left exactly as it was. The tests use them as helpers, and so can a
practitioner auditing their own attack run.
:func:`vanishing_gradients` and :func:`check_zero_gradients` flag gradient masking: every
white-box attack checks the input gradient at the clean images and warns when it vanishes.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from calib.runtime import predict_logits

#: Tolerance used when comparing a perturbation with its budget eps.
EPS_ATOL: float = 1e-6


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ValueError naming both."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_choices(name: str, value: object, allowed: Sequence[str]) -> list[str]:
    """A non-empty sequence (not a string) whose items are all in ``allowed``; else ValueError."""
    if isinstance(value, str) or not value or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a non-empty sequence of {list(allowed)}, "
                         f"got {value!r}")
    return [check_choice(f"{name} item", item, allowed) for item in value]


def check_int(name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in [minimum, maximum] (either bound may
    be None); otherwise raise a ValueError naming the argument and the allowed range.

    Booleans are rejected (``True`` is an int to Python, never a count to a caller).
    """
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if valid and ((minimum is not None and value < minimum)
                  or (maximum is not None and value > maximum)):
        valid = False
    if not valid:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = {None: "an integer", 0: "a non-negative integer",
                       1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_number(name: str, value: object, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False
                 ) -> float:
    """Return ``value`` as a float if it is a real number within the bounds; otherwise raise a
    ValueError naming the argument and the allowed range.

    Args:
        name: the argument's name, for the message.
        value: the value to check; booleans and NaN are rejected.
        low, high: the bounds (None: unbounded on that side).
        low_open, high_open: exclude the bound itself (``low=0, low_open=True``: positive).
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if number else math.nan  # type: ignore[arg-type]
    below = low is not None and (v < low or (low_open and v == low))
    above = high is not None and (v > high or (high_open and v == high))
    if math.isnan(v) or below or above:
        if low is not None and high is not None:
            allowed = (f"in {'(' if low_open else '['}{low}, {high}"
                       f"{')' if high_open else ']'}")
        elif low is not None:
            allowed = "positive" if low == 0 and low_open else \
                f"{'>' if low_open else '>='} {low}"
        elif high is not None:
            allowed = f"{'<' if high_open else '<='} {high}"
        else:
            allowed = "a number"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool; otherwise raise a ValueError naming the argument."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_images(images: object, *, name: str = "images") -> torch.Tensor:
    """Validate a batch of images: a floating tensor (N, C, H, W), N >= 1, finite, in [0, 1].

    Returns:
        The tensor itself (not a copy).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (normalisation belongs inside the model); "
            f"got values in [{lo:.4g}, {hi:.4g}]")
    return images


def check_labels(labels: object, n: int, *, num_classes: int | None = None,
                 name: str = "labels") -> torch.Tensor:
    """Validate integer class labels of shape (n,), optionally within [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if num_classes is not None and n > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for a model with {num_classes} "
                f"classes, got values in [{lo}, {hi}]")
    return labels


def check_eps(eps: object, norm: str) -> float:
    """Validate the perturbation budget: 0 < eps <= 1 for "linf", 0 < eps < inf for "l2"."""
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0.0:
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if norm == "linf" and eps > 1.0:
        raise ValueError(f"eps must be in (0, 1] for norm='linf' on [0, 1] images, got {eps}")
    return eps


def check_logits(logits: torch.Tensor, n: int) -> int:
    """Validate a model's output on n images: logits (n, K) with K >= 2, all finite.

    Warns (see :func:`check_logits_not_probs`) when the rows look like probabilities.

    Returns:
        K, the number of classes.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model must return a tensor of logits, got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise ValueError(
            f"the model must map (N, C, H, W) images to logits (N, K) with K >= 2; "
            f"got output shape {tuple(logits.shape)} for N = {n}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model returned NaN or infinite logits")
    check_logits_not_probs(logits)
    return int(logits.shape[1])


def check_logits_not_probs(logits: torch.Tensor, *, atol: float = 1e-4) -> bool:
    """Warn if ``logits`` (N, K) look like probabilities (rows in [0, 1] summing to 1).

    Calibration attacks apply a softmax themselves; feeding them probabilities squashes the
    confidences towards 1/K and silently changes every objective.

    Returns:
        True if the output looks like probabilities (a warning was issued).
    """
    z = logits.detach().double()
    in_unit = bool(((z >= 0) & (z <= 1)).all())
    sums_to_one = bool(((z.sum(-1) - 1).abs() <= atol).all())
    if in_unit and sums_to_one:
        warnings.warn(
            "the model output looks like probabilities (rows in [0, 1] summing to 1); "
            "calibration attacks expect logits, so remove the final softmax",
            UserWarning, stacklevel=3)
        return True
    return False


def perturbation_norms(clean: torch.Tensor, adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of ``adv - clean`` (both (N, C, H, W)); float64 (N,) on the CPU."""
    check_choice("norm", norm, ("linf", "l2"))
    delta = (adv.detach().double() - clean.detach().double()).flatten(1)
    out = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    return out.cpu()


def within_eps_ball(clean: torch.Tensor, adv: torch.Tensor, *, eps: float, norm: str,
                    atol: float = EPS_ATOL) -> torch.Tensor:
    """Per-sample bool (N,): ``adv`` is in [0, 1] and within ``eps + atol`` of ``clean``."""
    in_range = ((adv >= 0) & (adv <= 1)).flatten(1).all(1).cpu()
    return in_range & (perturbation_norms(clean, adv, norm) <= eps + atol)


def label_preserved(model: nn.Module, clean: torch.Tensor, adv: torch.Tensor, *,
                    batch_size: int = 256) -> torch.Tensor:
    """Per-sample bool (N,) on the CPU: the model predicts the same class on ``adv`` as on
    ``clean`` (both (N, C, H, W)), in eval mode."""
    before = predict_logits(model, clean, batch_size=batch_size).argmax(1)
    after = predict_logits(model, adv, batch_size=batch_size).argmax(1)
    return before == after


def parameters_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer of ``model``."""
    return {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}


def parameters_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True if every parameter and buffer still equals ``snapshot`` bitwise."""
    state = model.state_dict(keep_vars=True)
    if state.keys() != snapshot.keys():
        return False
    return all(torch.equal(state[k].detach(), v) for k, v in snapshot.items())


def check_deterministic(model: nn.Module, images: torch.Tensor, *, n: int = 8) -> bool:
    """Warn if two eval-mode forward passes on the first ``n`` images disagree.

    Score-based attacks compare the model's outputs across queries; a randomised model (e.g.
    dropout kept on at test time) makes every comparison noise.

    Returns:
        True if the outputs agreed (up to floating-point noise of the kernels).
    """
    probe = images[:n]
    first, second = predict_logits(model, probe), predict_logits(model, probe)
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        warnings.warn(
            "the model gives different outputs for the same input in eval mode; attacks and "
            "their acceptance rule assume a deterministic model", UserWarning, stacklevel=3)
        return False
    return True


#: A per-sample input gradient whose largest entry is at most this is treated as vanished.
#: A model whose output does depend on its input has gradients many orders above it (about
#: 1e-4 to 1 per pixel for the CE of a trained CNN on [0, 1] images); a clamped or quantised
#: output gives exactly 0 or float noise around 1e-17.
VANISHING_GRADIENT_ATOL: float = 1e-12


class GradientMaskingWarning(UserWarning):
    """White-box gradients vanish on some inputs: a gradient attack there measures nothing."""


def vanishing_gradients(grad: torch.Tensor, *, atol: float = VANISHING_GRADIENT_ATOL
                        ) -> torch.Tensor:
    """Per-sample bool (B,) on the CPU: the input gradient ``grad`` (B, ...) has vanished.

    As auto-attack's ``check_zero_gradients`` (Croce & Hein 2020, arXiv:2003.01690), with a
    tolerance instead of exact zero: a gradient that underflows to 1e-17 steers a sign step
    at random just as a zero one stops it. NaN gradients count as vanished (no direction).
    """
    size = grad.detach().flatten(1).abs().amax(1)
    return (~(size > atol)).cpu()


def check_zero_gradients(vanished: torch.Tensor, *, context: str,
                         stacklevel: int = 3) -> float:
    """Warn (:class:`GradientMaskingWarning`) when any sample's input gradient vanished.

    Args:
        vanished: bool (N,) from :func:`vanishing_gradients`.
        context: what was attacked, for the message (e.g. "PGD L-inf UCA").

    Returns:
        The fraction of samples whose gradient vanished.
    """
    vanished = vanished.detach().reshape(-1).cpu()
    if vanished.numel() == 0:
        return 0.0
    fraction = float(vanished.double().mean())
    if fraction > 0:
        warnings.warn(
            f"{context}: the input gradient vanishes on {int(vanished.sum())} of "
            f"{vanished.numel()} samples ({fraction:.1%}); a gradient attack cannot move "
            "them, so its success rate there is no evidence of robustness (gradient masking,"
            " Athalye et al. 2018). Attack through a differentiable surrogate of the masking "
            "part (BPDA / straight-through) or with a black-box attack (Square) instead.",
            GradientMaskingWarning, stacklevel=stacklevel)
    return fraction
