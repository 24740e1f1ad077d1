"""Training (SPEC §7): SGD + Nesterov + cosine schedule, best-val checkpoint.

Training-time defences (PGD-AT, CAAT, DCA, SAM, label smoothing) plug in as a ``train_step``
callable from :mod:`calib.defences.training`; the default step is plain cross-entropy. Device
choice, seeding and prediction live in :mod:`calib.runtime`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from calib.checks import check_choice, check_int, check_number
from calib.runtime import data_loader, predict_logits

#: (model, images, labels, optimizer) -> loss; runs forward, backward and optimizer.step().
TrainStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer], float]

OPTIMIZERS = ("sgd", "adamw")


def cross_entropy_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       optimizer: torch.optim.Optimizer) -> float:
    """The undefended training step: cross-entropy, backward, optimizer step."""
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def augment_batch(images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator
                  ) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, vectorised over the batch.

    Args:
        images: (N, C, H, W) in [0, 1].
        pad: padding in pixels for the random crop (0 disables it).
        flip: whether to flip each image horizontally with probability 1/2.
        generator: CPU generator for the random offsets.
    """
    n, _, h, w = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device)[None, :])  # (N, H)
        cols = (dx[:, None] + torch.arange(w, device=images.device)[None, :])  # (N, W)
        idx_n = torch.arange(n, device=images.device)[:, None, None]
        # Gather rows then columns per sample: (N, C, H, W) without a Python loop.
        out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2).contiguous()
    if flip:
        do_flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(do_flip[:, None, None, None], out.flip(-1), out)
    return out


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (train_loss, train_accuracy, val_loss, val_accuracy, lr).
        best_epoch: 1-based epoch with the best validation accuracy.
        best_val_accuracy: that accuracy.
        state_dict: the best-val weights (the model itself is left holding them too).
    """

    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    optimizer: str = "sgd",
    warmup_epochs: float = 0.0,
    augment_pad: int = 0,
    augment_flip: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    train_step: TrainStep | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``model`` and keep the best-validation-accuracy weights (SPEC §7).

    SGD with momentum 0.9, Nesterov and weight decay 5e-4 under a per-step cosine schedule
    (optionally after a linear warm-up) is the paper's recipe; ``optimizer="adamw"`` is offered
    for ViTs trained from scratch.

    Args:
        model: maps images in [0, 1] (N, C, H, W) to logits (N, K).
        train_data, val_data: datasets of (image (C, H, W) float in [0, 1], label) pairs.
        epochs: number of passes over ``train_data`` (>= 1).
        train_step: one optimisation step; defaults to :func:`cross_entropy_step`.

    Returns:
        A :class:`TrainResult`; ``model`` ends holding the best weights.
    """
    check_int("epochs", epochs, minimum=1)
    for key, part in (("train_data", train_data), ("val_data", val_data)):
        if len(part) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{key} is empty: training needs images to fit on and a "
                             f"validation split to pick the best epoch")
    check_choice("optimizer", optimizer, OPTIMIZERS)
    device = torch.device(device)
    model.to(device)
    step_fn = train_step or cross_entropy_step
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
            nesterov=nesterov)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)  # type: ignore[arg-type]
    total = epochs * steps_per_epoch
    warm = int(warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    history: list[dict[str, float]] = []
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, n_seen = 0.0, 0
        loader = data_loader(train_data, batch_size, shuffle=True, seed=seed + epoch)
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not show_progress,
                   leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if augment_pad or augment_flip:
                x = augment_batch(x, pad=augment_pad, flip=augment_flip, generator=aug_gen)
            loss = step_fn(model, x, y, opt)
            sched.step()
            loss_sum += loss * len(y)
            n_seen += len(y)
            bar.set_postfix(loss=f"{loss:.3f}")
        val_logits = predict_logits(model, val_data, device=device)
        val_labels = _labels_of(val_data)
        train_eval = _quick_train_accuracy(model, train_data, device)
        val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, n_seen),
            "train_accuracy": train_eval,
            "val_loss": float(F.cross_entropy(val_logits, val_labels)),
            "val_accuracy": val_acc,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        history.append(row)
        if show_progress:
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}  "
                       f"val loss {row['val_loss']:.4f}  val acc {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return TrainResult(history=history, best_epoch=best_epoch, best_val_accuracy=best_acc,
                       state_dict=best_state)


def levelled_off(history: list[dict[str, float]], key: str = "val_loss", *, last: int = 2,
                 rel_tol: float = 0.05) -> bool:
    """Whether a training curve has levelled off: ``key`` moved by at most ``rel_tol``
    (relative to its final value) over each of the last ``last`` epochs.

    Evidence for "trained to convergence" (SPEC §10, fair defences), read off the per-epoch
    ``history`` of :func:`fit`. False when there are fewer than ``last + 1`` epochs: one or
    two points cannot show a plateau.

    Args:
        history: :attr:`TrainResult.history` (one dict per epoch).
        key: the curve, e.g. "val_loss", "val_accuracy", "train_loss".
        last: number of final epoch-to-epoch changes that must be small.
        rel_tol: largest allowed change, as a fraction of the final value.
    """
    check_int("last", last, minimum=1)
    check_number("rel_tol", rel_tol, low=0.0)
    if len(history) < last + 1:
        return False
    if any(key not in row for row in history):
        raise ValueError(f"history rows lack {key!r}; have {sorted(history[0])}")
    values = [float(row[key]) for row in history[-(last + 1):]]
    scale = max(abs(values[-1]), 1e-12)
    return all(abs(b - a) <= rel_tol * scale for a, b in itertools.pairwise(values))


def _labels_of(data: Dataset) -> torch.Tensor:
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.long().cpu()
    return torch.cat([y.reshape(-1) for _, y in data_loader(data, 1024)]).long()


def _quick_train_accuracy(model: nn.Module, data: Dataset, device: torch.device,
                          n: int = 2048) -> float:
    """Accuracy on a fixed slice of the training set, in eval mode (cheap progress signal)."""
    sub = Subset(data, range(min(n, len(data))))  # type: ignore[arg-type]
    logits = predict_logits(model, sub, device=device)
    labels = _labels_of(sub)
    return float((logits.argmax(1) == labels).float().mean())

