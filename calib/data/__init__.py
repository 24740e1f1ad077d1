"""Datasets: registry, raw files with published checksums, loaders and seeded splits.

The registry (:data:`DATASETS`) covers Fashion-MNIST (the default; offline through the Debian
package ``dataset-fashion-mnist``) and the torchvision datasets CIFAR-10, CIFAR-100, GTSRB,
Caltech-101 and SVHN (downloaded when online). The paper (SPEC §7) uses CIFAR-100, Caltech-101
and GTSRB at 224 px with ImageNet normalisation; the normalisation itself lives inside the model,
so every loader here yields images in [0, 1].

Three steps, each usable on its own:

* :func:`fetch` makes the raw files available under ``root/<name>/`` (local copy, then a
  local mirror folder, then the system's dataset package, then a download) and :func:`verify`
  checks them against the published MD5 checksums (or a table read by :func:`read_checksums`);
* :func:`load_split` reads the official train or test split into a :class:`LabeledImages`
  dataset from the native on-disk format: IDX and CIFAR pickles with our own readers, SVHN
  ``.mat``, GTSRB and Caltech-101 image folders through torchvision's dataset classes;
* :func:`make_splits` carves a stratified, seeded validation split out of the official training
  set and names the attacked subset (the first ``attack_size`` test images, as in the paper).

Modules: :mod:`~calib.data.registry` (what each dataset is), :mod:`~calib.data.sources` (URLs
and checksums), :mod:`~calib.data.download` (fetch and verify), :mod:`~calib.data.readers`
(native formats), :mod:`~calib.data.dataset` (:class:`LabeledImages`, :func:`load_split`),
:mod:`~calib.data.splits` (seeded splits) and :mod:`~calib.data.errors`.
"""

from calib.data.dataset import LabeledImages, load_split
from calib.data.download import fetch, read_checksums, verify
from calib.data.errors import DataIntegrityError, DataUnavailableError
from calib.data.readers import CALTECH101_FRACTIONS
from calib.data.registry import (
    CALTECH101_CLASSES,
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    SPLITS,
    get_info,
)
from calib.data.sources import (
    CHECKSUMS,
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MIRRORS,
    SOURCES,
)
from calib.data.splits import (
    SPLIT_NAMES,
    class_counts,
    load_splits,
    make_splits,
    read_splits_metadata,
    save_splits,
    stratified_partition,
    subsample,
)

__all__ = [
    "CALTECH101_CLASSES",
    "CALTECH101_FRACTIONS",
    "CHECKSUMS",
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MIRRORS",
    "SOURCES",
    "SPLITS",
    "SPLIT_NAMES",
    "DataIntegrityError",
    "DataUnavailableError",
    "LabeledImages",
    "class_counts",
    "fetch",
    "get_info",
    "load_split",
    "load_splits",
    "make_splits",
    "read_checksums",
    "read_splits_metadata",
    "save_splits",
    "stratified_partition",
    "subsample",
    "verify",
]
