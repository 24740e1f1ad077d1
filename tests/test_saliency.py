"""Gradient saliency before vs after calibration attacks (calib.analysis.saliency)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from calib import checks, plots
from calib.analysis import saliency as sal

FAST = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed: int = 0, channels: int = 1, num_classes: int = 3) -> nn.Module:
    """A seeded conv net with BatchNorm (eval mode must keep the samples independent)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                              nn.Linear(16, num_classes))
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _images(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _maps(n: int, m: int, seed: int, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many tied pixels
        return torch.randint(0, 4, (n, m, m), generator=gen).double()
    return torch.rand(n, m, m, generator=gen, dtype=torch.float64)


# --- saliency maps ------------------------------------------------------------------------------

@FAST
@given(st.integers(1, 5), st.sampled_from([1, 3]), st.integers(4, 9), st.integers(0, 1000))
def test_saliency_shape_sign_and_batch_independence(n, channels, size, seed):
    model = tiny_cnn(seed % 7, channels).train()  # the function must switch to eval itself
    x = _images(n, channels, size, seed)
    k = torch.arange(n) % 3
    maps = sal.gradient_saliency(model, x, k, batch_size=2)
    assert maps.shape == (n, size, size) and maps.dtype == torch.float32
    assert bool((maps >= 0).all())
    assert model.training  # mode restored
    # One sample at a time gives the same maps: summing the logits does not mix samples.
    model.eval()
    for i in range(n):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, k[i]], xi)
        torch.testing.assert_close(maps[i], g.abs().amax(1)[0], atol=1e-6, rtol=1e-5)


def test_saliency_of_a_linear_model_is_its_weight():
    lin = nn.Linear(2 * 4 * 4, 3)
    model = nn.Sequential(nn.Flatten(), lin)
    x = _images(4, channels=2, size=4)
    k = torch.tensor([0, 1, 2, 1])
    maps = sal.gradient_saliency(model, x, k)
    expected = lin.weight.detach().view(3, 2, 4, 4).abs().amax(1)[k]
    torch.testing.assert_close(maps, expected)


def test_saliency_leaves_the_model_unchanged_and_rejects_bad_input():
    model = tiny_cnn()
    snapshot = checks.parameters_snapshot(model)
    sal.gradient_saliency(model, _images(3), torch.zeros(3, dtype=torch.long))
    assert checks.parameters_unchanged(model, snapshot)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="target must be"):
        sal.gradient_saliency(model, _images(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="images must lie"):
        sal.gradient_saliency(model, _images(3) + 1, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        sal.gradient_saliency(model, _images(3), torch.zeros(3, dtype=torch.long), batch_size=0)


def test_noisy_copy_is_seeded_bounded_and_exact_at_zero_radius():
    x = _images(4)
    r = torch.tensor([0.0, 0.05, 0.1, 0.3])
    a, b = sal.noisy_copy(x, r, seed=1), sal.noisy_copy(x, r, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, sal.noisy_copy(x, r, seed=2))
    assert torch.equal(a[0], x[0])
    assert bool(((a - x).abs().flatten(1).amax(1) <= r + 1e-7).all())
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    with pytest.raises(ValueError, match="radius"):
        sal.noisy_copy(x, -r, seed=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        sal.noisy_copy(x, r, seed=0, distribution="gauss")


def test_sign_noise_sits_on_the_linf_sphere_where_not_clipped():
    x = torch.full((3, 1, 6, 6), 0.5)
    r = torch.tensor([0.0, 0.1, 0.2])
    y = sal.noisy_copy(x, r, seed=0, distribution="sign")
    delta = (y - x).flatten(1)
    torch.testing.assert_close(delta.abs(), r[:, None].expand_as(delta))
    assert bool((delta[1] > 0).any() and (delta[1] < 0).any())
    u = sal.noisy_copy(x, r, seed=0)
    # uniform noise of the same radius carries less energy than sign noise
    assert float((u - x).norm()) < float(delta.norm())


# --- similarity scores --------------------------------------------------------------------------

@FAST
@given(st.integers(1, 4), st.integers(2, 7), st.integers(0, 10_000), st.booleans())
def test_scores_of_a_map_with_itself_are_one_and_scores_are_symmetric(n, m, seed, ties):
    a, b = _maps(n, m, seed, ties), _maps(n, m, seed + 1, ties)
    a[:, 0, 0], a[:, 0, 1] = 0.0, 5.0  # never constant
    b[:, 0, 0], b[:, 0, 1] = 5.0, 0.0
    for name, fn in (("cosine", sal.cosine), ("spearman", sal.spearman), ("iou", sal.iou_top)):
        torch.testing.assert_close(fn(a, a), torch.ones(n, dtype=torch.float64),
                                   msg=f"{name}(a, a) != 1")
        torch.testing.assert_close(fn(a, b), fn(b, a), msg=f"{name} not symmetric")
        s = fn(a, b)
        assert bool(((s >= -1 - 1e-12) & (s <= 1 + 1e-12)).all())


@FAST
@given(st.integers(1, 4), st.integers(2, 7), st.integers(0, 10_000), st.booleans())
def test_spearman_matches_scipy_with_ties(n, m, seed, ties):
    a, b = _maps(n, m, seed, ties), _maps(n, m, seed + 7, ties)
    a[:, 0, 0], a[:, 0, 1] = 0.0, 5.0
    b[:, 0, 0], b[:, 0, 1] = 5.0, 5.0
    ours = sal.spearman(a, b)
    for i in range(n):
        ref = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(sal.average_ranks(a.flatten(1)).numpy(),
                               np.stack([stats.rankdata(r) for r in a.flatten(1).numpy()]))


@FAST
@given(st.integers(1, 4), st.integers(2, 7), st.integers(0, 10_000),
       st.sampled_from(["exp", "cube", "affine"]))
def test_spearman_is_invariant_under_monotone_transforms(n, m, seed, transform):
    a, b = _maps(n, m, seed), _maps(n, m, seed + 3)
    f = {"exp": torch.exp, "cube": lambda t: t ** 3 + t, "affine": lambda t: 7.0 * t + 2.0}
    torch.testing.assert_close(sal.spearman(f[transform](a), b), sal.spearman(a, b))
    # cosine is not rank-based: reversing a map's order changes it, spearman flips sign.
    torch.testing.assert_close(sal.spearman(-a, b), -sal.spearman(a, b))


def test_spearman_of_a_constant_map_is_nan_and_cosine_of_zero_map_is_zero():
    a, z = _maps(2, 3, 0), torch.zeros(2, 3, 3, dtype=torch.float64)
    assert bool(sal.spearman(a, z).isnan().all())
    assert bool((sal.cosine(a, z) == 0).all())


def test_top_mask_and_iou_hand_values():
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    b = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])
    assert sal.top_mask(a, 0.5).tolist() == [[True, True, False, False]]
    # top-2 of a = {0, 1}, of b = {0, 2}: IoU = 1 / 3
    assert sal.iou_top(a, b, 0.5).item() == pytest.approx(1 / 3)
    ties = torch.zeros(1, 10, 10)
    assert int(sal.top_mask(ties, 0.1).sum()) == 10  # exactly ceil(fraction * M), ties or not
    with pytest.raises(ValueError, match="fraction"):
        sal.top_mask(a, 0.0)


def test_scores_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="b must have the shape"):
        sal.cosine(torch.rand(2, 3, 3), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="maps must be"):
        sal.spearman(torch.rand(3), torch.rand(3))


# --- the analysis -------------------------------------------------------------------------------

def test_saliency_shift_of_unchanged_images_is_perfect_similarity():
    model, x = tiny_cnn(), _images(6)
    table, maps = sal.saliency_shift(model, x, {"uca": x.clone(), "rca": x.clone()}, seed=0)
    assert len(table) == 12 and not table["perturbed"].any()
    for score in sal.SIMILARITIES:
        np.testing.assert_allclose(table[score], 1.0)
        for baseline in sal.BASELINES:
            np.testing.assert_allclose(table[f"{score}_{baseline}"], 1.0)
    assert set(maps) == {"clean", "noise/uniform", "noise/sign", "uca", "rca"}
    assert maps["clean"].shape == (6, 8, 8)


def test_saliency_shift_is_seeded_and_summarised():
    model, x = tiny_cnn(), _images(6)
    adv = {"uca": (x + 0.2 * (torch.arange(6) % 2 == 0).view(-1, 1, 1, 1)).clamp(0, 1),
           "oca": (1 - x)}
    t1, _ = sal.saliency_shift(model, x, adv, seed=3)
    t2, _ = sal.saliency_shift(model, x, adv, seed=3)
    pd.testing.assert_frame_equal(t1, t2)
    assert t1.loc[t1["kind"] == "uca", "perturbed"].tolist() == [True, False] * 3
    # One noise baseline for all kinds, at the largest L-inf radius any kind used.
    radius = t1.groupby("sample")["linf"].max().to_numpy()
    for kind in ("uca", "oca"):
        part = t1[t1["kind"] == kind]
        np.testing.assert_array_equal(part["noise_radius"], radius)
    np.testing.assert_array_equal(t1.loc[t1["kind"] == "uca", "cosine_sign"],
                                  t1.loc[t1["kind"] == "oca", "cosine_sign"])
    with pytest.raises(ValueError, match="baselines must be one of"):
        sal.saliency_shift(model, x, adv, seed=0, baselines=("gauss",))
    with pytest.raises(ValueError, match="adversarial must hold"):
        sal.saliency_shift(model, x, {}, seed=0)
    summary = sal.summarize_similarity(t1, setting="square-linf")
    assert list(summary.columns) == [
        "setting", "kind", "score", "n", "attack_median", "attack_mean", "uniform_median",
        "uniform_mean", "sign_median", "sign_mean", "frac_below_uniform", "frac_below_sign"]
    assert summary.set_index(["kind", "score"]).loc[("uca", "cosine"), "n"] == 3
    with pytest.raises(ValueError, match="kind must be one of"):
        sal.saliency_shift(model, x, {"fgsm": x}, seed=0)
    with pytest.raises(ValueError, match="adversarial\\['uca'\\] must have the shape"):
        sal.saliency_shift(model, x, {"uca": x[:3]}, seed=0)


def test_summarize_similarity_hand_values():
    table = pd.DataFrame({"kind": ["oca"] * 4, "sample": range(4),
                          "perturbed": [True, True, True, False],
                          **{s: [0.2, 0.4, 0.9, 1.0] for s in sal.SIMILARITIES},
                          **{f"{s}_uniform": [0.5, 0.5, 0.5, 1.0] for s in sal.SIMILARITIES}})
    summary = sal.summarize_similarity(table, setting="s")
    assert "sign_median" not in summary  # only the baselines the table holds
    row = summary.iloc[0]
    assert (row["n"], row["attack_median"], row["uniform_median"]) == (3, 0.4, 0.5)
    assert row["frac_below_uniform"] == pytest.approx(2 / 3)


def test_figures_are_deterministic(tmp_path):
    model, x = tiny_cnn(), _images(6)
    adv = {"uca": (x + 0.1).clamp(0, 1), "oca": (x - 0.1).clamp(0, 1)}
    table, maps = sal.saliency_shift(model, x, adv, seed=0)
    digests = []
    for i in range(2):
        fig = sal.examples_figure(x, adv, maps, [0, 2], table=table, class_names=["a", "b", "c"],
                                  prediction=torch.zeros(6, dtype=torch.long), title="t")
        plots.save_figure(fig, tmp_path / f"e{i}.png")
        digests.append(hashlib.sha256((tmp_path / f"e{i}.png").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    plots.save_figure(sal.similarity_figure(table, title="t"), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
