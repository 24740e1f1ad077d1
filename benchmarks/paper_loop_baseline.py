"""Speed baseline: a plain port of the released calibration-attack loop (L-inf Square, UCA).

The released code of Obadinma et al. (``calibration_attack_linf``) keeps its state in float64
numpy arrays, places each image's square in a Python loop over the images, and sends every
batch of candidates through the model via a numpy -> torch -> numpy ``predict``. This file
reproduces that structure so that ``bench_square.py`` can measure what the vectorised
:func:`calib.attacks.square_attack` gains; it is a benchmark baseline, not part of the
package.

Semantics follow the project's SPEC rather than the released code where they differ (the
candidate is accepted when the probability margin improves and the argmax stays the clean
prediction; no correct-classification requirement), so both implementations do the same
work per query.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import softmax
from torch import nn


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Piece-wise constant schedule for p, rescaled to ``n_iters`` (as released)."""
    it = int(it / n_iters * 10000)
    if 10 < it <= 50:
        return p_init / 2
    if 50 < it <= 200:
        return p_init / 4
    if 200 < it <= 500:
        return p_init / 8
    if 500 < it <= 1000:
        return p_init / 16
    if 1000 < it <= 2000:
        return p_init / 32
    if 2000 < it <= 4000:
        return p_init / 64
    if 4000 < it <= 6000:
        return p_init / 128
    if 6000 < it <= 8000:
        return p_init / 256
    if 8000 < it <= 10000:
        return p_init / 512
    return p_init


def predict(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of ``x`` (numpy, N x C x H x W) batch by batch, returned as numpy (released
    ``ModelPT.predict`` without the ImageNet normalisation, which lives in our models)."""
    x = x.astype(np.float32)
    logits = []
    with torch.no_grad():
        for i in range(math.ceil(x.shape[0] / batch_size)):
            batch = torch.as_tensor(x[i * batch_size:(i + 1) * batch_size])
            logits.append(model(batch).numpy())
    return np.vstack(logits)


def probability_margin(logits: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """p_k - max_{j != k} p_j for the clean predictions k (released 'rand_underconf' loss)."""
    probs = softmax(logits, axis=1)
    p_k = probs[np.arange(len(predicted)), predicted]
    others = probs.copy()
    others[np.arange(len(predicted)), predicted] = -np.inf
    return p_k - others.max(1)


def calibration_attack_linf(model: nn.Module, x: np.ndarray, eps: float, n_iters: int,
                            p_init: float = 0.05, uca_margin: float = 0.1,
                            batch_size: int = 256, seed: int = 0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """UCA with L-inf Square Attack, released structure. Returns (x_best, n_queries)."""
    rng = np.random.RandomState(seed)  # the legacy generator behind np.random.seed
    min_val, max_val = 0, 1
    c, h, w = x.shape[1:]
    n_features = c * h * w

    x_best = np.clip(x + 0 * rng.choice([-eps, eps], size=[x.shape[0], c, 1, w]),
                     min_val, max_val)  # released: stripe init multiplied by 0
    logits = predict(model, x_best, batch_size)
    initial_predictions = logits.argmax(1)
    margin_min = probability_margin(logits, initial_predictions)
    n_queries = np.ones(x.shape[0])

    for i_iter in range(n_iters - 1):
        idx_to_fool = margin_min > uca_margin
        if not idx_to_fool.any():
            break
        x_curr, x_best_curr = x[idx_to_fool], x_best[idx_to_fool]
        margin_min_curr = margin_min[idx_to_fool]
        deltas = x_best_curr - x_curr

        p = p_selection(p_init, i_iter, n_iters)
        for i_img in range(x_best_curr.shape[0]):
            s = round(np.sqrt(p * n_features / c))
            s = min(max(s, 1), h - 1)
            center_h = rng.randint(0, h - s)
            center_w = rng.randint(0, w - s)
            x_curr_window = x_curr[i_img, :, center_h:center_h + s, center_w:center_w + s]
            x_best_curr_window = x_best_curr[i_img, :, center_h:center_h + s,
                                             center_w:center_w + s]
            while np.sum(np.abs(np.clip(
                    x_curr_window + deltas[i_img, :, center_h:center_h + s,
                                           center_w:center_w + s],
                    min_val, max_val) - x_best_curr_window) < 10**-7) == c * s * s:
                deltas[i_img, :, center_h:center_h + s, center_w:center_w + s] = \
                    rng.choice([-eps, eps], size=[c, 1, 1])

        x_new = np.clip(x_curr + deltas, min_val, max_val)
        logits = predict(model, x_new, batch_size)
        margin = probability_margin(logits, initial_predictions[idx_to_fool])
        same_predictions = initial_predictions[idx_to_fool] == logits.argmax(1)
        idx_improved = (margin < margin_min_curr) & same_predictions

        margin_min[idx_to_fool] = idx_improved * margin + ~idx_improved * margin_min_curr
        idx_improved = np.reshape(idx_improved, [-1, *[1] * len(x.shape[:-1])])
        x_best[idx_to_fool] = idx_improved * x_new + ~idx_improved * x_best_curr
        n_queries[idx_to_fool] += 1
    return x_best, n_queries
