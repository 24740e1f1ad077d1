"""Tiny fake raw files in each dataset's native on-disk format, for the tests.

Each writer fills ``root/<name>/`` exactly as the official release unpacks (IDX ``.gz`` files,
CIFAR pickles, SVHN ``.mat`` files, GTSRB's PPM folders and CSV, Caltech-101's JPEG folders)
and returns ``{"checksums": {raw path: MD5}, ...}`` plus what the loader should read back
(``"train"``/``"test"``: uint8 images (N, C, H, W) or solid colours, and labels). The checksums
replace the published ones (``calib.data.fetch(..., checksums=...)`` or a JSON file for the
pipeline's ``data.checksums``), since fake files cannot match the real releases.

Used by ``test_data.py`` (loaders, checksums, fallbacks) and ``test_paper_profile.py`` (the
paper profile's pipeline on fake CIFAR-100, Caltech-101 and GTSRB).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from calib import data

FakeWriter = Callable[[Path], dict]


def md5(path: Path) -> str:
    """MD5 of a file's bytes."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_checksums_json(path: Path, checksums: Mapping[str, str]) -> Path:
    """Write a checksum table as the JSON file ``data.checksums`` points at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(checksums), indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: four IDX files, gzip-compressed
# --------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array in the IDX (MNIST) format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fashion_payloads(n_train: int = 20, n_test: int = 10) -> tuple[dict[str, bytes], dict]:
    """The four IDX payloads (uncompressed) and the images/labels they hold."""
    rng = _rng(1)
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_tr = (np.arange(n_train) % 10).astype(np.uint8)
    y_te = (np.arange(n_test)[::-1] % 10).astype(np.uint8)
    payloads = {
        "train-images-idx3-ubyte.gz": idx_bytes(x_tr),
        "train-labels-idx1-ubyte.gz": idx_bytes(y_tr),
        "t10k-images-idx3-ubyte.gz": idx_bytes(x_te),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(y_te),
    }
    expected = {"train": (x_tr[:, None], y_tr), "test": (x_te[:, None], y_te)}
    return payloads, expected


def write_gz(folder: Path, payloads: dict[str, bytes], *, mtime: int = 0) -> None:
    """Gzip each payload into ``folder`` (``mtime`` sets the gzip header, hence the MD5)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        (folder / name).write_bytes(gzip.compress(payload, mtime=mtime))


def write_fashion_mnist(root: Path) -> dict:
    payloads, expected = fashion_payloads()
    folder = root / "fashion_mnist"
    write_gz(folder, payloads)
    return {"checksums": {f: md5(folder / f) for f in payloads},
            "payload_checksums": {f: hashlib.md5(p, usedforsecurity=False).hexdigest()
                                  for f, p in payloads.items()},
            **expected}


# --------------------------------------------------------------------------------------------
# CIFAR-10/100 ("python version": pickled dicts), SVHN (.mat)
# --------------------------------------------------------------------------------------------


def write_pickle(path: Path, obj: dict) -> None:
    """Pickle ``obj`` as the CIFAR batches are (protocol 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(root: Path) -> dict:
    rng = _rng(2)
    base = root / "cifar10" / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _cifar_images(rng, 2), [(2 * i) % 10, (2 * i + 1) % 10]
        write_pickle(base / f"data_batch_{i}", {"batch_label": f"batch {i}", "labels": y,
                                                "data": x.reshape(2, -1), "filenames": ["a", "b"]})
        xs.append(x)
        ys += y
    x_te, y_te = _cifar_images(rng, 3), [9, 0, 4]
    write_pickle(base / "test_batch", {"batch_label": "test", "labels": y_te,
                                       "data": x_te.reshape(3, -1), "filenames": ["c"] * 3})
    write_pickle(base / "batches.meta", {"label_names": list(data.CIFAR10_CLASSES),
                                         "num_cases_per_batch": 2, "num_vis": 3072})
    checksums = {rel: md5(root / "cifar10" / rel) for rel in data.CHECKSUMS["cifar10"]}
    return {"checksums": checksums, "train": (np.concatenate(xs), np.array(ys)),
            "test": (x_te, np.array(y_te))}


def write_cifar100(root: Path, *, train_labels: Sequence[int] | None = None,
                   test_labels: Sequence[int] | None = None) -> dict:
    """CIFAR-100's ``train``, ``test`` and ``meta`` pickles with random 32x32 RGB images.

    Labels default to 6 training and 4 test images of random classes; pass them to choose
    the classes and sizes (e.g. a few classes with enough images for a validation split).
    """
    rng = _rng(3)
    base = root / "cifar100" / "cifar-100-python"
    out: dict = {}
    for split, n, given in (("train", 6, train_labels), ("test", 4, test_labels)):
        n = n if given is None else len(given)
        x = _cifar_images(rng, n)
        y = [int(v) for v in (rng.integers(0, 100, n) if given is None else given)]
        write_pickle(base / split, {"filenames": ["f"] * n, "batch_label": split,
                                    "fine_labels": y, "coarse_labels": [v // 5 for v in y],
                                    "data": x.reshape(n, -1)})
        out[split] = (x, np.array(y))
    write_pickle(base / "meta", {"fine_label_names": list(data.CIFAR100_CLASSES),
                                 "coarse_label_names": [f"super{i}" for i in range(20)]})
    out["checksums"] = {rel: md5(root / "cifar100" / rel) for rel in data.CHECKSUMS["cifar100"]}
    return out


def write_svhn(root: Path) -> dict:
    import scipy.io

    rng = _rng(4)
    folder = root / "svhn"
    folder.mkdir(parents=True)
    out: dict = {}
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        digits = np.arange(n) % 10
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # 10 means digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat",
                         {"X": np.transpose(x, (2, 3, 1, 0)), "y": y})
        out[split] = (x, digits)
    out["checksums"] = {f: md5(folder / f) for f in data.CHECKSUMS["svhn"]}
    return out


# --------------------------------------------------------------------------------------------
# GTSRB (PPM folders per class, test CSV) and Caltech-101 (JPEG folders per category)
# --------------------------------------------------------------------------------------------


def solid(path: Path, size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB"
          ) -> None:
    """Save a solid-colour image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour[0] if mode == "L" else colour).save(path)


#: GTSRB's default fake training images: class id -> image sizes (width, height).
GTSRB_TRAIN: dict[int, list[tuple[int, int]]] = {
    0: [(30, 31), (45, 40)], 2: [(25, 25)], 42: [(60, 52), (33, 29)],
}
GTSRB_TEST: tuple[int, ...] = (14, 0, 42)


def write_gtsrb(root: Path, *, train: Mapping[int, Sequence[tuple[int, int]]] | None = None,
                test_labels: Sequence[int] | None = None) -> dict:
    """GTSRB's training folders (``GTSRB/Training/<class>/*.ppm`` with a CSV each), the test
    images (``GTSRB/Final_Test/Images``) and their labels (``GT-final_test.csv``).

    Args:
        train: class id -> sizes of its training images (default :data:`GTSRB_TRAIN`).
        test_labels: class id of each test image (default :data:`GTSRB_TEST`).
    """
    train = GTSRB_TRAIN if train is None else train
    test_labels = GTSRB_TEST if test_labels is None else test_labels
    folder = root / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    train_colours, train_labels = [], []
    for cls, sizes in train.items():
        class_dir = folder / "GTSRB" / "Training" / f"{cls:05d}"
        rows = [header]
        for i, size in enumerate(sizes):
            colour = (10 * cls % 256, 50 + i, 200)
            solid(class_dir / f"00000_{i:05d}.ppm", size, colour)
            rows.append(f"00000_{i:05d}.ppm;{size[0]};{size[1]};1;1;5;5;{cls}")
            train_colours.append(colour)
            train_labels.append(cls)
        (class_dir / f"GT-{cls:05d}.csv").write_text("\n".join(rows) + "\n")
    test_colours = []
    rows = [header]
    for i, cls in enumerate(test_labels):
        colour = (i * 40 % 256, 255 - i, 7)
        solid(folder / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", (40 + i, 35), colour)
        rows.append(f"{i:05d}.ppm;{40 + i};35;1;1;5;5;{cls}")
        test_colours.append(colour)
    (folder / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return {"checksums": {"GT-final_test.csv": md5(folder / "GT-final_test.csv")},
            "train": (train_colours, np.array(train_labels)),
            "test": (test_colours, np.array(list(test_labels)))}


#: Caltech-101 categories of the default fake release (with one grayscale image).
CALTECH_FAKE: tuple[str, ...] = ("Faces", "accordion", "yin_yang")


def write_caltech101(root: Path, *, classes: Sequence[str] = CALTECH_FAKE,
                     per_class: int = 10) -> dict:
    """Caltech-101's ``101_ObjectCategories/<category>/image_NNNN.jpg`` of varied sizes, plus
    the ``BACKGROUND_Google`` folder the loader skips; ``accordion/image_0003.jpg`` (when
    written) is grayscale, as some real Caltech-101 images are.
    """
    cats = root / "caltech101" / "101_ObjectCategories"
    colours: dict[str, tuple[int, int, int]] = {}
    for c, name in enumerate(classes):
        for i in range(1, per_class + 1):
            colour = ((20 * c + i) % 256, (100 + c) % 256, (90 + i) % 256)
            path = cats / name / f"image_{i:04d}.jpg"
            if name == "accordion" and i == 3:  # Caltech-101 holds some grayscale images
                colour = (77, 77, 77)
                solid(path, (50, 37), colour, mode="L")
            else:
                solid(path, (41 + i, 30 + c), colour)
            colours[str(path)] = colour
    solid(cats / "BACKGROUND_Google" / "image_0001.jpg", (20, 20), (0, 0, 0))
    first = f"101_ObjectCategories/{classes[0]}/image_0001.jpg"
    rel = "101_ObjectCategories/accordion/image_0001.jpg" if "accordion" in classes else first
    return {"checksums": {rel: md5(root / "caltech101" / rel)}, "colours": colours}


WRITERS: dict[str, FakeWriter] = {
    "fashion_mnist": write_fashion_mnist,
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "svhn": write_svhn,
    "gtsrb": write_gtsrb,
    "caltech101": write_caltech101,
}
