"""Calibration attacks: UCA, OCA, MMA and RCA, black-box (Square) and white-box (PGD).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks: A Comprehensive Study of Adversarial
Attacks on Model Confidence" (TMLR; arXiv:2401.02718). One entry point,
:func:`run_attack`, dispatches to :func:`square_attack` and :func:`pgd_attack`; each
returns an :class:`AttackResult` with the adversarial images, per-sample outcomes and the
per-iteration history.

Example:
    >>> from calib.attacks import run_attack
    >>> result = run_attack(model, images, kind="uca", method="square", eps=0.05,
    ...                     iterations=1000, labels=labels)
    >>> result.summary()["ece_after"], result.curve(points=50)["ece"]
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from calib.attacks.base import (
    KINDS,
    METHODS,
    NORMS,
    AttackHistory,
    AttackResult,
    Thresholds,
)
from calib.attacks.pgd import pgd_attack
from calib.attacks.square import square_attack
from calib.checks import check_choice

__all__ = [
    "KINDS",
    "METHODS",
    "NORMS",
    "AttackHistory",
    "AttackResult",
    "Thresholds",
    "method_options",
    "pgd_attack",
    "run_attack",
    "square_attack",
]

_ATTACKS = {"square": square_attack, "pgd": pgd_attack}
_COMMON = ("model", "images", "kind", "norm", "eps", "iterations", "labels", "seed")


def method_options(method: str) -> dict[str, Any]:
    """The options a method accepts through ``run_attack(**options)``, with their defaults."""
    check_choice("method", method, METHODS)
    params = inspect.signature(_ATTACKS[method]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON}


def run_attack(model: nn.Module, images: torch.Tensor, *, kind: str, method: str = "square",
               norm: str = "linf", eps: float = 0.05, iterations: int | None = None,
               labels: torch.Tensor | None = None, seed: int = 0, **options: Any
               ) -> AttackResult:
    """Run one calibration attack on ``images`` (N, C, H, W) in [0, 1].

    Args:
        model: any ``nn.Module`` mapping images in [0, 1] to logits (N, K).
        images: (N, C, H, W) floating images in [0, 1] on the model's device.
        kind: "uca" (underconfidence), "oca" (overconfidence), "mma" (maximum
            miscalibration, needs ``labels``) or "rca" (random confidence).
        method: "square" (black-box, score-based) or "pgd" (white-box).
        norm: "linf" or "l2".
        eps: radius of the perturbation ball (paper: 0.05, L-inf, [0, 1] scale).
        iterations: budget; None picks the method's default (square: 1000 queries, pgd: 100
            gradient steps).
        labels: (N,) true labels (required for "mma"; used by summaries and curves).
        seed: seed of the attack's own random generator.
        **options: method options, see :func:`method_options` (e.g. square: ``p_init``,
            ``stripes_init``, ``backtrack_steps``; pgd: ``alpha``, ``sparsify``; both:
            ``uca_margin``, ``oca_confidence``, ``rca_tolerance``, ``uca_objective``
            ("margin", or "confidence": UCA minimises p_k for the whole budget),
            ``min_margin``, ``batch_size``, ``show_progress``).

    Returns:
        An :class:`AttackResult`.

    Raises:
        ValueError: unknown kind, method, norm or option, or invalid values, before any work.
    """
    check_choice("method", method, METHODS)
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}; "
                         f"allowed: {sorted(allowed)}")
    return _ATTACKS[method](model, images, kind=kind, norm=norm, eps=eps,
                            iterations=iterations, labels=labels, seed=seed, **options)
