"""Figures: reliability diagrams, confidence histograms, training curves, example grids.

One pinned style and deterministic files: PNGs are written without software metadata and
PDFs without creation dates, so an unchanged result keeps its hash (DVC and git see no change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

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


#: The reliability diagram's marks: the hatched gap to the mean confidence, the diagonal.
GAP_COLOUR = "#c0392b"
DIAGONAL_COLOUR = "#555555"
#: Clean (before-attack) levels drawn as lines across attack curves.
CLEAN_COLOUR = "#222222"
#: Attack kinds in the order of every table and figure (calib.reporting.KIND_ORDER).
KINDS = ("uca", "oca", "mma", "rca")
#: Attack settings in the order of the figures' panels (calib.reporting.SETTING_ORDER).
SETTINGS = ("square-linf", "square-l2", "pgd-linf")


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
    bin's mean confidence; the dashed diagonal is perfect calibration. The ECE is printed in the
    corner (:func:`reliability_legend` explains the marks once per figure). Returns the bins.
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
           edgecolor=GAP_COLOUR, hatch="///", linewidth=0.0, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color=DIAGONAL_COLOUR, lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.text(0.04, 0.93, f"ECE = {bins.ece:.3f}", transform=ax.transAxes, fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round"})
    if title:
        ax.set_title(title)
    return bins


def reliability_legend(fig: Figure, *, bar_colour: str = PALETTE[7], ncol: int = 3) -> None:
    """One legend under the figure for the marks of its reliability diagrams (bars, hatched gap,
    dashed diagonal), outside every axes so that it covers no data. The figure must use the
    constrained layout (``layout="constrained"``)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=bar_colour, edgecolor="white", label="accuracy per confidence bin"),
        Patch(facecolor="none", edgecolor=GAP_COLOUR, hatch="///",
              label="gap to the bin's mean confidence"),
        Line2D([0], [0], ls="--", color=DIAGONAL_COLOUR, lw=1, label="perfect calibration"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=9)


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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.7), layout="constrained")
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train",
                 color=PALETTE[0])
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation",
                 color=PALETTE[1])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train",
                color=PALETTE[0])
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation",
                color=PALETTE[1])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(handles=ax_loss.get_lines(), loc="outside lower center", ncol=2, fontsize=9)
    if title:
        fig.suptitle(title)
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
    fig, (ax_rel, ax_hist) = plt.subplots(1, 2, figsize=(8.6, 4.0), layout="constrained")
    reliability_diagram(ax_rel, confidences, correct, n_bins=n_bins, title="reliability")
    confidence_histogram(ax_hist, confidences, n_bins=n_bins, title="confidence histogram")
    fig.suptitle(title)
    reliability_legend(fig, bar_colour=PALETTE[0])
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
    fig, axes = plt.subplots(len(rows), len(cols),
                             figsize=(2.7 * len(cols), 2.7 * len(rows) + 0.5),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
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
    reliability_legend(fig)
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
                        cmap: str = "YlOrRd", names: Mapping[str, str] | None = None,
                        families: Mapping[str, str] | None = None) -> Figure:
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
        names: display name per defence key (e.g. :data:`calib.reporting.DEFENCE_NAMES`); its
            order is the rows' order (undefended, post-hoc, training-time), defences it does
            not list follow in the table's order.
        families: family per defence key ("none", "posthoc", "training"): a white line
            separates the families.
    """
    use_style()
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    if "model" in table and table["model"].nunique() > 1:
        raise ValueError("table holds several models; plot one model at a time")
    settings = _settings_in(table["setting"])
    present = list(dict.fromkeys(table["defence"]))
    names = dict(names or {})
    defences = [d for d in names if d in present] + [d for d in present if d not in names]
    order = {k.upper(): i for i, k in enumerate(KINDS)}
    attacks = sorted(dict.fromkeys(table["attack"]), key=lambda a: order.get(a, len(order)))
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
        ax.set_yticklabels([names.get(d, d) for d in defences])
        ax.axvline(0.5, color="white", lw=2)
        if families:
            for i in range(1, len(defences)):
                if families.get(defences[i]) != families.get(defences[i - 1]):
                    ax.axhline(i - 0.5, color="white", lw=3)
        ax.grid(False)
        ax.set_title(setting)
        ax.tick_params(length=0)
    assert image is not None
    fig.colorbar(image, ax=axes[0].tolist(), label="ECE", fraction=0.04, pad=0.01)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# Figures of the analysis stages (the notebooks only call these and save the result)

_METRIC_LABELS = {"ece": "ECE", "ks": "KS error", "confidence": "average confidence",
                  "accuracy": "accuracy", "success_rate": "success rate"}


def _plain_log_ticks(ax: Axes, x: np.ndarray) -> None:
    """Plain numbers on a log x axis (1, 2, 5, 10, ... for a short range; powers of ten for a
    long one), never the crowded "2×10⁰ 3×10⁰" labels of minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    span = np.log10(max(float(np.nanmax(x)), 1.0) / max(float(np.nanmin(x)), 1e-12))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 2 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _settings_in(values: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [k for k in SETTINGS if k in present] + [k for k in present if k not in SETTINGS]


def _kinds_in(values: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [k for k in KINDS if k in present] + [k for k in present if k not in KINDS]


def sweep_figure(tidy: pd.DataFrame, curves: pd.DataFrame | None, *,
                 budgets: pd.DataFrame | None = None,
                 settings: Sequence[str] | None = None,
                 metrics: Sequence[str] = ("ece", "ks", "confidence"),
                 eps_marks: Mapping[str, float] | None = None,
                 title: str | None = None) -> Figure:
    """The paper's Fig. 2: each metric against eps (the sweep) and against the query budget,
    a row per metric, a column pair per setting.

    The query axis is made of dedicated runs, one per budget (``budgets``; markers), each run
    as a user choosing that budget would run it; the attack stage's one long run is drawn
    beside them, dotted and named "one run's trajectory": Square's schedule is rescaled to the
    budget, so its first b queries are not a b-query run. The sweep and the dedicated runs use
    the first ``n`` attacked images, the trajectory all of them, so their clean levels differ
    slightly: each is drawn in its own line style and named in the legend, under the panels.

    Args:
        tidy: :func:`calib.analysis.sweeps.collect_sweep` output of one model (columns
            setting, kind, eps, n, the metrics and ``clean_<metric>``).
        curves: the attack stage's long curve table (setting, kind, queries, metrics), or None.
        budgets: :func:`calib.analysis.sweeps.collect_budgets` output of the same model, or
            None (then the query axis is the trajectory alone).
        settings: settings to draw (default: those in ``tidy``, in order).
        metrics: rows, among ece, ks, confidence.
        eps_marks: label -> eps drawn as a dotted vertical line on the eps axes.
        title: figure title.
    """
    from matplotlib.lines import Line2D

    if tidy.empty:
        raise ValueError("tidy is empty: nothing to plot")
    use_style()
    settings = list(settings) if settings is not None else list(dict.fromkeys(tidy["setting"]))
    panels = []
    for setting in settings:
        panels.append((setting, "eps"))
        if any(df is not None and setting in set(df["setting"]) for df in (curves, budgets)):
            panels.append((setting, "queries"))
    fig, axes = plt.subplots(len(metrics), len(panels),
                             figsize=(3.3 * len(panels), 2.6 * len(metrics) + 0.6),
                             squeeze=False, sharex="col", layout="constrained")
    kinds = _kinds_in(tidy["kind"])
    styles = {"eps": "--", "queries": "-."}
    trajectory_drawn = False
    for j, (setting, axis) in enumerate(panels):
        dedicated = (axis == "queries" and budgets is not None
                     and setting in set(budgets["setting"]))
        has_curve = curves is not None and setting in set(curves["setting"])
        if axis == "eps" or dedicated:
            source, x_name = (tidy, "eps") if axis == "eps" else (budgets, "budget")
            part = source[source["setting"] == setting]  # type: ignore[index]
        else:
            part, x_name = curves[curves["setting"] == setting], "queries"  # type: ignore[index]
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            wide = part.pivot_table(index=x_name, columns="kind", values=metric,
                                    aggfunc="first").sort_index()
            x = wide.index.to_numpy(dtype=np.float64)
            for kind in (k for k in kinds if k in wide):
                ax.plot(x, wide[kind], color=ATTACK_COLOURS.get(kind, PALETTE[0]),
                        marker="o" if x_name != "queries" else None, ms=4, lw=1.5)
            if x_name != "queries":
                clean = float(part[f"clean_{metric}"].iloc[0])
                ax.axhline(clean, color=CLEAN_COLOUR, ls=styles["eps"], lw=1.1)
            if x_name == "queries" or (dedicated and has_curve):
                run = curves[curves["setting"] == setting]  # type: ignore[index]
                trajectory = run.pivot_table(index="queries", columns="kind", values=metric,
                                             aggfunc="first").sort_index()
                tq = trajectory.index.to_numpy(dtype=np.float64)
                for kind in (k for k in kinds if k in trajectory):
                    ax.plot(tq, trajectory[kind], color=ATTACK_COLOURS.get(kind, PALETTE[0]),
                            ls=":" if dedicated else "-", lw=0.9 if dedicated else 1.5)
                first = run[run["queries"] == run["queries"].min()]
                ax.axhline(float(first[metric].mean()), color=CLEAN_COLOUR,
                           ls=styles["queries"], lw=1.1)
                trajectory_drawn = trajectory_drawn or dedicated
                if x_name == "queries":
                    x = tq
            ax.set_xscale("log")
            if axis == "eps":
                for k, (label, value) in enumerate((eps_marks or {}).items()):
                    ax.axvline(value, color="#777777", ls=":", lw=1)
                    if i == 0:
                        ax.text(value, 1.0 - 0.09 * k, f" {label}", fontsize=7,
                                transform=ax.get_xaxis_transform(), color="#555555",
                                va="top")
                ax.set_xticks(x)
                ax.set_xticklabels([repr(float(v)) for v in x], fontsize=8)
                ax.minorticks_off()
            else:
                _plain_log_ticks(ax, x)
            if metric == "confidence":
                ax.set_ylim(0, 1.02)
            else:
                ax.set_ylim(bottom=0)
            if i == 0:
                ax.set_title(f"{setting}: against {'eps' if axis == 'eps' else 'queries'}",
                             fontsize=10)
            if i == len(metrics) - 1:
                ax.set_xlabel("eps (L∞, [0, 1] pixel scale)" if axis == "eps" else
                              ("gradient steps + 1" if setting.startswith("pgd")
                               else "queries per image"))
            if j == 0:
                ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    n = int(tidy["n"].iloc[0]) if "n" in tidy else None
    handles = [Line2D([0], [0], color=ATTACK_COLOURS.get(k, PALETTE[0]), lw=1.5,
                      label=k.upper()) for k in kinds]
    handles.append(Line2D([0], [0], color=CLEAN_COLOUR, ls=styles["eps"], lw=1.1,
                          label="clean, sweep images" + (f" (first {n})" if n else "")))
    if trajectory_drawn:
        handles.append(Line2D([0], [0], color="#555555", ls=":", lw=0.9,
                              label="one long run's trajectory"))
    if curves is not None and any(axis == "queries" for _, axis in panels):
        handles.append(Line2D([0], [0], color=CLEAN_COLOUR, ls=styles["queries"], lw=1.1,
                              label="clean, attack-stage images (all)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def size_comparison(table: pd.DataFrame, *, setting: str = "square-linf",
                    balanced_only: bool = True) -> Figure:
    """ECE after each attack (top, with the clean ECE as a black tick) and success rate
    (bottom) per model, a column per architecture family, models small to large.

    Args:
        table: :func:`calib.analysis.comparison.model_table` (columns model, family, arch,
            parameters_m, imbalance_ratio, setting, attack, clean_ece, ece_after,
            success_rate).
        setting: which attack setting to show.
        balanced_only: leave out long-tailed models (they have their own figure).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    use_style()
    t = table[table["setting"] == setting]
    if balanced_only:
        t = t[t["imbalance_ratio"] == 1]
    if t.empty:
        raise ValueError(f"no rows for setting {setting!r}; "
                         f"have {sorted(table['setting'].unique())}")
    families = sorted(t["family"].unique())
    kinds = _kinds_in(t["attack"].str.lower())
    fig, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 6.6),
                             squeeze=False, sharey="row", layout="constrained")
    width = 0.8 / len(kinds)
    for col, family in enumerate(families):
        f = t[t["family"] == family]
        models = f.drop_duplicates("model").sort_values("parameters_m")
        x = np.arange(len(models))
        for row, (metric, label) in enumerate((("ece_after", "ECE after attack"),
                                               ("success_rate", "success rate"))):
            ax = axes[row, col]
            for i, kind in enumerate(kinds):
                vals = [f[(f["model"] == m) & (f["attack"] == kind.upper())][metric].mean()
                        for m in models["model"]]
                ax.bar(x + (i - (len(kinds) - 1) / 2) * width, vals, width,
                       color=ATTACK_COLOURS.get(kind, PALETTE[0]))
            if metric == "ece_after":
                ax.scatter(x, models["clean_ece"], marker="_", s=900, color=CLEAN_COLOUR,
                           zorder=3, linewidths=2)
            ax.set_ylim(0, 1.0 if metric == "success_rate" else None)
            ax.set_xticks(x, [f"{m}\n{a}\n{p:.2f}M params" for m, a, p in
                              zip(models["model"], models["arch"], models["parameters_m"],
                                  strict=True)], fontsize=8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{family} family ({setting})")
    handles = [Patch(color=ATTACK_COLOURS.get(k, PALETTE[0]), label=k.upper()) for k in kinds]
    handles.append(Line2D([0], [0], color=CLEAN_COLOUR, lw=2, label="clean ECE"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9)
    return fig


def imbalance(per_class: pd.DataFrame, *, balanced: str, long_tailed: str,
              train_counts: Sequence[int], kinds: Sequence[str] = ("uca", "oca"),
              class_names: Sequence[str] | None = None) -> Figure:
    """Head-to-tail view of a balanced and a long-tailed model, two panels a row so that the
    text reads at page width: training images per class (log scale); clean accuracy and
    confidence per class; the success rate per class of each attack kind. Rates are drawn on
    their full 0-1 axis, so a dip is shown at its true size.

    Args:
        per_class: :func:`calib.analysis.comparison.per_class_table` (model, label,
            clean_accuracy, clean_confidence, ``<kind>_success``).
        balanced, long_tailed: the two models' names.
        train_counts: the long-tailed model's training images per class.
        kinds: attack kinds with a success-rate panel each.
        class_names: tick labels (default: class indices).
    """
    from matplotlib.lines import Line2D

    use_style()
    for name in (balanced, long_tailed):
        if name not in set(per_class["model"]):
            raise ValueError(f"model {name!r} not in the per-class table; have "
                             f"{sorted(per_class['model'].unique())}")
    classes = np.arange(len(train_counts))
    labels = list(class_names) if class_names is not None else [str(c) for c in classes]
    n_panels = 2 + len(kinds)
    n_rows = (n_panels + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(10.0, 3.6 * n_rows + 0.5), squeeze=False,
                             layout="constrained")
    axes = axes.flatten()
    axes[0].bar(classes, train_counts, color=PALETTE[7])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training images")
    axes[0].set_title(f"{long_tailed}: training images per class")
    styles = {balanced: ("-", PALETTE[0]), long_tailed: ("--", PALETTE[3])}
    for model, (ls, colour) in styles.items():
        m = per_class[per_class["model"] == model].sort_values("label")
        axes[1].plot(m["label"], m["clean_accuracy"], ls=ls, color=colour, marker="o", ms=4)
        axes[1].plot(m["label"], m["clean_confidence"], ls=ls, color=colour, marker="^", ms=4,
                     alpha=0.55)
        for ax, kind in zip(axes[2:], kinds, strict=False):
            ax.plot(m["label"], m[f"{kind}_success"], ls=ls, color=colour, marker="o", ms=4)
    axes[1].set_title("clean accuracy (●) and confidence (▲)")
    axes[1].set_ylabel("accuracy, confidence")
    for ax, kind in zip(axes[2:], kinds, strict=False):
        ax.set_title(f"{kind.upper()} success rate per class")
        ax.set_ylabel("success rate")
    for ax in axes[1:n_panels]:
        ax.set_ylim(0, 1.02)
    for ax in axes[:n_panels]:
        ax.set_xticks(classes, labels, rotation=35, fontsize=8, ha="right")
        ax.set_xlabel("class (head → tail)")
    for ax in axes[n_panels:]:
        ax.axis("off")
    handles = [Line2D([0], [0], ls=ls, color=colour, marker="o", ms=4,
                      label=f"{model} ({'balanced' if model == balanced else 'long-tailed'})")
               for model, (ls, colour) in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9)
    return fig


def mma_bound(bounds: pd.DataFrame) -> Figure:
    """Achieved MMA ECE and KS per model x setting next to the clean ECE and the bound
    ``1 - q/K`` (:func:`calib.analysis.claims.mma_bound_table`); the legend sits beside the
    axes, clear of the bars and of the bound's marks near the top."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    use_style()
    labels = [f"{r.model}\n{r.setting}" for r in bounds.itertuples()]
    x = np.arange(len(bounds))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(bounds) + 2), 4.2),
                           layout="constrained")
    ax.bar(x - 0.2, bounds["ece_after"], 0.4, color=ATTACK_COLOURS["mma"])
    ax.bar(x + 0.2, bounds["ks_after"], 0.4, color=PALETTE[9])
    ax.scatter(x, bounds["ece_before"], marker="_", s=600, color=CLEAN_COLOUR, zorder=3,
               linewidths=2)
    ax.scatter(x, bounds["bound"], marker="_", s=900, color=PALETTE[3], zorder=3, linewidths=2)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("calibration error")
    handles = [Patch(color=ATTACK_COLOURS["mma"], label="ECE after MMA"),
               Patch(color=PALETTE[9], label="KS after MMA"),
               Line2D([0], [0], color=CLEAN_COLOUR, lw=2, label="clean ECE"),
               Line2D([0], [0], color=PALETTE[3], lw=2, label="bound 1 − q/K")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    ax.set_title("MMA: achieved calibration error against the theoretical bound")
    return fig
