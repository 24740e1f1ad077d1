"""Do calibration attacks change what the model looks at? Gradient saliency before vs after
(SPEC §9: the paper's gradient-based visualisations of the attacks' characteristics).

Paper: Obadinma, Zhu, Guo, "Calibration Attacks: A Comprehensive Study of Adversarial Attacks
on Model Confidence" (TMLR; arXiv:2401.02718). It shows saliency / Grad-CAM visualisations
before and after the attacks on example images; here every attacked image is scored, against
a random-noise baseline, so the comparison does not rest on a few chosen examples.

We use vanilla gradient saliency (Simonyan et al. 2014): ``S(x) = max_c |d z_k / d x_c|``,
the channel-wise maximum of the absolute input gradient of the logit of class ``k``, where
``k`` is the **clean** prediction for both the clean and the adversarial input (the attacks
keep it). Grad-CAM is not used: on 28x28 inputs the ResNet-18's last feature map is 1x1, so a
class activation map would be a single number.

Clean and adversarial maps are compared per sample with cosine similarity, Spearman rank
correlation and the IoU of their top-10% pixels. Reference baselines ask how much the map
would change anyway under random noise of the same L-inf size r (the largest L-inf norm the
attacks reached on that image; for L-inf attacks, the budget eps), clipped to [0, 1]:

- ``uniform``: U(-r, r) per pixel (RMS r / sqrt(3): less energy than an attack of that size);
- ``sign``: +-r per pixel at random (the vertices of the L-inf ball, as Square Attack's
  L-inf updates produce: the largest L2 norm that L-inf size allows).

An attack whose scores sit below both baselines changes the explanation more than random
noise of its size does, even noise with more energy than the attack.

Shapes: images (N, C, H, W) in [0, 1]; saliency maps (N, H, W), non-negative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from calib.analysis.representations import KINDS, check_pair
from calib.checks import check_choice, check_images, check_int, check_number
from calib.plots import ATTACK_COLOURS, PALETTE, use_style
from calib.runtime import eval_mode, model_device, predict_logits

#: Similarity scores between two saliency maps, in table order.
SIMILARITIES: tuple[str, ...] = ("cosine", "spearman", "iou_top")


def gradient_saliency(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                      batch_size: int = 128) -> torch.Tensor:
    """Vanilla gradient saliency ``max_c |d z_target / d x_c|``, (N, H, W) float32 on the CPU.

    One backward pass per batch: the selected logits are summed, which gives every sample its
    own gradient because the samples of a batch do not interact in eval mode (BatchNorm uses
    its running statistics).

    Args:
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K); run in eval mode, its
            modes and parameters are left as they were.
        images: (N, C, H, W) in [0, 1].
        target: (N,) int64, the logit to explain per sample (the clean prediction).
        batch_size: images per forward/backward pass.
    """
    check_images(images)
    if not isinstance(target, torch.Tensor) or target.shape != (images.shape[0],) \
            or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor of shape ({images.shape[0]},), "
                         f"got {getattr(target, 'shape', type(target).__name__)}")
    check_int("batch_size", batch_size, minimum=1)
    device = model_device(model)
    maps = []
    with eval_mode(model):
        for x, k in zip(images.split(batch_size), target.split(batch_size), strict=True):
            x = x.to(device).detach().requires_grad_(True)
            logits = model(x)
            selected = logits.gather(1, k.to(device)[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, x)
            maps.append(grad.abs().amax(1).float().cpu())
    return torch.cat(maps)


#: Random-noise baselines: uniform in [-r, r], or +-r with equal probability.
BASELINES: tuple[str, ...] = ("uniform", "sign")


def noisy_copy(images: torch.Tensor, radius: torch.Tensor, *, seed: int,
               distribution: str = "uniform") -> torch.Tensor:
    """``clip(x + r * u, 0, 1)`` per sample with u ~ U(-1, 1) ("uniform") or u = +-1 with
    equal probability ("sign"): a random-noise baseline of L-inf size r, seeded.

    Args:
        images: (N, C, H, W) in [0, 1].
        radius: (N,) per-sample noise amplitude r >= 0 (the attack's L-inf norm).
        seed: generator seed (CPU generator, so the noise does not depend on the device).
        distribution: one of :data:`BASELINES`.
    """
    check_images(images)
    check_choice("distribution", distribution, BASELINES)
    if radius.shape != (images.shape[0],) or bool((radius < 0).any()):
        raise ValueError(f"radius must be non-negative with shape ({images.shape[0]},), "
                         f"got {tuple(radius.shape)}")
    gen = torch.Generator().manual_seed(seed)
    if distribution == "uniform":
        u = torch.rand(images.shape, generator=gen, dtype=torch.float32) * 2 - 1
    else:
        u = torch.randint(0, 2, images.shape, generator=gen).to(torch.float32) * 2 - 1
    r = radius.to(torch.float32).view(-1, 1, 1, 1)
    return (images + (u * r).to(images.device, images.dtype)).clamp(0.0, 1.0)


# --- similarity scores --------------------------------------------------------------------------

def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim < 2:
        raise ValueError(f"maps must be (N, ...) with at least one value per sample, "
                         f"got shape {tuple(a.shape)}")
    check_pair(a, b, name="b")
    return a.flatten(1).double(), b.flatten(1).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair of maps (N, ...) -> (N,) float64 (0 for an all-zero
    map)."""
    x, y = _flat_pair(a, b)
    return torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-300)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) of each row of ``values`` (N, M), ties sharing their average rank
    (as ``scipy.stats.rankdata``), vectorised: for a value v, the ranks of its ties run
    from #(< v) + 1 to #(<= v), whose mean is (#(< v) + #(<= v) + 1) / 2."""
    x = values.double().contiguous()
    ordered = x.sort(dim=1).values
    below = torch.searchsorted(ordered, x, right=False)
    upto = torch.searchsorted(ordered, x, right=True)
    return (below + upto + 1).double() / 2


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of (N, M) tensors -> (N,) float64; NaN for a constant row."""
    x = x.double() - x.double().mean(1, keepdim=True)
    y = y.double() - y.double().mean(1, keepdim=True)
    denom = x.norm(dim=1) * y.norm(dim=1)
    r = (x * y).sum(1) / denom
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (N, ...) -> (N,) float64 (Pearson on
    average ranks; NaN when a map is constant)."""
    x, y = _flat_pair(a, b)
    return pearson(average_ranks(x), average_ranks(y))


def top_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, M) bool: the ``ceil(fraction * M)`` largest values of each flattened map; ties
    are broken by position (a stable sort), so the mask always has exactly that many."""
    check_number("fraction", fraction, low=0, high=1, low_open=True)
    x = maps.flatten(1)
    m = int(np.ceil(fraction * x.shape[1]))
    order = x.argsort(dim=1, descending=True, stable=True)[:, :m]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)


def iou_top(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Intersection over union of the top-``fraction`` pixels of each pair of maps -> (N,)."""
    x, y = _flat_pair(a, b)
    ma, mb = top_mask(x, fraction), top_mask(y, fraction)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def similarities(a: torch.Tensor, b: torch.Tensor, *, fraction: float = 0.1
                 ) -> dict[str, torch.Tensor]:
    """All scores of :data:`SIMILARITIES` for maps (N, H, W); each (N,) float64."""
    return {"cosine": cosine(a, b), "spearman": spearman(a, b),
            "iou_top": iou_top(a, b, fraction)}


# --- the analysis over an attacked set ----------------------------------------------------------

def saliency_shift(model: nn.Module, clean: torch.Tensor, adversarial: Mapping[str, torch.Tensor],
                   *, seed: int, fraction: float = 0.1, batch_size: int = 128,
                   baselines: Sequence[str] = BASELINES,
                   saliency: Callable[..., torch.Tensor] = gradient_saliency,
                   ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Saliency maps of the clean, adversarial and noise-baseline inputs and their
    per-sample similarities.

    The noise baselines are shared by all kinds (one backward pass per baseline instead of
    one per kind and baseline): image i gets noise of L-inf radius
    ``r_i = max over kinds of ||x~_i - x_i||_inf``. For L-inf attacks this is the budget eps
    on every image any attack touched (perturbed L-inf attacks sit on the boundary of the
    ball); for L2 attacks it is the largest of the kinds' L-inf norms, a conservative
    baseline for the others.

    Args:
        model: the attacked classifier.
        clean: (N, C, H, W) clean images.
        adversarial: kind -> (N, C, H, W) adversarial images (aligned with ``clean``).
        seed: seeds the noise baselines (baseline j uses ``seed + j``).
        fraction: the top share of pixels compared by the IoU score.
        batch_size: images per backward pass.
        baselines: which of :data:`BASELINES` to compute.
        saliency: the map function ``(model, images, target, batch_size=) -> (N, H, W)``.

    Returns:
        A long table with one row per (kind, sample): kind, sample, prediction, perturbed,
        linf (the perturbation's L-inf norm), noise_radius, ``<score>`` (clean vs
        adversarial) and ``<score>_<baseline>`` (clean vs that noise baseline) for each score
        and baseline; and the maps "clean", one per kind and "noise/<baseline>", each
        (N, H, W).

    Raises:
        ValueError: an unknown kind or baseline, or an adversarial tensor of another shape.
    """
    check_images(clean, name="clean")
    if not adversarial:
        raise ValueError("adversarial must hold at least one kind")
    for kind, adv in adversarial.items():
        check_choice("kind", kind, KINDS)
        check_pair(clean, adv, name=f"adversarial[{kind!r}]")
    for baseline in baselines:
        check_choice("baselines", baseline, BASELINES)
    prediction = predict_logits(model, clean, batch_size=batch_size,
                                device=model_device(model)).argmax(1)
    linf = {kind: (adv.double() - clean.double()).flatten(1).abs().amax(1).cpu()
            for kind, adv in adversarial.items()}
    radius = torch.stack(list(linf.values())).amax(0)
    maps = {"clean": saliency(model, clean, prediction, batch_size=batch_size)}
    noise_scores = {}
    for j, baseline in enumerate(baselines):
        noisy = noisy_copy(clean, radius, seed=seed + j, distribution=baseline)
        maps[f"noise/{baseline}"] = saliency(model, noisy, prediction, batch_size=batch_size)
        noise_scores[baseline] = similarities(maps["clean"], maps[f"noise/{baseline}"],
                                              fraction=fraction)
    frames = []
    n = clean.shape[0]
    for kind, adv in adversarial.items():
        maps[kind] = saliency(model, adv, prediction, batch_size=batch_size)
        cols: dict[str, object] = {"kind": kind, "sample": np.arange(n),
                                   "prediction": prediction.numpy(),
                                   "perturbed": (linf[kind] > 0).numpy(),
                                   "linf": linf[kind].numpy(), "noise_radius": radius.numpy()}
        for name, values in similarities(maps["clean"], maps[kind], fraction=fraction).items():
            cols[name] = values.numpy()
        for baseline, scores in noise_scores.items():
            for name, values in scores.items():
                cols[f"{name}_{baseline}"] = values.numpy()
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True), maps


def summarize_similarity(table: pd.DataFrame, *, setting: str, only_perturbed: bool = True
                         ) -> pd.DataFrame:
    """Per-kind summary of :func:`saliency_shift`'s table: one row per (kind, score).

    Columns: setting, kind, score, n, median / mean of the clean-vs-attack score, and per
    baseline b present in the table: ``b_median``, ``b_mean`` (clean vs that noise) and
    ``frac_below_b``, the share of samples whose map the attack changed more than that noise
    did (0.5: no different from noise). Unperturbed samples (score 1 by construction) are
    excluded by default.
    """
    baselines = [b for b in BASELINES if f"{SIMILARITIES[0]}_{b}" in table]
    rows = []
    for kind in dict.fromkeys(table["kind"]):
        part = table[table["kind"] == kind]
        if only_perturbed:
            part = part[part["perturbed"]]
        for score in SIMILARITIES:
            att = part[score].to_numpy()
            ref = {b: part[f"{score}_{b}"].to_numpy() for b in baselines}
            ok = ~np.isnan(att)
            for values in ref.values():
                ok &= ~np.isnan(values)
            row: dict[str, object] = {
                "setting": setting, "kind": kind, "score": score, "n": int(ok.sum()),
                "attack_median": _nan(np.median, att[ok]), "attack_mean": _nan(np.mean, att[ok])}
            for b, values in ref.items():
                row[f"{b}_median"] = _nan(np.median, values[ok])
                row[f"{b}_mean"] = _nan(np.mean, values[ok])
            for b, values in ref.items():
                row[f"frac_below_{b}"] = _nan(np.mean, att[ok] < values[ok])
            rows.append(row)
    return pd.DataFrame(rows)


def _nan(fn: Callable[[np.ndarray], object], values: np.ndarray) -> float:
    return float(fn(values)) if values.size else float("nan")  # type: ignore[arg-type]


# --- figures ------------------------------------------------------------------------------------

def examples_figure(clean: torch.Tensor, adversarial: Mapping[str, torch.Tensor],
                    maps: Mapping[str, torch.Tensor], samples: Sequence[int], *,
                    table: pd.DataFrame | None = None, class_names: Sequence[str] = (),
                    prediction: torch.Tensor | None = None, title: str | None = None
                    ) -> Figure:
    """Per example two rows: the clean and adversarial images, then their saliency maps
    (one colour scale per example: the 99th percentile of its maps, so magnitudes compare).
    With ``table`` (from :func:`saliency_shift`), each adversarial map is titled with its
    Spearman correlation to the clean map and, unless ``prediction`` (N,) is given, the
    clean prediction is read from it."""
    use_style()
    kinds = list(adversarial)
    if prediction is None and table is not None:
        first = table[table["kind"] == table["kind"].iloc[0]].sort_values("sample")
        prediction = torch.as_tensor(first["prediction"].to_numpy())
    cols = 1 + len(kinds)
    fig, axes = plt.subplots(2 * len(samples), cols, figsize=(1.9 * cols, 2.0 * 2 * len(samples)),
                             squeeze=False)
    for r, i in enumerate(samples):
        row_maps = [maps["clean"][i], *(maps[k][i] for k in kinds)]
        vmax = float(torch.quantile(torch.stack(row_maps).flatten().double(), 0.99))
        vmax = vmax if vmax > 0 else 1.0
        for c, name in enumerate(["clean", *kinds]):
            img = clean[i] if name == "clean" else adversarial[name][i]
            ax_img, ax_map = axes[2 * r, c], axes[2 * r + 1, c]
            _show_image(ax_img, img)
            label = name if name == "clean" else name.upper()
            if name == "clean" and prediction is not None:
                k = int(prediction[i])
                label += f"\n#{i}: {class_names[k] if k < len(class_names) else k}"
            ax_img.set_title(label, fontsize=8, color=ATTACK_COLOURS.get(name, "black"))
            ax_map.imshow(row_maps[c].numpy(), cmap="inferno", vmin=0, vmax=vmax)
            ax_map.axis("off")
            if table is not None and name != "clean":
                row = table[(table["kind"] == name) & (table["sample"] == i)]
                if len(row):
                    ax_map.set_title(f"Spearman {float(row['spearman'].iloc[0]):.2f}",
                                     fontsize=7)
            elif name == "clean":
                ax_map.set_title("saliency", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _show_image(ax: plt.Axes, img: torch.Tensor) -> None:
    img = img.detach().cpu().float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.axis("off")


#: Face colour and hatch of each noise baseline's boxes.
BASELINE_STYLE: dict[str, tuple[str, str]] = {"uniform": ("#e3e3e3", "///"),
                                              "sign": ("#b0b0b0", "xxx")}

#: Axis labels of the similarity scores.
SCORE_LABELS: dict[str, str] = {"cosine": "cosine similarity",
                                "spearman": "Spearman rank correlation",
                                "iou_top": "IoU of the top-{fraction:.0%} pixels"}


def similarity_figure(table: pd.DataFrame, *, only_perturbed: bool = True, fraction: float = 0.1,
                      title: str | None = None) -> Figure:
    """Box plots of each similarity score per kind: clean vs attack (kind colour) beside
    clean vs each noise baseline of the same L-inf size (grey, hatched); ``fraction`` is the
    top share the IoU used (for its label)."""
    use_style()
    kinds = list(dict.fromkeys(table["kind"]))
    baselines = [b for b in BASELINES if f"{SIMILARITIES[0]}_{b}" in table]
    width = 1 + len(baselines)
    fig, axes = plt.subplots(1, len(SIMILARITIES), figsize=(4.0 * len(SIMILARITIES), 3.6),
                             squeeze=False, sharey=True)
    for ax, score in zip(axes[0], SIMILARITIES, strict=True):
        values, pos, styles = [], [], []
        for i, kind in enumerate(kinds):
            part = table[table["kind"] == kind]
            if only_perturbed:
                part = part[part["perturbed"]]
            for j, col in enumerate((score, *(f"{score}_{b}" for b in baselines))):
                v = part[col].to_numpy()
                values.append(v[~np.isnan(v)])
                pos.append((width + 1) * i + j)
                styles.append((ATTACK_COLOURS.get(kind, PALETTE[0]), "") if j == 0
                              else BASELINE_STYLE[baselines[j - 1]])
        box = ax.boxplot(values, positions=pos, widths=0.8, patch_artist=True,
                         showfliers=False, medianprops={"color": "black"})
        for patch, (colour, hatch) in zip(box["boxes"], styles, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.85)
            patch.set_hatch(hatch)
        ax.set_xticks([(width + 1) * i + (width - 1) / 2 for i in range(len(kinds))])
        ax.set_xticklabels([k.upper() for k in kinds])
        ax.set_title(SCORE_LABELS.get(score, score).format(fraction=fraction), fontsize=9)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    handles = [Patch(facecolor=ATTACK_COLOURS.get(k, PALETTE[0]), alpha=0.85) for k in kinds]
    labels = [f"clean vs {k.upper()}" for k in kinds]
    for b in baselines:
        colour, hatch = BASELINE_STYLE[b]
        handles.append(Patch(facecolor=colour, hatch=hatch, alpha=0.85))
        labels.append(f"clean vs {b} noise, same L-inf")
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    axes[0, 0].set_ylabel("similarity to the clean saliency map")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
    return fig
