"""Feature-space analysis of calibration attacks (calib.analysis.representations)."""

from __future__ import annotations

import gzip
import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from calib import data, io, models, plots
from calib.analysis import representations as rep

FAST = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A few layers on 1x8x8 images with a ``features`` method and no exposed head, so
    :func:`rep.extract` takes its second-forward-pass path."""

    def __init__(self, seed: int = 0, dim: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                      nn.Linear(16, dim), nn.Tanh())
            self.fc = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# --- class means and distances ------------------------------------------------------------------

@FAST
@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_class_means_of_identical_features_are_those_features(k, d, per_class, seed):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(k, d, generator=gen)
    labels = torch.arange(k).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=gen)
    means = rep.class_means(prototypes[labels][perm], labels[perm], k)
    assert means.shape == (k, d)
    torch.testing.assert_close(means, prototypes.double())


def test_classes_without_samples_have_no_mean_and_no_distance():
    # A small fitting set drawn from many classes: class 1 has no sample, hence no mean.
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    means = rep.class_means(feats, torch.tensor([0, 0, 2]), 3)
    assert torch.isnan(means[1]).all() and not torch.isnan(means[[0, 2]]).any()
    query = torch.tensor([[1.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    own, other = rep.mean_distances(query, means, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(own[:2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert math.isnan(float(own[2]))                          # its class has no mean
    torch.testing.assert_close(other, torch.tensor([math.sqrt(10), math.sqrt(17), 1.0],
                                                   dtype=torch.float64))
    lonely = rep.class_means(feats, torch.tensor([0, 0, 0]), 3)
    _, other = rep.mean_distances(query, lonely, torch.tensor([0, 0, 0]))
    assert torch.isnan(other).all()                           # no other class has a mean


def test_class_means_hand_computation():
    feats = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [3.0, -1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    expected = torch.tensor([[1.0, 2.0], [2.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(rep.class_means(feats, labels, 3), expected)


def test_class_means_rejects_bad_input():
    feats = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="no samples"):
        rep.class_means(feats[:0], torch.tensor([], dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        rep.class_means(feats, torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match="features must be 2-D"):
        rep.class_means(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        rep.class_means(feats, torch.tensor([0, 1, 0, 5]), 2)


@FAST
@given(st.integers(1, 6), st.integers(2, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_mean_distances_equal_a_hand_computation(n, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    classes = torch.randint(0, k, (n,), generator=gen)
    own, other = rep.mean_distances(feats, means, classes)
    f, m = feats.double().numpy(), means.numpy()
    for i in range(n):
        dists = [float(np.sqrt(((f[i] - m[c]) ** 2).sum())) for c in range(k)]
        c = int(classes[i])
        assert own[i].item() == pytest.approx(dists[c], rel=1e-9, abs=1e-9)
        assert other[i].item() == pytest.approx(min(dists[:c] + dists[c + 1:]), rel=1e-9,
                                                abs=1e-9)


def test_mean_distances_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share D"):
        rep.mean_distances(torch.zeros(3, 2), torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="classes must have shape"):
        rep.mean_distances(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(2, dtype=torch.long))


def test_top2_margin():
    z = torch.tensor([[1.0, 3.0, 2.5], [0.0, 0.0, -1.0]])
    torch.testing.assert_close(rep.top2_margin(z), torch.tensor([0.5, 0.0], dtype=torch.float64))


# --- PCA ----------------------------------------------------------------------------------------

@FAST
@given(st.integers(3, 12), st.integers(2, 6), st.integers(0, 10_000))
def test_pca_is_deterministic_sign_fixed_and_orthonormal(n, d, seed):
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * \
        torch.linspace(3.0, 0.5, d)
    a, b = rep.fit_pca(feats), rep.fit_pca(feats.clone())
    assert torch.equal(a.components, b.components)
    comps = a.components
    torch.testing.assert_close(comps @ comps.T, torch.eye(2, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    pivot = comps.abs().argmax(1)
    assert bool((comps.gather(1, pivot[:, None]) > 0).all())
    # Negating the data flips the SVD's arbitrary signs; the sign fix undoes that.
    neg = rep.fit_pca(-feats)
    torch.testing.assert_close(neg.components, comps, atol=1e-8, rtol=0)
    torch.testing.assert_close(neg.transform(-feats), -a.transform(feats), atol=1e-8, rtol=0)
    # Explained variance matches the covariance eigenvalues.
    eig = np.sort(np.linalg.eigvalsh(np.cov(feats.double().numpy().T)))[::-1]
    np.testing.assert_allclose(a.explained_variance_ratio.numpy(), eig[:2] / eig.sum(),
                               rtol=1e-7, atol=1e-10)


def test_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="n_components"):
        rep.fit_pca(torch.randn(5, 3), n_components=4)
    with pytest.raises(ValueError, match="features must be"):
        rep.fit_pca(torch.randn(1, 3))
    with pytest.raises(ValueError, match="features must have shape"):
        rep.fit_pca(torch.randn(5, 3)).transform(torch.randn(2, 4))


# --- extraction and the shift table -------------------------------------------------------------

def test_extract_batches_agree_and_match_the_model():
    model = TinyNet()
    x = _images(10)
    one = rep.extract(model, x, batch_size=3)
    all_ = rep.extract(model, x, batch_size=64)
    torch.testing.assert_close(one.features, all_.features)
    with torch.no_grad():
        torch.testing.assert_close(one.logits, model(x))
        torch.testing.assert_close(one.features, model.features(x))
    with pytest.raises(ValueError, match="features"):
        rep.extract(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="batch_size"):
        rep.extract(model, x, batch_size=0)


@pytest.mark.parametrize("arch", ["resnet10t", "vit_fmnist_d4"])
def test_extract_uses_the_head_of_real_models(arch):
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=10, in_chans=1, img_size=28, mean=[0.3],
                                std=[0.35]).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    emb = rep.extract(model, x)
    with torch.no_grad():
        torch.testing.assert_close(emb.logits, model(x), atol=1e-5, rtol=1e-5)
    assert emb.features.shape[0] == 3 and emb.features.ndim == 2


def _embeddings(n: int = 12, seed: int = 0) -> tuple[rep.Embeddings, torch.Tensor]:
    model = TinyNet(seed)
    fit = rep.extract(model, _images(30, seed + 1))
    means = rep.class_means(fit.features, torch.arange(30) % 3, 3)
    return rep.extract(model, _images(n, seed)), means


def test_shift_table_of_an_unchanged_input_shows_no_shift():
    clean, means = _embeddings()
    table = rep.shift_table(clean, {"uca": clean, "oca": clean}, means)
    assert len(table) == 2 * 12 and set(table["kind"]) == {"uca", "oca"}
    for q in rep.QUANTITIES:
        np.testing.assert_array_equal(table[f"{q}_before"], table[f"{q}_after"])
    assert (table["displacement"] == 0).all() and table["label_kept"].all()
    summary = rep.summarize_shift(table, setting="square-linf")
    assert (summary["median_change"].fillna(0) == 0).all()
    assert (summary["frac_increased"].fillna(0) == 0).all()


def test_shift_table_measures_the_moved_features():
    clean, means = _embeddings()
    pred = clean.logits.argmax(1)
    # Move every feature exactly onto its predicted class mean: d_own becomes 0.
    moved = rep.Embeddings(means[pred].float(), clean.logits * 2)
    table = rep.shift_table(clean, {"oca": moved}, means,
                            perturbed={"oca": torch.arange(12) % 2 == 0},
                            labels=torch.zeros(12, dtype=torch.long))
    np.testing.assert_allclose(table["d_own_after"], 0.0, atol=1e-6)
    expected = (means[pred] - clean.features.double()).norm(dim=1) / \
        clean.features.double().norm(dim=1)
    np.testing.assert_allclose(table["displacement"], expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["logit_margin_after"], 2 * table["logit_margin_before"],
                               rtol=1e-5)
    summary = rep.summarize_shift(table, setting="pgd-linf").set_index("quantity")
    assert (summary["n"] == 6).all()  # only the perturbed half
    assert summary.loc["d_own", "median_after"] == pytest.approx(0.0, abs=1e-6)
    all_rows = rep.summarize_shift(table, setting="pgd-linf", only_perturbed=False)
    assert (all_rows["n"] == 12).all()


def test_shift_table_rejects_unknown_kinds_and_mismatched_shapes():
    clean, means = _embeddings()
    with pytest.raises(ValueError, match="kind must be one of"):
        rep.shift_table(clean, {"fgsm": clean}, means)
    short = rep.Embeddings(clean.features[:5], clean.logits[:5])
    with pytest.raises(ValueError, match="features must have the shape"):
        rep.shift_table(clean, {"uca": short}, means)


def test_summarize_shift_hand_values():
    table = pd.DataFrame({"kind": ["uca"] * 3, "perturbed": [True, True, False],
                          **{f"{q}_before": [1.0, 3.0, 9.0] for q in rep.QUANTITIES},
                          **{f"{q}_after": [2.0, 2.0, 9.0] for q in rep.QUANTITIES},
                          "displacement": [0.5, 0.7, 0.0]})
    s = rep.summarize_shift(table, setting="s").set_index("quantity")
    row = s.loc["d_own"]
    assert (row["n"], row["median_before"], row["median_after"]) == (2, 2.0, 2.0)
    assert (row["median_change"], row["frac_increased"]) == (0.0, 0.5)
    assert s.loc["displacement", "median_after"] == pytest.approx(0.6)
    assert np.isnan(s.loc["displacement", "median_before"])


# --- loading the attack stage's outputs ---------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_tree(root, *, settings=("square-linf",)):
    """A miniature pipeline tree: Fashion-MNIST IDX files, splits, a model spec, records."""
    rng = np.random.default_rng(0)
    raw = root / "data/raw/fashion_mnist"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx(rng.integers(0, 256, (n, 28, 28))), mtime=0))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx(np.arange(n) % 10), mtime=0))
    io.write_json(root / "data/prepared/dataset.json", {"dataset": "fashion_mnist"})
    attack = torch.tensor([3, 1, 4, 0])
    data.save_splits(root / "data/prepared/splits.safetensors",
                     {"train": torch.arange(16), "val": torch.arange(16, 20),
                      "test": torch.arange(10), "attack": attack})
    io.write_json(root / "models/m/model.json", {"img_size": 28, "in_chans": 1})
    test = data.load_split("fashion_mnist", root / "data/raw", "test", img_size=28, in_chans=1)
    clean, labels = test.tensors(attack)
    adv = {f"{s}/{k}": (clean + 0.05).clamp(0, 1) for s in settings for k in rep.KINDS}
    io.save_tensors(root / "results/m/records/adversarial.safetensors", adv)
    rows = pd.DataFrame([{"setting": s, "kind": k, "index": int(i), "label": int(y),
                          "success": True}
                         for s in settings for k in rep.KINDS
                         for i, y in zip(attack, labels, strict=True)])
    io.write_text(root / "results/m/records/attack_records.csv", rows.to_csv(index=False))
    return clean, labels


def test_load_attacked_set_reads_the_attack_stage_outputs(tmp_path):
    clean, labels = _fake_tree(tmp_path)
    aset = rep.load_attacked_set("m", "square-linf", root=tmp_path)
    assert torch.equal(aset.images, clean) and torch.equal(aset.labels, labels)
    assert list(aset.adversarial) == list(rep.KINDS)
    assert len(aset.records) == 4 * len(rep.KINDS)
    assert bool(aset.perturbed("uca").any())
    with pytest.raises(ValueError, match="setting must be one of \\['square-linf'\\]"):
        rep.load_attacked_set("m", "pgd-linf", root=tmp_path)
    with pytest.raises(ValueError, match="kinds must be one of"):
        rep.load_attacked_set("m", "square-linf", kinds=("fgsm",), root=tmp_path)


def test_load_attacked_set_names_a_bad_setting_before_reading_files(tmp_path):
    with pytest.raises(ValueError, match="setting must be one of"):
        rep.load_attacked_set("m", "square-l3", root=tmp_path)


def test_pick_samples_prefers_samples_every_kind_perturbed():
    table = pd.DataFrame({"kind": ["uca"] * 5 + ["oca"] * 5, "sample": [*range(5), *range(5)],
                          "perturbed": [True] * 5 + [False, True, False, True, True]})
    picked = rep.pick_samples(table, 3, seed=0)
    assert picked == rep.pick_samples(table, 3, seed=0)
    assert picked == [1, 3, 4]
    assert len(rep.pick_samples(table, 4, seed=1)) == 4


    with pytest.raises(ValueError, match="n must be"):
        rep.pick_samples(table, 0, seed=0)


# --- figures ------------------------------------------------------------------------------------

def test_figures_are_deterministic(tmp_path):
    clean, means = _embeddings()
    noise = torch.randn(clean.features.shape, generator=torch.Generator().manual_seed(3))
    adv = {k: rep.Embeddings(clean.features + 0.1 * noise, clean.logits * s)
           for k, s in (("uca", 0.5), ("oca", 2.0))}
    fit_feats = rep.extract(TinyNet(0), _images(30, 1)).features
    pca = rep.fit_pca(fit_feats)
    table = rep.shift_table(clean, adv, means)
    digests = []
    for i in range(2):
        fig = rep.projection_figure(pca, fit_feats, torch.arange(30) % 3, clean, adv,
                                    sample=torch.arange(6), means=means,
                                    class_names=["a", "b", "c"], title="t")
        plots.save_figure(fig, tmp_path / f"p{i}.png")
        digests.append(hashlib.sha256((tmp_path / f"p{i}.png").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    plots.save_figure(rep.shift_figure(table, title="t"), tmp_path / "shift.png")
    assert (tmp_path / "shift.png").stat().st_size > 0


def test_load_attacked_set_rejects_misaligned_records_and_shapes(tmp_path):
    _fake_tree(tmp_path)
    records = tmp_path / "results/m/records/attack_records.csv"
    rows = pd.read_csv(records)
    io.write_text(records, rows.iloc[::-1].to_csv(index=False))
    with pytest.raises(ValueError, match="not aligned"):
        rep.load_attacked_set("m", "square-linf", root=tmp_path)
    io.write_text(records, rows.to_csv(index=False))
    io.save_tensors(tmp_path / "results/m/records/adversarial.safetensors",
                    {f"square-linf/{k}": torch.zeros(4, 1, 14, 14) for k in rep.KINDS})
    with pytest.raises(ValueError, match="adversarial\\['square-linf/uca'\\] must have"):
        rep.load_attacked_set("m", "square-linf", root=tmp_path)
