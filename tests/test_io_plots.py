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


# --------------------------------------------------------------------------------------------
# The report's figures: legends clear of the data, readable layouts, display names


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


def _legend_clear_of_axes(fig) -> None:
    """Every legend of ``fig`` is drawn outside every axes (it covers no data)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.axison:
                assert not _overlaps(box, ax.get_window_extent(renderer)), (
                    f"legend {[t.get_text() for t in legend.get_texts()]} covers {ax.get_title()}")


def _tidy_and_curves():
    import pandas as pd

    rows, curves = [], []
    for setting in ("square-linf", "pgd-linf"):
        for kind in ("uca", "oca", "mma", "rca"):
            for eps in (0.02, 0.05, 0.1, 0.2):
                rows.append({"model": "m", "setting": setting, "kind": kind, "eps": eps, "n": 50,
                             "ece": eps * 2, "ks": eps, "confidence": 0.9 - eps,
                             "clean_ece": 0.05, "clean_ks": 0.04, "clean_confidence": 0.92})
            for q in (1, 10, 100):
                curves.append({"model": "m", "setting": setting, "kind": kind, "queries": q,
                               "ece": 0.03 + q / 1000, "ks": 0.02 + q / 1000,
                               "confidence": 0.93 - q / 1000, "success_rate": q / 100})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def _model_table():
    import pandas as pd

    rows = []
    for family, models in (("resnet", (("resnet_small", 4.9), ("resnet", 11.2))),
                           ("vit", (("vit_small", 1.8), ("vit", 2.7)))):
        for model, params in models:
            for kind in ("UCA", "OCA", "MMA", "RCA"):
                rows.append({"model": model, "family": family, "arch": f"{model}-arch",
                             "parameters_m": params, "imbalance_ratio": 1,
                             "setting": "square-linf", "attack": kind, "clean_ece": 0.02,
                             "ece_after": 0.58 if kind == "MMA" else 0.3, "success_rate": 1.0})
    return pd.DataFrame(rows)


def test_report_figures_keep_legends_off_the_data():
    import pandas as pd

    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(300, generator=gen)
    correct = torch.rand(300, generator=gen) < conf
    grid = plots.reliability_grid({"square-linf": {"clean": (conf, correct),
                                                   "uca": (conf / 2, correct)}})
    texts = [t.get_text() for t in grid.legends[0].get_texts()]
    assert texts == ["accuracy per confidence bin", "gap to the bin's mean confidence",
                     "perfect calibration"]  # Fig. 1 explains its hatching and dashed line
    tidy, curves = _tidy_and_curves()
    sweep = plots.sweep_figure(tidy, curves, eps_marks={"paper": 0.05})
    labels = [t.get_text() for t in sweep.legends[0].get_texts()]
    assert labels[-2:] == ["clean, sweep images (first 50)", "clean, attack-stage images (all)"]
    per_class = pd.DataFrame([{"model": m, "label": c, "clean_accuracy": 0.9,
                               "clean_confidence": 0.95, "uca_success": 1.0 - c / 50,
                               "oca_success": 0.98} for m in ("a", "b") for c in range(10)])
    imbalance = plots.imbalance(per_class, balanced="a", long_tailed="b",
                                train_counts=[5000 // (c + 1) for c in range(10)])
    bounds = pd.DataFrame([{"model": m, "setting": s, "ece_after": 0.55, "ks_after": 0.45,
                            "ece_before": 0.03, "bound": 0.91}
                           for m in ("resnet", "vit") for s in ("pgd-linf", "square-linf")])
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.9,
                "val_accuracy": 0.8} for e in (1, 2, 3)]
    figures = [grid, plots.calibration_panel(conf, correct, title="t"), sweep,
               plots.training_curves(history, title="t"),
               plots.size_comparison(_model_table()), imbalance, plots.mma_bound(bounds)]
    for fig in figures:
        _legend_clear_of_axes(fig)
    # The imbalance figure: two panels a row (readable at page width), rates on full axes.
    assert imbalance.get_size_inches()[0] <= 10.5
    rate_axes = [ax for ax in imbalance.axes if ax.axison][1:]
    assert len(rate_axes) == 3 and all(ax.get_ylim() == (0.0, 1.02) for ax in rate_axes)
    for fig in figures:
        plt.close(fig)


def test_defence_heatmap_shows_display_names_in_family_order():
    import pandas as pd

    rows = [{"defence": d, "setting": s, "attack": a, "ece_before": 0.03, "ece_after": 0.3}
            for d in ("sam", "none", "cs") for s in ("pgd-linf", "square-linf")
            for a in ("RCA", "UCA")]
    fig = plots.defence_ece_heatmap(pd.DataFrame(rows),
                                    names={"none": "Undefended", "cs": "Compression Scaling",
                                           "sam": "SAM"},
                                    families={"none": "none", "cs": "posthoc",
                                              "sam": "training"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Undefended", "Compression Scaling",
                                                            "SAM"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "UCA", "RCA"]
    assert ax.get_title() == "square-linf"  # the paper's black-box setting first
    assert len([line for line in ax.get_lines() if line.get_ydata()[0] in (0.5, 1.5)]) == 2
    plt.close(fig)


def test_report_figures_are_byte_identical(tmp_path):
    tidy, curves = _tidy_and_curves()
    digests = set()
    for i in range(2):
        path = tmp_path / f"f{i}.png"
        plots.save_figure(plots.sweep_figure(tidy, curves), path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_intervals_travel_from_summaries_to_tables_and_merge_for_readers():
    import pandas as pd
    import torch
    from tiny_models import centred_conv, images

    from calib import reporting
    from calib.attacks import run_attack

    model, x = centred_conv(0), images(1, 60)
    labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(0))
    s = run_attack(model, x, kind="uca", method="square", eps=0.1, iterations=3,
                   labels=labels).summary()
    for key in ("ece_after", "accuracy_before", "confidence_after", "success_rate", "ks_after"):
        assert s[f"{key}_lo"] <= s[f"{key}_hi"], key
    assert s["accuracy_before_lo"] <= s["accuracy_before"] <= s["accuracy_before_hi"]
    assert "ece_after_lo" not in run_attack(model, x, kind="uca", iterations=2,
                                            labels=labels).summary(intervals=False)
    table = reporting.table1([{**s, "model": "m", "setting": "square-linf"}])
    assert {"ece_after_lo", "ece_after_hi", "acc_before_lo", "success_rate_hi"} <= set(table)
    assert list(table.columns).index("ece_after_lo") == list(table.columns).index("ece_after") + 1
    merged = reporting.merge_intervals(table, digits=3)
    assert "ece_after_lo" not in merged
    assert merged["ece_after"].iloc[0] == (f"{s['ece_after']:.3f} [{s['ece_after_lo']:.3f}, "
                                           f"{s['ece_after_hi']:.3f}]")
    assert "[" in reporting.to_markdown(table)
    nan = pd.DataFrame({"a": [float("nan")], "a_lo": [0.1], "a_hi": [0.2]})
    assert reporting.merge_intervals(nan)["a"].iloc[0] == "–"
