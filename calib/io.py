"""Atomic file output, JSON and safetensors helpers, run provenance.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in
the destination folder and renamed into place, so a crash never leaves a half-written file
where a later stage would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the HTML report needs none of it
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file keeps the destination's suffix (``suffix`` overrides) because some
    writers (matplotlib, safetensors) dispatch on it.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=suffix if suffix is not None else dest.suffix,
        dir=dest.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            # mkstemp creates the file private (0600); give it the permissions an ordinary
            # open() would (0666 less the umask) so readers and other tools can use it.
            tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; swap it in for ``path`` on success.

    A folder cannot be renamed over a non-empty one, so the old folder is first renamed aside
    and removed after the new one is in place: a reader sees the old folder or the complete new
    one, never a half-written one, and a failed block leaves the old folder untouched.
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old",
                                        dir=dest.parent))
            os.replace(dest, old)  # onto an empty folder: allowed, and atomic
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return _to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (floats rounded to 6 digits), atomically."""
    text = json.dumps(_to_jsonable(obj), indent=2, sort_keys=True) + "\n"
    write_text(path, text)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


#: Suffix of a metrics file DVC reads (``dvc metrics show``, ``dvc exp show``).
METRICS_SUFFIX = "_metrics.json"
#: Suffix of its sibling with everything that is not a number (names, lists, environment).
INFO_SUFFIX = "_info.json"


def info_path(metrics_path: str | os.PathLike[str]) -> Path:
    """The sibling of a metrics file that holds its non-scalar part.

    ``results/resnet/clean_metrics.json -> results/resnet/clean_info.json``.
    """
    path = Path(metrics_path)
    if not path.name.endswith(METRICS_SUFFIX):
        raise ValueError(f"a metrics file's name ends with {METRICS_SUFFIX!r}; got {path.name!r}")
    return path.with_name(path.name[: -len(METRICS_SUFFIX)] + INFO_SUFFIX)


def _is_metric(value: Any) -> bool:
    return isinstance(value, bool | int | float) and not (
        isinstance(value, float) and value != value)  # NaN is no metric DVC can compare


def split_metrics(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a nested document into ``(scalars, info)`` with the same key paths.

    ``scalars`` keeps every number and bool (what ``dvc metrics diff`` and ``dvc exp show``
    compare); ``info`` keeps the rest: names, lists, environment, NaN. Mappings left empty on
    one side are dropped. ``merge_metrics(*split_metrics(d)) == d`` for any JSON document.
    """
    scalars: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for key, value in _to_jsonable(doc).items():
        if isinstance(value, Mapping):
            sub_scalars, sub_info = split_metrics(value)
            if sub_scalars:
                scalars[key] = sub_scalars
            if sub_info or not sub_scalars:  # an empty mapping survives, on the info side
                info[key] = sub_info
        elif _is_metric(value):
            scalars[key] = value
        else:
            info[key] = value
    return scalars, info


def merge_metrics(scalars: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_metrics`: one nested document from both halves."""
    merged: dict[str, Any] = {k: v for k, v in info.items()}
    for key, value in scalars.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_metrics(value, merged[key])
        elif key in merged:
            raise ValueError(f"metrics key {key!r} is in both the scalar and the info half")
        else:
            merged[key] = value
    return merged


def write_metrics(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write a stage's metrics: numbers to ``path`` (``*_metrics.json``), the rest beside it.

    DVC shows every leaf of a metrics file in ``dvc exp show`` and ``dvc metrics diff``; kept
    to scalars, those tables stay readable. Names, class lists and the run environment go to
    :func:`info_path` (``*_info.json``), declared as an ordinary output. Read both back with
    :func:`read_metrics`.
    """
    scalars, info = split_metrics(doc)
    write_json(info_path(path), info)
    write_json(path, scalars)


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metrics file written by :func:`write_metrics`, merged with its info sibling."""
    path = Path(path)
    sibling = info_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}; has its stage run?")
    info = read_json(sibling) if sibling.is_file() else {}
    return merge_metrics(read_json(path), info)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def safetensors_bytes(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise tensors as safetensors with a canonical, byte-stable header.

    safetensors writes its ``__metadata__`` from a hash map whose order changes from run to
    run, so the same tensors could give different bytes (and a DVC output a new hash, rerunning
    every later stage). Only that entry is re-written, with sorted keys; the tensor entries keep
    safetensors' own (deterministic) order and compact JSON, padded with spaces to a multiple of
    8 bytes as the format asks, so a file without metadata is byte-identical to safetensors'.
    Tensor offsets are relative to the data block and stay valid.
    """
    import json
    import struct

    from safetensors.torch import save

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    raw = save(contiguous, metadata=dict(metadata) if metadata else None)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n], object_pairs_hook=dict)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically and byte-stably (no pickles)."""
    data = safetensors_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """Load a safetensors file into a dict of tensors."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"missing tensor file {p} (run the stage that produces it)")
    return load_file(str(p), device=str(device))


def environment_info(device: str | torch.device | None = None, seed: int | None = None
                     ) -> dict[str, Any]:
    """Library versions, device and seed, recorded in every metrics file."""
    import numpy
    import timm
    import torch
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.machine(),
    }
    if device is not None:
        info["device"] = str(device)
    if seed is not None:
        info["seed"] = int(seed)
    return info
