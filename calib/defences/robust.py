"""Robust pretrained models from RobustBench as rows of Table 4 (SPEC §8, "RobustBench-style
robust models, with internet only").

A robust model is not a defence of our checkpoint: it brings its own weights, adversarially
trained by its authors, and is attacked with the same calibration attacks, budget and seed as
the defences, so its row says how a model trained to be robust fares against calibration
attacks. RobustBench's CIFAR-100 models take 32x32 RGB images in [0, 1] and normalise inside
(e.g. ``DMWideResNet`` subtracts the CIFAR-100 mean as its first operation), the same contract
as :class:`calib.models.ImageClassifier`; the defence stage feeds them the attack images at that
native resolution (:data:`IMG_SIZE`), with eps on the same [0, 1] scale.

Weights load through ``robustbench.utils.load_model``, which reads
``<model_dir>/cifar100/Linf/<model_name>.pt`` and downloads it first when it is absent (the
paper profile, with internet). Offline, put the checkpoint there: :func:`checkpoint_path` says
where, and :func:`load_robust_model` says so when the download fails.

robustbench (1.1.1) is imported lazily, and without its package ``__init__``: that also
imports its benchmark code, which needs the ``autoattack`` package (installed from GitHub, not
on PyPI) and ``pkg_resources`` (gone from setuptools 82), neither of which the loader or the
model zoo use (:func:`_robustbench`).

Example:
    >>> net = load_robust_model(DEFAULT_MODEL, model_dir="models/robustbench")
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 100])
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DATASET",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_DIR",
    "IMG_SIZE",
    "IN_CHANS",
    "NUM_CLASSES",
    "THREAT_MODELS",
    "check_options",
    "checkpoint_path",
    "load_robust_model",
    "robustbench_models",
]

#: RobustBench's dataset key: its CIFAR-100 models (the paper's Table 4 dataset).
DATASET = "cifar100"
#: Threat models allowed: L-inf only, the norm of the attacks' eps.
THREAT_MODELS: tuple[str, ...] = ("Linf",)
#: Native input of RobustBench's CIFAR-100 models: 32x32 RGB in [0, 1], 100 logits.
IMG_SIZE = 32
IN_CHANS = 3
NUM_CLASSES = 100
#: The paper profile's model: a WideResNet-28-10 (Swish) of Rebuffi et al. 2021, trained with
#: CutMix and DDPM-generated data (RobustBench CIFAR-100 L-inf, 8/255).
DEFAULT_MODEL = "Rebuffi2021Fixing_28_10_cutmix_ddpm"
#: Where checkpoints are kept (gitignored, beside the trained models).
DEFAULT_MODEL_DIR = "models/robustbench"


def _robustbench() -> types.ModuleType:
    """``robustbench.utils`` (its ``load_model`` and, through it, the model zoo).

    Imported without running ``robustbench/__init__.py`` (which needs the GitHub-only
    ``autoattack`` and ``pkg_resources`` for its benchmark and data code): unless robustbench
    is imported already, its package is registered as a bare package over its installed
    folder, and only the loader and the zoo are imported. timm's deprecation warnings about
    the old import paths robustbench's architectures use are silenced.
    """
    if "robustbench" not in sys.modules:
        spec = importlib.util.find_spec("robustbench")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("robustbench is not installed; install it with "
                              "`pip install --no-deps -r requirements-nodeps.txt` "
                              "(scripts/setup.sh does)")
        package = types.ModuleType("robustbench")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        package.__spec__ = spec
        sys.modules["robustbench"] = package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import robustbench.utils as utils
    return utils


def _zoo() -> dict[str, dict[str, Any]]:
    """RobustBench's CIFAR-100 L-inf registry: model id -> {"model": constructor, "gdrive_id"}."""
    _robustbench()  # first: registers the bare package
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(DATASET)][ThreatModel("Linf")]


@cache
def robustbench_models() -> tuple[str, ...]:
    """The model ids this module loads: RobustBench's CIFAR-100 L-inf entries stored as one
    checkpoint in ``model_dir`` (read from the installed package's registry; no network).

    Left out: entries whose weights come from the Hugging Face hub through timm (the XCiT
    models) and ensembles stored as several files (Bai2023Improving, Bai2024MixedNUTS).
    """
    _robustbench()
    import timm

    def timm_hosted(name: str) -> bool:
        return timm.is_model(f"{name.lower().replace('-', '_')}_{DATASET}_linf")

    return tuple(name for name, entry in _zoo().items()
                 if isinstance(entry.get("gdrive_id"), str) and not timm_hosted(name))


def check_options(model_name: str = DEFAULT_MODEL, threat_model: str = "Linf",
                  model_dir: str | os.PathLike[str] = DEFAULT_MODEL_DIR) -> dict[str, Any]:
    """Validate a RobustBench model's options without loading anything; returns them.

    Args:
        model_name: a RobustBench CIFAR-100 L-inf model id (:func:`robustbench_models`).
        threat_model: "Linf" (the attacks' eps is an L-inf radius).
        model_dir: the folder holding ``cifar100/Linf/<model_name>.pt``.

    Raises:
        ValueError: a threat model other than Linf, or a model id not in the registry (the
            message names the option and lists the allowed values).
    """
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model must be one of {list(THREAT_MODELS)}, got "
                         f"{threat_model!r} (the calibration attacks' eps is an L-inf radius)")
    if not isinstance(model_dir, str | os.PathLike) or not os.fspath(model_dir):
        raise ValueError(f"model_dir must be a folder path, got {model_dir!r}")
    allowed = robustbench_models()
    if model_name not in allowed:
        from importlib.metadata import version

        why = ("is in RobustBench's zoo but its weights come from the Hugging Face hub or from "
               "several files, not from one checkpoint in model_dir" if model_name in _zoo()
               else f"is not a CIFAR-100 Linf model of RobustBench's zoo "
                    f"(robustbench {version('robustbench')})")
        raise ValueError(f"model_name {model_name!r} {why}; allowed: {list(allowed)}")
    return {"model_name": model_name, "threat_model": threat_model,
            "model_dir": os.fspath(model_dir)}


def checkpoint_path(model_name: str, model_dir: str | os.PathLike[str] = DEFAULT_MODEL_DIR
                    ) -> Path:
    """Where ``robustbench.utils.load_model`` reads (and downloads) the checkpoint."""
    return Path(model_dir) / DATASET / "Linf" / f"{model_name}.pt"


def load_robust_model(model_name: str = DEFAULT_MODEL, *, threat_model: str = "Linf",
                      model_dir: str | os.PathLike[str] = DEFAULT_MODEL_DIR,
                      device: str | torch.device = "cpu") -> nn.Module:
    """A RobustBench CIFAR-100 model, in eval mode on ``device``.

    It maps (N, 3, 32, 32) images in [0, 1] to (N, 100) logits. The checkpoint is read from
    :func:`checkpoint_path`; RobustBench downloads it there first when it is absent.

    Raises:
        ValueError: bad options (:func:`check_options`), before anything is read.
        FileNotFoundError: the checkpoint is absent and could not be downloaded (no
            internet): the message says where to put it.
        RuntimeError: the checkpoint is there but does not load into the architecture.
    """
    check_options(model_name, threat_model, model_dir)
    utils = _robustbench()
    path = checkpoint_path(model_name, model_dir)
    present = path.is_file()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = utils.load_model(model_name=model_name, dataset=DATASET,
                                   threat_model=threat_model, model_dir=os.fspath(model_dir))
    except Exception as err:
        if present:
            raise RuntimeError(f"RobustBench checkpoint {path} does not load into "
                               f"{model_name!r}: {type(err).__name__}: {err}") from err
        raise FileNotFoundError(
            f"no RobustBench checkpoint at {path}, and downloading it failed "
            f"({type(err).__name__}: {err}). Without internet, put the file there: RobustBench's "
            f"checkpoint of {model_name} (CIFAR-100, Linf), e.g. fetched on a machine with "
            f"internet by robustbench.utils.load_model(model_name={model_name!r}, "
            f"dataset='cifar100', threat_model='Linf', model_dir=...), which saves it as "
            f"<model_dir>/cifar100/Linf/{model_name}.pt") from err
    return net.to(device).eval()
