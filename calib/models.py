"""Model factory: timm ResNet and ViT families behind one ``create_model`` (timm style).

Every model returned here maps images in [0, 1] to logits: the input normalisation is the
first module inside the model, so attacks, metrics and defences never see normalised pixels.
:func:`extract_features` reads a model's hidden layers (the detectors of paper Table 2 and the
representation analysis use it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from calib.checks import check_choices, check_images, check_int
from calib.runtime import eval_mode, model_device

#: Families and, per family, the timm architectures we support (prefix match on the timm name).
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet",),
    "vit": ("vit_",),
}

#: Layers :func:`extract_features` reads, from the input side: the second-to-last stage of the
#: backbone (global-average-pooled), the penultimate (pre-logit) features and the logits.
FEATURE_LAYERS: tuple[str, ...] = ("intermediate", "penultimate", "logits")


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
        net: the timm model (``forward_features`` / ``forward_intermediates`` and
            ``forward_head`` give the hidden layers, see :meth:`layer_features`).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-logit) features (N, D) of images ``x`` (N, C, H, W) in [0, 1]."""
        return self.layer_features(x, ("penultimate",))["penultimate"]

    def layer_features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named layers of :data:`FEATURE_LAYERS` from one backbone pass.

        The backbone runs through ``forward_intermediates`` when the intermediate stage is
        asked for and through ``forward_features`` otherwise. The penultimate features are the
        head's pre-logits, and the logits are the classifier applied to them: the operations
        of ``forward_head``, so they equal :meth:`forward`.

        Args:
            x: (N, C, H, W) images in [0, 1].
            layers: names from :data:`FEATURE_LAYERS`.

        Returns:
            layer -> tensor: "intermediate" (N, C_stage), the second-to-last stage (``layer3``
            of a ResNet-18, the second-to-last block of a ViT) averaged over its spatial or
            token-grid positions as Lee et al. (NeurIPS 2018) do; "penultimate" (N, D);
            "logits" (N, K).
        """
        z = self.normalize(x)
        out = {}
        if "intermediate" in layers:
            final, (inter,) = self.net.forward_intermediates(z, indices=[-2],
                                                             intermediates_only=False)
            out["intermediate"] = inter.flatten(2).mean(2) if inter.ndim > 2 else inter
        else:
            final = self.net.forward_features(z)
        pre_logits = self.net.forward_head(final, pre_logits=True)
        if "penultimate" in layers:
            out["penultimate"] = pre_logits
        if "logits" in layers:
            out["logits"] = self.net.get_classifier()(pre_logits)
        return out


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *,
                     layers: Sequence[str] = FEATURE_LAYERS, batch_size: int = 256,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Features of ``images`` at the named layers, batch by batch, in eval mode.

    An :class:`ImageClassifier` gives every layer of :data:`FEATURE_LAYERS` from one backbone
    pass (:meth:`ImageClassifier.layer_features`). Any other model gives "logits" (its output)
    and "penultimate" (its ``features(x)`` method, if it has one), and no "intermediate".

    Args:
        model: maps images in [0, 1] to logits; its modes are restored afterwards.
        images: (N, C, H, W) in [0, 1]; each batch is moved to the model's device.
        layers: names from :data:`FEATURE_LAYERS`.
        batch_size: images per forward pass.
        dtype: dtype of the returned features (the detectors' linear algebra wants float64).

    Returns:
        layer -> (N, D_layer) in ``dtype`` on the CPU.

    Raises:
        ValueError: invalid images, layers or batch size, or a layer the model cannot give.
    """
    images = check_images(images)
    check_choices("layers", layers, FEATURE_LAYERS)
    if not isinstance(model, ImageClassifier):
        if "intermediate" in layers:
            raise ValueError("layer 'intermediate' needs an ImageClassifier (a timm backbone "
                             "with forward_intermediates)")
        if "penultimate" in layers and not callable(getattr(model, "features", None)):
            raise ValueError("layer 'penultimate' needs a model with a features(x) method "
                             "returning penultimate features (N, D), like ImageClassifier")
    check_int("batch_size", batch_size, minimum=1)
    device = model_device(model)
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with eval_mode(model):
        for chunk in images.split(batch_size):
            x = chunk.to(device)
            if isinstance(model, ImageClassifier):
                feats = model.layer_features(x, layers)
            else:
                feats = {"logits": model(x)} if "logits" in layers else {}
                if "penultimate" in layers:
                    feats["penultimate"] = model.features(x)
            for layer in layers:
                out[layer].append(feats[layer].flatten(1).to(dtype).cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


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
    check_int("num_classes", num_classes, minimum=2)
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
