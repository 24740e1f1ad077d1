"""Perturbation sizes per threat model (calib.analysis.perturbations): the L2 radius item."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
import torch

from calib.analysis.perturbations import perturbation_examples, perturbation_sizes

matplotlib.use("Agg")


def _records() -> pd.DataFrame:
    # L-inf: every pixel at +-0.1 on a 28x28 image (L2 = 2.8); L2: one pixel at 0.6 (L2 = 0.6)
    # and one image the attack left alone (dropped).
    return pd.DataFrame({
        "model": ["m"] * 5,
        "setting": ["square-linf", "square-linf", "square-l2", "square-l2", "square-l2"],
        "kind": ["uca"] * 5,
        "linf": [0.1, 0.1, 0.6, 0.05, 0.0],
        "l2": [2.8, 2.8, 0.6, 1.0, 0.0],
    })


def test_sizes_per_setting():
    sizes = perturbation_sizes(_records(), eps=0.1, eps_l2=1.0, n_resamples=200).set_index(
        "setting")
    linf, l2 = sizes.loc["square-linf"], sizes.loc["square-l2"]
    assert (linf["norm"], linf["radius"], linf["n"]) == ("linf", 0.1, 2)
    assert (l2["norm"], l2["radius"], l2["n"]) == ("l2", 1.0, 2)  # the unchanged image is out
    assert linf["above_eps"] == 0.0 and l2["above_eps"] == 0.5
    assert l2["linf_max"] == pytest.approx(0.6) and linf["l2_max"] == pytest.approx(2.8)
    assert l2["linf_median_lo"] <= l2["linf_median"] <= l2["linf_median_hi"]
    assert 0.0 <= l2["above_eps_lo"] <= 0.5 <= l2["above_eps_hi"] <= 1.0


def test_sizes_bad_input():
    with pytest.raises(ValueError, match="l2"):
        perturbation_sizes(_records().drop(columns="l2"), eps=0.1, eps_l2=1.0)
    with pytest.raises(ValueError, match="eps_l2"):
        perturbation_sizes(_records(), eps=0.1, eps_l2=0.0)
    with pytest.raises(ValueError, match="norm"):
        perturbation_sizes(_records().assign(setting="square-l1"), eps=0.1, eps_l2=1.0)


def test_examples_figure():
    clean = torch.rand(3, 1, 8, 8)
    adv = {"a/uca": (clean + 0.1).clamp(0, 1), "b/uca": clean.clone()}
    fig = perturbation_examples(clean, adv, [0, 2], titles={"a/uca": "A"})
    # 2 rows x (clean + 2 x (image, delta)) panels, plus the colour bar
    assert len(fig.axes) == 2 * 5 + 1
    assert fig.axes[1].get_title() == "A"
    with pytest.raises(ValueError, match="out of range"):
        perturbation_examples(clean, adv, [3])
    with pytest.raises(ValueError, match="shape"):
        perturbation_examples(clean, {"a": clean[:2]}, [0])
    with pytest.raises(ValueError, match="empty"):
        perturbation_examples(clean, {}, [0])
