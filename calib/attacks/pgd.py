"""White-box attacks: projected gradient descent on the confidence, and ordinary L-inf PGD.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
(arXiv:1706.06083), adapted to calibration attacks as in Obadinma et al. (arXiv:2401.02718),
SPEC §5: the gradient of CE(f(x~), k) with respect to the input, k the clean prediction;
UCA ascends it, OCA descends it, RCA and MMA choose per sample.

Distance: L-inf (sign steps) or L2 (normalised-gradient steps); every candidate is projected
onto the eps-ball and [0, 1], including after the optional dropout-style sparsification of
the step (the released code's sparsification left the ball; SPEC Decision).

Each iteration is one forward and backward pass per active sample at the candidate: if the
candidate is accepted its gradient drives the next step and the sample's step doubles (up to
``alpha``); otherwise the sample keeps the gradient of its current best input and halves its
step (down to ``alpha / 2**backtrack_steps``). This is a backtracking line search spread over
iterations: a UCA step that jumps over the decision boundary is retried shorter instead of
stalling the sample. (UCA at eps = 0.05 on a Fashion-MNIST ResNet-18, 100 images, 100
steps without sparsification: 12% success without backtracking, 83% with it.)

:func:`pgd_linf` is the ordinary (misclassification) L-inf PGD of Madry et al.: PGD adversarial
training (:class:`calib.defences.training.PGDATStep`) trains on it and the detection analysis
(:mod:`calib.attacks.ordinary`) compares the calibration attacks with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calib.attacks.base import (
    MODE_RCA,
    MODE_UCA,
    AttackResult,
    AttackState,
    Thresholds,
    check_common,
    check_min_margin,
    execute,
)
from calib.checks import (
    check_bool,
    check_eps,
    check_int,
    check_number,
    check_zero_gradients,
    vanishing_gradients,
)
from calib.runtime import eval_mode

#: Default number of gradient steps.
DEFAULT_ITERATIONS: int = 100

#: Default step as a fraction of eps: 5/255 at eps = 0.05, the paper's setting.
ALPHA_PER_EPS: float = 20 / 51


def input_gradient(model: nn.Module, x: torch.Tensor, k: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and the gradient of ``sum_i CE(f(x_i), k_i)`` w.r.t. ``x`` (B, C, H, W).

    Only the input gets a gradient; the model's parameters keep ``.grad`` untouched.

    Args:
        model: the classifier.
        x: inputs (B, C, H, W).
        k: (B,) classes of the cross-entropy; default the argmax at ``x``.
    """
    x_var = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_var)
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        k = z.detach().argmax(1) if k is None else k
        (grad,) = torch.autograd.grad(F.cross_entropy(z, k, reduction="sum"), x_var)
    return logits.detach(), grad


def project(x_clean: torch.Tensor, x: torch.Tensor, *, eps: float, norm: str) -> torch.Tensor:
    """Project ``x`` (B, C, H, W) onto the eps-ball around ``x_clean``, then onto [0, 1]."""
    delta = x - x_clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        length = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * (eps / length.clamp_min(1e-12)).clamp(max=1.0)
    return (x_clean + delta).clamp(0, 1)


def step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of a PGD step for gradients ``grad`` (B, C, H, W).

    L-inf: ``sign(grad)`` (Madry et al. 2018); L2: ``grad / ||grad||_2`` per sample.
    """
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def pgd_linf(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
             alpha: float, steps: int, random_start: bool = True,
             generator: torch.Generator | None = None, check_gradients: bool = True
             ) -> torch.Tensor:
    """Ordinary L-inf PGD (Madry et al. 2018, arXiv:1706.06083): maximise CE on ``labels``.

    Unlike the calibration attacks there is no label-preservation rule: this is the
    misclassification attack that PGD adversarial training trains on (with the true labels)
    and that the detection analysis runs on the clean predictions. Every step is
    ``x <- clip(x + alpha * sign(grad_x CE(f(x), labels)))``, and all steps run (no early
    stop). The model is run in eval mode (its modes are restored afterwards) and its
    parameters get no gradients.

    Args:
        model: images in [0, 1] (N, C, H, W) -> logits (N, K).
        images: (N, C, H, W) clean images in [0, 1].
        labels: (N,) the classes whose cross-entropy is ascended.
        eps: L-inf radius on the [0, 1] scale.
        alpha: step size.
        steps: number of signed-gradient ascent steps.
        random_start: start from a uniform point of the eps-ball.
        generator: CPU generator for the random start (seeded by the caller).
        check_gradients: warn (:class:`~calib.checks.GradientMaskingWarning`) when the
            gradient of the first step vanishes on some samples; adversarial training, which
            calls this every step, turns it off.

    Returns:
        (N, C, H, W) adversarial images, detached, inside the eps-ball and [0, 1].
    """
    check_eps(eps, "linf")
    check_number("alpha", alpha, low=0, low_open=True)
    check_int("steps", steps, minimum=0)
    x0 = images.detach()
    x = x0.clone()
    if check_bool("random_start", random_start):
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype)
        x = (x0 + (2 * noise.to(x0.device) - 1) * eps).clamp(0, 1)
    with eval_mode(model), torch.enable_grad():
        for step in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), labels)
            (grad,) = torch.autograd.grad(loss, x)
            if step == 0 and check_bool("check_gradients", check_gradients):
                check_zero_gradients(vanishing_gradients(grad), context="ordinary PGD L-inf",
                                     stacklevel=4)
            with torch.no_grad():
                x = x + alpha * step_direction(grad, "linf")
                # Clipped to the box [x0 - eps, x0 + eps] directly rather than through
                # project's x0 + clamp(x - x0): the two round differently, and PGD-AT
                # models and the detection results are computed with this one.
                x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
    return x.detach()


def _chunk_loop(model: nn.Module, *, norm: str, eps: float, iterations: int, alpha: float,
                sparsify: bool, drop_uca: float, drop_oca: float, backtrack_steps: int,
                vanished: list[torch.Tensor]):
    """The per-chunk PGD loop bound to its settings (see :func:`pgd_attack`).

    Appends each chunk's :func:`~calib.checks.vanishing_gradients` flags at the clean images
    to ``vanished`` (the first gradient is needed anyway, so the check costs nothing).
    """
    floor = alpha * 0.5**backtrack_steps

    def attack_chunk(x: torch.Tensor, make_state, generator: torch.Generator, bar: Any
                     ) -> AttackState:
        logits, grad_best = input_gradient(model, x)
        vanished.append(vanishing_gradients(grad_best))
        state = make_state(logits)
        step = torch.full((x.shape[0],), alpha, dtype=x.dtype, device=x.device)
        for _ in range(iterations):
            idx = state.active()
            if idx.numel() == 0:
                break
            mode = state.mode[idx]
            # Ascending CE(., k) lowers p_k: UCA, and RCA samples above their target.
            lower = (mode == MODE_UCA) | (
                (mode == MODE_RCA) & (state.confidence[idx] > state.target[idx]))
            direction = step_direction(grad_best.index_select(0, idx), norm)
            if sparsify:
                drop = torch.where(lower, drop_uca, drop_oca).to(x.dtype).view(-1, 1, 1, 1)
                keep = torch.rand(direction.shape, generator=generator, device=x.device,
                                  dtype=x.dtype) >= drop
                direction = direction * keep / (1 - drop)
            signed = torch.where(lower, step[idx], -step[idx]).view(-1, 1, 1, 1)
            cand = project(x.index_select(0, idx),
                           state.x_best.index_select(0, idx) + signed * direction,
                           eps=eps, norm=norm)
            logits, grad = input_gradient(model, cand, state.k[idx])
            accepted, _ = state.consider(idx, cand, logits)
            local = accepted.nonzero().squeeze(1)
            grad_best.index_copy_(0, idx[local], grad.index_select(0, local))
            # Backtracking spread over iterations: halve after a rejection, regrow after an
            # acceptance, so a sample near the boundary neither stalls nor crawls.
            step[idx] = torch.where(accepted, (step[idx] * 2).clamp_max(alpha),
                                    (step[idx] * 0.5).clamp_min(floor))
            state.record()
            bar.update(1)
        return state

    return attack_chunk


def pgd_attack(
    model: nn.Module,
    images: torch.Tensor,
    *,
    kind: str,
    norm: str = "linf",
    eps: float = 0.05,
    iterations: int | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    alpha: float | None = None,
    sparsify: bool = True,
    drop_uca: float = 0.95,
    drop_oca: float = 0.1,
    backtrack_steps: int = 8,
    uca_margin: float = 0.1,
    oca_confidence: float = 0.99,
    rca_tolerance: float = 0.05,
    uca_objective: str = "margin",
    min_margin: float = 1e-4,
    batch_size: int = 256,
    show_progress: bool = False,
) -> AttackResult:
    """White-box calibration attack (UCA, OCA, MMA or RCA) by projected gradient steps.

    Paper: Obadinma et al. 2024 (arXiv:2401.02718), PGD variant (SPEC §5). Step
    ``x <- Proj(x +- alpha * sign(grad_x CE(f(x), k)))`` (L2: the normalised gradient),
    accepted per sample iff the objective improves and the argmax stays ``k``.

    Args:
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K); evaluated in eval mode
            (modes restored); only input gradients are computed.
        images: (N, C, H, W) float images in [0, 1] on the model's device.
        kind: "uca", "oca", "mma" or "rca".
        norm: "linf" or "l2".
        eps: radius of the ball (paper: 0.05, L-inf).
        iterations: number of gradient steps (default :data:`DEFAULT_ITERATIONS`); queries
            per sample = steps taken + 1.
        labels: (N,) true labels; needed for "mma".
        seed: seed of the run's own ``torch.Generator`` (drives the sparsification masks).
        alpha: initial step (default ``eps * 20/51``, i.e. the paper's 5/255 at eps = 0.05).
        sparsify: drop each step coordinate with probability ``drop_uca`` (steps lowering the
            confidence) or ``drop_oca`` (raising it) and rescale the rest, dropout-style, as
            the released code does; the candidate is projected afterwards in any case. (It
            trades speed for exploration: UCA at eps = 0.05 on a Fashion-MNIST ResNet-18
            reached 82% success after 100 steps with it, 83% after 20 steps without.)
        drop_uca, drop_oca: drop probabilities (released code: 0.95 and 0.1).
        backtrack_steps: a rejected candidate halves the sample's step (down to
            ``alpha / 2**backtrack_steps``); an accepted one doubles it (up to ``alpha``).
        uca_margin, oca_confidence, rca_tolerance: success thresholds (SPEC §3).
        uca_objective: "margin" (SPEC §3) or "confidence": UCA samples minimise ``p_k`` for
            the whole budget instead of stopping at ``uca_margin`` (the push-to-the-bound
            variant; :class:`~calib.attacks.base.Thresholds`).
        min_margin: a candidate keeps the label only if ``p_k`` beats the runner-up by more
            than this.
        batch_size: images attacked together (bounds memory).
        show_progress: show a tqdm progress bar.

    Returns:
        An :class:`~calib.attacks.base.AttackResult`.

    Example:
        >>> result = pgd_attack(model, images, kind="oca", eps=0.05, iterations=50)
        >>> result.success.float().mean()
    """
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    images, eps = check_common(model, images, kind=kind, norm=norm, eps=eps,
                               iterations=iterations, labels=labels, seed=seed,
                               batch_size=batch_size)
    alpha = check_number("alpha", eps * ALPHA_PER_EPS if alpha is None else alpha, low=0,
                         high=math.inf, low_open=True, high_open=True)
    check_bool("sparsify", sparsify)
    drop_uca = check_number("drop_uca", drop_uca, low=0, high=1, high_open=True)
    drop_oca = check_number("drop_oca", drop_oca, low=0, high=1, high_open=True)
    check_int("backtrack_steps", backtrack_steps, minimum=0)
    thresholds = Thresholds(uca_margin=uca_margin, oca_confidence=oca_confidence,
                            rca_tolerance=rca_tolerance, uca_objective=uca_objective)
    min_margin = check_min_margin(min_margin)
    options = {"alpha": alpha, "sparsify": sparsify, "drop_uca": drop_uca,
               "drop_oca": drop_oca, "backtrack_steps": backtrack_steps,
               "uca_margin": uca_margin, "oca_confidence": oca_confidence,
               "rca_tolerance": rca_tolerance, "uca_objective": uca_objective,
               "min_margin": min_margin, "batch_size": batch_size}
    vanished: list[torch.Tensor] = []
    loop = _chunk_loop(model, norm=norm, eps=eps, iterations=iterations, alpha=alpha,
                       sparsify=sparsify, drop_uca=drop_uca, drop_oca=drop_oca,
                       backtrack_steps=backtrack_steps, vanished=vanished)
    result = execute(model, images, attack_chunk=loop, kind=kind, method="pgd", norm=norm,
                     eps=eps, iterations=iterations, labels=labels, seed=seed,
                     thresholds=thresholds, min_margin=min_margin, batch_size=batch_size,
                     show_progress=show_progress, options=options)
    result.zero_gradient = torch.cat(vanished)
    check_zero_gradients(result.zero_gradient,
                         context=f"PGD {'L-inf' if norm == 'linf' else 'L2'} {kind.upper()}")
    return result
