"""calib.defences.posthoc: the recalibrators keep labels, calibrate, and compose with models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from calib import metrics
from calib.defences import (
    AAA,
    MDTS,
    POSTHOC,
    CalibratedModel,
    CompressionScaling,
    SplineCalibration,
    TemperatureScaling,
    compression_target,
    fit_temperature,
    make_recalibrator,
)


def _synthetic(n: int, k: int, *, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``scale * true`` and labels drawn from softmax(true): T = scale is ideal."""
    g = torch.Generator().manual_seed(seed)
    true = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
    return scale * true, labels


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    z, y = _synthetic(600, 5, scale=4.0, seed=1)
    z_uca, y_uca = _synthetic(200, 5, scale=0.3, seed=2)
    z_oca, y_oca = _synthetic(200, 5, scale=8.0, seed=3)
    return {
        "temperature": TemperatureScaling().fit(z, y),
        "spline": SplineCalibration().fit(z, y),
        "cs": CompressionScaling().fit(z, y),
        "aaa": AAA(steps=20).fit(z, y),
        "mdts": MDTS().fit_domains({"clean": (z, y), "uca": (z_uca, y_uca),
                                    "oca": (z_oca, y_oca)}),
    }


def _confidence(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().softmax(-1).max(-1).values


# --------------------------------------------------------------------------------------------
# Invariants shared by every method
# --------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(2, 7), scale=st.floats(0.1, 15.0),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_no_method_changes_a_label_and_outputs_are_finite(fitted, n, k, scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    top = z.double().topk(2, -1).values
    assume(bool(((top[:, 0] - top[:, 1]) > 1e-2).all()))  # no ties at the top
    for name, method in fitted.items():
        out = method(z)
        assert out.shape == z.shape and out.dtype == z.dtype, name
        assert torch.isfinite(out).all(), name
        assert torch.equal(out.argmax(-1), z.argmax(-1)), name


def test_registry_and_factory():
    assert set(POSTHOC) == {"temperature", "spline", "cs", "aaa", "mdts"}
    assert isinstance(make_recalibrator("cs"), CompressionScaling)
    assert make_recalibrator("aaa", steps=3).steps == 3
    with pytest.raises(ValueError, match=r"allowed.*aaa.*cs.*mdts.*spline.*temperature"):
        make_recalibrator("platt")
    with pytest.raises(ValueError, match="bad options"):
        make_recalibrator("temperature", temperature=2.0)


def test_params_are_json_serialisable(fitted):
    for name, method in fitted.items():
        text = json.dumps(method.params())
        assert text, name
    assert fitted["temperature"].params()["temperature"] > 0


def test_bad_inputs_fail_fast():
    with pytest.raises(RuntimeError, match="fit"):
        TemperatureScaling()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits"):
        TemperatureScaling().fit(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        TemperatureScaling().fit(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        SplineCalibration().fit(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_knots"):
        SplineCalibration(n_knots=2)
    with pytest.raises(ValueError, match="domains"):
        MDTS().fit_domains({})


# --------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------

def test_temperature_scaling_recovers_t_and_lowers_nll():
    z, y = _synthetic(3000, 5, scale=5.0, seed=0)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature == pytest.approx(5.0, rel=0.1)
    assert metrics.nll(ts(z), y) < metrics.nll(z, y) - 0.1
    # The fitted T is the NLL minimiser: nudging it either way does not help.
    for factor in (0.9, 1.1):
        assert metrics.nll(z / (ts.temperature * factor), y) > metrics.nll(ts(z), y)
    assert fit_temperature(z, y) == pytest.approx(ts.temperature)


# --------------------------------------------------------------------------------------------
# Splines
# --------------------------------------------------------------------------------------------

def test_splines_lower_held_out_ece():
    z, y = _synthetic(4000, 10, scale=4.0, seed=5)
    fit_z, fit_y, test_z, test_y = z[:2000], y[:2000], z[2000:], y[2000:]
    sp = SplineCalibration().fit(fit_z, fit_y)
    conf, pred = metrics.confidence_and_prediction(test_z)
    before = metrics.ece(conf, pred == test_y)
    out = sp(test_z)
    conf_after, pred_after = metrics.confidence_and_prediction(out)
    after = metrics.ece(conf_after, pred_after == test_y)
    assert torch.equal(pred_after, pred)
    assert before > 0.2 and after < 0.4 * before
    # Rebuilt logits are log-probabilities whose top probability is the calibrated confidence.
    assert torch.allclose(out.double().exp().sum(-1), torch.ones(2000, dtype=torch.float64),
                          atol=1e-5)


def test_spline_on_calibrated_model_changes_little():
    z, y = _synthetic(4000, 5, scale=1.0, seed=6)
    sp = SplineCalibration().fit(z[:2000], y[:2000])
    shift = (_confidence(sp(z[2000:])) - _confidence(z[2000:])).abs().mean()
    assert shift < 0.05


# --------------------------------------------------------------------------------------------
# Compression scaling
# --------------------------------------------------------------------------------------------

def _binary_logits(conf: torch.Tensor) -> torch.Tensor:
    """Two-class float64 logits (N, 2) whose confidence is ``conf`` (N,) in (1/2, 1)."""
    return torch.stack([torch.log(conf / (1 - conf)), torch.zeros_like(conf)], dim=-1)


def test_compression_scaling_hand_computed():
    # z = [log 1.5, 0]: c = 0.6, third b = 1, c* = 0.8 + 1/15 + (0.6 - 1/3)/5 = 0.92, so the
    # scaled logit must be log(0.92 / 0.08) = log 11.5, i.e. T = log 1.5 / log 11.5.
    z = torch.tensor([[math.log(1.5), 0.0]], dtype=torch.float64)
    cs = CompressionScaling()
    assert cs.temperatures(z).item() == pytest.approx(math.log(1.5) / math.log(11.5), rel=1e-9)
    assert _confidence(cs(z)).item() == pytest.approx(0.92, abs=1e-12)
    assert compression_target(torch.tensor([0.6], dtype=torch.float64)).item() == \
        pytest.approx(0.92)


def test_compression_scaling_maps_each_third_onto_its_bin():
    # Confidences spread over (1/2, 1), including both sides of the 2/3 edge; plus a 5-class
    # batch that reaches the first third.
    conf = torch.cat([torch.linspace(0.501, 0.999, 200, dtype=torch.float64),
                      torch.tensor([2 / 3 - 1e-6, 2 / 3 + 1e-6], dtype=torch.float64)])
    z = _binary_logits(conf)
    g = torch.Generator().manual_seed(0)
    z5 = torch.randn(300, 5, generator=g, dtype=torch.float64) * 0.7
    for logits in (z, z5):
        c = _confidence(logits)
        out = CompressionScaling()(logits)
        c_out = _confidence(out)
        b = torch.floor(3 * c).clamp(0, 2)
        assert torch.equal(out.argmax(-1), logits.argmax(-1))
        assert (c_out >= 0.8).all() and (c_out <= 1).all()
        tol = 1e-12
        assert (c_out >= 0.8 + b / 15 - tol).all()
        assert (c_out <= 0.8 + (b + 1) / 15 + tol).all()
        assert (c_out - compression_target(c)).abs().max() < 1e-10
        # The order of confidences is kept exactly (Spearman = 1).
        assert torch.equal(torch.argsort(c_out), torch.argsort(c))
    assert (torch.floor(3 * _confidence(z5)) == 0).any()  # the first third is exercised
    # Just below / above the 2/3 edge land just below / above 0.8 + 2/15.
    edge = _confidence(CompressionScaling()(_binary_logits(conf[-2:])))
    assert edge[0] < 0.8 + 2 / 15 < edge[1]


def test_compression_scaling_temperature_range_and_ties():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 4, generator=g)
    temps = CompressionScaling().temperatures(z)
    assert ((temps > 0) & (temps <= 1)).all()
    # A tie at the top cannot reach c* at any temperature: the output stays finite.
    tied = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.isfinite(CompressionScaling()(tied)).all()


# --------------------------------------------------------------------------------------------
# AAA
# --------------------------------------------------------------------------------------------

def test_aaa_keeps_labels_and_moves_margin_towards_reflected_target():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 6, generator=g) * 3
    aaa = AAA()
    out = aaa(z)
    assert torch.equal(out.argmax(-1), z.argmax(-1))
    top = z.topk(2, -1).values
    margin = top[:, 0] - top[:, 1]
    target = aaa.target_margin(margin)
    top_new = out.topk(2, -1).values
    new_margin = top_new[:, 0] - top_new[:, 1]
    moved = (margin - target).abs() > 0.1
    assert moved.sum() > 30
    assert ((new_margin - target).abs()[moved] < (margin - target).abs()[moved]).all()
    # Confidence-preservation term: the top probability changes little on average.
    assert (_confidence(out) - _confidence(z)).abs().mean() < 0.1


def test_aaa_target_reflects_about_attractor():
    aaa = AAA(tau=4.0)
    # m = 1 -> attractor 2, target 3; m = 5 -> attractor 6, target 7; m = 7.5 -> 6, 4.5.
    got = aaa.target_margin(torch.tensor([1.0, 5.0, 7.5]))
    assert got.tolist() == pytest.approx([3.0, 7.0, 4.5])


def _bench_aaa():
    """benchmarks/bench_aaa.py: it holds the autograd reference the test compares against."""
    from benchmark_scripts import load_benchmark

    return load_benchmark("bench_aaa")


@pytest.mark.parametrize("calib_weight", [0.0, 5.0])
def test_aaa_written_out_gradient_matches_autograd_and_torch_adam(calib_weight):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(128, 10, generator=g) * 4
    aaa = AAA(steps=100, calib_weight=calib_weight, temperature=1.3)
    expected = _bench_aaa().autograd_reference(aaa, z)
    got = aaa(z)
    assert not torch.equal(got, z)
    # The two differ only by float32 rounding; but the loss is piecewise linear (|.|, top-2),
    # so a row whose runner-up logits are near-tied can switch runner-up at a different step
    # and end at a different, equally good point. Almost every row agrees to rounding ...
    close = ((got - expected).abs() <= 1e-4 + 1e-5 * expected.abs()).all(-1)
    assert close.float().mean() >= 0.97, f"{int((~close).sum())} rows differ"
    # ... and every row reaches the same objective value.
    top = z.topk(2, -1).values
    target = aaa.target_margin(top[:, 0] - top[:, 1])
    p1_orig = (z / aaa.temperature).softmax(-1).max(-1).values

    def objective(x: torch.Tensor) -> torch.Tensor:
        n = x.topk(2, -1).values
        p1 = x.softmax(-1).max(-1).values
        return (n[:, 0] - n[:, 1] - target).abs() + calib_weight * (p1 - p1_orig).abs()

    torch.testing.assert_close(objective(got), objective(expected), rtol=0, atol=0.05)


def test_aaa_falls_back_to_original_logits_if_the_label_would_flip():
    # One Adam step of lr 3 lowers the top logit and raises the runner-up by 3: a flip.
    z = torch.tensor([[3.9, 0.0, -5.0], [0.0, 3.0, 1.0]])
    out = AAA(lr=3.0, steps=1, calib_weight=0.0)(z)
    assert torch.equal(out[0], z[0])
    assert torch.equal(out.argmax(-1), z.argmax(-1))


# --------------------------------------------------------------------------------------------
# MDTS
# --------------------------------------------------------------------------------------------

def test_mdts_fits_positive_domain_temperatures(fitted):
    mdts = fitted["mdts"]
    temps = mdts.domain_temperatures
    assert set(temps) == {"clean", "uca", "oca"}
    assert all(t > 0 for t in temps.values())
    # The domains were built with logits scaled by 0.3, 4 and 8.
    assert temps["uca"] < temps["clean"] < temps["oca"]
    z, _ = _synthetic(100, 5, scale=4.0, seed=9)
    pred_t = mdts.temperatures(z)
    assert (pred_t > 0).all()
    assert (pred_t >= min(temps.values()) - 1e-9).all()
    assert (pred_t <= max(temps.values()) + 1e-9).all()
    # Sharper logits are predicted a higher temperature on average.
    assert mdts.temperatures(2 * z).mean() > mdts.temperatures(0.5 * z).mean()


def test_mdts_clean_only_is_temperature_scaling():
    z, y = _synthetic(500, 4, scale=3.0, seed=4)
    mdts = MDTS().fit(z, y)
    ts = TemperatureScaling().fit(z, y)
    assert torch.allclose(mdts(z), ts(z), atol=1e-5)


# --------------------------------------------------------------------------------------------
# CalibratedModel
# --------------------------------------------------------------------------------------------

def _tiny_convnet(seed: int = 0) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


@pytest.mark.parametrize("name", ["temperature", "cs", "mdts", "spline"])
def test_calibrated_model_forward_and_input_gradient(fitted, name):
    net = _tiny_convnet()
    z_val, y_val = _synthetic(200, 3, scale=3.0, seed=7)
    rec = make_recalibrator(name)
    if name != "cs":
        rec.fit(z_val, y_val)
    model = CalibratedModel(net, rec)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    out = model(x)
    assert out.shape == (5, 3)
    assert torch.equal(out.argmax(-1), net(x).argmax(-1))
    loss = torch.nn.functional.cross_entropy(out, out.argmax(-1).detach())
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_calibrated_model_through_aaa_masks_or_passes_gradients():
    net = _tiny_convnet()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    masked = CalibratedModel(net, AAA(steps=5))
    (grad,) = torch.autograd.grad(masked(x).sum(), x)
    assert grad.abs().sum() == 0
    bpda = CalibratedModel(net, AAA(steps=5, bpda=True))
    out = bpda(x)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad.abs().sum() > 0
    with torch.inference_mode():
        assert masked(x.detach()).shape == (3, 3)


def test_aaa_anchor_uses_a_fitted_temperature_as_released():
    """The released AAA anchors the confidence at softmax(z / T), T tuned on validation data."""
    g = torch.Generator().manual_seed(3)
    z_val = 4 * torch.randn(400, 5, generator=g)
    y_val = torch.where(torch.rand(400, generator=g) < 0.6, z_val.argmax(1),
                        torch.randint(0, 5, (400,), generator=g))  # overconfident logits
    aaa = AAA(steps=60, tau=4.0).fit(z_val, y_val)
    ts = TemperatureScaling().fit(z_val, y_val)
    assert aaa.fitted and aaa.temperature == pytest.approx(ts.temperature)
    assert aaa.temperature > 1.2 and aaa.params()["temperature_fitted"] is True
    z = 4 * torch.randn(64, 5, generator=g)
    raw = z.softmax(1).max(1).values
    scaled = ts(z).softmax(1).max(1).values
    anchored = aaa(z).softmax(1).max(1).values
    unfitted = AAA(steps=60, tau=4.0)(z).softmax(1).max(1).values
    # Fitted, AAA's confidences follow the temperature-scaled ones, not the raw ones.
    assert (anchored - scaled).abs().mean() < (anchored - raw).abs().mean()
    assert (unfitted - raw).abs().mean() < (unfitted - scaled).abs().mean()
    assert torch.equal(aaa(z).argmax(1), z.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        AAA(temperature=0.0)


def test_aaa_benchmark_runs_and_agrees(capsys):
    rows = _bench_aaa().main(["--sizes", "16", "--repeat", "1", "--threads", "1"])
    assert [r["n"] for r in rows] == [16]
    assert rows[0]["rows_equal"] >= 0.9 and rows[0]["calib_ms"] > 0
    assert "speed-up" in capsys.readouterr().out
