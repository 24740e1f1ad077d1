"""Model factory: timm ResNet and ViT families behind one ``create_model`` (timm style).

Every model returned here maps images in [0, 1] to logits: the input normalisation is the
first module inside the model, so attacks, metrics and defences never see normalised pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

#: Families and, per family, the timm architectures we support (prefix match on the timm name).
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet",),
    "vit": ("vit_",),
}


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module, so it travels with the checkpoint."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """``Normalize`` followed by a timm backbone; images in [0, 1] (N, C, H, W) -> logits (N, K).

    Attributes:
        normalize: the input normalisation.
        net: the timm model (``forward_features`` / ``forward_head`` give penultimate features).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-logit) features, (N, D)."""
        feats = self.net.forward_features(self.normalize(x))
        return self.net.forward_head(feats, pre_logits=True)


#: Named small variants for 28x28 inputs, trained from scratch in the default profile:
#: name -> (family, timm architecture, timm kwargs). Any other timm ResNet/ViT name is accepted
#: as is (e.g. "resnet50", "vit_base_patch16_224.augreg_in21k" in the paper profile).
MODEL_ZOO: dict[str, tuple[str, str, dict[str, Any]]] = {
    # 7x7 patches on 28x28 images -> 16 tokens; width 192, 3 heads.
    "vit_fmnist_d4": ("vit", "vit_tiny_patch16_224", {"patch_size": 7, "depth": 4}),
    "vit_fmnist_d6": ("vit", "vit_tiny_patch16_224", {"patch_size": 7, "depth": 6}),
    "vit_fmnist_d8w256": ("vit", "vit_tiny_patch16_224",
                          {"patch_size": 7, "depth": 8, "embed_dim": 256, "num_heads": 4}),
}


def family_of(arch: str) -> str:
    """The family ("resnet" or "vit") of a zoo name or timm architecture name."""
    if arch in MODEL_ZOO:
        return MODEL_ZOO[arch][0]
    for family, prefixes in FAMILIES.items():
        if any(arch.startswith(p) for p in prefixes):
            return family
    raise ValueError(
        f"unknown model arch {arch!r}; allowed: one of {sorted(MODEL_ZOO)} or a timm name "
        f"starting with {[p for ps in FAMILIES.values() for p in ps]}")


def check_arch(arch: str) -> str:
    """Validate ``arch`` without building it; returns its family."""
    family = family_of(arch)
    timm_name = MODEL_ZOO[arch][1] if arch in MODEL_ZOO else arch
    if timm_name.split(".")[0] not in timm.list_models():
        raise ValueError(f"unknown timm architecture {arch!r}")
    return family


def create_model(
    arch: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> ImageClassifier:
    """Build a ResNet- or ViT-family classifier through timm, normalisation included.

    Args:
        arch: a name from :data:`MODEL_ZOO` (small variants for 28x28 inputs) or a timm
            ResNet/ViT name such as "resnet18", "resnet50" or
            "vit_base_patch16_224.augreg_in21k" (the paper's ImageNet-21k ViT-B/16).
        num_classes: K, the number of output logits.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        img_size: input side length; passed to ViTs (position embeddings are resized).
        mean, std: per-channel normalisation applied inside the model.
        pretrained: load timm's pretrained weights (needs internet; the paper profile).
        **timm_kwargs: passed through to ``timm.create_model`` after the zoo's own kwargs
            (e.g. ``drop_rate``).

    Returns:
        An :class:`ImageClassifier` mapping images in [0, 1] of shape
        (N, in_chans, img_size, img_size) to logits (N, num_classes).
    """
    family = check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(mean) != in_chans:
        raise ValueError(f"mean/std have {len(mean)} channels but in_chans = {in_chans}")
    timm_name, kwargs = (MODEL_ZOO[arch][1], dict(MODEL_ZOO[arch][2])) if arch in MODEL_ZOO \
        else (arch, {})
    kwargs.update(timm_kwargs)
    if family == "vit":
        kwargs.setdefault("img_size", img_size)
    net = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes,
                            in_chans=in_chans, **kwargs)
    return ImageClassifier(net, mean, std)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_trained(directory: str | os.PathLike[str], model: ImageClassifier, spec: dict[str, Any],
                 ) -> None:
    """Write ``model.safetensors`` and ``model.json`` (what :func:`load_trained` needs).

    ``spec`` holds the :func:`create_model` arguments: arch, num_classes, in_chans, img_size,
    mean, std (and anything else worth recording, such as the best epoch).
    """
    from calib.io import save_tensors, write_json

    missing = {"arch", "num_classes", "in_chans", "img_size", "mean", "std"} - set(spec)
    if missing:
        raise ValueError(f"model spec lacks {sorted(missing)}")
    d = Path(directory)
    save_tensors(d / "model.safetensors", dict(model.state_dict()))
    write_json(d / "model.json", spec)


def load_trained(directory: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> ImageClassifier:
    """Rebuild a model saved by :func:`save_trained` (no pickles), in eval mode on ``device``."""
    from calib.io import load_tensors, read_json

    d = Path(directory)
    if not (d / "model.json").exists():
        raise FileNotFoundError(f"no trained model in {d} (run the training stage first)")
    spec = read_json(d / "model.json")
    model = create_model(spec["arch"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                         img_size=spec["img_size"], mean=spec["mean"], std=spec["std"],
                         pretrained=False)
    model.load_state_dict(load_tensors(d / "model.safetensors"), strict=True)
    return model.to(device).eval()
