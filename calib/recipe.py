"""Build and train one model from its params.yaml entry (``models.<name>``; SPEC §7).

The one training path of the pipeline: the training stage (``10_train``) trains every model
with :func:`train_from_config`, and the training-seed stage (``11_train_seeds``,
``train_seeds@<model>``) trains each copy with it, so that copies differ from the main model
only in their seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from calib import data, imbalance, models
from calib.runtime import seed_everything
from calib.train import TrainResult, fit


@dataclass
class TrainedModel:
    """What :func:`train_from_config` returns.

    Attributes:
        model: the trained classifier (best validation epoch), in eval mode.
        spec: the architecture record :func:`calib.models.save_trained` stores (arch,
            num_classes, in_chans, img_size, mean, std).
        result: the training history and best epoch (:class:`TrainResult`).
        train_set, val_set: the datasets it was trained and validated on (long-tailed when
            the recipe's ``imbalance_ratio`` > 1).
        seconds: wall time of the training.
    """

    model: nn.Module
    spec: dict[str, Any]
    result: TrainResult
    train_set: Dataset
    val_set: Dataset
    seconds: float


def train_from_config(config: Mapping[str, Any], meta: Mapping[str, Any], full_train: Any,
                      splits: Mapping[str, torch.Tensor], *, seed: int,
                      device: str | torch.device = "cpu", show_progress: bool = True
                      ) -> TrainedModel:
    """Build and train one model of params.yaml's ``models`` section (SPEC §7).

    The one training path of the pipeline: the training stage trains every model with it and
    the training-seed stage trains each copy with it, so copies differ only in ``seed``.

    Args:
        config: one ``models.<name>`` entry: ``arch``, ``pretrained``, ``img_size`` and the
            ``train`` recipe (epochs, batch_size, optimizer, lr, weight_decay, warmup_epochs,
            augment_pad, augment_flip, imbalance_ratio).
        meta: the prepared dataset's metadata (num_classes, in_chans, mean, std).
        full_train: the whole training split as a :class:`calib.data.LabeledImages`.
        splits: the prepared splits (``train`` and ``val`` index tensors).
        seed: seed of the weights' initialisation, the data order and the long-tailed subset.
        device: where training runs.
        show_progress: progress bars and a line per epoch.
    """
    recipe = dict(config["train"])
    seed_everything(seed)
    train_idx = splits["train"]
    if recipe["imbalance_ratio"] > 1:
        # Long-tailed training set (paper: CIFAR-100-LT); validation and test stay balanced.
        train_idx = imbalance.long_tailed_subset(
            train_idx, full_train.labels[train_idx], imbalance_ratio=recipe["imbalance_ratio"],
            num_classes=meta["num_classes"], seed=seed)
        if show_progress:
            print("long-tailed class sizes:", data.class_counts(
                full_train.labels[train_idx], meta["num_classes"]).tolist())
    train_set, val_set = full_train.subset(train_idx), full_train.subset(splits["val"])
    spec = {"arch": config["arch"], "num_classes": meta["num_classes"],
            "in_chans": meta["in_chans"], "img_size": config["img_size"],
            "mean": meta["mean"], "std": meta["std"]}
    model = models.create_model(**spec, pretrained=config["pretrained"])
    start = time.perf_counter()
    result = fit(model, train_set, val_set, epochs=recipe["epochs"],
                 batch_size=recipe["batch_size"], lr=recipe["lr"],
                 optimizer=recipe["optimizer"], weight_decay=recipe["weight_decay"],
                 warmup_epochs=recipe["warmup_epochs"], augment_pad=recipe["augment_pad"],
                 augment_flip=recipe["augment_flip"], seed=seed, device=device,
                 show_progress=show_progress)
    return TrainedModel(model.eval(), spec, result, train_set, val_set,
                        time.perf_counter() - start)
