"""How large the attacks' perturbations are, per threat model (the L2 radius, SPEC §3).

The L-inf and L2 attacks run at radii chosen independently (``attack.eps`` = 0.1 per pixel,
``attack.eps_l2`` = 1.0 in total), so "the same strength" is not given. An L2 ball lets a few
pixels move far beyond the L-inf eps while the rest stay put; an L-inf ball spreads a smaller
change over every pixel and so has a larger L2 norm. Which attack is "more visible" depends on
which of the two a reader looks at, so this module reports both norms of the final perturbations
of every attack and draws the same images under both threat models side by side.

Inputs are the attack stage's per-sample records (``results/<model>/records/attack_records.csv``,
columns ``setting``, ``kind``, ``linf``, ``l2``; with a ``model`` column) and its adversarial
images (``adversarial.safetensors``: ``"<setting>/<kind>" -> (N, C, H, W)`` in attack-split
order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from calib import stats
from calib.checks import check_int, check_number

#: Columns :func:`perturbation_sizes` needs in the records.
SIZE_COLUMNS = ("model", "setting", "kind", "linf", "l2")


def _median(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Batched median for :func:`calib.stats.bootstrap_interval`: ``[n], [B, n] -> [B]``."""
    return values[idx].median(dim=1).values


def perturbation_sizes(records: pd.DataFrame, *, eps: float, eps_l2: float,
                       n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Both norms of the final perturbations, per model and attack setting.

    Images the attack left unchanged (an L2 norm of 0, e.g. OCA on an image that was already
    confident enough) are left out: they say nothing about the size of a perturbation.

    Args:
        records: per-sample rows with columns :data:`SIZE_COLUMNS` (``linf``: the largest
            per-pixel change ``max |x_adv - x|``; ``l2``: ``||x_adv - x||_2``; [0, 1] pixels).
        eps: the L-inf radius of the L-inf settings.
        eps_l2: the L2 radius of the L2 settings.
        n_resamples: bootstrap resamples of each interval (seeded).
        seed: seeds the bootstrap.

    Returns:
        One row per (model, setting): ``norm`` ("linf" or "l2", from the setting's name),
        ``radius`` (the setting's own eps), ``n`` perturbed images, ``linf_median`` with its
        95% interval (``_lo`` / ``_hi``), ``linf_p90``, ``linf_max``, ``above_eps``: the share
        of images whose largest pixel change exceeds the L-inf eps (with interval; 0 by
        construction for L-inf settings), ``l2_median`` with interval and ``l2_max``.
    """
    missing = [c for c in SIZE_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}; need {list(SIZE_COLUMNS)}")
    check_number("eps", eps, low=0.0, low_open=True)
    check_number("eps_l2", eps_l2, low=0.0, low_open=True)
    check_int("n_resamples", n_resamples, minimum=1)
    rows = []
    for (model, setting), part in records.groupby(["model", "setting"], sort=True):
        norm = str(setting).rsplit("-", 1)[-1]
        if norm not in ("linf", "l2"):
            raise ValueError(f"setting {setting!r}: cannot tell its norm (expected a name "
                             "ending in -linf or -l2)")
        moved = part[part["l2"] > 0]
        row: dict[str, object] = {"model": model, "setting": setting, "norm": norm,
                                  "radius": eps if norm == "linf" else eps_l2,
                                  "n": len(moved)}
        if moved.empty:
            rows.append(row)
            continue
        linf = torch.tensor(moved["linf"].to_numpy(dtype=np.float64))
        l2 = torch.tensor(moved["l2"].to_numpy(dtype=np.float64))
        above = (linf > eps * (1 + 1e-4)).to(torch.float64)
        row.update(stats.bootstrap_interval(_median, linf, n_resamples=n_resamples,
                                            seed=seed).to_columns("linf_median"))
        row["linf_p90"] = float(torch.quantile(linf, 0.9))
        row["linf_max"] = float(linf.max())
        row.update(stats.bootstrap_interval("mean", above, n_resamples=n_resamples,
                                            seed=seed).to_columns("above_eps"))
        row.update(stats.bootstrap_interval(_median, l2, n_resamples=n_resamples,
                                            seed=seed).to_columns("l2_median"))
        row["l2_max"] = float(l2.max())
        rows.append(row)
    return pd.DataFrame(rows)


def perturbation_examples(clean: torch.Tensor, adversarial: Mapping[str, torch.Tensor],
                          indices: Sequence[int], *,
                          titles: Mapping[str, str] | None = None) -> Figure:
    """The same images under each attack, with their perturbations on one colour scale.

    Args:
        clean: (N, C, H, W) clean images in [0, 1] (C = 1 or 3), in the order of the
            adversarial tensors.
        adversarial: column name (e.g. "square-linf/uca") -> (N, C, H, W) adversarial images.
        indices: which images (rows of the figure).
        titles: optional column name -> display title.

    Returns:
        A figure with one row per image: the clean image, then per attack the adversarial
        image and ``x_adv - x`` (summed over channels for colour images) on a diverging scale
        shared by every panel, so a reader compares the sizes directly; each perturbation panel
        is titled with its L-inf and L2 norms.
    """
    if not adversarial:
        raise ValueError("adversarial is empty: give at least one attack's images")
    if len(indices) == 0:
        raise ValueError("indices is empty: give at least one image to draw")
    n = clean.shape[0]
    for name, adv in adversarial.items():
        if adv.shape != clean.shape:
            raise ValueError(f"adversarial[{name!r}] has shape {tuple(adv.shape)}, the clean "
                             f"images {tuple(clean.shape)}")
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"indices {bad} out of range for {n} images")
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    x = clean[idx].detach().cpu().float()
    deltas = {k: v[idx].detach().cpu().float() - x for k, v in adversarial.items()}
    scale = max(float(d.abs().max()) for d in deltas.values()) or 1.0
    titles = dict(titles or {})

    def show(ax: plt.Axes, img: torch.Tensor) -> None:
        pic = img.permute(1, 2, 0).numpy()
        ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic.clip(0, 1),
                  cmap="gray" if pic.shape[-1] == 1 else None, vmin=0, vmax=1)

    cols = 1 + 2 * len(adversarial)
    fig, axes = plt.subplots(len(idx), cols, figsize=(1.6 * cols, 1.75 * len(idx)),
                             squeeze=False, constrained_layout=True)
    image = None
    for r in range(len(idx)):
        show(axes[r, 0], x[r])
        if r == 0:
            axes[r, 0].set_title("clean", fontsize=8)
        for c, (name, delta) in enumerate(deltas.items()):
            show(axes[r, 1 + 2 * c], (x[r] + delta[r]).clamp(0, 1))
            d = delta[r].sum(0).numpy()
            image = axes[r, 2 + 2 * c].imshow(d, cmap="RdBu_r", vmin=-scale, vmax=scale)
            axes[r, 2 + 2 * c].set_title(
                f"L∞ {float(delta[r].abs().max()):.2f}, L2 {float(delta[r].norm()):.2f}",
                fontsize=7)
            if r == 0:
                axes[r, 1 + 2 * c].set_title(titles.get(name, name), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[:, 1:], shrink=0.6, label="x_adv − x (per pixel)")
    return fig
