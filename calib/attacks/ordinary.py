"""Ordinary (misclassification) attacks, matched to the calibration attacks for detection.

Paper Table 2 (Obadinma et al., arXiv:2401.02718) compares how detectable calibration attacks
are with how detectable *ordinary* adversarial attacks are. SPEC §10 ("Matched comparisons")
asks that the two be compared on equal terms, so the ordinary attacks here are the calibration
attacks of :mod:`calib.attacks.square` and :mod:`calib.attacks.pgd` with only the objective
and the success rule exchanged. What is matched, per method:

- **eps and norm**: the caller passes the calibration attacks' radius (the detection stage
  passes ``attack.eps``); every candidate is projected onto the same eps-ball and [0, 1].
- **Budget**: the same ``iterations`` (Square: queries, at most ``iterations + 1`` per
  sample, the clean one included; PGD: gradient steps) and the same step options (Square:
  ``p_init`` and its schedule rescaled to the budget; PGD: step ``alpha``, default
  ``eps * 20/51`` as :func:`calib.attacks.pgd.pgd_attack`).
- **Stopping rule**: a sample stops being queried as soon as it is misclassified (its argmax
  differs from the clean prediction), as a calibration attack stops a sample once it reaches
  its success threshold. Nothing runs "all steps".
- **Initialisation**: both start at the clean image. Square: no vertical-stripe
  initialisation (``stripes_init=False``, the calibration attacks' default; with it every
  pixel would start at +-eps); the first candidate is one random +-eps window, as in
  :func:`calib.attacks.square.square_attack`. PGD: no random start; the first step is taken
  from the clean image along the gradient there, as in :func:`calib.attacks.pgd.pgd_attack`.
- **Proposals and acceptance**: the same proposal functions (Square windows; PGD sign or
  normalised-gradient steps on ``CE(f(x), k)`` with the same dropout-style sparsification,
  ``drop`` = the calibration PGD's ``drop_uca``, since ascending that cross-entropy is the UCA
  direction) and the same monotone acceptance: a candidate is kept iff it lowers the
  objective. PGD also shares the calibration PGD's backtracking (a rejected step halves the
  sample's step, an accepted one doubles it back up to ``alpha``).
- **Random stream**: the run's generator lives on the images' device and draws the same N
  leading uniforms the calibration attacks draw for their RCA targets
  (:func:`calib.attacks.base.execute`), so with the same seed and batch size the first
  candidates are the same random proposals (common random numbers): the ordinary Square
  Attack's first window, and the ordinary PGD's first sparsified step (that of a UCA run),
  coincide with the calibration attack's wherever both attack the same samples.

The objective is Square Attack's untargeted margin loss ``z_k - max_{j != k} z_j`` on the
logits (k the clean prediction, not the true label, so that "success" means the same thing for
both families: the predicted label moved); it is negative exactly when the label has flipped.
What differs from a calibration attack is therefore only the objective (push across the
decision boundary instead of moving the confidence) and the acceptance rule (no
label-preservation constraint).

The unmatched textbook variants (Square with stripes; PGD of Madry et al. from a random start
running all its steps, :func:`calib.attacks.pgd.pgd_linf`, which PGD adversarial training uses)
are not used by the detection analysis; the Square stripes remain available as
``stripes_init=True``.

One entry point, :func:`ordinary_attack`, returns an :class:`OrdinaryAttackResult`.

Example:
    >>> out = ordinary_attack(model, images, method="square", eps=0.1, iterations=500,
    ...                       p_init=0.3)
    >>> out.success.float().mean(), out.summary()["l2_mean"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from calib.attacks.pgd import ALPHA_PER_EPS, input_gradient, project, step_direction
from calib.attacks.square import (
    meta_pseudo_gaussian,
    p_schedule,
    propose_l2,
    propose_linf,
    propose_stripes,
    square_side,
    square_side_l2,
)
from calib.checks import (
    check_bool,
    check_choice,
    check_eps,
    check_images,
    check_int,
    check_number,
    check_zero_gradients,
    perturbation_norms,
    vanishing_gradients,
)
from calib.runtime import eval_mode, predict_logits

#: Methods and norms of the ordinary attacks.
ORDINARY_METHODS: tuple[str, ...] = ("square", "pgd")
ORDINARY_NORMS: tuple[str, ...] = ("linf", "l2")


@dataclass
class OrdinaryAttackResult:
    """Outcome of one ordinary attack on N images (tensors other than the images on the CPU).

    Attributes:
        x_adv: (N, C, H, W) adversarial images, same device and dtype as the input, inside
            the eps-ball around the clean images and inside [0, 1].
        success: bool (N,) the model's argmax on ``x_adv`` differs from the clean prediction
            (recomputed from one final forward pass).
        queries: int64 (N,) model evaluations per sample, the clean one included (PGD:
            gradient steps taken + 1; a sample stops once misclassified).
        clean_prediction, final_prediction: int64 (N,) argmax on the clean / adversarial
            images.
        method, norm, eps, iterations, seed: the run's settings.
        x_clean: (N, C, H, W) the clean images (the caller's tensor), for the norms.
        options: the method options the run used (defaults filled in).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    clean_prediction: torch.Tensor
    final_prediction: torch.Tensor
    method: str
    norm: str
    eps: float
    iterations: int
    seed: int
    x_clean: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def linf_norm(self) -> torch.Tensor:
        """Per-sample L-inf norm of the perturbation, float64 (N,)."""
        return perturbation_norms(self._clean(), self.x_adv, "linf")

    def l2_norm(self) -> torch.Tensor:
        """Per-sample L2 norm of the perturbation, float64 (N,)."""
        return perturbation_norms(self._clean(), self.x_adv, "l2")

    def _clean(self) -> torch.Tensor:
        if self.x_clean is None:
            raise ValueError("this result has no x_clean: the norms need the clean images")
        return self.x_clean

    def summary(self) -> dict[str, Any]:
        """Settings and options, success rate, mean queries (over all / successful samples)
        and, when the clean images are known, the mean and max L-inf and L2 norms of the
        perturbations (over all samples, and over successful ones)."""
        won = self.success
        q = self.queries.double()
        out: dict[str, Any] = {
            "method": self.method, "norm": self.norm, "eps": self.eps,
            "iterations": self.iterations, "seed": self.seed, "n": int(q.numel()),
            "success_rate": float(won.double().mean()),
            "queries_mean": float(q.mean()),
            "queries_success_mean": float(q[won].mean()) if bool(won.any()) else None,
            "options": dict(self.options)}
        if self.x_clean is not None:
            for name, values in (("linf", self.linf_norm()), ("l2", self.l2_norm())):
                out[f"{name}_mean"] = float(values.mean())
                out[f"{name}_max"] = float(values.max())
                out[f"{name}_success_mean"] = (float(values[won].mean()) if bool(won.any())
                                               else None)
        return out


def margin_loss(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Square Attack's untargeted margin loss ``z_k - max_{j != k} z_j``, (B,) from (B, K).

    Negative exactly when some other class beats ``k`` (the label has flipped).
    """
    z = logits.detach().float()
    z_k = z.gather(1, k[:, None]).squeeze(1)
    return z_k - z.scatter(1, k[:, None], -math.inf).amax(1)


@torch.no_grad()
def _square_chunk(model: nn.Module, x: torch.Tensor, *, norm: str, eps: float,
                  iterations: int, p_init: float, stripes_init: bool,
                  generator: torch.Generator, **_: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Untargeted Square Attack on one chunk x (B, C, H, W); returns (x_adv, k, queries)."""
    x = x.contiguous()
    b, _, h, w = x.shape
    logits = model(x)
    k = logits.argmax(1)
    best = margin_loss(logits, k)
    x_best = x.clone()
    queries = torch.ones(b, dtype=torch.int64, device=x.device)
    patterns: dict[int, torch.Tensor] = {}
    for t in range(iterations):
        idx = (best >= 0).nonzero().squeeze(1)  # still classified as k: keep attacking
        if idx.numel() == 0:
            break
        p = p_schedule(p_init, t, iterations)
        init = t == 0 and stripes_init and norm == "linf"
        if init:
            x_new = propose_stripes(x.index_select(0, idx), eps, generator)
        elif norm == "linf":
            x_new = x_best.index_select(0, idx)
            propose_linf(x, idx, x_new, eps, square_side(p, h, w), generator)
        else:
            side = square_side_l2(p, h, w)
            if side not in patterns:
                patterns[side] = meta_pseudo_gaussian(side).to(x.device, x.dtype)
            x_new = propose_l2(x.index_select(0, idx), x_best.index_select(0, idx), eps,
                               side, patterns[side], generator)
        loss = margin_loss(model(x_new), k[idx])
        # The reference starts from the stripes unconditionally; later squares must improve.
        accepted = torch.ones_like(loss, dtype=torch.bool) if init else loss < best[idx]
        local = accepted.nonzero().squeeze(1)
        x_best.index_copy_(0, idx[local], x_new.index_select(0, local))
        best[idx[local]] = loss[local]
        queries[idx] += 1
    return x_best, k, queries


def _pgd_chunk(model: nn.Module, x: torch.Tensor, *, norm: str, eps: float, iterations: int,
               alpha: float, sparsify: bool, drop: float, backtrack_steps: int,
               generator: torch.Generator, vanished: list[torch.Tensor], **_: Any
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Misclassification PGD on one chunk x (B, C, H, W) with the calibration PGD's steps
    (:func:`calib.attacks.pgd._chunk_loop`, UCA direction); returns (x_adv, k, queries)."""
    logits, grad_best = input_gradient(model, x)
    vanished.append(vanishing_gradients(grad_best))
    k = logits.argmax(1)
    best = margin_loss(logits, k)
    x_best = x.detach().clone()
    b = x.shape[0]
    queries = torch.ones(b, dtype=torch.int64, device=x.device)
    step = torch.full((b,), alpha, dtype=x.dtype, device=x.device)
    floor = alpha * 0.5**backtrack_steps
    for _ in range(iterations):
        idx = (best >= 0).nonzero().squeeze(1)  # still classified as k: keep attacking
        if idx.numel() == 0:
            break
        direction = step_direction(grad_best.index_select(0, idx), norm)
        if sparsify:
            keep = torch.rand(direction.shape, generator=generator, device=x.device,
                              dtype=x.dtype) >= drop
            direction = direction * keep / (1 - drop)
        cand = project(x.index_select(0, idx),
                       x_best.index_select(0, idx) + step[idx].view(-1, 1, 1, 1) * direction,
                       eps=eps, norm=norm)
        logits, grad = input_gradient(model, cand, k[idx])
        loss = margin_loss(logits, k[idx])
        accepted = loss < best[idx]
        local = accepted.nonzero().squeeze(1)
        rows = idx[local]
        x_best.index_copy_(0, rows, cand.index_select(0, local))
        grad_best.index_copy_(0, rows, grad.index_select(0, local))
        best[rows] = loss[local]
        step[idx] = torch.where(accepted, (step[idx] * 2).clamp_max(alpha),
                                (step[idx] * 0.5).clamp_min(floor))
        queries[idx] += 1
    return x_best.detach(), k, queries


def ordinary_attack(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: str = "square",
    norm: str = "linf",
    eps: float,
    iterations: int,
    seed: int = 0,
    alpha: float | None = None,
    p_init: float = 0.05,
    stripes_init: bool = False,
    sparsify: bool = True,
    drop: float = 0.95,
    backtrack_steps: int = 8,
    batch_size: int = 256,
    show_progress: bool = False,
) -> OrdinaryAttackResult:
    """Run an ordinary (misclassification) attack on ``images`` (N, C, H, W) in [0, 1],
    matched to the calibration attacks (module docstring: same eps, budget, stopping rule,
    initialisation, proposals and random stream; only the objective differs).

    Paper: Square Attack, Andriushchenko et al. 2020 (arXiv:1912.00049); PGD, Madry et al.
    2018 (arXiv:1706.06083), in the calibration attacks' form (Obadinma et al. 2024,
    arXiv:2401.02718; SPEC §4-5, §10). The reference against which Table 2 compares the
    detectability of calibration attacks.

    Args:
        model: images in [0, 1] (N, C, H, W) -> logits (N, K); run in eval mode (its modes
            are restored afterwards, its weights untouched).
        images: (N, C, H, W) clean images in [0, 1] on the model's device.
        method: "square" (black-box, score-based) or "pgd" (white-box).
        norm: "linf" or "l2".
        eps: radius of the perturbation ball on the [0, 1] scale.
        iterations: square: query budget T (at most T + 1 queries per sample); pgd: gradient
            steps. A sample stops as soon as it is misclassified.
        seed: seed of the run's own generator on the images' device (same seed, same result
            on CPU).
        alpha: PGD step size (default ``eps * 20/51``, as
            :func:`calib.attacks.pgd.pgd_attack`).
        p_init: Square Attack's initial square size as a fraction of the pixels (pass the
            calibration attacks' value; the reference's ImageNet value is 0.05).
        stripes_init: L-inf Square only: start from the reference's vertical-stripe
            initialisation (every pixel at +-eps). Off by default, as in the calibration
            attacks; turning it on unmatches the initialisation.
        sparsify, drop: PGD only: drop each step coordinate with probability ``drop`` and
            rescale the rest (the calibration PGD's sparsification; its default ``drop_uca``
            is 0.95).
        backtrack_steps: PGD only: a rejected step halves the sample's step, down to
            ``alpha / 2**backtrack_steps`` (the calibration PGD's default is 8).
        batch_size: images attacked together (bounds memory; the random streams depend on
            it, as in the calibration attacks).
        show_progress: show a tqdm progress bar over the chunks.

    Returns:
        An :class:`OrdinaryAttackResult`.

    Raises:
        ValueError: unknown method or norm, eps <= 0, bad iterations, seed, alpha, p_init,
            drop, backtrack_steps or batch_size, stripes with norm "l2", or images outside
            [0, 1]; before any work.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("method", method, ORDINARY_METHODS)
    check_choice("norm", norm, ORDINARY_NORMS)
    images = check_images(images)
    eps = check_eps(eps, norm)
    check_int("iterations", iterations, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed)
    p_init = check_number("p_init", p_init, low=0, high=1, low_open=True)
    if check_bool("stripes_init", stripes_init) and norm != "linf":
        raise ValueError("stripes_init applies to norm='linf' only")
    check_bool("sparsify", sparsify)
    drop = check_number("drop", drop, low=0, high=1, high_open=True)
    check_int("backtrack_steps", backtrack_steps, minimum=0)
    alpha = check_number("alpha", eps * ALPHA_PER_EPS if alpha is None else alpha, low=0,
                         high=math.inf, low_open=True, high_open=True)
    if method == "square" and min(images.shape[2:]) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {tuple(images.shape[2:])}")

    options: dict[str, Any] = (
        {"p_init": p_init, "stripes_init": stripes_init} if method == "square"
        else {"alpha": alpha, "sparsify": sparsify, "drop": drop,
              "backtrack_steps": backtrack_steps})
    options["batch_size"] = batch_size
    device = images.device
    n = images.shape[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    # The calibration attacks draw N uniforms first (their RCA targets, base.execute): drawing
    # them too puts both families on the same random stream from the first proposal on.
    torch.rand(n, generator=generator, device=device)
    vanished: list[torch.Tensor] = []
    chunk_attack = _square_chunk if method == "square" else _pgd_chunk
    x_adv, ks, queries = [], [], []
    with eval_mode(model):
        for chunk in tqdm(images.split(batch_size), desc=f"ordinary {method}-{norm}",
                          disable=not show_progress, leave=False):
            adv, k, q = chunk_attack(model, chunk, norm=norm, eps=eps, iterations=iterations,
                                     p_init=p_init, stripes_init=stripes_init, alpha=alpha,
                                     sparsify=sparsify, drop=drop,
                                     backtrack_steps=backtrack_steps, generator=generator,
                                     vanished=vanished)
            x_adv.append(adv)
            ks.append(k)
            queries.append(q)
    if vanished:
        check_zero_gradients(torch.cat(vanished),
                             context=f"ordinary PGD {'L-inf' if norm == 'linf' else 'L2'}")
    out = torch.cat(x_adv)
    final = predict_logits(model, out, batch_size=batch_size).argmax(1)
    clean = torch.cat(ks).cpu()
    return OrdinaryAttackResult(
        x_adv=out, success=final != clean, queries=torch.cat(queries).cpu(),
        clean_prediction=clean, final_prediction=final, method=method, norm=norm,
        eps=eps, iterations=iterations, seed=seed, x_clean=images, options=options)
