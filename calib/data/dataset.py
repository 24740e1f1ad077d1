"""The in-memory or file-backed labelled image dataset, and :func:`load_split` that fills it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from calib.data.download import missing_files
from calib.data.errors import DataIntegrityError, DataUnavailableError
from calib.data.readers import ARRAY_READERS, FILE_READERS
from calib.data.registry import SPLITS, DatasetInfo, check_in_chans, get_info


def _check_img_size(img_size: int | None) -> None:
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int)
                                 or img_size < 1):
        raise ValueError(f"img_size must be a positive integer or None, got {img_size!r}")


def _as_index(indices: Tensor | Sequence[int] | np.ndarray, n: int) -> Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        raise ValueError("indices must be integer positions, not a boolean mask")
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise ValueError(f"indices out of range for {n} samples: "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return torch.where(idx < 0, idx + n, idx)


def _decode_image(path: str) -> Tensor:
    """One image file as uint8 (3, H, W); grayscale and palette images become RGB."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)


#: Output values converted per batch by :meth:`LabeledImages.tensors` (64 MB of float32):
#: large enough that per-batch overhead vanishes, small enough to bound the resize's memory.
_CONVERT_VALUES = 1 << 24


class LabeledImages(Dataset[tuple[Tensor, Tensor]]):
    """Images with integer labels, converted to float in [0, 1] on access.

    Two storages behind one interface: in memory (``images``: uint8 or float tensor
    (N, C, H, W), for Fashion-MNIST, CIFAR and SVHN) or image files decoded lazily with PIL
    (``paths``, for GTSRB and Caltech-101, whose images vary in size). On access an image is
    scaled to [0, 1] (uint8 / 255), resized to ``img_size`` x ``img_size`` when that differs
    from its size (bilinear with antialiasing; the aspect ratio is not kept, as with
    ``transforms.Resize((s, s))``) and, for ``in_chans=3`` on grayscale data, its channel is
    repeated, so a 3-channel (e.g. ImageNet-pretrained) model can take a grayscale dataset.

    A subset is a view: it shares the storage and keeps an index into it.

    Attributes:
        labels: int64 tensor (N,).
        img_size: output side, or None for the native size (in-memory storage only).
        in_chans: output channels (1 or 3).
        class_names: names of the classes, index = label.
    """

    def __init__(self, labels: Tensor | Sequence[int], *, images: Tensor | None = None,
                 paths: Sequence[str | os.PathLike[str]] | None = None,
                 img_size: int | None = None, in_chans: int | None = None,
                 class_names: Sequence[str] = ()) -> None:
        labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
        if (images is None) == (paths is None):
            raise ValueError("pass exactly one of images (N, C, H, W) or paths")
        _check_img_size(img_size)
        if images is not None:
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"images must have shape (N, C, H, W) with C in (1, 3), "
                                 f"got {tuple(images.shape)}")
            if images.dtype != torch.uint8 and not images.is_floating_point():
                raise ValueError(f"images must be uint8 or floating, got {images.dtype}")
            native_chans, n = int(images.shape[1]), int(images.shape[0])
        else:
            if img_size is None:
                raise ValueError("img_size is required for images read from files (their "
                                 "sizes vary): pass e.g. img_size=224")
            native_chans, n = 3, len(paths)  # type: ignore[arg-type]
        if labels.numel() != n:
            raise ValueError(f"labels has {labels.numel()} entries for {n} images")
        self._images = images
        self._paths = None if paths is None else [os.fspath(p) for p in paths]
        self._index = torch.arange(n)
        self._native_chans = native_chans
        self.labels = labels
        self.img_size = img_size
        self.in_chans = check_in_chans(in_chans, native=native_chans)
        self.class_names = tuple(class_names)

    # ---- Dataset protocol -------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(image float32 (C, H, W) in [0, 1], label int64 scalar)."""
        idx = _as_index([int(index)], len(self))
        return self._materialise(idx, batch_size=1)[0], self.labels[idx[0]]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        # DataLoader's batched fetch: one vectorised conversion per batch instead of per image.
        idx = _as_index(indices, len(self))
        images = self._materialise(idx, batch_size=max(1, len(indices)))
        return list(zip(images.unbind(0), self.labels[idx].unbind(0), strict=True))

    # ---- views and materialisation ------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every output image."""
        if self.img_size is not None:
            return (self.in_chans, self.img_size, self.img_size)
        assert self._images is not None
        return (self.in_chans, int(self._images.shape[2]), int(self._images.shape[3]))

    @property
    def paths(self) -> list[str] | None:
        """Image file of each sample (file storage), or None for images held in memory."""
        if self._paths is None:
            return None
        return [self._paths[i] for i in self._index.tolist()]

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray) -> LabeledImages:
        """The images at ``indices`` (positions in this dataset), sharing the storage."""
        idx = _as_index(indices, len(self))
        view = object.__new__(LabeledImages)
        view.__dict__.update(self.__dict__)
        view._index = self._index[idx]
        view.labels = self.labels[idx]
        return view

    def tensors(self, indices: Tensor | Sequence[int] | np.ndarray | None = None, *,
                batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Materialise images and labels.

        Args:
            indices: positions in this dataset (default: all).
            batch_size: images converted (and resized) at once, bounding the memory of the
                intermediate tensors; None picks about 16 M output values per batch (e.g.
                about 21,000 Fashion-MNIST images, 111 images at 3 x 224 x 224).

        Returns:
            images float32 (n, C, H, W) in [0, 1] and labels int64 (n,).
        """
        if batch_size is None:
            batch_size = max(1, _CONVERT_VALUES // math.prod(self.image_shape))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        idx = torch.arange(len(self)) if indices is None else _as_index(indices, len(self))
        return self._materialise(idx, batch_size=batch_size), self.labels[idx].clone()

    def _materialise(self, idx: Tensor, *, batch_size: int) -> Tensor:
        source_idx = self._index[idx]
        n = int(source_idx.numel())
        out = torch.empty((n, *self.image_shape), dtype=torch.float32)
        if self._images is not None:
            for start in range(0, n, batch_size):
                chunk = source_idx[start:start + batch_size]
                out[start:start + chunk.numel()] = self._convert(self._images[chunk])
        else:
            assert self._paths is not None
            for i, j in enumerate(source_idx.tolist()):
                out[i] = self._convert(_decode_image(self._paths[j]).unsqueeze(0))[0]
        return out

    def _convert(self, raw: Tensor) -> Tensor:
        """uint8 or float (n, C, h, w) -> float32 (n, in_chans, s, s) in [0, 1]."""
        x = raw.float().div_(255.0) if raw.dtype == torch.uint8 else raw.float()
        size = self.img_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        if self.in_chans != x.shape[1]:
            x = x.repeat(1, self.in_chans // x.shape[1], 1, 1)
        return x

    def __repr__(self) -> str:
        storage = "memory" if self._images is not None else "files"
        return (f"LabeledImages(n={len(self)}, image_shape={self.image_shape}, "
                f"classes={len(self.class_names)}, storage={storage})")


def load_split(name: str, root: str | os.PathLike[str], split: str, *,
               img_size: int | None = None, in_chans: int | None = None) -> LabeledImages:
    """The official ``split`` of dataset ``name``, read from its native files in ``root/<name>/``.

    Fashion-MNIST, CIFAR-10/100 and SVHN are read into memory as uint8 (N, C, H, W) and
    converted on access; GTSRB and Caltech-101 images are decoded from disk on access (RGB;
    Caltech-101's grayscale images are converted) and need ``img_size``. Caltech-101 has no
    official split: its images are split per class 80/10/10 at random (seed 42, SPEC §7);
    ``"train"`` is the 80 + 10 pool (carve the validation split out of it with
    :func:`calib.data.make_splits`, e.g. ``val_fraction=1/9``) and ``"test"`` the last 10 %.

    Args:
        name: a registered dataset.
        root: the folder holding one subfolder per dataset (see :func:`calib.data.fetch`).
        split: "train" or "test".
        img_size: output side (images resized to ``img_size`` x ``img_size``, bilinear with
            antialiasing); None keeps the native size (in-memory datasets only).
        in_chans: output channels; None for the native ones, 3 to repeat a grayscale channel.

    Returns:
        The split as a :class:`LabeledImages` (images float32 in [0, 1], labels int64).

    Raises:
        ValueError: bad ``name``, ``split``, ``img_size`` or ``in_chans``.
        DataUnavailableError: the raw files are not there (run :func:`calib.data.fetch` first).
        DataIntegrityError: a raw file is malformed or holds an out-of-range label.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    _check_img_size(img_size)
    chans = check_in_chans(in_chans, info)
    if not info.in_memory and img_size is None:
        raise ValueError(f"img_size is required for {name}: its images vary in size "
                         f"(the paper uses img_size=224)")
    folder = Path(root) / name
    missing = missing_files(folder, info.raw_files)
    if missing:
        raise DataUnavailableError(
            f"{info.title} raw files not found under {folder} ({', '.join(missing)}): run "
            f"calib.data.fetch({name!r}, {os.fspath(root)!r}) first (the data stage does).")
    if info.in_memory:
        images, labels, names = ARRAY_READERS[name](folder, split)
        if not images.flags.writeable:  # np.frombuffer views are read-only; torch wants writable
            images = images.copy()
        labels_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        _check_labels(labels_t, info, folder)
        return LabeledImages(labels_t, images=torch.from_numpy(np.ascontiguousarray(images)),
                             img_size=img_size, in_chans=chans, class_names=list(names))
    paths, labels_list = FILE_READERS[name](folder, split)
    if not paths:
        raise DataIntegrityError(f"{folder}: no {split} images found")
    labels_t = torch.tensor(labels_list, dtype=torch.int64)
    _check_labels(labels_t, info, folder)
    return LabeledImages(labels_t, paths=paths, img_size=img_size, in_chans=chans,
                         class_names=info.class_names)


def _check_labels(labels: Tensor, info: DatasetInfo, folder: Path) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataIntegrityError(
            f"{folder}: labels must lie in [0, {info.num_classes - 1}], found "
            f"[{int(labels.min())}, {int(labels.max())}]")
