"""Dataset registry, raw files and checksums, loaders and splits (calib.data).

Every registered dataset is exercised on tiny fake raw files in its native on-disk format
(written by ``fake_data.py``), with checksum overrides, and its loader is compared with an
independent decode of those files; nothing touches the network (downloads are replaced by local
stand-ins). One test reads the real Fashion-MNIST files of the Debian package when installed.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from fake_data import (
    CALTECH_FAKE,
    WRITERS,
    fashion_payloads,
    idx_bytes,
    md5,
    write_caltech101,
    write_checksums_json,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_gz,
    write_pickle,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from calib import data, imbalance
from calib.data import download


def _fetch_fake(name: str, root: Path) -> dict:
    fake = WRITERS[name](root)
    data.fetch(name, root, download=False, system_dirs=(), checksums=fake["checksums"],
               payload_checksums=fake.get("payload_checksums"))
    return fake


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_every_registered_dataset_has_a_fake_writer():
    assert set(WRITERS) == set(data.DATASETS)
    assert "fashion_mnist" in data.DATASETS


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_registry_entries_are_consistent(name):
    info = data.get_info(name)
    assert info.name == name
    assert len(info.class_names) == info.num_classes == len(set(info.class_names))
    assert len(info.mean) == len(info.std) == info.in_chans
    assert set(info.checksums) <= set(info.raw_files)
    assert info.sources and all(s.md5 for s in info.sources)
    provided = {p for s in info.sources for p in s.provides}
    assert set(info.raw_files) <= provided
    assert (info.native_size is None) == (not info.in_memory)


def test_get_info_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*fashion_mnist"):
        data.get_info("mnist")


def test_stats_repeat_grayscale_statistics():
    info = data.get_info("fashion_mnist")
    mean, std = info.stats(3)
    assert mean == info.mean * 3 and std == info.std * 3
    assert info.stats() == (info.mean, info.std)
    with pytest.raises(ValueError, match="in_chans"):
        data.get_info("cifar10").stats(1)


# --------------------------------------------------------------------------------------------
# Loading every dataset from its native format
# --------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor, n: int, shape: tuple[int, int, int]) -> None:
    assert images.shape == (n, *shape)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_in_memory_datasets_load_native_files(tmp_path, name):
    fake = _fetch_fake(name, tmp_path)
    info = data.get_info(name)
    for split in data.SPLITS:
        ds = data.load_split(name, tmp_path, split)
        raw, labels = fake[split]
        assert len(ds) == len(labels)
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.labels, torch.as_tensor(labels, dtype=torch.int64))
        images, lab = ds.tensors(batch_size=3)
        _check_images(images, len(labels), (info.in_chans, info.native_size, info.native_size))
        assert torch.equal(images, torch.from_numpy(raw).float() / 255.0)
        assert torch.equal(lab, ds.labels)
        x0, y0 = ds[0]
        assert x0.shape == images.shape[1:] and torch.equal(x0, images[0])
        assert y0.dtype == torch.int64 and int(y0) == int(labels[0])
        assert list(ds.class_names) == list(info.class_names)


def test_gtsrb_reads_training_folders_and_test_csv(tmp_path):
    fake = _fetch_fake("gtsrb", tmp_path)
    for split in data.SPLITS:
        ds = data.load_split("gtsrb", tmp_path, split, img_size=16)
        colours, labels = fake[split]
        assert torch.equal(ds.labels, torch.as_tensor(labels, dtype=torch.int64))
        images, _ = ds.tensors()
        _check_images(images, len(labels), (3, 16, 16))
        # Solid PPM (lossless) images stay their colour through the resize.
        want = torch.tensor(colours, dtype=torch.float32)[:, :, None, None] / 255.0
        assert torch.allclose(images, want.expand_as(images), atol=1e-6)


def test_caltech101_split_is_stratified_80_10_10_and_converts_grayscale(tmp_path):
    fake = _fetch_fake("caltech101", tmp_path)
    train = data.load_split("caltech101", tmp_path, "train", img_size=12)
    test = data.load_split("caltech101", tmp_path, "test", img_size=12)
    expected_labels = [data.CALTECH101_CLASSES.index(c) for c in CALTECH_FAKE]
    # 10 images per class: 8 train + 1 val in the "train" pool, 1 in "test"; background skipped.
    assert data.class_counts(train.labels, 101)[expected_labels].tolist() == [9, 9, 9]
    assert data.class_counts(test.labels, 101)[expected_labels].tolist() == [1, 1, 1]
    assert len(train) + len(test) == 30
    assert set(train.paths).isdisjoint(test.paths)
    # The split is fixed by the seed: a second load gives the same images.
    assert data.load_split("caltech101", tmp_path, "test", img_size=12).paths == test.paths
    n_gray = 0
    for ds in (train, test):
        images, _ = ds.tensors()
        _check_images(images, len(ds), (3, 12, 12))
        want = torch.tensor([fake["colours"][p] for p in ds.paths], dtype=torch.float32) / 255
        # JPEG is lossy: a solid colour comes back within a few levels.
        assert torch.allclose(images.mean((2, 3)), want, atol=4 / 255)
        grays = [i for i, p in enumerate(ds.paths) if p.endswith("accordion/image_0003.jpg")]
        for i in grays:
            x, _ = ds[i]
            assert x.shape == (3, 12, 12) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        n_gray += len(grays)
    assert n_gray == 1


# The loaders against an independent decode of the same native files: torchvision's
# FashionMNIST and CIFAR classes (on the test's own files, so their plain pickle is harmless),
# scipy for SVHN, the CSV files and folder names for GTSRB and Caltech-101, PIL for images.


def _reference_arrays(name: str, folder: Path, split: str, tmp_path: Path
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels (N,) of an in-memory dataset's split."""
    if name == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        # torchvision reads the decompressed IDX files from <root>/FashionMNIST/raw/.
        raw = tmp_path / "torchvision" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in data.FASHION_MNIST_FILES:
            (raw / f.removesuffix(".gz")).write_bytes(gzip.decompress((folder / f).read_bytes()))
        ref = FashionMNIST(tmp_path / "torchvision", train=split == "train", download=False)
        return ref.data[:, None], ref.targets
    if name in ("cifar10", "cifar100"):
        from torchvision.datasets import CIFAR10, CIFAR100

        cifar = (CIFAR10 if name == "cifar10" else CIFAR100)(folder, train=split == "train")
        # torchvision keeps CIFAR images as (N, H, W, C).
        return torch.from_numpy(cifar.data).permute(0, 3, 1, 2), torch.tensor(cifar.targets)
    mat = scipy.io.loadmat(folder / f"{split}_32x32.mat")
    labels = torch.from_numpy(mat["y"].reshape(-1).astype(np.int64))
    # X is (H, W, C, N); SVHN labels the digit 0 as 10.
    return torch.from_numpy(mat["X"]).permute(3, 2, 0, 1), torch.where(labels == 10, 0, labels)


def _gtsrb_reference(folder: Path, split: str) -> tuple[list[str], list[int]]:
    """GTSRB's image files and labels as its CSV files list them (one per training class)."""
    if split == "test":
        csvs = [(folder / "GT-final_test.csv", folder / "GTSRB" / "Final_Test" / "Images")]
    else:
        csvs = [(d / f"GT-{d.name}.csv", d)
                for d in sorted((folder / "GTSRB" / "Training").iterdir())]
    paths, labels = [], []
    for csv_path, images in csvs:
        for row in csv_path.read_text().splitlines()[1:]:
            fields = row.split(";")
            paths.append(str(images / fields[0]))
            labels.append(int(fields[-1]))
    return paths, labels


def _decode(paths: list[str], size: int) -> torch.Tensor:
    """Image files as float32 (N, 3, size, size) in [0, 1]: PIL's RGB decode, then the resize
    the loaders document (bilinear, antialiased)."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None]
        out.append(torch.nn.functional.interpolate(
            x.float() / 255, size=(size, size), mode="bilinear", align_corners=False,
            antialias=True).clamp(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_in_memory_loaders_match_an_independent_decode(tmp_path, monkeypatch, name):
    # The fake files cannot match the MD5s torchvision's CIFAR classes check on load.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *_args: True)
    _fetch_fake(name, tmp_path)
    for split in data.SPLITS:
        ds = data.load_split(name, tmp_path, split)
        want_images, want_labels = _reference_arrays(name, tmp_path / name, split, tmp_path)
        images, labels = ds.tensors()
        assert want_images.dtype == torch.uint8 and want_labels.dtype == torch.int64
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(images, want_images.float() / 255)
        assert torch.equal(labels, want_labels) and torch.equal(ds.labels, want_labels)


def test_gtsrb_loader_matches_its_csv_files_and_a_pil_decode(tmp_path):
    # The default fake training set has only classes 0, 2 and 42: labels are class ids,
    # not the ranks of the folders present.
    _fetch_fake("gtsrb", tmp_path)
    for split in data.SPLITS:
        ds = data.load_split("gtsrb", tmp_path, split, img_size=20)
        paths, labels = _gtsrb_reference(tmp_path / "gtsrb", split)
        assert ds.paths == paths
        assert torch.equal(ds.labels, torch.tensor(labels, dtype=torch.int64))
        images, _ = ds.tensors()
        assert torch.equal(images, _decode(paths, 20))


def test_caltech101_loader_matches_its_folders_and_a_pil_decode(tmp_path):
    _fetch_fake("caltech101", tmp_path)
    categories = tmp_path / "caltech101" / "101_ObjectCategories"
    listing = [(str(f), data.CALTECH101_CLASSES.index(d.name))
               for d in sorted(categories.iterdir()) if d.name != "BACKGROUND_Google"
               for f in sorted(d.glob("*.jpg"))]
    labels = torch.tensor([label for _, label in listing])
    train, val, test = data.stratified_partition(labels, data.CALTECH101_FRACTIONS, seed=42)
    for split, keep in (("train", torch.sort(torch.cat([train, val])).values), ("test", test)):
        ds = data.load_split("caltech101", tmp_path, split, img_size=20)
        assert ds.paths == [listing[i][0] for i in keep.tolist()]
        assert torch.equal(ds.labels, labels[keep])
        images, _ = ds.tensors()
        assert torch.equal(images, _decode(ds.paths, 20))


@pytest.mark.parametrize("name", ["gtsrb", "caltech101"])
def test_file_datasets_need_img_size(tmp_path, name):
    _fetch_fake(name, tmp_path)
    with pytest.raises(ValueError, match="img_size"):
        data.load_split(name, tmp_path, "train")


def test_resize_and_channel_repeat(tmp_path):
    fake = _fetch_fake("fashion_mnist", tmp_path)
    ds = data.load_split("fashion_mnist", tmp_path, "test", img_size=32, in_chans=3)
    images, _ = ds.tensors()
    _check_images(images, len(ds), (3, 32, 32))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    raw = torch.from_numpy(fake["test"][0]).float() / 255.0
    want = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear",
                                           align_corners=False, antialias=True)
    assert torch.allclose(images[:, :1], want, atol=1e-6)
    with pytest.raises(ValueError, match="in_chans"):
        data.load_split("fashion_mnist", tmp_path, "test", in_chans=2)
    with pytest.raises(ValueError, match="img_size"):
        data.load_split("fashion_mnist", tmp_path, "test", img_size=0)
    with pytest.raises(ValueError, match="split"):
        data.load_split("fashion_mnist", tmp_path, "val")


def test_subset_tensors_and_dataloader_agree(tmp_path):
    _fetch_fake("fashion_mnist", tmp_path)
    ds = data.load_split("fashion_mnist", tmp_path, "train")
    assert ds.paths is None  # held in memory
    sub = ds.subset(torch.tensor([3, 1, 4, 15, 9, 2]))
    subsub = sub.subset([5, 0, -1])
    assert torch.equal(subsub.labels, ds.labels[torch.tensor([2, 3, 2])])
    x_all, y_all = ds.tensors()
    x_sub, y_sub = subsub.tensors()
    assert torch.equal(x_sub, x_all[[2, 3, 2]]) and torch.equal(y_sub, y_all[[2, 3, 2]])
    x_idx, _ = sub.tensors([1, 2])
    assert torch.equal(x_idx, x_all[[1, 4]])
    batches = list(DataLoader(sub, batch_size=4, shuffle=False))
    assert torch.equal(torch.cat([b[0] for b in batches]), sub.tensors()[0])
    assert torch.equal(torch.cat([b[1] for b in batches]), sub.labels)
    assert batches[0][1].dtype == torch.int64
    with pytest.raises(ValueError, match="out of range"):
        sub.subset([6])
    with pytest.raises(ValueError, match="batch_size"):
        sub.tensors(batch_size=0)


def test_labeled_images_wraps_user_tensors():
    images = torch.rand(5, 3, 8, 8)
    ds = data.LabeledImages(torch.arange(5) % 2, images=images, class_names=["a", "b"])
    x, y = ds.tensors()
    assert torch.equal(x, images) and y.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="exactly one"):
        data.LabeledImages([0], images=None)
    with pytest.raises(ValueError, match="labels"):
        data.LabeledImages([0, 1], images=images)
    with pytest.raises(ValueError, match="in_chans"):
        data.LabeledImages(torch.zeros(5), images=images, in_chans=1)


# --------------------------------------------------------------------------------------------
# Raw files: checksums, fallbacks, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_checksum_mismatch_names_the_file(tmp_path, name):
    fake = WRITERS[name](tmp_path)
    rel, expected = next(iter(fake["checksums"].items()))
    path = tmp_path / name / rel
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(data.DataIntegrityError) as err:
        data.fetch(name, tmp_path, download=False, system_dirs=(), checksums=fake["checksums"])
    msg = str(err.value)
    assert str(path) in msg and expected in msg and md5(path) in msg
    assert "fetch" in msg  # says what to do


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_missing_files_without_download_say_what_to_do(tmp_path, name):
    with pytest.raises(data.DataUnavailableError) as err:
        data.fetch(name, tmp_path, download=False, system_dirs=())
    msg = str(err.value)
    info = data.get_info(name)
    assert str(tmp_path / name) in msg and "download" in msg
    assert all(rel in msg for rel in info.raw_files)
    assert info.sources[0].urls[0] in msg
    if name == "fashion_mnist":
        assert "sudo apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(data.DataUnavailableError, match="fetch"):
        data.load_split(name, tmp_path, "test", img_size=8)


def test_debian_fallback_copies_and_accepts_regzipped_files(tmp_path):
    payloads, _ = fashion_payloads()
    system = tmp_path / "usr-share"
    write_gz(system, payloads, mtime=1_591_000_000)  # re-compressed: a different .gz header
    published = tmp_path / "published"
    write_gz(published, payloads, mtime=0)
    checksums = {f: md5(published / f) for f in payloads}
    payload_md5 = {f: hashlib.md5(p, usedforsecurity=False).hexdigest()
                   for f, p in payloads.items()}
    assert all(md5(system / f) != checksums[f] for f in payloads)
    root = tmp_path / "raw"
    folder = data.fetch("fashion_mnist", root, download=False, system_dirs=[system],
                        checksums=checksums, payload_checksums=payload_md5)
    assert folder == root / "fashion_mnist"
    assert all((folder / f).read_bytes() == (system / f).read_bytes() for f in payloads)
    assert len(data.load_split("fashion_mnist", root, "train")) == 20
    # Without the payload checksums the re-compressed files are rejected.
    with pytest.raises(data.DataIntegrityError, match="checksum mismatch"):
        data.verify("fashion_mnist", root, checksums=checksums, payload_checksums={})


def test_corrupt_payload_is_rejected_even_for_gzip(tmp_path):
    fake = write_fashion_mnist(tmp_path)
    rel = "t10k-labels-idx1-ubyte.gz"
    payload = gzip.decompress((tmp_path / "fashion_mnist" / rel).read_bytes())
    (tmp_path / "fashion_mnist" / rel).write_bytes(gzip.compress(payload[:-1] + b"\x07"))
    with pytest.raises(data.DataIntegrityError) as err:
        data.verify("fashion_mnist", tmp_path, checksums=fake["checksums"],
                    payload_checksums=fake["payload_checksums"])
    assert rel in str(err.value) and fake["payload_checksums"][rel] in str(err.value)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_mirror_folder_supplies_files_and_folders(tmp_path, name):
    """data.mirror: a local copy laid out like root (``<name>/``), folders copied whole."""
    mirror = tmp_path / "mirror"
    fake = WRITERS[name](mirror)
    root = tmp_path / "raw"
    folder = data.fetch(name, root, download=False, system_dirs=(), mirror=mirror,
                        checksums=fake["checksums"],
                        payload_checksums=fake.get("payload_checksums"))
    assert folder == root / name
    copied = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(mirror / name) for p in (mirror / name).rglob("*")
                            if p.is_file())
    assert not [p for p in root.rglob(".*")]  # no temporary leftovers
    img_size = None if data.get_info(name).in_memory else 8
    assert len(data.load_split(name, root, "test", img_size=img_size)) > 0
    # Files already in root are kept; the empty string means "no mirror".
    assert data.fetch(name, root, download=False, system_dirs=(), mirror="",
                      checksums=fake["checksums"],
                      payload_checksums=fake.get("payload_checksums")) == folder


def test_missing_mirror_folder_is_named(tmp_path):
    with pytest.raises(data.DataUnavailableError, match=r"mirror folder .*nowhere"):
        data.fetch("cifar100", tmp_path / "raw", download=False, mirror=tmp_path / "nowhere")


def test_mirror_comes_before_system_dirs(tmp_path):
    payloads, _ = fashion_payloads()
    write_gz(tmp_path / "mirror" / "fashion_mnist", payloads, mtime=7)
    write_gz(tmp_path / "system", payloads, mtime=9)
    checksums = {f: md5(tmp_path / "mirror" / "fashion_mnist" / f) for f in payloads}
    folder = data.fetch("fashion_mnist", tmp_path / "raw", download=False,
                        system_dirs=[tmp_path / "system"], mirror=tmp_path / "mirror",
                        checksums=checksums)
    assert all(md5(folder / f) == checksums[f] for f in payloads)


def test_interrupted_folder_copy_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    fake = write_caltech101(mirror)

    def broken_copy(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken_copy)
    root = tmp_path / "raw"
    with pytest.raises(OSError, match="disk full"):
        data.fetch("caltech101", root, download=False, mirror=mirror,
                   checksums=fake["checksums"])
    assert list((root / "caltech101").iterdir()) == []


def test_read_checksums_json(tmp_path):
    fake = write_cifar100(tmp_path / "mirror")
    path = write_checksums_json(tmp_path / "md5.json", fake["checksums"])
    assert data.read_checksums(path) == fake["checksums"]
    assert data.read_checksums("") is None and data.read_checksums(None) is None
    data.fetch("cifar100", tmp_path / "raw", download=False, mirror=tmp_path / "mirror",
               checksums=data.read_checksums(path))
    with pytest.raises(data.DataIntegrityError, match="checksum mismatch"):  # the published ones
        data.verify("cifar100", tmp_path / "raw")


@pytest.mark.parametrize("content,pattern", [
    (None, r"does not exist"),
    ("{not json", r"not valid JSON"),
    ("[1, 2]", r"must hold a JSON object"),
    ('{"train": "abc"}', r"MD5 of 'train' must be 32 hexadecimal digits"),
    ('{"train": 5}', r"MD5 of 'train' must be"),
    ('{"../train": "' + "0" * 32 + '"}', r"'\.\./train' is not a path relative"),
])
def test_read_checksums_rejects_bad_files(tmp_path, content, pattern):
    path = tmp_path / "md5.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=pattern) as err:
        data.read_checksums(path)
    assert str(path) in str(err.value)


def test_fetch_is_idempotent(tmp_path):
    fake = write_fashion_mnist(tmp_path)
    kwargs = {"download": False, "system_dirs": (), "checksums": fake["checksums"]}
    first = data.fetch("fashion_mnist", tmp_path, **kwargs)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}
    second = data.fetch("fashion_mnist", tmp_path, **kwargs)
    assert first == second
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in second.iterdir()} == stamps


def test_download_fills_missing_files_through_the_downloader(tmp_path, monkeypatch):
    payloads, _ = fashion_payloads()
    mirror = tmp_path / "mirror"
    write_gz(mirror, payloads)
    calls = []

    def fake_download(url: str, folder: Path, filename: str, md5: str | None) -> None:
        calls.append(url)
        shutil.copyfile(mirror / filename, Path(folder) / filename)

    monkeypatch.setattr(download, "_download_file", fake_download)
    root = tmp_path / "raw"
    (root / "fashion_mnist").mkdir(parents=True)
    shutil.copyfile(mirror / "t10k-labels-idx1-ubyte.gz",
                    root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz")
    checksums = {f: md5(mirror / f) for f in payloads}
    data.fetch("fashion_mnist", root, download=True, system_dirs=(), checksums=checksums)
    assert sorted(Path(u).name for u in calls) == sorted(set(payloads) - {
        "t10k-labels-idx1-ubyte.gz"})
    assert all(u.startswith(data.FASHION_MNIST_MIRRORS[0]) for u in calls)


def test_archive_download_unpacks_into_the_dataset_folder(tmp_path, monkeypatch):
    made: dict = {}

    def fake_archive(url: str, folder: Path, filename: str, md5: str | None) -> None:
        assert filename == "cifar-10-python.tar.gz" and md5 == data.SOURCES["cifar10"][0].md5
        made.update(write_cifar10(Path(folder).parent))

    monkeypatch.setattr(download, "_download_archive", fake_archive)
    with pytest.raises(data.DataIntegrityError):  # the fake files fail the published checksums
        data.fetch("cifar10", tmp_path, download=True)
    assert data.verify("cifar10", tmp_path, checksums=made["checksums"]) == tmp_path / "cifar10"


def test_failed_download_raises_unavailable_with_instructions(tmp_path, monkeypatch):
    def offline(*_args: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(download, "_download_file", offline)
    with pytest.raises(data.DataUnavailableError, match=r"could not download.*unreachable") as e:
        data.fetch("svhn", tmp_path, download=True)
    assert "train_32x32.mat" in str(e.value)


def test_malformed_idx_and_hostile_pickle_are_rejected(tmp_path):
    fake = write_fashion_mnist(tmp_path)
    path = tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 20))
    with pytest.raises(data.DataIntegrityError, match="magic"):
        data.load_split("fashion_mnist", tmp_path, "test")
    assert fake["checksums"]
    write_cifar10(tmp_path)
    write_pickle(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch",
            {"data": collections.OrderedDict(), "labels": []})
    with pytest.raises(data.DataIntegrityError, match="refusing to unpickle"):
        data.load_split("cifar10", tmp_path, "test")


def test_out_of_range_labels_are_rejected(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.full(10, 10, dtype=np.uint8))))
    with pytest.raises(data.DataIntegrityError, match="labels"):
        data.load_split("fashion_mnist", tmp_path, "test")


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist_verifies_and_loads(tmp_path):
    folder = data.fetch("fashion_mnist", tmp_path, download=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(data.FASHION_MNIST_FILES)
    train = data.load_split("fashion_mnist", tmp_path, "train")
    test = data.load_split("fashion_mnist", tmp_path, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert data.class_counts(train.labels, 10).tolist() == [6000] * 10
    assert data.class_counts(test.labels, 10).tolist() == [1000] * 10
    x, y = test.tensors(torch.arange(8))
    _check_images(x, 8, (1, 28, 28))
    assert y.tolist() == [9, 2, 1, 1, 6, 1, 4, 6]  # the published first test labels
    # The same arrays as torchvision's reader of the decompressed files (a sample of train).
    want_x, want_y = _reference_arrays("fashion_mnist", folder, "test", tmp_path)
    assert torch.equal(test.tensors()[0], want_x.float() / 255)
    assert torch.equal(test.labels, want_y)
    want_x, want_y = _reference_arrays("fashion_mnist", folder, "train", tmp_path)
    sample = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:2000]
    assert torch.equal(train.tensors(sample)[0], want_x[sample].float() / 255)
    assert torch.equal(train.labels, want_y)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _class_labels(sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])


def test_make_splits_is_seeded_stratified_disjoint_and_complete():
    labels = _class_labels([50, 30, 20, 7])[torch.randperm(107, generator=torch.Generator()
                                                          .manual_seed(5))]
    splits = data.make_splits(labels, 40, val_fraction=0.2, attack_size=25, seed=3)
    assert list(splits) == ["train", "val", "test", "attack"]
    assert all(v.dtype == torch.int64 for v in splits.values())
    assert torch.equal(torch.sort(torch.cat([splits["train"], splits["val"]])).values,
                       torch.arange(107))
    assert data.class_counts(labels[splits["val"]], 4).tolist() == [10, 6, 4, 1]
    assert torch.equal(splits["test"], torch.arange(40))
    assert torch.equal(splits["attack"], torch.arange(25))
    again = data.make_splits(labels, 40, val_fraction=0.2, attack_size=25, seed=3)
    assert all(torch.equal(splits[k], again[k]) for k in splits)
    other = data.make_splits(labels, 40, val_fraction=0.2, attack_size=25, seed=4)
    assert not torch.equal(splits["val"], other["val"])
    small = data.make_splits(labels, 10, val_fraction=0.2, attack_size=500, seed=3)
    assert torch.equal(small["attack"], torch.arange(10))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       val_fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1))
def test_make_splits_properties(sizes, val_fraction, seed):
    labels = _class_labels(sizes)
    n_train = [math.floor((1 - val_fraction) * n + 0.5) for n in sizes]
    if sum(n_train) == 0 or sum(n_train) == sum(sizes):
        with pytest.raises(ValueError, match="val_fraction"):
            data.make_splits(labels, 3, val_fraction=val_fraction, attack_size=1, seed=seed)
        return
    splits = data.make_splits(labels, 3, val_fraction=val_fraction, attack_size=1, seed=seed)
    train, val = splits["train"], splits["val"]
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    k = len(sizes)
    assert data.class_counts(labels[train], k).tolist() == n_train
    assert data.class_counts(labels[val], k).tolist() == [n - t for n, t in zip(sizes, n_train,
                                                                                 strict=True)]


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, 0.0, 1.0, True, "0.1"])
def test_bad_val_fraction_names_the_key(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        data.make_splits(torch.arange(10) % 2, 5, val_fraction=bad, attack_size=2, seed=0)


def test_val_fraction_too_small_for_the_classes_is_named():
    # 5 images per class: 10% rounds to none (4.5 of 5 go to training), so no validation split.
    labels = torch.arange(4).repeat_interleave(5)
    with pytest.raises(ValueError, match=r"val_fraction=0\.1 leaves no validation images.*5"):
        data.make_splits(labels, 4, val_fraction=0.1, attack_size=2, seed=0)
    splits = data.make_splits(torch.arange(4).repeat_interleave(6), 4, val_fraction=0.1,
                              attack_size=2, seed=0)
    assert splits["val"].numel() == 4


def test_bad_attack_size_names_the_key():
    with pytest.raises(ValueError, match="attack_size"):
        data.make_splits(torch.arange(10) % 2, 5, val_fraction=0.2, attack_size=0, seed=0)


def test_stratified_partition_80_10_10():
    sizes = [31, 40, 55, 200]
    labels = _class_labels(sizes)
    parts = data.stratified_partition(labels, data.CALTECH101_FRACTIONS, seed=42)
    counts = [data.class_counts(labels[p], 4).tolist() for p in parts]
    assert counts[2] == [n - math.floor(0.9 * n + 0.5) for n in sizes]
    assert [a + b + c for a, b, c in zip(*counts, strict=True)] == sizes
    assert sorted(torch.cat(parts).tolist()) == list(range(len(labels)))
    with pytest.raises(ValueError, match="fractions"):
        data.stratified_partition(labels, (0.5, 0.4), seed=0)


def test_subsample_is_seeded_subset():
    idx = torch.arange(100, 200)
    a = data.subsample(idx, 10, seed=1)
    assert torch.equal(a, data.subsample(idx, 10, seed=1))
    assert a.numel() == 10 and set(a.tolist()) <= set(idx.tolist())
    assert torch.equal(a, torch.sort(a).values)
    assert torch.equal(data.subsample(idx, 1000, seed=1), idx)
    with pytest.raises(ValueError, match="n must"):
        data.subsample(idx, 0, seed=1)


def test_save_and_load_splits_roundtrip(tmp_path):
    splits = data.make_splits(torch.arange(30) % 3, 12, val_fraction=0.3, attack_size=5, seed=0)
    path = tmp_path / "prepared" / "splits.safetensors"
    data.save_splits(path, splits, {"dataset": "fashion_mnist", "seed": 0})
    loaded = data.load_splits(path)
    assert list(loaded)[:4] == list(data.SPLIT_NAMES)
    assert all(torch.equal(loaded[k], splits[k]) for k in splits)
    assert data.read_splits_metadata(path) == {"dataset": "fashion_mnist", "seed": "0"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files
    data.save_splits(path, {"train": splits["train"]})
    with pytest.raises(ValueError, match="missing splits"):
        data.load_splits(path)
    with pytest.raises(ValueError, match="1-D integer"):
        data.save_splits(path, {"train": torch.rand(3)})


def test_class_counts():
    assert data.class_counts(torch.tensor([0, 2, 2, 4]), 6).tolist() == [1, 0, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="labels"):
        data.class_counts(torch.tensor([0, 6]), 6)
    with pytest.raises(ValueError, match="num_classes"):
        data.class_counts(torch.tensor([0]), 0)


# --------------------------------------------------------------------------------------------
# Long-tailed training subsets (class imbalance, SPEC §9)

def test_long_tailed_counts_follow_the_exponential_profile():
    counts = imbalance.long_tailed_counts(torch.tensor([500, 520, 600, 510, 700]), 100)
    # n_max = 500 (the smallest class); ratio 100 over 4 steps -> x 100 ** (-1/4) per class.
    assert counts.tolist() == [500, 158, 50, 15, 5]
    assert imbalance.long_tailed_counts(torch.tensor([7, 9]), 1).tolist() == [7, 7]


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 6), per_class=st.integers(5, 40),
       ratio=st.floats(1.0, 50.0), seed=st.integers(0, 2**31 - 1))
def test_long_tailed_subset_sizes_membership_and_seeding(k, per_class, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=gen)
    labels = labels[perm]
    indices = torch.arange(1000, 1000 + labels.numel())
    kept = imbalance.long_tailed_subset(indices, labels, imbalance_ratio=ratio, num_classes=k,
                                   seed=seed)
    expected = imbalance.long_tailed_counts(torch.full((k,), per_class), ratio)
    kept_labels = labels[kept - 1000]
    assert data.class_counts(kept_labels, k).tolist() == expected.tolist()
    assert bool((kept[1:] > kept[:-1]).all())            # sorted, no duplicates
    assert set(kept.tolist()) <= set(indices.tolist())
    again = imbalance.long_tailed_subset(indices, labels, imbalance_ratio=ratio, num_classes=k,
                                    seed=seed)
    assert torch.equal(kept, again)
    counts = data.class_counts(kept_labels, k)
    assert bool((counts[:-1] >= counts[1:]).all())      # head first, tail last


def test_long_tailed_counts_skip_empty_classes():
    # A tiny subset of a 100-class split: most classes are empty and keep none; the others
    # keep the size of their position in the profile, from the smallest non-empty class.
    available = torch.zeros(100, dtype=torch.int64)
    available[[0, 1, 50, 99]] = torch.tensor([3, 5, 4, 2])
    counts = imbalance.long_tailed_counts(available, 100)
    assert counts[[0, 1, 50, 99]].tolist() == [2, 1, 1, 1]
    assert int(counts.sum()) == 5
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 50, 50, 50, 50, 99, 99])
    kept = imbalance.long_tailed_subset(torch.arange(14), labels, imbalance_ratio=100,
                                        num_classes=100, seed=0)
    assert data.class_counts(labels[kept], 100)[[0, 1, 50, 99]].tolist() == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="some images"):
        imbalance.long_tailed_counts(torch.zeros(5, dtype=torch.int64), 10)


def test_long_tailed_subset_rejects_bad_ratio_and_shapes():
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="imbalance_ratio"):
        imbalance.long_tailed_subset(torch.arange(4), labels, imbalance_ratio=0.5, num_classes=2,
                                seed=0)
    with pytest.raises(ValueError, match="differ in length"):
        imbalance.long_tailed_subset(torch.arange(3), labels, imbalance_ratio=2, num_classes=2,
                                seed=0)
