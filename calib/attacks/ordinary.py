"""Ordinary (misclassification) attacks, the reference point of the detection analysis.

Paper Table 2 (Obadinma et al., arXiv:2401.02718) compares how detectable calibration attacks
are with how detectable *ordinary* adversarial attacks are. The ordinary attacks here:

- **Square Attack** (Andriushchenko et al., ECCV 2020, arXiv:1912.00049), untargeted, L-inf
  or L2, score-based: the usual margin loss ``z_k - max_{j != k} z_j`` on the logits (k the
  clean prediction), a candidate is kept when it lowers the loss, and a sample stops being
  queried as soon as its label flips. It reuses the proposal functions of
  :mod:`calib.attacks.square` (window schedule, +-eps squares, vertical-stripe
  initialisation, the L2 "meta" pseudo-Gaussian update), so the ordinary and calibration
  Square Attacks differ only in their objective and acceptance rule.
- **PGD** (Madry et al., ICLR 2018), L-inf only: :func:`calib.attacks.pgd.pgd_linf` run on
  the clean predictions (not the true labels, so that "success" means the same thing for
  both methods: the predicted label moved away from the clean prediction). It runs all its
  steps (no early stop), as the standard attack does.

One entry point, :func:`ordinary_attack`, returns an :class:`OrdinaryAttackResult`.

Example:
    >>> out = ordinary_attack(model, images, method="square", eps=0.1, iterations=500)
    >>> out.success.float().mean(), out.x_adv.shape
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from calib.attacks.pgd import pgd_linf
from calib.attacks.square import (
    meta_pseudo_gaussian,
    p_schedule,
    propose_l2,
    propose_linf,
    propose_stripes,
    square_side,
    square_side_l2,
)
from calib.checks import check_bool, check_choice, check_eps, check_images, check_int, check_number
from calib.runtime import eval_mode, predict_logits

#: Methods and norms of the ordinary attacks (PGD: L-inf only).
ORDINARY_METHODS: tuple[str, ...] = ("square", "pgd")
ORDINARY_NORMS: tuple[str, ...] = ("linf", "l2")


@dataclass
class OrdinaryAttackResult:
    """Outcome of one ordinary attack on N images (tensors other than ``x_adv`` on the CPU).

    Attributes:
        x_adv: (N, C, H, W) adversarial images, same device and dtype as the input, inside
            the eps-ball around the clean images and inside [0, 1].
        success: bool (N,) the model's argmax on ``x_adv`` differs from the clean prediction
            (recomputed from one final forward pass).
        queries: int64 (N,) model evaluations per sample, the clean one included (PGD:
            gradient steps + 1 for every sample).
        clean_prediction, final_prediction: int64 (N,) argmax on the clean / adversarial
            images.
        method, norm, eps, iterations, seed: the run's settings.
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

    def summary(self) -> dict[str, float | int | str]:
        """Settings, success rate and mean queries (over all / successful samples)."""
        won = self.success
        q = self.queries.double()
        return {"method": self.method, "norm": self.norm, "eps": self.eps,
                "iterations": self.iterations, "seed": self.seed, "n": int(q.numel()),
                "success_rate": float(won.double().mean()),
                "queries_mean": float(q.mean()),
                "queries_success_mean": float(q[won].mean()) if bool(won.any()) else None}


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
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
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
    stripes_init: bool = True,
    batch_size: int = 256,
    show_progress: bool = False,
) -> OrdinaryAttackResult:
    """Run an ordinary (misclassification) attack on ``images`` (N, C, H, W) in [0, 1].

    Paper: Square Attack, Andriushchenko et al. 2020 (arXiv:1912.00049); PGD, Madry et al.
    2018 (arXiv:1706.06083). The reference against which Obadinma et al. (Table 2) compare
    the detectability of calibration attacks.

    Args:
        model: images in [0, 1] (N, C, H, W) -> logits (N, K); run in eval mode (its modes
            are restored afterwards, its weights untouched).
        images: (N, C, H, W) clean images in [0, 1] on the model's device.
        method: "square" (black-box, score-based) or "pgd" (white-box, L-inf only).
        norm: "linf" or "l2".
        eps: radius of the perturbation ball on the [0, 1] scale.
        iterations: square: query budget T (at most T + 1 queries per sample); pgd: gradient
            steps.
        seed: seed of the run's own generator (same seed, same result on CPU).
        alpha: PGD step size (default eps / 4).
        p_init: Square Attack's initial square size as a fraction of the pixels (the
            reference's ImageNet value is 0.05; small images need larger values).
        stripes_init: L-inf Square Attack starts from the reference's vertical-stripe
            initialisation (every pixel at +-eps); the calibration attacks leave it out.
        batch_size: images attacked together (bounds memory).
        show_progress: show a tqdm progress bar over the chunks.

    Returns:
        An :class:`OrdinaryAttackResult`.

    Raises:
        ValueError: unknown method or norm, PGD with norm "l2", eps <= 0, bad iterations,
            seed, alpha, p_init or batch_size, or images outside [0, 1]; before any work.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("method", method, ORDINARY_METHODS)
    check_choice("norm", norm, ORDINARY_NORMS)
    if method == "pgd" and norm != "linf":
        raise ValueError(f"norm must be 'linf' for method='pgd' (pgd_linf), got {norm!r}")
    images = check_images(images)
    eps = check_eps(eps, norm)
    check_int("iterations", iterations, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed)
    p_init = check_number("p_init", p_init, low=0, high=1, low_open=True)
    check_bool("stripes_init", stripes_init)
    alpha = check_number("alpha", eps / 4 if alpha is None else alpha, low=0, low_open=True)
    if min(images.shape[2:]) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {tuple(images.shape[2:])}")

    device = images.device
    # Square draws on the images' device; pgd_linf draws its random start on the CPU.
    generator = torch.Generator(device=device if method == "square" else "cpu")
    generator.manual_seed(seed)
    x_adv, ks, queries = [], [], []
    chunks = images.split(batch_size)
    with eval_mode(model):
        for chunk in tqdm(chunks, desc=f"ordinary {method}-{norm}", disable=not show_progress,
                          leave=False):
            if method == "square":
                adv, k, q = _square_chunk(model, chunk, norm=norm, eps=eps,
                                          iterations=iterations, p_init=p_init,
                                          stripes_init=stripes_init, generator=generator)
            else:
                with torch.no_grad():
                    k = model(chunk).argmax(1)
                adv = pgd_linf(model, chunk, k, eps=eps, alpha=alpha, steps=iterations,
                               random_start=True, generator=generator)
                q = torch.full_like(k, iterations + 1)
            x_adv.append(adv)
            ks.append(k)
            queries.append(q)
    out = torch.cat(x_adv)
    final = predict_logits(model, out, batch_size=batch_size).argmax(1)
    clean = torch.cat(ks).cpu()
    return OrdinaryAttackResult(
        x_adv=out, success=final != clean, queries=torch.cat(queries).cpu(),
        clean_prediction=clean, final_prediction=final, method=method, norm=norm,
        eps=eps, iterations=iterations, seed=seed)
