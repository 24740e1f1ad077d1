"""Atomic writes and deterministic figures."""

from __future__ import annotations

import hashlib
import os
import stat

import matplotlib.pyplot as plt
import pytest
import torch

from calib import io, plots


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "tree"
    with io.atomic_dir(target) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "f.txt").write_text("x")
        assert not target.exists()
    assert (target / "a" / "f.txt").read_text() == "x"
    assert [p.name for p in target.parent.iterdir()] == ["tree"]
    with io.atomic_dir(target) as tmp:  # an existing folder is replaced whole
        (tmp / "g.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["g.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["tree"]
    other = tmp_path / "other"
    with pytest.raises(RuntimeError), io.atomic_dir(other) as tmp:
        (tmp / "half").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_write_json_roundtrip_and_rounding(tmp_path):
    io.write_json(tmp_path / "a.json", {"b": torch.tensor([1.23456789]), "a": 1.0000004})
    assert io.read_json(tmp_path / "a.json") == {"a": 1.0, "b": [1.234568]}


def test_tensor_roundtrip(tmp_path):
    t = {"x": torch.arange(6).view(2, 3)}
    io.save_tensors(tmp_path / "t.safetensors", t, {"k": "v"})
    assert torch.equal(io.load_tensors(tmp_path / "t.safetensors")["x"], t["x"])
    with pytest.raises(FileNotFoundError, match="stage"):
        io.load_tensors(tmp_path / "missing.safetensors")


def _figure():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=gen)
    return plots.calibration_panel(conf, torch.rand(200, generator=gen) < conf, title="t")


@pytest.mark.parametrize("ext", ["png", "pdf", "svg"])
def test_figures_are_byte_identical(tmp_path, ext):
    digests = []
    for i in range(2):
        path = tmp_path / f"f{i}.{ext}"
        plots.save_figure(_figure(), path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert plt.get_fignums() == []


def test_unsupported_format(tmp_path):
    with pytest.raises(ValueError, match="png"):
        plots.save_figure(_figure(), tmp_path / "f.jpg")


def test_tensor_files_are_byte_stable_and_readable(tmp_path):
    """safetensors orders its metadata by a hash map; our header is canonical."""
    from safetensors import safe_open

    tensors = {"b": torch.arange(5), "a": torch.ones(2, 3)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    blobs = {io.safetensors_bytes(tensors, metadata) for _ in range(12)}
    assert len(blobs) == 1
    io.save_tensors(tmp_path / "t.safetensors", tensors, metadata)
    again = io.load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(again["b"], tensors["b"]) and torch.equal(again["a"], tensors["a"])
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as fh:
        assert fh.metadata() == metadata
    header_len = int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0


def test_tensor_files_without_metadata_match_safetensors_bytes():
    """Checkpoints (no metadata) keep safetensors' own bytes, so old artefacts stay valid."""
    from safetensors.torch import save

    tensors = {"w": torch.randn(3, 4), "b": torch.zeros(4), "n": torch.tensor(7)}
    assert io.safetensors_bytes(tensors) == save(tensors)


def test_many_classes_show_a_readable_subset():
    """CIFAR-100 / Caltech-101: 20 example columns, class indices on the balance chart."""
    labels = torch.tensor([c for c in range(0, 100, 3) for _ in range(2)])
    shown = plots.shown_classes(labels, 100, 20)
    assert len(shown) == 20 and shown[0] == 0 and shown[-1] == 99
    assert set(shown) <= set(labels.tolist()) and shown == sorted(set(shown))
    assert plots.shown_classes(labels, 10, 20) == list(range(10))   # few classes: all of them
    assert plots.shown_classes(torch.tensor([5, 7, 5]), 100, 20) == [5, 7]
    names = [f"class {i}" for i in range(100)]
    images = torch.rand(len(labels), 3, 8, 8)
    fig = plots.image_grid(images, labels, names, per_class=2, title="examples")
    assert len(fig.axes) == 2 * 20
    assert fig._suptitle.get_text() == "examples (20 of 100 classes)"
    plt.close(fig)
    fig = plots.class_balance({"train": [1] * 100}, names)
    assert fig.get_size_inches()[0] == 12.0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:2] == ["0", "10"]
    plt.close(fig)
