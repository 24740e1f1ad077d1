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
  dataset, straight from the native on-disk format (IDX, CIFAR pickles, SVHN ``.mat``, GTSRB and
  Caltech-101 image folders), without torchvision ``Dataset`` objects;
* :func:`make_splits` carves a stratified, seeded validation split out of the official training
  set and names the attacked subset (the first ``attack_size`` test images, as in the paper).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from calib.constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from calib.io import atomic_dir, atomic_path, load_tensors, save_tensors

#: The official splits every dataset offers through :func:`load_split`.
SPLITS: tuple[str, ...] = ("train", "test")

#: Where the Debian package ``dataset-fashion-mnist`` installs the four IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The mirror torchvision's ``FashionMNIST`` downloads from.
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

#: Caltech-101's split (SPEC §7): stratified 80/10/10 train/val/test with this seed.
CALTECH101_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
CALTECH101_SEED = 42


class DataUnavailableError(RuntimeError):
    """The raw files are not on disk and cannot be obtained (offline, or download disabled)."""


class DataIntegrityError(ValueError):
    """A raw file is missing, corrupt or malformed (checksum mismatch, bad header, bad label)."""


# --------------------------------------------------------------------------------------------
# Published checksums (MD5), relative to ``root/<name>/``
# --------------------------------------------------------------------------------------------

FASHION_MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)

#: MD5 of each raw file as published by the dataset authors (for the torchvision datasets:
#: the values torchvision 0.29 ships in ``torchvision/datasets/{cifar,svhn}.py``). GTSRB and
#: Caltech-101 are published as archives only; their MD5s are in :data:`SOURCES` and are checked
#: while downloading, and the unpacked folders are checked for presence.
CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
        "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
        "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
        "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
        "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
    "gtsrb": {},
    "caltech101": {},
}

#: MD5 of the *decompressed* content of gzip files. A file is accepted if either its own MD5
#: matches :data:`CHECKSUMS` or its decompressed MD5 matches this table: Debian's
#: ``dataset-fashion-mnist`` re-compresses the original files (a different gzip header, hence a
#: different MD5 of the ``.gz``) while the IDX payload is byte-for-byte the published one.
PAYLOAD_CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


@dataclass(frozen=True)
class Source:
    """One downloadable file: where from, its published MD5, and the raw paths it yields.

    Attributes:
        urls: mirrors, tried in order.
        filename: the name the download is saved under (in ``root/<name>/``).
        md5: published MD5 of the download (checked by torchvision's downloader).
        provides: raw paths (relative to ``root/<name>/``) this download makes available.
        extract: unpack the archive into ``root/<name>/`` (and delete it afterwards).
        inner: an archive inside the unpacked one to unpack as well; the folder that held it is
            deleted afterwards (Caltech-101 ships a zip of tarballs).
    """

    urls: tuple[str, ...]
    filename: str
    md5: str | None
    provides: tuple[str, ...]
    extract: bool = False
    inner: str | None = None


_CIFAR10_FILES = tuple(CHECKSUMS["cifar10"])
_CIFAR100_FILES = tuple(CHECKSUMS["cifar100"])
_GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"

#: Download sources per dataset (URLs and archive MD5s as torchvision 0.29 publishes them).
SOURCES: dict[str, tuple[Source, ...]] = {
    "fashion_mnist": tuple(
        Source(tuple(m + f for m in FASHION_MNIST_MIRRORS), f, CHECKSUMS["fashion_mnist"][f], (f,))
        for f in FASHION_MNIST_FILES
    ),
    "cifar10": (
        Source(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
               "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", _CIFAR10_FILES,
               extract=True),
    ),
    "cifar100": (
        Source(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
               "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", _CIFAR100_FILES,
               extract=True),
    ),
    "svhn": tuple(
        Source((f"http://ufldl.stanford.edu/housenumbers/{f}",), f, CHECKSUMS["svhn"][f], (f,))
        for f in CHECKSUMS["svhn"]
    ),
    "gtsrb": (
        Source((_GTSRB_URL + "GTSRB-Training_fixed.zip",), "GTSRB-Training_fixed.zip",
               "513f3c79a4c5141765e10e952eaa2478", ("GTSRB/Training",), extract=True),
        Source((_GTSRB_URL + "GTSRB_Final_Test_Images.zip",), "GTSRB_Final_Test_Images.zip",
               "c7e4e6327067d32654124b0fe9e82185", ("GTSRB/Final_Test/Images",), extract=True),
        Source((_GTSRB_URL + "GTSRB_Final_Test_GT.zip",), "GTSRB_Final_Test_GT.zip",
               "fe31e9c9270bbcd7b84b7f21a9d9d9e5", ("GT-final_test.csv",), extract=True),
    ),
    "caltech101": (
        Source(("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
               "caltech-101.zip", "3138e1922a9193bfa496528edbbc45d0",
               ("101_ObjectCategories",), extract=True,
               inner="caltech-101/101_ObjectCategories.tar.gz"),
    ),
}

# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
#: GTSRB ships class ids (folders 00000..00042) only; these are the benchmark's sign names.
GTSRB_CLASSES: tuple[str, ...] = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road",
    "Slippery road", "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians",
    "Children crossing", "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
    "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)
#: The folder names of ``101_ObjectCategories`` in sorted order, without ``BACKGROUND_Google``
#: (not a real class): the same classes and indices as torchvision's ``Caltech101``.
CALTECH101_CLASSES: tuple[str, ...] = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair",
    "chandelier", "cougar_body", "cougar_face", "crab", "crayfish", "crocodile",
    "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly",
    "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo",
    "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors",
    "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus",
    "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)
_CALTECH101_BACKGROUND = "BACKGROUND_Google"

# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about a dataset before reading it.

    Attributes:
        name: registry key; the raw files live in ``root/<name>/``.
        title: the dataset's usual name, for messages and figures.
        num_classes: number of classes K.
        in_chans: channels of the native images (1 grayscale, 3 RGB).
        native_size: side of the native square images, or None when sizes vary (GTSRB,
            Caltech-101: :func:`load_split` then needs ``img_size``).
        mean, std: per-channel statistics for the normalisation inside the model (Fashion-MNIST
            statistics for Fashion-MNIST, ImageNet statistics for the others, as in the paper).
        class_names: the K class names, index = label.
        raw_files: paths (files or folders, relative to ``root/<name>/``) that must exist after
            :func:`fetch`.
        homepage: where the dataset is published.
        in_memory: whether the whole dataset is read into memory as uint8 (else images are
            decoded from disk on access).
    """

    name: str
    title: str
    num_classes: int
    in_chans: int
    native_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    raw_files: tuple[str, ...]
    homepage: str
    in_memory: bool

    @property
    def checksums(self) -> dict[str, str]:
        """Published MD5 per raw file (from :data:`CHECKSUMS`)."""
        return dict(CHECKSUMS[self.name])

    @property
    def payload_checksums(self) -> dict[str, str]:
        """MD5 of the decompressed content per gzip file (from :data:`PAYLOAD_CHECKSUMS`)."""
        return dict(PAYLOAD_CHECKSUMS.get(self.name, {}))

    @property
    def sources(self) -> tuple[Source, ...]:
        """Download sources (from :data:`SOURCES`)."""
        return SOURCES[self.name]

    def stats(self, in_chans: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for a model with ``in_chans`` input channels (grayscale stats repeated)."""
        c = _check_in_chans(in_chans, self)
        if c == len(self.mean):
            return self.mean, self.std
        return self.mean * c, self.std * c


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", title="Fashion-MNIST", num_classes=10, in_chans=1, native_size=28,
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, class_names=FASHION_MNIST_CLASSES,
        raw_files=FASHION_MNIST_FILES,
        homepage="https://github.com/zalandoresearch/fashion-mnist", in_memory=True),
    "cifar10": DatasetInfo(
        name="cifar10", title="CIFAR-10", num_classes=10, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CIFAR10_CLASSES,
        raw_files=_CIFAR10_FILES, homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        in_memory=True),
    "cifar100": DatasetInfo(
        name="cifar100", title="CIFAR-100", num_classes=100, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CIFAR100_CLASSES,
        raw_files=_CIFAR100_FILES, homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        in_memory=True),
    "gtsrb": DatasetInfo(
        name="gtsrb", title="GTSRB", num_classes=43, in_chans=3, native_size=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=GTSRB_CLASSES,
        raw_files=("GTSRB/Training", "GTSRB/Final_Test/Images", "GT-final_test.csv"),
        homepage="https://benchmark.ini.rub.de/gtsrb_dataset.html", in_memory=False),
    "caltech101": DatasetInfo(
        name="caltech101", title="Caltech-101", num_classes=101, in_chans=3, native_size=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CALTECH101_CLASSES,
        raw_files=("101_ObjectCategories",), homepage="https://data.caltech.edu/records/20086",
        in_memory=False),
    "svhn": DatasetInfo(
        name="svhn", title="SVHN", num_classes=10, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=tuple(str(d) for d in range(10)),
        raw_files=tuple(CHECKSUMS["svhn"]), homepage="http://ufldl.stanford.edu/housenumbers/",
        in_memory=True),
}


def get_info(name: str) -> DatasetInfo:
    """The registry entry of dataset ``name``; ValueError naming the allowed names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Raw files: fetch and verify
# --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gunzip_md5(path: Path) -> str | None:
    """MD5 of the decompressed content, or None when the file is not a valid gzip stream."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def _required(info: DatasetInfo, checksums: Mapping[str, str]) -> list[str]:
    return list(dict.fromkeys([*info.raw_files, *checksums]))


def _missing(folder: Path, required: Sequence[str]) -> list[str]:
    return [rel for rel in required if not (folder / rel).exists()]


def _remedy(info: DatasetInfo, folder: Path) -> str:
    urls = [s.urls[0] for s in info.sources]
    lines = ["Do one of:"]
    if info.name == "fashion_mnist":
        lines.append(
            f"  * install the Debian package: sudo apt-get install dataset-fashion-mnist "
            f"(it puts the four files in {DEBIAN_FASHION_MNIST_DIR}, where fetch looks);")
    lines.append("  * run with internet access and download enabled (download=True; in the "
                 "pipeline data.download: true in params.yaml), which downloads "
                 + ", ".join(urls) + ";")
    if info.name == "fashion_mnist":
        lines.append(f"  * copy the four official files ({', '.join(FASHION_MNIST_FILES)}) "
                     f"into {folder}.")
    else:
        inner = [f" (then unpack {s.inner} in it)" for s in info.sources if s.inner]
        lines.append(f"  * download {' and '.join(urls)} yourself and unpack into {folder}"
                     f"{''.join(inner)} so that {', '.join(info.raw_files)} exist there.")
    return "\n".join(lines)


def _mismatch_message(info: DatasetInfo, path: Path, expected: str, actual: str,
                      expected_payload: str | None, actual_payload: str | None) -> str:
    want = f"md5 {expected}"
    got = f"md5 {actual}"
    if expected_payload is not None:
        want += f" (or decompressed md5 {expected_payload})"
        got += f" (decompressed md5 {actual_payload or 'n/a: not a valid gzip file'})"
    return (f"{info.title}: checksum mismatch for {path}: expected {want}, got {got}. "
            f"The file is corrupt, truncated or not the official release. Delete it and run "
            f"calib.data.fetch({info.name!r}, root) again (it is re-copied or re-downloaded), "
            f"or replace it with the official file from {info.homepage}.")


def verify(name: str, root: str | os.PathLike[str], *,
           checksums: Mapping[str, str] | None = None,
           payload_checksums: Mapping[str, str] | None = None) -> Path:
    """Check that the raw files of ``name`` are present under ``root/<name>/`` and intact.

    Args:
        name: a registered dataset.
        root: the folder holding one subfolder per dataset.
        checksums: MD5 per raw path (relative to ``root/<name>/``); defaults to the published
            :data:`CHECKSUMS`. Tests pass the checksums of small fake files here.
        payload_checksums: MD5 of the decompressed content per gzip file; defaults to
            :data:`PAYLOAD_CHECKSUMS`.

    Returns:
        The verified folder ``root/<name>/``.

    Raises:
        DataIntegrityError: a required file is missing or matches neither checksum; the
            message names the file, the expected and actual MD5 and what to do.
    """
    info = get_info(name)
    folder = Path(root) / name
    table = info.checksums if checksums is None else dict(checksums)
    payload = info.payload_checksums if payload_checksums is None else dict(payload_checksums)
    for rel in _required(info, table):
        path = folder / rel
        if not path.exists():
            expected = f" (expected md5 {table[rel]})" if rel in table else ""
            raise DataIntegrityError(
                f"{info.title}: missing raw file {path}{expected}.\n" + _remedy(info, folder))
    for rel, expected in table.items():
        path = folder / rel
        actual = _md5(path)
        if actual == expected:
            continue
        # A re-compressed .gz (e.g. Debian's) has a different header, hence a different MD5,
        # but its decompressed payload must still be the published bytes.
        expected_payload = payload.get(rel)
        actual_payload = _gunzip_md5(path) if expected_payload is not None else None
        if expected_payload is not None and actual_payload == expected_payload:
            continue
        raise DataIntegrityError(_mismatch_message(info, path, expected, actual,
                                                   expected_payload, actual_payload))
    return folder


def _copy_from_system(folder: Path, missing: Sequence[str],
                      system_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Copy missing raw paths found in ``system_dirs``; return what is still missing.

    A raw path is a file (copied atomically) or a folder (GTSRB's ``GTSRB/Training``,
    Caltech-101's ``101_ObjectCategories``: the whole tree is copied into a temporary folder
    and renamed into place, so an interrupted copy leaves nothing behind).
    """
    still = []
    for rel in missing:
        src = next((Path(d) / rel for d in system_dirs if (Path(d) / rel).exists()), None)
        if src is None:
            still.append(rel)
            continue
        if src.is_dir():
            with atomic_dir(folder / rel) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            with atomic_path(folder / rel) as tmp:
                shutil.copyfile(src, tmp)
    return still


def read_checksums(path: str | os.PathLike[str] | None) -> dict[str, str] | None:
    """The MD5 table in a JSON file (raw path -> MD5), or None when ``path`` is empty.

    Such a file replaces the published checksums of :data:`CHECKSUMS` in :func:`fetch` and
    :func:`verify` (the pipeline's ``data.checksums``): for re-packaged raw files, or for the
    tests' small fake files. Paths are relative to ``root/<name>/``, e.g.
    ``{"cifar-100-python/train": "<32 hex digits>", ...}``.

    Raises:
        ValueError: the file is missing, is not JSON, or is not a mapping of relative paths to
            32-digit hexadecimal MD5 strings (the message names the file and the entry).
    """
    if path is None or os.fspath(path) == "":
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checksums file {p} does not exist (data.checksums: a JSON file "
                         f"mapping raw paths to MD5s, or \"\" for the published checksums)")
    try:
        table = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checksums file {p} is not valid JSON: {err}") from None
    if not isinstance(table, dict):
        raise ValueError(f"checksums file {p} must hold a JSON object mapping raw paths to "
                         f"MD5s, got {type(table).__name__}")
    for rel, md5 in table.items():
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"checksums file {p}: {rel!r} is not a path relative to the "
                             f"dataset folder")
        if not isinstance(md5, str) or len(md5) != 32 \
                or any(c not in "0123456789abcdef" for c in md5.lower()):
            raise ValueError(f"checksums file {p}: the MD5 of {rel!r} must be 32 hexadecimal "
                             f"digits, got {md5!r}")
    return {str(rel): md5.lower() for rel, md5 in table.items()}


def _download_file(url: str, folder: Path, filename: str, md5: str | None) -> None:
    """Download one file with torchvision's downloader (the only network access here)."""
    from torchvision.datasets.utils import download_url

    download_url(url, str(folder), filename=filename, md5=md5)


def _download_archive(url: str, folder: Path, filename: str, md5: str | None) -> None:
    """Download an archive with torchvision's downloader and unpack it into ``folder``."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=str(folder), filename=filename, md5=md5,
                                 remove_finished=True)


def _unpack_inner(folder: Path, inner: str) -> None:
    from torchvision.datasets.utils import extract_archive

    extract_archive(str(folder / inner), str(folder))
    shutil.rmtree(folder / Path(inner).parts[0])


def _download(info: DatasetInfo, folder: Path, missing: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in info.sources:
        if not any(rel in missing for rel in source.provides):
            continue
        errors: list[str] = []
        for url in source.urls:
            try:
                if source.extract:
                    _download_archive(url, folder, source.filename, source.md5)
                else:
                    _download_file(url, folder, source.filename, source.md5)
                if source.inner is not None:
                    _unpack_inner(folder, source.inner)
                break
            except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:
                errors.append(f"{url}: {err}")
        else:
            raise DataUnavailableError(
                f"{info.title}: could not download {source.filename} "
                f"({'; '.join(errors)}).\n" + _remedy(info, folder))


def fetch(name: str, root: str | os.PathLike[str], *, download: bool = True,
          system_dirs: Sequence[str | os.PathLike[str]] | None = None,
          checksums: Mapping[str, str] | None = None,
          payload_checksums: Mapping[str, str] | None = None,
          mirror: str | os.PathLike[str] | None = None) -> Path:
    """Make the raw files of ``name`` available under ``root/<name>/`` and verify them.

    Files already there are kept; missing ones are copied from ``mirror/<name>/``, then from
    ``system_dirs`` (for Fashion-MNIST by default the Debian package's folder
    :data:`DEBIAN_FASHION_MNIST_DIR`), then, if ``download``, downloaded with torchvision's
    downloader. Calling it again is cheap and changes nothing.

    Args:
        name: a registered dataset.
        root: the folder holding one subfolder per dataset.
        download: allow downloads when files are neither local nor in ``system_dirs``.
        system_dirs: folders to copy raw files from, searched in order; None means the
            Debian folder for Fashion-MNIST and none for the others.
        checksums, payload_checksums: overrides of the published checksums (see :func:`verify`).
        mirror: a local folder laid out like ``root`` (one ``<name>/`` subfolder per dataset,
            e.g. a lab's shared copy), searched before ``system_dirs``; None or "" for none
            (the pipeline's ``data.mirror``).

    Returns:
        The folder ``root/<name>/`` holding the verified raw files.

    Raises:
        DataUnavailableError: files are missing and cannot be obtained; the message says how to
            get them.
        DataIntegrityError: a file does not match its published checksum.
    """
    info = get_info(name)
    folder = Path(root) / name
    table = info.checksums if checksums is None else dict(checksums)
    required = _required(info, table)
    if system_dirs is None:
        system_dirs = (DEBIAN_FASHION_MNIST_DIR,) if name == "fashion_mnist" else ()
    if mirror is not None and os.fspath(mirror) != "":
        if not Path(mirror).is_dir():
            raise DataUnavailableError(f"{info.title}: the mirror folder {mirror} does not "
                                       f"exist (it should hold {name}/ with the raw files)")
        system_dirs = (Path(mirror) / name, *system_dirs)
    missing = _missing(folder, required)
    if missing:
        missing = _copy_from_system(folder, missing, system_dirs)
    if missing:
        if not download:
            raise DataUnavailableError(
                f"{info.title} is not on disk and download=False. Missing under {folder}: "
                f"{', '.join(missing)}.\n" + _remedy(info, folder))
        _download(info, folder, missing)
        missing = _missing(folder, required)
        if missing:
            raise DataUnavailableError(
                f"{info.title}: after downloading, still missing under {folder}: "
                f"{', '.join(missing)}.\n" + _remedy(info, folder))
    return verify(name, root, checksums=table, payload_checksums=payload_checksums)


# --------------------------------------------------------------------------------------------
# Labelled images
# --------------------------------------------------------------------------------------------


def _check_in_chans(in_chans: int | None, info: DatasetInfo | None = None,
                    native: int | None = None) -> int:
    native = info.in_chans if info is not None else native
    if in_chans is None:
        if native is None:
            raise ValueError("in_chans must be 1 or 3, got None")
        return native
    if isinstance(in_chans, bool) or in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 (or None for the native channels), "
                         f"got {in_chans!r}")
    if native == 3 and in_chans == 1:
        raise ValueError("in_chans=1 needs grayscale images; these are RGB (use in_chans=3)")
    return in_chans


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
        self.in_chans = _check_in_chans(in_chans, native=native_chans)
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


# --------------------------------------------------------------------------------------------
# Native-format readers
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


def _load_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.ndim != 3:
        raise DataIntegrityError(f"{folder}: {prefix} images must be (N, H, W), "
                                 f"got {images.shape}")
    return images[:, None], labels, FASHION_MNIST_CLASSES


def _load_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    base = "cifar-10-batches-py"
    files = ([f"{base}/data_batch_{i}" for i in range(1, 6)] if split == "train"
             else [f"{base}/test_batch"])
    images, labels = _cifar_arrays(folder, files, "labels")
    names = _read_cifar_pickle(folder / base / "batches.meta").get("label_names")
    return images, labels, names or CIFAR10_CLASSES


def _load_cifar100(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    base = "cifar-100-python"
    images, labels = _cifar_arrays(folder, [f"{base}/{split}"], "fine_labels")
    names = _read_cifar_pickle(folder / base / "meta").get("fine_label_names")
    return images, labels, names or CIFAR100_CLASSES


def _load_svhn(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    import scipy.io

    path = folder / f"{split}_32x32.mat"
    mat = scipy.io.loadmat(path)
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[2] != 3:
        raise DataIntegrityError(f"{path}: expected X (32, 32, 3, N) and y (N, 1)")
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN labels the digit 0 as class 10
    # X is (H, W, C, N); the loaders' layout is (N, C, H, W).
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8)
    return images, labels, DATASETS["svhn"].class_names


def _gtsrb_files(folder: Path, split: str) -> tuple[list[str], list[int]]:
    if split == "train":
        # Training/<class id, 5 digits>/*.ppm: the folder name is the label.
        paths, labels = [], []
        for class_dir in sorted(p for p in (folder / "GTSRB" / "Training").iterdir()
                                if p.is_dir()):
            if not class_dir.name.isdigit():
                raise DataIntegrityError(f"{class_dir}: GTSRB class folders are numbered")
            files = sorted(class_dir.glob("*.ppm"))
            paths += [str(f) for f in files]
            labels += [int(class_dir.name)] * len(files)
        return paths, labels
    images = folder / "GTSRB" / "Final_Test" / "Images"
    with (folder / "GT-final_test.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
    try:
        return [str(images / r["Filename"]) for r in rows], [int(r["ClassId"]) for r in rows]
    except (KeyError, ValueError) as err:
        raise DataIntegrityError(f"{folder / 'GT-final_test.csv'}: needs the columns "
                                 f"Filename and ClassId ({err})") from None


def stratified_partition(labels: Tensor, fractions: Sequence[float], *, seed: int
                         ) -> tuple[Tensor, ...]:
    """Split indices into parts with the given fractions of every class, at random (seeded).

    Within each class the samples are put in a random order (one ``torch.Generator`` seeded
    with ``seed``); part j takes ranks [round(F_{j-1} n_c), round(F_j n_c)), with F the
    cumulative fractions and n_c the class size, so the parts are disjoint and cover all
    samples.

    Args:
        labels: int64 tensor (N,).
        fractions: positive fractions summing to 1.
        seed: seed of the generator.

    Returns:
        One sorted int64 index tensor per fraction.
    """
    labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.int64).reshape(-1)
    fr = torch.as_tensor(list(fractions), dtype=torch.float64)
    if fr.numel() < 1 or bool((fr <= 0).any()) or abs(float(fr.sum()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    n = labels.numel()
    if n and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    # Grouping a random permutation by label (stable sort) gives a random order per class.
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    grouped_labels = labels[grouped]
    counts = torch.bincount(grouped_labels) if n else torch.zeros(0, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[grouped_labels]
    cum = torch.cumsum(fr, 0)
    cum[-1] = 1.0
    bounds = torch.floor(cum[:, None] * counts[None, :].double() + 0.5).long()  # (parts, K)
    part = (rank[None, :] >= bounds[:, grouped_labels]).sum(0)  # index of each sample's part
    return tuple(torch.sort(grouped[part == j]).values for j in range(fr.numel()))


def _caltech101_files(folder: Path, split: str) -> tuple[list[str], list[int]]:
    categories = folder / "101_ObjectCategories"
    known = {name: i for i, name in enumerate(CALTECH101_CLASSES)}
    paths, labels = [], []
    for class_dir in sorted(p for p in categories.iterdir() if p.is_dir()):
        if class_dir.name == _CALTECH101_BACKGROUND:
            continue
        if class_dir.name not in known:
            raise DataIntegrityError(f"{class_dir}: not a Caltech-101 category")
        files = sorted(class_dir.glob("*.jpg"))
        paths += [str(f) for f in files]
        labels += [known[class_dir.name]] * len(files)
    train, val, test = stratified_partition(torch.tensor(labels, dtype=torch.int64),
                                            CALTECH101_FRACTIONS, seed=CALTECH101_SEED)
    # No official split: "train" is the 80 + 10 pool (train + val), "test" the last 10 %.
    keep = torch.sort(torch.cat([train, val])).values if split == "train" else test
    return [paths[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]


_ARRAY_LOADERS: dict[str, Callable[[Path, str], tuple[np.ndarray, np.ndarray, Sequence[str]]]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
}
_FILE_LISTERS: dict[str, Callable[[Path, str], tuple[list[str], list[int]]]] = {
    "gtsrb": _gtsrb_files,
    "caltech101": _caltech101_files,
}


def load_split(name: str, root: str | os.PathLike[str], split: str, *,
               img_size: int | None = None, in_chans: int | None = None) -> LabeledImages:
    """The official ``split`` of dataset ``name``, read from its native files in ``root/<name>/``.

    Fashion-MNIST, CIFAR-10/100 and SVHN are read into memory as uint8 (N, C, H, W) and
    converted on access; GTSRB and Caltech-101 images are decoded from disk on access (RGB;
    Caltech-101's grayscale images are converted) and need ``img_size``. Caltech-101 has no
    official split: its images are split per class 80/10/10 at random (seed 42, SPEC §7);
    ``"train"`` is the 80 + 10 pool (carve the validation split out of it with
    :func:`make_splits`, e.g. ``val_fraction=1/9``) and ``"test"`` the last 10 %.

    Args:
        name: a registered dataset.
        root: the folder holding one subfolder per dataset (see :func:`fetch`).
        split: "train" or "test".
        img_size: output side (images resized to ``img_size`` x ``img_size``, bilinear with
            antialiasing); None keeps the native size (in-memory datasets only).
        in_chans: output channels; None for the native ones, 3 to repeat a grayscale channel.

    Returns:
        The split as a :class:`LabeledImages` (images float32 in [0, 1], labels int64).

    Raises:
        ValueError: bad ``name``, ``split``, ``img_size`` or ``in_chans``.
        DataUnavailableError: the raw files are not there (run :func:`fetch` first).
        DataIntegrityError: a raw file is malformed or holds an out-of-range label.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    _check_img_size(img_size)
    chans = _check_in_chans(in_chans, info)
    if not info.in_memory and img_size is None:
        raise ValueError(f"img_size is required for {name}: its images vary in size "
                         f"(the paper uses img_size=224)")
    folder = Path(root) / name
    missing = _missing(folder, info.raw_files)
    if missing:
        raise DataUnavailableError(
            f"{info.title} raw files not found under {folder} ({', '.join(missing)}): run "
            f"calib.data.fetch({name!r}, {os.fspath(root)!r}) first (the data stage does).")
    if info.in_memory:
        images, labels, names = _ARRAY_LOADERS[name](folder, split)
        if not images.flags.writeable:  # np.frombuffer views are read-only; torch wants writable
            images = images.copy()
        labels_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        _check_labels(labels_t, info, folder)
        return LabeledImages(labels_t, images=torch.from_numpy(np.ascontiguousarray(images)),
                             img_size=img_size, in_chans=chans, class_names=list(names))
    paths, labels_list = _FILE_LISTERS[name](folder, split)
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


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

#: The splits :func:`make_splits` returns, in this order.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "attack")


def make_splits(train_labels: Tensor, n_test: int, *, val_fraction: float, attack_size: int,
                seed: int) -> dict[str, Tensor]:
    """Index tensors of the pipeline's splits.

    * ``train`` / ``val``: the official training set split per class, ``val_fraction`` of each
      class (rounded) to validation, at random with a ``torch.Generator`` seeded with ``seed``;
    * ``test``: every test index;
    * ``attack``: the first ``min(attack_size, n_test)`` test images, as in the paper
      (SPEC §7: the first 500).

    Args:
        train_labels: int64 tensor (N,) of the official training labels.
        n_test: number of test images.
        val_fraction: fraction of each class held out for validation, in (0, 1).
        attack_size: number of test images to attack (>= 1).
        seed: seed of the validation split.

    Returns:
        Sorted int64 index tensors keyed by ``"train"``, ``"val"``, ``"test"``, ``"attack"``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) \
            or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in the open interval (0, 1), "
                         f"got {val_fraction!r}")
    if isinstance(attack_size, bool) or not isinstance(attack_size, int) or attack_size < 1:
        raise ValueError(f"attack_size must be an integer >= 1, got {attack_size!r}")
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    labels = torch.as_tensor(train_labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be a 1-D integer tensor, got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("train_labels is empty")
    train, val = stratified_partition(labels, (1.0 - float(val_fraction), float(val_fraction)),
                                      seed=seed)
    if train.numel() == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images")
    if val.numel() == 0:
        largest = int(torch.bincount(labels.to(torch.int64)).max())
        raise ValueError(
            f"val_fraction={val_fraction} leaves no validation images: each class's share "
            f"rounds to 0 (the largest class has {largest} images); the validation split "
            f"picks the best checkpoint and fits the recalibration methods, so raise "
            f"val_fraction or use more training images")
    return {"train": train, "val": val, "test": torch.arange(n_test),
            "attack": torch.arange(min(attack_size, n_test))}


def subsample(indices: Tensor, n: int, *, seed: int) -> Tensor:
    """A seeded random subset of ``n`` of ``indices`` (all of them if fewer), sorted."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    indices = torch.as_tensor(indices).to(torch.int64).reshape(-1)
    if n >= indices.numel():
        return torch.sort(indices).values
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(indices[torch.randperm(indices.numel(), generator=gen)[:n]]).values


def save_splits(path: str | os.PathLike[str], splits: Mapping[str, Tensor],
                metadata: Mapping[str, Any] | None = None) -> None:
    """Write index tensors (int64, 1-D) and string metadata as safetensors, atomically."""
    tensors: dict[str, Tensor] = {}
    for key, idx in splits.items():
        t = torch.as_tensor(idx)
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"split {key!r} must be a 1-D integer tensor, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
        tensors[key] = t.to(torch.int64)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_tensors(path, tensors, meta)


def load_splits(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read splits written by :func:`save_splits` (``train``, ``val``, ``test``, ``attack``)."""
    raw = load_tensors(path)
    missing = [k for k in SPLIT_NAMES if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing splits {missing}; found {sorted(raw)}")
    order = [*SPLIT_NAMES, *sorted(k for k in raw if k not in SPLIT_NAMES)]
    return {k: raw[k].to(torch.int64) for k in order}


def read_splits_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored with the splits (dataset, seed, ...)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Number of samples per class: int64 tensor (num_classes,)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    lab = torch.as_tensor(labels).to(device="cpu").reshape(-1)
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.to(torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    return torch.bincount(lab, minlength=num_classes)
