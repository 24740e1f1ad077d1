"""Black-box calibration attacks by random search: Square Attack, L-inf and L2.

Square Attack: Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020 (arXiv:1912.00049). Adapted to
calibration attacks as in Obadinma et al. (arXiv:2401.02718), §3-4 of SPEC.

Distance: L-inf (per-channel constant +-eps squares) or L2 (two windows, pseudo-Gaussian
"meta" perturbation, norm kept at eps). One query per active sample per iteration.

Every window placement is vectorised over the batch: each image gets its own random window,
built with index arithmetic, never a Python loop over samples.

Where the candidate crosses the decision boundary (the UCA failure mode: a full +-eps square
overshoots the boundary and is rejected, so the sample stalls), the next queries of that
sample backtrack along the rejected step: ``x_best + s * (x_rejected - x_best)`` for
s = 1/2, 1/4, ... (``backtrack_steps`` halvings). Each retry is one query. (Square candidates
cross the boundary far less often than PGD steps: on a Fashion-MNIST ResNet-18 at eps = 0.05
UCA success was limited by the distance to the boundary and backtracking changed nothing
measurable; with large eps on the test suite's small model it turns 97% into 100%.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from calib.attacks.base import (
    AttackResult,
    AttackState,
    Thresholds,
    check_common,
    check_min_margin,
    execute,
)
from calib.checks import check_bool, check_int, check_number

#: Default iteration budget (queries per sample = iterations + 1).
DEFAULT_ITERATIONS: int = 1000


def p_schedule(p_init: float, iteration: int, budget: int) -> float:
    """Fraction of pixels a square covers at ``iteration`` (Square Attack's piecewise schedule).

    The schedule is defined for 10,000 iterations and rescaled to ``budget`` as in the
    reference implementation: p halves at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
    8000 (of 10,000).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    it = int(iteration / budget * 10000)
    for halvings, upper in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000, 10000)):
        if it <= upper:
            return p_init / 2**halvings
    return p_init


def square_side(p: float, height: int, width: int) -> int:
    """Side of the L-inf square covering about a fraction ``p`` of the pixels.

    Clamped to [1, min(height, width) - 1] as in the reference implementation.
    """
    side = round(math.sqrt(p * height * width))
    return min(max(side, 1), min(height, width) - 1)


def square_side_l2(p: float, height: int, width: int) -> int:
    """Side of the L2 windows: at least 3 and odd (reference), at most min(height, width)."""
    side = max(round(math.sqrt(p * height * width)), 3)
    side += 1 - side % 2
    return min(side, height, width)


def random_windows(n: int, side: int, height: int, width: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners (rows, cols), int64 (n,) each, of uniformly placed side x side windows.

    Every position with the window inside the image is possible (the reference draws from
    ``[0, h - side)`` and so never touches the last row or column).
    """
    rows = torch.randint(0, height - side + 1, (n,), generator=generator, device=device)
    cols = torch.randint(0, width - side + 1, (n,), generator=generator, device=device)
    return rows, cols


def window_offsets(rows: torch.Tensor, cols: torch.Tensor, side: int, channels: int,
                   height: int, width: int) -> torch.Tensor:
    """Offsets of each sample's window inside one flattened (C * H * W) image.

    Args:
        rows, cols: (n,) top-left corners.
        side: window side s.
        channels, height, width: image shape.

    Returns:
        int64 (n, C, s * s); element ``[i, c, j]`` is the position of row ``j // s``, column
        ``j % s`` of channel ``c`` of window i. Add ``sample * C * H * W`` to address a batch
        through ``x.view(-1)``; flat ``index_select`` / ``index_copy_`` with these offsets is
        much cheaper than multi-dimensional advanced indexing.
    """
    template = _window_template(side, channels, height, width, rows.device)
    return template + (rows * width + cols).view(-1, 1, 1)


@functools.lru_cache(maxsize=64)
def _window_template(side: int, channels: int, height: int, width: int,
                     device: torch.device) -> torch.Tensor:
    """Offsets (1, C, s * s) of the window with its top-left corner at (0, 0)."""
    steps = torch.arange(side, device=device)
    pixel = (steps[:, None] * width + steps[None, :]).view(1, 1, side * side)
    return torch.arange(channels, device=device).view(1, channels, 1) * (height * width) + pixel


def _flat_index(x: torch.Tensor, samples: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    per_image = x.shape[1] * x.shape[2] * x.shape[3]
    return (offsets + (samples * per_image).view(-1, 1, 1)).view(-1)


def _gather(x: torch.Tensor, samples: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Windows (n, C, s * s) of images ``x[samples]`` (x contiguous) at ``offsets``."""
    return x.view(-1).index_select(0, _flat_index(x, samples, offsets)).view(offsets.shape)


def _scatter(x: torch.Tensor, samples: torch.Tensor, offsets: torch.Tensor,
             values: torch.Tensor) -> None:
    """Write windows ``values`` (n, C, s * s) into images ``x[samples]`` (x contiguous)."""
    x.view(-1).index_copy_(0, _flat_index(x, samples, offsets), values.reshape(-1))


def window_mask(rows: torch.Tensor, cols: torch.Tensor, side: int, height: int, width: int
                ) -> torch.Tensor:
    """Bool mask (n, 1, height, width) that is True inside each sample's window."""
    r = torch.arange(height, device=rows.device)
    c = torch.arange(width, device=rows.device)
    in_rows = (r >= rows[:, None]) & (r < rows[:, None] + side)
    in_cols = (c >= cols[:, None]) & (c < cols[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def pseudo_gaussian_rectangle(height: int, width: int) -> torch.Tensor:
    """Unit-norm bump of nested rectangles, weight 1/(n+1)^2 on ring n (Square Attack L2)."""
    delta = torch.zeros(height, width, dtype=torch.float64)
    r0, c0 = height // 2, width // 2
    for ring in range(max(height // 2 + 1, width // 2 + 1)):
        delta[max(r0 - ring, 0):min(r0 - ring + 2 * ring + 1, height),
              max(c0 - ring, 0):min(c0 - ring + 2 * ring + 1, width)] += 1.0 / (ring + 1) ** 2
    return delta / delta.norm()


def meta_pseudo_gaussian(side: int) -> torch.Tensor:
    """Unit-norm (side, side) pattern: a bump on the top half, a negative bump below."""
    if side < 2:
        raise ValueError(f"side must be >= 2, got {side}")
    top = side // 2
    delta = torch.cat([pseudo_gaussian_rectangle(top, side),
                       -pseudo_gaussian_rectangle(side - top, side)])
    return delta / delta.norm()


def _random_signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def propose_linf(x: torch.Tensor, idx: torch.Tensor, x_new: torch.Tensor, eps: float,
                 side: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square Attack's L-inf update: one random +-eps square per sample, written into
    ``x_new`` in place.

    Andriushchenko et al. 2020 (arXiv:1912.00049), Alg. 2: inside a uniformly placed
    ``side`` x ``side`` window every pixel of a channel is set to ``clean +- eps`` (one sign
    per channel), clipped to [0, 1]. Signs are per channel; a sample whose new square would
    leave the image unchanged gets other signs (the reference redraws them).

    Args:
        x: (N, C, H, W) contiguous clean images; only the windows of ``x[idx]`` are read.
        idx: (A,) int64, the clean image of each row of ``x_new``.
        x_new: (A, C, H, W) contiguous current best inputs of those samples; overwritten.
        eps: L-inf radius.
        side: window side (:func:`square_side`).
        generator: the run's generator, on the images' device.

    Returns:
        The windows' offsets (A, C, s * s), their previous and their new content.
    """
    n, c, h, w = x_new.shape
    device, dtype = x_new.device, x_new.dtype
    rows, cols = random_windows(n, side, h, w, generator, device)
    offsets = window_offsets(rows, cols, side, c, h, w)
    clean_win = _gather(x, idx, offsets)  # (n, C, s * s)
    local = torch.arange(n, device=device)
    best_win = _gather(x_new, local, offsets)
    signs = _random_signs((n, c, 1), generator, device, dtype)
    cand = (clean_win + eps * signs).clamp(0, 1)
    redo = cand.eq(best_win).flatten(1).all(1).nonzero().squeeze(1)
    if redo.numel():
        # At most one sign vector leaves a window unchanged (for eps > 0), so the
        # reference's redraw-until-changed loop equals flipping the channels of a uniformly
        # random non-empty subset: uniform over the other sign vectors, without a loop.
        bits = min(c, 62)
        subset = torch.randint(1, 2**bits, (redo.numel(), 1), generator=generator,
                               device=device)
        flips = torch.zeros(redo.numel(), c, 1, dtype=dtype, device=device)
        flips[:, :bits] = ((subset >> torch.arange(bits, device=device)) & 1).view(
            -1, bits, 1).to(dtype)
        cand[redo] = (clean_win[redo] + eps * signs[redo] * (1 - 2 * flips)).clamp(0, 1)
    _scatter(x_new, local, offsets, cand)
    return offsets, best_win, cand


def propose_stripes(x_clean: torch.Tensor, eps: float, generator: torch.Generator
                    ) -> torch.Tensor:
    """Square Attack's L-inf initialisation: vertical stripes of +-eps, per channel.

    Andriushchenko et al. 2020 (arXiv:1912.00049): every column of every channel of each
    image is shifted by ``+eps`` or ``-eps`` at random, then clipped to [0, 1].

    Args:
        x_clean: (A, C, H, W) clean images.
        eps: L-inf radius.
        generator: the run's generator, on the images' device.

    Returns:
        (A, C, H, W) candidates.
    """
    n, c, _, w = x_clean.shape
    signs = _random_signs((n, c, 1, w), generator, x_clean.device, x_clean.dtype)
    return (x_clean + eps * signs).clamp(0, 1)


def propose_l2(x_clean: torch.Tensor, x_best: torch.Tensor, eps: float, side: int,
               pattern: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Square Attack's L2 update, one per sample (Andriushchenko et al. 2020, Alg. 3).

    Window 1 receives the (randomly transposed, per-channel signed) meta pattern plus its
    old content, rescaled so that the mass of window 2 moves into it; window 2 is zeroed;
    the whole perturbation is then rescaled to norm eps and the image clipped to [0, 1].

    Args:
        x_clean: (A, C, H, W) clean images.
        x_best: (A, C, H, W) current best inputs of the same samples.
        eps: L2 radius.
        side: window side (:func:`square_side_l2`).
        pattern: (side, side) :func:`meta_pseudo_gaussian` pattern.
        generator: the run's generator, on the images' device.

    Returns:
        (A, C, H, W) candidates.
    """
    n, c, h, w = x_best.shape
    device, dtype = x_best.device, x_best.dtype
    delta = x_best - x_clean
    rows1, cols1 = random_windows(n, side, h, w, generator, device)
    rows2, cols2 = random_windows(n, side, h, w, generator, device)
    mask1 = window_mask(rows1, cols1, side, h, w)
    mask2 = window_mask(rows2, cols2, side, h, w)
    win_norm = (delta * mask1).square().sum((2, 3), keepdim=True).sqrt()  # (n, C, 1, 1)
    img_norm_sq = delta.square().sum((1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
    union_norm_sq = (delta * (mask1 | mask2)).square().sum((2, 3), keepdim=True)
    offsets = window_offsets(rows1, cols1, side, c, h, w)
    local = torch.arange(n, device=device)
    old = _gather(delta, local, offsets).view(n, c, side, side)
    transpose = torch.rand(n, generator=generator, device=device) > 0.5
    pattern = pattern.to(device, dtype)
    pat = torch.where(transpose.view(n, 1, 1, 1), pattern.T, pattern)  # (n, 1, s, s)
    signs = _random_signs((n, c, 1, 1), generator, device, dtype)
    new = pat * signs + old / (1e-10 + win_norm)
    budget = ((eps**2 - img_norm_sq).clamp_min(0) / c + union_norm_sq).sqrt()
    new = new / new.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
    delta = delta.masked_fill(mask2, 0.0)
    _scatter(delta, local, offsets, new)
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
    return (x_clean + delta * (eps / norm)).clamp(0, 1)


class _Backtrack:
    """Retries, at half the step each time, candidates that crossed the decision boundary.

    A sample whose candidate lost the clean label is retried at
    ``x_best + s * (x_rejected - x_best)`` for s = 1/2, 1/4, ... down to 2**-steps, one
    query per retry, until a retry keeps the label.
    """

    def __init__(self, x: torch.Tensor, steps: int) -> None:
        self.floor = 0.5**steps
        self.scale = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)  # 0: none
        self.rejected = torch.empty_like(x)
        self.waiting = False

    def apply(self, idx: torch.Tensor, x_new: torch.Tensor, x_best: torch.Tensor
              ) -> torch.Tensor | None:
        """Replace the candidates of waiting samples by their retries, in place.

        Returns:
            Bool (A,) marking the retried rows of ``x_new``, or None if there are none.
        """
        if not self.waiting:
            return None
        scale = self.scale[idx]
        retried = scale > 0
        local = retried.nonzero().squeeze(1)
        rows = idx[local]
        best = x_best.index_select(0, rows)
        step = self.rejected.index_select(0, rows) - best
        x_new.index_copy_(0, local, best + scale[local].view(-1, 1, 1, 1) * step)
        return retried

    def update(self, idx: torch.Tensor, x_new: torch.Tensor, crossed: torch.Tensor,
               retried: torch.Tensor | None) -> None:
        """Record the candidates that crossed; halve or drop the retries."""
        if retried is None and not bool(crossed.any()):
            return
        fresh = (crossed if retried is None else crossed & ~retried).nonzero().squeeze(1)
        self.rejected.index_copy_(0, idx[fresh], x_new.index_select(0, fresh))
        half = torch.full_like(crossed, 0.5, dtype=self.scale.dtype)
        if retried is not None:
            half = torch.where(retried, self.scale[idx] * 0.5, half)
        self.scale[idx] = torch.where(crossed & (half >= self.floor), half, 0.0)
        self.waiting = bool((self.scale > 0).any())


def _commit_windows(state: AttackState, work: torch.Tensor, idx: torch.Tensor,
                    accepted: torch.Tensor, retried: torch.Tensor | None,
                    offsets: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
    """After a windowed L-inf step: copy accepted windows into ``x_best``, undo rejected ones
    in ``work``; rows that were backtracking retries changed as whole images."""
    windows = accepted if retried is None else accepted & ~retried
    rows = windows.nonzero().squeeze(1)
    _scatter(state.x_best, idx[rows], offsets[rows], new[rows])
    windows = ~accepted if retried is None else ~accepted & ~retried
    rows = windows.nonzero().squeeze(1)
    _scatter(work, rows, offsets[rows], old[rows])
    if retried is not None:
        rows = (accepted & retried).nonzero().squeeze(1)
        state.x_best.index_copy_(0, idx[rows], work.index_select(0, rows))
        rows = (~accepted & retried).nonzero().squeeze(1)
        work.index_copy_(0, rows, state.x_best.index_select(0, idx[rows]))


def _chunk_loop(model: nn.Module, *, norm: str, eps: float, iterations: int, p_init: float,
                stripes_init: bool, backtrack_steps: int):
    """The per-chunk Square Attack loop bound to its settings (see :func:`square_attack`)."""

    @torch.no_grad()
    def attack_chunk(x: torch.Tensor, make_state, generator: torch.Generator, bar: Any
                     ) -> AttackState:
        x = x.contiguous()
        state = make_state(model(x))
        h, w = x.shape[2:]
        backtrack = _Backtrack(x, backtrack_steps) if backtrack_steps > 0 else None
        patterns: dict[int, torch.Tensor] = {}
        # While candidates differ from the best inputs only in a window (L-inf squares),
        # ``work`` holds the best inputs of the active samples (rows in ``idx`` order): each
        # iteration writes the windows in place and undoes the rejected ones, instead of
        # copying every active image.
        work: torch.Tensor | None = None
        idx = state.active()
        for t in range(iterations):
            if work is None:
                idx = state.active()
            else:
                keep = ~state.success[idx]
                if not bool(keep.all()):
                    local = keep.nonzero().squeeze(1)
                    idx, work = idx[local], work.index_select(0, local)
            if idx.numel() == 0:
                break
            p = p_schedule(p_init, t, iterations)
            windowed = norm == "linf" and not (t == 0 and stripes_init)
            if windowed:
                if work is None:
                    work = state.x_best.index_select(0, idx)
                x_new = work
                offsets, old, new = propose_linf(x, idx, x_new, eps,
                                                 square_side(p, h, w), generator)
            elif norm == "linf":
                x_new = propose_stripes(x.index_select(0, idx), eps, generator)
            else:
                side = square_side_l2(p, h, w)
                if side not in patterns:
                    patterns[side] = meta_pseudo_gaussian(side).to(x.device, x.dtype)
                x_new = propose_l2(x.index_select(0, idx), state.x_best.index_select(0, idx),
                                   eps, side, patterns[side], generator)
            retried = backtrack.apply(idx, x_new, state.x_best) if backtrack else None
            accepted, scores = state.consider(idx, x_new, model(x_new),
                                              copy_inputs=not windowed)
            if backtrack:
                backtrack.update(idx, x_new, ~scores.keeps_label, retried)
            if windowed:
                _commit_windows(state, work, idx, accepted, retried, offsets, old, new)
            else:
                work = None
            state.record()
            bar.update(1)
        return state

    return attack_chunk


def square_attack(
    model: nn.Module,
    images: torch.Tensor,
    *,
    kind: str,
    norm: str = "linf",
    eps: float = 0.05,
    iterations: int | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    p_init: float = 0.05,
    stripes_init: bool = False,
    backtrack_steps: int = 4,
    uca_margin: float = 0.1,
    oca_confidence: float = 0.99,
    rca_tolerance: float = 0.05,
    uca_objective: str = "margin",
    min_margin: float = 1e-4,
    batch_size: int = 256,
    show_progress: bool = False,
) -> AttackResult:
    """Black-box calibration attack (UCA, OCA, MMA or RCA) by Square Attack random search.

    Paper: Obadinma et al. 2024 (arXiv:2401.02718) on top of Andriushchenko et al. 2020
    (arXiv:1912.00049). Each iteration proposes one new square per still-active image and
    keeps it iff the calibration objective improves and the argmax stays the clean
    prediction (SPEC §3-4).

    Args:
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K); evaluated in eval mode
            under ``torch.no_grad`` (its modes are restored, its weights untouched).
        images: (N, C, H, W) float images in [0, 1], H, W >= 2, on the model's device.
        kind: "uca", "oca", "mma" or "rca".
        norm: "linf" or "l2".
        eps: radius of the ball (paper: 0.05 for L-inf on the [0, 1] scale).
        iterations: budget T (default :data:`DEFAULT_ITERATIONS`); at most T + 1 queries per
            sample, the clean one included.
        labels: (N,) true labels; needed for "mma", used by the result's summaries.
        seed: seed of the run's own ``torch.Generator`` (same seed, same result on CPU).
        p_init: initial fraction of pixels a square covers (paper: 0.05).
        stripes_init: L-inf only: propose Square Attack's vertical-stripe initialisation as
            the first candidate (the paper removed it; off by default).
        backtrack_steps: after a candidate that crosses the decision boundary, retry that
            sample at 1/2, 1/4, ... of the rejected step, up to this many halvings
            (0 disables).
        uca_margin, oca_confidence, rca_tolerance: success thresholds (SPEC §3).
        uca_objective: "margin" (SPEC §3) or "confidence": UCA samples minimise ``p_k`` for
            the whole budget instead of stopping at ``uca_margin`` (the push-to-the-bound
            variant; :class:`~calib.attacks.base.Thresholds`).
        min_margin: a candidate keeps the label only if ``p_k`` beats the runner-up by more
            than this (robustness to last-bit differences between batch compositions).
        batch_size: images attacked together (bounds memory); the random streams, and so the
            result, depend on it.
        show_progress: show a tqdm progress bar.

    Returns:
        An :class:`~calib.attacks.base.AttackResult`.

    Example:
        >>> result = square_attack(model, images, kind="uca", eps=0.05, iterations=500)
        >>> result.summary(labels)["ece_after"]
    """
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    images, eps = check_common(model, images, kind=kind, norm=norm, eps=eps,
                               iterations=iterations, labels=labels, seed=seed,
                               batch_size=batch_size)
    if min(images.shape[2:]) < 2:
        raise ValueError(f"square attacks need images of at least 2x2 pixels, got "
                         f"{tuple(images.shape[2:])}")
    p_init = check_number("p_init", p_init, low=0, high=1, low_open=True)
    if check_bool("stripes_init", stripes_init) and norm != "linf":
        raise ValueError("stripes_init applies to norm='linf' only")
    check_int("backtrack_steps", backtrack_steps, minimum=0)
    thresholds = Thresholds(uca_margin=uca_margin, oca_confidence=oca_confidence,
                            rca_tolerance=rca_tolerance, uca_objective=uca_objective)
    min_margin = check_min_margin(min_margin)
    options = {"p_init": p_init, "stripes_init": stripes_init,
               "backtrack_steps": backtrack_steps, "uca_margin": uca_margin,
               "oca_confidence": oca_confidence, "rca_tolerance": rca_tolerance,
               "uca_objective": uca_objective, "min_margin": min_margin,
               "batch_size": batch_size}
    loop = _chunk_loop(model, norm=norm, eps=eps, iterations=iterations, p_init=p_init,
                       stripes_init=stripes_init, backtrack_steps=backtrack_steps)
    return execute(model, images, attack_chunk=loop, kind=kind, method="square", norm=norm,
                   eps=eps, iterations=iterations, labels=labels, seed=seed,
                   thresholds=thresholds, min_margin=min_margin, batch_size=batch_size,
                   show_progress=show_progress, options=options)
