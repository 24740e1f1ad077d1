"""Raw files: fetch them (local copy, mirror folder, system package, download) and verify them."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from calib.data.errors import DataIntegrityError, DataUnavailableError
from calib.data.registry import DatasetInfo, get_info
from calib.data.sources import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_FILES
from calib.io import atomic_dir, atomic_path


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


def missing_files(folder: Path, required: Sequence[str]) -> list[str]:
    """The raw paths of ``required`` (relative to ``folder``) that do not exist there."""
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
            :data:`~calib.data.sources.CHECKSUMS`. Tests pass the checksums of small fake
            files here.
        payload_checksums: MD5 of the decompressed content per gzip file; defaults to
            :data:`~calib.data.sources.PAYLOAD_CHECKSUMS`.

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

    Such a file replaces the published checksums of :data:`~calib.data.sources.CHECKSUMS` in
    :func:`fetch` and :func:`verify` (the pipeline's ``data.checksums``): for re-packaged raw
    files, or for the tests' small fake files. Paths are relative to ``root/<name>/``, e.g.
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
    :data:`~calib.data.sources.DEBIAN_FASHION_MNIST_DIR`), then, if ``download``, downloaded
    with torchvision's downloader. Calling it again is cheap and changes nothing.

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
    missing = missing_files(folder, required)
    if missing:
        missing = _copy_from_system(folder, missing, system_dirs)
    if missing:
        if not download:
            raise DataUnavailableError(
                f"{info.title} is not on disk and download=False. Missing under {folder}: "
                f"{', '.join(missing)}.\n" + _remedy(info, folder))
        _download(info, folder, missing)
        missing = missing_files(folder, required)
        if missing:
            raise DataUnavailableError(
                f"{info.title}: after downloading, still missing under {folder}: "
                f"{', '.join(missing)}.\n" + _remedy(info, folder))
    return verify(name, root, checksums=table, payload_checksums=payload_checksums)
