"""Where each dataset's raw files come from: download URLs and published MD5 checksums."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Where the Debian package ``dataset-fashion-mnist`` installs the four IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The mirror torchvision's ``FashionMNIST`` downloads from.
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

FASHION_MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)

#: MD5 of each raw file (relative to ``root/<name>/``) as published by the dataset authors (for
#: the torchvision datasets: the values torchvision 0.29 ships in
#: ``torchvision/datasets/{cifar,svhn}.py``). GTSRB and Caltech-101 are published as archives
#: only; their MD5s are in :data:`SOURCES` and are checked while downloading, and the unpacked
#: folders are checked for presence.
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


_GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"

#: Download sources per dataset (URLs and archive MD5s as torchvision 0.29 publishes them).
SOURCES: dict[str, tuple[Source, ...]] = {
    "fashion_mnist": tuple(
        Source(tuple(m + f for m in FASHION_MNIST_MIRRORS), f, CHECKSUMS["fashion_mnist"][f], (f,))
        for f in FASHION_MNIST_FILES
    ),
    "cifar10": (
        Source(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
               "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
               tuple(CHECKSUMS["cifar10"]), extract=True),
    ),
    "cifar100": (
        Source(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
               "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
               tuple(CHECKSUMS["cifar100"]), extract=True),
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
