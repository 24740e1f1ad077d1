"""Figures: reliability diagrams, confidence histograms, training curves, example grids.

One pinned style and deterministic files: PNGs are written without software metadata and
PDFs without creation dates, so an unchanged result keeps its hash (DVC and git see no change).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from calib.constants import N_BINS
from calib.io import atomic_path
from calib.metrics import ArrayLike, ReliabilityBins, reliability_bins

STYLE: dict[str, object] = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "svg.hashsalt": "calib",
    "path.simplify": True,
}

#: Colours shared by all figures (colour-blind-safe, from seaborn's "colorblind" palette).
PALETTE = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4",
           "#949494", "#ece133", "#56b4e9"]
ATTACK_COLOURS = {"clean": "#0173b2", "uca": "#de8f05", "oca": "#d55e00", "mma": "#cc78bc",
                  "rca": "#029e73"}


def use_style() -> None:
    """Apply the project's pinned matplotlib style."""
    plt.rcParams.update(STYLE)


def save_figure(fig: Figure, path: str | os.PathLike[str], *, close: bool = True) -> None:
    """Save ``fig`` atomically and deterministically (format from the suffix: png, pdf, svg)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    metadata: dict[str, str | None]
    if ext == "png":
        metadata = {"Software": None}
    elif ext == "pdf":
        metadata = {"Creator": None, "Producer": None, "CreationDate": None}
    elif ext == "svg":
        metadata = {"Creator": None, "Date": None}
    else:
        raise ValueError(f"unsupported figure format {ext!r}; allowed: png, pdf, svg")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext, metadata=metadata, bbox_inches="tight")
    if close:
        plt.close(fig)


def reliability_diagram(ax: Axes, confidences: ArrayLike, correct: ArrayLike, *,
                        n_bins: int = N_BINS, title: str | None = None,
                        colour: str = PALETTE[0]) -> ReliabilityBins:
    """Draw a reliability diagram (per-bin accuracy bars against the diagonal) on ``ax``.

    Bars show the accuracy of each confidence bin; the hatched red part is the gap to the
    bin's mean confidence. The ECE is printed in the corner. Returns the bins.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    edges = np.asarray(bins.edges)
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    acc = np.nan_to_num(np.asarray(bins.accuracy), nan=0.0)
    conf = np.asarray(bins.confidence)
    has = np.asarray(bins.counts) > 0
    ax.bar(centres[has], acc[has], width=width, color=colour, edgecolor="white",
           linewidth=0.6, label="accuracy")
    gap_lo = np.minimum(acc, conf)[has]
    gap_hi = np.maximum(acc, conf)[has]
    ax.bar(centres[has], gap_hi - gap_lo, bottom=gap_lo, width=width, color="none",
           edgecolor="#c0392b", hatch="///", linewidth=0.0, label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="#555555", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.text(0.04, 0.93, f"ECE = {bins.ece:.3f}", transform=ax.transAxes, fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round"})
    if title:
        ax.set_title(title)
    return bins


def confidence_histogram(ax: Axes, confidences: ArrayLike, *, n_bins: int = N_BINS,
                         title: str | None = None, colour: str = PALETTE[0],
                         label: str | None = None, alpha: float = 0.85) -> None:
    """Histogram of confidences (fraction of samples per bin) with the mean marked."""
    conf = _np(confidences)
    weights = np.full_like(conf, 1.0 / max(1, conf.size))
    ax.hist(conf, bins=np.linspace(0, 1, n_bins + 1), weights=weights, color=colour,
            alpha=alpha, edgecolor="white", linewidth=0.6, label=label)
    ax.axvline(conf.mean(), color=colour, ls="--", lw=1.2)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("fraction of samples")
    if title:
        ax.set_title(title)


def training_curves(history: Sequence[dict[str, float]], *, title: str | None = None) -> Figure:
    """Loss and accuracy per epoch (train and validation) as a two-panel figure."""
    use_style()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train",
                 color=PALETTE[0])
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation",
                 color=PALETTE[1])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train",
                color=PALETTE[0])
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation",
                color=PALETTE[1])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def shown_classes(labels: torch.Tensor, num_classes: int, max_classes: int) -> list[int]:
    """The classes a per-class figure shows: all of them when there are at most
    ``max_classes``, else ``max_classes`` of the classes present in ``labels``, evenly spaced
    over their sorted list (the first and last included)."""
    if num_classes <= max_classes:
        return list(range(num_classes))
    present = sorted({int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()})
    if len(present) <= max_classes:
        return present
    picks = np.linspace(0, len(present) - 1, max_classes).round().astype(int)
    return [present[i] for i in picks]


def image_grid(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], *,
               per_class: int = 6, title: str | None = None, max_classes: int = 20) -> Figure:
    """A grid with ``per_class`` example images (rows) for each class (columns).

    With more than ``max_classes`` classes (CIFAR-100, Caltech-101, GTSRB) only
    ``max_classes`` columns are drawn (:func:`shown_classes`) and the title says so: a
    100-column grid is neither readable nor quick to draw.
    """
    use_style()
    classes = shown_classes(labels, len(class_names), max_classes)
    k = len(classes)
    fig, axes = plt.subplots(per_class, k, figsize=(1.05 * k, 1.1 * per_class), squeeze=False)
    for col, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        for r in range(per_class):
            ax = axes[r, col]
            ax.axis("off")
            if r < len(idx):
                img = images[idx[r]].detach().cpu().float()
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            if r == 0:
                ax.set_title(class_names[c], fontsize=8)
    if k < len(class_names):
        title = f"{title or 'examples'} ({k} of {len(class_names)} classes)"
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def class_balance(counts: dict[str, Sequence[int]], class_names: Sequence[str], *,
                  title: str | None = None, max_named: int = 30) -> Figure:
    """Grouped bar chart of samples per class for each split (class names on the axis for up
    to ``max_named`` classes, class indices beyond)."""
    use_style()
    k = len(class_names)
    if k > max_named:  # too many names to read: class indices every 10 classes instead
        fig, ax = plt.subplots(figsize=(12.0, 3.4))
    else:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * k), 3.4))
    width = 0.8 / max(1, len(counts))
    for i, (split, values) in enumerate(counts.items()):
        ax.bar(np.arange(k) + i * width - 0.4 + width / 2, list(values), width=width,
               label=split, color=PALETTE[i % len(PALETTE)])
    if k > max_named:
        ax.set_xticks(np.arange(0, k, 10))
        ax.set_xlabel("class index")
    else:
        ax.set_xticks(np.arange(k))
        ax.set_xticklabels(class_names, rotation=35, ha="right")
    ax.set_ylabel("images")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def calibration_panel(confidences: ArrayLike, correct: ArrayLike, *, title: str,
                      n_bins: int = N_BINS) -> Figure:
    """Reliability diagram and confidence histogram side by side for one model/condition."""
    use_style()
    fig, (ax_rel, ax_hist) = plt.subplots(1, 2, figsize=(8.6, 3.6))
    reliability_diagram(ax_rel, confidences, correct, n_bins=n_bins, title="reliability")
    confidence_histogram(ax_hist, confidences, n_bins=n_bins, title="confidence histogram")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


def reliability_grid(panels: dict[str, dict[str, tuple[ArrayLike, ArrayLike]]], *,
                     title: str | None = None, n_bins: int = N_BINS) -> Figure:
    """The paper's Fig. 1: reliability diagrams before and after each attack.

    Args:
        panels: row name (e.g. "square L-inf") -> column name (e.g. "clean", "uca") ->
            (confidences (N,), correct (N,)).
    """
    use_style()
    rows = list(panels)
    cols = list(dict.fromkeys(c for r in rows for c in panels[r]))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.7 * len(cols), 2.7 * len(rows)),
                             squeeze=False, sharex=True, sharey=True)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            if col not in panels[row]:
                ax.axis("off")
                continue
            conf, correct = panels[row][col]
            reliability_diagram(ax, conf, correct, n_bins=n_bins,
                                colour=ATTACK_COLOURS.get(col, PALETTE[0]))
            ax.set_title(f"{row}: {col.upper() if col != 'clean' else 'clean'}", fontsize=9)
            if i < len(rows) - 1:
                ax.set_xlabel("")
            if j > 0:
                ax.set_ylabel("")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confidence_histograms(conditions: dict[str, ArrayLike], *, title: str | None = None,
                          n_bins: int = N_BINS) -> Figure:
    """One confidence histogram per condition (e.g. clean and each attack), side by side."""
    use_style()
    names = list(conditions)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        confidence_histogram(ax, conditions[name], n_bins=n_bins,
                             colour=ATTACK_COLOURS.get(name, PALETTE[0]),
                             title=name.upper() if name != "clean" else "clean")
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def attack_curves(curves: pd.DataFrame, *, title: str | None = None) -> Figure:
    """ECE and success rate against the query budget, one line per attack kind.

    Args:
        curves: long table with columns setting, kind, queries, ece, success_rate (as written
            by the attack stage from :meth:`calib.attacks.AttackResult.curve`).
    """
    use_style()
    settings = list(dict.fromkeys(curves["setting"]))
    fig, axes = plt.subplots(2, len(settings), figsize=(3.4 * len(settings), 5.4),
                             squeeze=False, sharey="row")
    for j, setting in enumerate(settings):
        part = curves[curves["setting"] == setting]
        for kind in dict.fromkeys(part["kind"]):
            rows = part[part["kind"] == kind]
            colour = ATTACK_COLOURS.get(kind, PALETTE[0])
            axes[0, j].plot(rows["queries"], rows["ece"], color=colour, label=kind.upper())
            axes[1, j].plot(rows["queries"], rows["success_rate"], color=colour,
                            label=kind.upper())
        axes[0, j].set_title(setting)
        axes[1, j].set_xlabel("queries per image" if not setting.startswith("pgd")
                              else "gradient steps + 1")
        axes[1, j].set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("ECE")
    axes[1, 0].set_ylabel("success rate")
    axes[0, -1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def defence_ece_heatmap(table: pd.DataFrame, *, title: str | None = None,
                        cmap: str = "YlOrRd") -> Figure:
    """Post-attack ECE across defences and attacks (paper Table 4 as a figure).

    One heatmap per setting (e.g. square-linf, pgd-linf): a row per defence, a column per
    attack, each cell annotated with its ECE; the first column is the defended model's clean
    ECE on the same images, so each row reads "before, then after each attack". All panels
    share one colour scale starting at 0.

    Args:
        table: rows of :func:`calib.reporting.table4` for ONE model (columns defence,
            setting, attack, ece_before, ece_after).
        title: figure title.
        cmap: a matplotlib colormap name.
    """
    use_style()
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    if "model" in table and table["model"].nunique() > 1:
        raise ValueError("table holds several models; plot one model at a time")
    settings = list(dict.fromkeys(table["setting"]))
    defences = list(dict.fromkeys(table["defence"]))
    attacks = list(dict.fromkeys(table["attack"]))
    columns = ["clean", *attacks]
    grids = []
    for setting in settings:
        part = table[table["setting"] == setting]
        after = part.pivot_table(index="defence", columns="attack", values="ece_after",
                                 aggfunc="first")
        clean = part.groupby("defence")["ece_before"].first().rename("clean")
        grid = pd.concat([clean, after], axis=1).reindex(index=defences, columns=columns)
        grids.append(grid.to_numpy(dtype=np.float64))
    vmax = max(0.05, float(np.nanmax(np.stack(grids))))
    width = 1.0 + 0.75 * len(columns)
    fig, axes = plt.subplots(1, len(settings), figsize=(width * len(settings) + 0.8,
                                                          0.42 * len(defences) + 1.6),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, setting, grid in zip(axes[0], settings, grids, strict=True):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax,
                          aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = grid[i, j]
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if value > 0.6 * vmax else "black")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns)
        ax.set_yticks(range(len(defences)))
        ax.set_yticklabels(defences)
        ax.axvline(0.5, color="white", lw=2)
        ax.grid(False)
        ax.set_title(setting)
        ax.tick_params(length=0)
    assert image is not None
    fig.colorbar(image, ax=axes[0].tolist(), label="ECE", fraction=0.04, pad=0.01)
    if title:
        fig.suptitle(title)
    return fig
