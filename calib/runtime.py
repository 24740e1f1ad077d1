"""Running models: device choice, seeding, eval mode, batched prediction (SPEC §7).

Every stage starts with :func:`resolve_device` and :func:`seed_everything`. Whatever evaluates a
model without training it (metrics, attacks, defences, analyses) does so inside
:func:`eval_mode`, which restores every submodule's own mode afterwards, also when a forward
pass raises; :func:`predict_logits` is the one batched prediction loop built on it.

Shapes: images (N, C, H, W) in [0, 1]; logits (N, K).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (model initialisation and dropout use the global RNG)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may draw from the legacy global RNG
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device.

    Raises:
        ValueError: a CUDA device is named but CUDA is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with none."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def training_flags(model: nn.Module) -> list[bool]:
    """The ``training`` flag of every submodule, in ``model.modules()`` order."""
    return [m.training for m in model.modules()]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore every submodule's own mode after.

    The flags are restored in a ``finally``, so a forward pass that raises leaves the model
    in the modes it had (a model being trained stays in train mode).
    """
    flags = training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        for module, flag in zip(model.modules(), flags, strict=True):
            module.training = flag


def data_loader(data: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
                ) -> DataLoader:
    """A single-process DataLoader over ``data`` with its own generator seeded by ``seed``.

    The loader draws its base seed from that generator even when it does not shuffle, so the
    global torch RNG (model initialisation, dropout) is never consumed by reading data.
    """
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=0, drop_last=False)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset | torch.Tensor, *, batch_size: int = 512,
                   device: str | torch.device | None = None, show_progress: bool = False
                   ) -> torch.Tensor:
    """Logits of ``model`` on an image tensor or a dataset, batch by batch, in eval mode.

    The model's previous modes are restored afterwards (see :func:`eval_mode`), also when a
    forward pass raises.

    Args:
        model: maps images (B, C, H, W) to logits (B, K).
        data: images (N, C, H, W), or a dataset of (image (C, H, W), label) pairs read in
            order.
        batch_size: images per forward pass (a kernel's result can depend on the batch it
            runs in, so callers that compare runs keep theirs fixed).
        device: where each batch is moved before the forward pass; None leaves it where it is
            (a tensor's own device; the CPU for a dataset).
        show_progress: show a tqdm progress bar over the batches.

    Returns:
        float32 logits (N, K) on the CPU.
    """
    if isinstance(data, torch.Tensor):
        batches: Iterable[torch.Tensor] = data.split(batch_size)
    else:
        batches = (x for x, _ in data_loader(data, batch_size))
    outs = []
    with eval_mode(model):
        for x in tqdm(batches, desc="predict", disable=not show_progress, leave=False):
            outs.append(model(x if device is None else x.to(device)).float().cpu())
    return torch.cat(outs)
