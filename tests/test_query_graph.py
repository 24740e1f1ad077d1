"""calib.query_graph: frozen fp32 query graphs, their fallbacks, and the check that gates them."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import labelled_images
from tiny_models import seeded_conv as conv_without_batchnorm
from torch import nn

from calib.analysis.precision import CHECKED_METRICS, compare_precisions
from calib.attacks import run_attack
from calib.attacks.base import reevaluate
from calib.attacks.grid import AttackGrid
from calib.constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from calib.models import Normalize, create_model
from calib.query_graph import (
    DENSE_MAX_PIXELS,
    QUERY_GRAPHS,
    DenseConv2d,
    FrozenQueries,
    dense_small_maps,
    freeze_for_queries,
)
from calib.runtime import predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = AttackGrid(settings="square-linf,pgd-linf", kinds="uca,oca", eps_linf=0.1,
                  square_iterations=6, square_p_init=0.3, pgd_iterations=3, pgd_alpha=0.04)


def conv_with_batchnorm(seed: int = 0) -> nn.Module:
    """A small conv net with BatchNorm (running statistics set away from 0/1), 1x8x8 -> 4."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 6, 3, padding=1, bias=False),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def test_a_frozen_graph_computes_the_models_logits():
    model = conv_with_batchnorm()
    queries, graph = freeze_for_queries(model)
    assert isinstance(queries, FrozenQueries) and (graph.used, graph.fell_back) == (
        "frozen", False)
    images, _ = labelled_images(40, seed=1)
    with torch.inference_mode():
        eager, frozen = model(images), queries(images)
        # any batch size, and the same numbers for an image whatever its batch
        assert torch.equal(queries(images[:7]), frozen[:7])
        assert torch.equal(queries(images), frozen)  # deterministic
    assert frozen.dtype == torch.float32 and frozen.shape == eager.shape
    torch.testing.assert_close(frozen, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(frozen.argmax(1), eager.argmax(1))
    assert model.training is False and any(p.requires_grad for p in model.parameters())


def test_the_frozen_graph_is_a_snapshot_and_the_model_is_untouched():
    model = conv_with_batchnorm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    queries, _ = freeze_for_queries(model)
    assert model.training  # not switched to eval
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    images, _ = labelled_images(5, seed=2)
    with torch.inference_mode():
        frozen = queries(images)
        model[-1].weight.add_(1.0)  # a change after freezing does not reach the graph
        assert torch.equal(queries(images), frozen)
        assert not torch.allclose(model.eval()(images), frozen, atol=1e-3)


def test_a_frozen_graph_refuses_gradients():
    queries, _ = freeze_for_queries(conv_with_batchnorm())
    images = torch.rand(3, 1, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradients"):
        queries(images)


def test_eager_and_fallbacks_return_the_model_and_say_why():
    model = conv_with_batchnorm()
    same, graph = freeze_for_queries(model, "eager")
    assert same is model and graph.used == "eager" and not graph.fell_back
    plain = conv_without_batchnorm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ViT's expected fallback is recorded, not warned
        same, graph = freeze_for_queries(plain)
    assert same is plain and graph.fell_back and "BatchNorm" in graph.reason
    half = conv_with_batchnorm().double()
    with pytest.warns(UserWarning, match="fp32"):
        same, graph = freeze_for_queries(half)
    assert same is half and graph.used == "eager"


def test_a_model_torchscript_cannot_compile_falls_back():
    class Unscriptable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = conv_with_batchnorm()

        def forward(self, x, *extra):  # varargs: TorchScript refuses them
            return self.net(x)

    model = Unscriptable()
    with pytest.warns(UserWarning, match="TorchScript could not freeze"):
        same, graph = freeze_for_queries(model)
    assert same is model and graph.fell_back


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.sampled_from([(1, 1), (2, 2), (1, 3), (3, 2)]),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1]), groups=st.sampled_from([1, 2]),
       bias=st.booleans())
def test_a_dense_convolution_is_the_same_linear_map(seed, size, kernel, stride, padding, groups,
                                                    bias):
    """DenseConv2d computes its convolution (padding, stride, groups, bias) up to rounding."""
    if kernel > size[0] + 2 * padding or kernel > size[1] + 2 * padding:
        return  # no output: not a convolution one could build
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    x = torch.randn(5, 4, *size)
    dense = DenseConv2d(conv, size)
    with torch.no_grad():
        expected, got = conv(x), dense(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dense_small_maps_folds_batchnorm_and_makes_only_small_maps_dense():
    model = conv_with_batchnorm()  # 8x8 maps: nothing is small enough
    same_maps, count = dense_small_maps(model, (1, 8, 8))
    assert count == 0
    small, count = dense_small_maps(model, (1, 2, 2))  # 2x2 maps: both convolutions
    assert count == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert sum(isinstance(m, DenseConv2d) for m in small.modules()) == 2
    images = torch.rand(9, 1, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(small(images), model(images), atol=1e-5, rtol=1e-5)
        large = torch.rand(3, 1, 8, 8)
        torch.testing.assert_close(same_maps(large), model(large), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, DenseConv2d) for m in model.modules())  # model untouched


def test_the_default_resnet_graph_is_specialised_to_its_input_shape():
    """The default profile's ResNet-18 at 28 x 28: the 8 convolutions that read 2x2 and 1x1
    maps (layer3 after its first block's entry, layer4) become dense, the
    logits move by rounding only, and another input shape is refused by name."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=1, img_size=28,
                         mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        queries, graph = freeze_for_queries(model, input_shape=(1, 28, 28))
    assert graph.used == "frozen" and "8 convolutions" in graph.reason, graph.reason
    assert f"<= {DENSE_MAX_PIXELS} pixels" in graph.reason
    assert queries.input_shape == (1, 28, 28)
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager, frozen = model(images), queries(images)
        torch.testing.assert_close(frozen, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(frozen.argmax(1), eager.argmax(1))
        with pytest.raises(ValueError, match=r"built for images of shape \(N, 1, 28, 28\)"):
            queries(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="input_shape"):
        freeze_for_queries(model, input_shape=(28, 28))


def test_a_model_fx_cannot_trace_is_frozen_unspecialised():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = conv_with_batchnorm()

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                return self.net(x)
            return -self.net(x)

    queries, graph = freeze_for_queries(Untraceable(), input_shape=(1, 8, 8))
    assert graph.used == "frozen" and "torch.fx could not trace" in graph.reason
    assert queries.input_shape is None


def test_an_unknown_query_graph_is_refused():
    with pytest.raises(ValueError, match="query_graph"):
        freeze_for_queries(conv_with_batchnorm(), "compiled")
    assert QUERY_GRAPHS == ("eager", "frozen")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["uca", "oca", "mma", "rca"]),
       eps=st.sampled_from([0.05, 0.2]))
def test_square_on_a_frozen_graph_keeps_labels_and_the_ball(seed, kind, eps):
    """The invariants of a calibration attack hold when its queries run on the frozen graph
    and its outcome is re-read on the eager model."""
    model = conv_with_batchnorm(seed % 7)
    queries, _ = freeze_for_queries(model)
    images, labels = labelled_images(12, seed=seed)
    result = reevaluate(run_attack(queries, images, kind=kind, method="square", eps=eps,
                                   iterations=8, labels=labels, seed=seed), model)
    delta = result.x_adv - images
    assert float(delta.abs().max()) <= eps + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    kept = result.final_prediction == result.clean_prediction
    assert not bool((result.success & ~kept).any())
    assert torch.equal(result.clean_prediction,
                       predict_logits(model, images, batch_size=64).argmax(1))


def test_the_check_compares_frozen_queries_with_eager_fp32():
    model = conv_with_batchnorm(3)
    images, labels = labelled_images(24, seed=4)
    check = compare_precisions(model, images, labels, GRID, precision="fp32",
                               query_graph="frozen", seed=0)
    table = check.table()
    assert len(table) == len(GRID.settings) * len(GRID.kinds) * len(CHECKED_METRICS)
    assert check.candidate == "fp32-frozen" and set(check.seconds) == {"fp32", "fp32-frozen"}
    assert check.agreement == 1.0
    # PGD needs gradients, so it runs on the eager model in both runs: identical numbers.
    assert (table[table.setting == "pgd-linf"].difference == 0).all()
    assert check.verdict().startswith(("passed", "FAILED"))
    assert check.verdict().split(":")[0].endswith("fp32-frozen")


def test_the_check_refuses_a_frozen_graph_in_reduced_precision(monkeypatch):
    from calib import precision

    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    images, labels = labelled_images(6, seed=4)
    with pytest.raises(ValueError, match="fp32"):
        compare_precisions(conv_with_batchnorm(), images, labels, GRID, precision="bf16",
                           query_graph="frozen")


def test_a_check_whose_graph_fell_back_is_not_called_a_pass():
    images, labels = labelled_images(8, seed=4)
    check = compare_precisions(conv_without_batchnorm(), images, labels, GRID,
                               precision="fp32", query_graph="frozen")
    assert check.verdict().startswith("not checked") and check.candidate == "fp32"
    assert "BatchNorm" in check.verdict()


# --- the attack grid's query_graph (what the pipeline's stages set) ---------------------------

def test_the_grid_refuses_an_unknown_graph_and_a_frozen_graph_in_reduced_precision():
    with pytest.raises(ValueError, match="query_graph"):
        AttackGrid(query_graph="compiled")
    with pytest.raises(ValueError, match="fp32"):
        AttackGrid(query_graph="frozen", precision="bf16")
    assert AttackGrid().query_graph == "eager"
    assert AttackGrid(query_graph="frozen").config()["query_graph"] == "frozen"


def test_run_grid_queries_the_frozen_graph_in_square_only_and_reports_eager_outcomes():
    from dataclasses import replace

    from calib.attacks.grid import run_grid

    model = conv_with_batchnorm(2)
    images, labels = labelled_images(16, seed=5)
    eager = run_grid(model, images, labels, GRID, seed=1)
    frozen = run_grid(model, images, labels, replace(GRID, query_graph="frozen"), seed=1)
    assert eager.query_graph.used == "eager" and not eager.query_graph.fell_back
    assert frozen.query_graph.used == "frozen"
    assert frozen.queries_info()["query_graph"] == "frozen"
    assert frozen.queries_info()["precision"] == "fp32"
    for kind in GRID.kinds:
        # PGD differentiates through the model in both runs: bit-identical outcomes.
        assert torch.equal(frozen.results["pgd-linf", kind].x_adv,
                           eager.results["pgd-linf", kind].x_adv)
        # Square's outcome is what the eager model says of the final images.
        square = frozen.results["square-linf", kind]
        probs = predict_logits(model, square.x_adv, batch_size=64).softmax(1)
        assert torch.allclose(square.final_confidence, probs.max(1).values, atol=1e-6)
        assert not bool((square.success & (square.final_prediction
                                           != square.clean_prediction)).any())


def test_run_grid_on_a_model_without_batchnorm_stays_eager_and_says_why():
    from dataclasses import replace

    from calib.attacks.grid import run_grid

    model = conv_without_batchnorm()
    images, labels = labelled_images(10, seed=6)
    eager = run_grid(model, images, labels, GRID, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asked = run_grid(model, images, labels, replace(GRID, query_graph="frozen"), seed=0)
    assert asked.query_graph.fell_back and "BatchNorm" in asked.queries_info()[
        "query_graph_reason"]
    for key, result in eager.results.items():
        assert torch.equal(result.x_adv, asked.results[key].x_adv)
