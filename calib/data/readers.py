"""Native-format readers: IDX, CIFAR pickles, and torchvision's SVHN, GTSRB and Caltech-101."""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib.data.errors import DataIntegrityError
from calib.data.registry import (
    CALTECH101_CLASSES,
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
)
from calib.data.splits import stratified_partition

# torchvision is imported inside the readers that use it: ``import torchvision.datasets`` costs
# seconds, which every ``import calib.data`` (e.g. to validate params.yaml) would otherwise pay.
# Its classes are always built with ``download=False`` on files that ``fetch`` has already put
# in ``root/<name>/`` and verified against our checksums.

#: An in-memory reader: (folder ``root/<name>/``, split) -> (uint8 images (N, C, H, W), int64
#: labels (N,), class names).
ArrayReader = Callable[[Path, str], tuple[np.ndarray, np.ndarray, Sequence[str]]]
#: A file lister: (folder ``root/<name>/``, split) -> (image paths, labels), in reading order.
FileReader = Callable[[Path, str], tuple[list[str], list[int]]]

#: Caltech-101's split (SPEC §7): stratified 80/10/10 train/val/test with this seed.
CALTECH101_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
CALTECH101_SEED = 42

# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX) and CIFAR (pickles): our readers
#
# torchvision's FashionMNIST reads only the *decompressed* IDX files under
# ``<root>/FashionMNIST/raw/`` (it gunzips them when downloading); the raw files we verify are
# the ``.gz`` files themselves (the published ones, or Debian's re-compressed ones, accepted by
# their payload MD5), so using it would mean a second, decompressed copy of the data. Our
# reader decodes the same bytes from the ``.gz`` files directly.
#
# torchvision's CIFAR10/CIFAR100 read the batches with plain ``pickle.load``, which runs
# whatever code a tampered file holds; ours goes through a restricted unpickler instead.
# --------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST-format) uint8 array from a ``.gz`` file."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataIntegrityError(f"{path}: not a readable gzip file ({err}); delete it and "
                                 f"run fetch again") from None
    # Header: two zero bytes, type code (0x08 = uint8), number of dims, then big-endian sizes.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataIntegrityError(f"{path}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataIntegrityError(f"{path}: IDX header says {dims} but holds {data.size} values")
    return data.reshape(dims)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, lists and strings only (the CIFAR batches' content).

    The CIFAR "python version" is a set of pickles; refusing every other global means a
    tampered file cannot run code even before its checksum is checked.
    """

    _ALLOWED = frozenset({
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        # Files pickled with numpy 1.x name numpy.core, which numpy 2 calls numpy._core.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise DataIntegrityError(f"refusing to unpickle {module}.{name}: a CIFAR batch "
                                     f"holds only arrays, lists and strings")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        # latin1 decodes the Python 2 byte strings of the original files (as torchvision does).
        entry = _ArrayUnpickler(fh, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise DataIntegrityError(f"{path}: expected a dict, got {type(entry).__name__}")
    return entry


def _cifar_arrays(folder: Path, files: Sequence[str], label_key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for rel in files:
        entry = _read_cifar_pickle(folder / rel)
        try:
            data, lab = np.asarray(entry["data"], dtype=np.uint8), entry[label_key]
        except KeyError as err:
            raise DataIntegrityError(f"{folder / rel}: missing key {err}") from None
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R(1024) G(1024) B(1024)
        labels.append(np.asarray(lab, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_fashion_mnist(folder: Path, split: str
                        ) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.ndim != 3:
        raise DataIntegrityError(f"{folder}: {prefix} images must be (N, H, W), "
                                 f"got {images.shape}")
    return images[:, None], labels, FASHION_MNIST_CLASSES


def _read_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    base = "cifar-10-batches-py"
    files = ([f"{base}/data_batch_{i}" for i in range(1, 6)] if split == "train"
             else [f"{base}/test_batch"])
    images, labels = _cifar_arrays(folder, files, "labels")
    names = _read_cifar_pickle(folder / base / "batches.meta").get("label_names")
    return images, labels, names or CIFAR10_CLASSES


def _read_cifar100(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    base = "cifar-100-python"
    images, labels = _cifar_arrays(folder, [f"{base}/{split}"], "fine_labels")
    names = _read_cifar_pickle(folder / base / "meta").get("fine_label_names")
    return images, labels, names or CIFAR100_CLASSES


# --------------------------------------------------------------------------------------------
# SVHN, GTSRB, Caltech-101: torchvision's classes
# --------------------------------------------------------------------------------------------


def _read_svhn(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    from torchvision.datasets import SVHN

    class VerifiedSVHN(SVHN):
        def _check_integrity(self) -> bool:
            # fetch has checked the file against our table (the published MD5 or the
            # data.checksums override); torchvision would hash it again against its own.
            return True

    path = folder / f"{split}_32x32.mat"
    try:
        # SVHN(root) reads root/<split>_32x32.mat: our folder as it is.
        svhn = VerifiedSVHN(folder, split=split, download=False)
    except (KeyError, ValueError) as err:  # not a .mat file, no X or y in it, or X not 4-D
        raise DataIntegrityError(f"{path}: expected X (32, 32, 3, N) and y (N, 1) "
                                 f"({err})") from None
    # torchvision transposes X (H, W, C, N) to the loaders' (N, C, H, W) and maps the label 10
    # (SVHN's digit 0) to class 0.
    if svhn.data.shape[1] != 3:
        raise DataIntegrityError(f"{path}: expected X (32, 32, 3, N) and y (N, 1)")
    images = np.ascontiguousarray(svhn.data, dtype=np.uint8)
    return images, svhn.labels.reshape(-1), DATASETS["svhn"].class_names


def _gtsrb_files(folder: Path, split: str) -> tuple[list[str], list[int]]:
    from torchvision.datasets import GTSRB
    from torchvision.datasets.folder import find_classes

    try:
        # GTSRB(root) reads root/gtsrb/, our folder for the dataset: nothing to copy or link.
        # The class exposes its (path, label) list only as ``_samples``; the images are decoded
        # by LabeledImages, lazily.
        samples = GTSRB(folder.parent, split=split, download=False)._samples
    except FileNotFoundError as err:  # no class folders, or one without .ppm images
        raise DataIntegrityError(f"{folder}: {err}") from None
    except (KeyError, ValueError) as err:  # the test CSV
        raise DataIntegrityError(f"{folder / 'GT-final_test.csv'}: needs the columns "
                                 f"Filename and ClassId ({err})") from None
    if split == "test":
        return [path for path, _ in samples], [label for _, label in samples]
    # Training/<class id, 5 digits>/*.ppm. torchvision labels a training image by the rank of
    # its folder among the sorted folders (ImageFolder's rule), which is the class id only when
    # all 43 folders are there; the folder name is the class id in any copy.
    classes, _ = find_classes(folder / "GTSRB" / "Training")
    for name in classes:
        if not name.isdigit():
            raise DataIntegrityError(f"{folder / 'GTSRB' / 'Training' / name}: GTSRB class "
                                     f"folders are numbered")
    return [path for path, _ in samples], [int(classes[rank]) for _, rank in samples]


def _caltech101_files(folder: Path, split: str) -> tuple[list[str], list[int]]:
    from torchvision.datasets import Caltech101

    try:
        # Caltech101(root) reads root/caltech101/101_ObjectCategories: our folder as it is.
        caltech = Caltech101(folder.parent, target_type="category", download=False)
    except ValueError:  # torchvision drops BACKGROUND_Google by name
        raise DataIntegrityError(f"{folder / '101_ObjectCategories'}: no BACKGROUND_Google "
                                 f"folder; not the official Caltech-101 release") from None
    known = {name: i for i, name in enumerate(CALTECH101_CLASSES)}
    for name in caltech.categories:
        if name not in known:
            raise DataIntegrityError(f"{folder / '101_ObjectCategories' / name}: not a "
                                     f"Caltech-101 category")
    # torchvision numbers each category's images 1..n, n the number of files in its folder (the
    # release names them image_0001.jpg .. image_<n>.jpg), and labels them by the category's
    # rank among those present. We rebuild the file names (LabeledImages decodes them and
    # converts grayscale to RGB, which torchvision's Caltech101 does not) and label by name
    # with CALTECH101_CLASSES: the same ranks when all 101 categories are present.
    categories = folder / "101_ObjectCategories"
    paths = [str(categories / caltech.categories[rank] / f"image_{number:04d}.jpg")
             for number, rank in zip(caltech.index, caltech.y, strict=True)]
    labels = [known[caltech.categories[rank]] for rank in caltech.y]
    train, val, test = stratified_partition(torch.tensor(labels, dtype=torch.int64),
                                            CALTECH101_FRACTIONS, seed=CALTECH101_SEED)
    # No official split: "train" is the 80 + 10 pool (train + val), "test" the last 10 %.
    keep = torch.sort(torch.cat([train, val])).values if split == "train" else test
    return [paths[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]


#: Readers of the datasets held in memory as uint8 arrays.
ARRAY_READERS: dict[str, ArrayReader] = {
    "fashion_mnist": _read_fashion_mnist,
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "svhn": _read_svhn,
}
#: Listers of the datasets decoded from image files on access.
FILE_READERS: dict[str, FileReader] = {
    "gtsrb": _gtsrb_files,
    "caltech101": _caltech101_files,
}
