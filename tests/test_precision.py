"""calib.precision (query precision with fallback) and calib.analysis.precision (the check)."""

from __future__ import annotations

import typing
import warnings

import pytest
import torch
from tiny_models import labelled_images
from tiny_models import seeded_conv as tiny_model
from torch import nn

from calib import config, precision, reporting
from calib.analysis.precision import CHECKED_METRICS, PrecisionCheck, compare_precisions
from calib.attacks.grid import AttackGrid, run_grid
from calib.precision import (
    PRECISIONS,
    Precision,
    PrecisionModel,
    resolve_precision,
    with_precision,
)
from calib.runtime import predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = AttackGrid(settings="square-linf,pgd-linf", kinds="uca,oca", eps_linf=0.1,
                  square_iterations=5, square_p_init=0.3, pgd_iterations=3, pgd_alpha=0.04)
BF16 = Precision("bf16", "bf16", "cpu", "forced in a test")


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has native bf16 (autocast still runs, only slower, where it has not)."""
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)


def test_schema_offers_exactly_the_precisions():
    field = config.Attack.model_fields["precision"]
    assert typing.get_args(field.annotation) == PRECISIONS
    assert field.default == "fp32"


def test_fp32_is_fp32_everywhere():
    chosen = resolve_precision("fp32", "cpu")
    assert (chosen.used, chosen.fell_back) == ("fp32", False)
    model = tiny_model()
    assert with_precision(model, chosen) is model


class FlagRecorder(nn.Module):
    """Records the TF32 flags in force during its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.backends.cuda.matmul.allow_tf32,
                          torch.backends.cudnn.allow_tf32))
        return images.flatten(1)[:, :3]


@pytest.mark.parametrize(("name", "expected"), [("fp32", (False, False)), ("tf32", (True, True))])
def test_cuda_fp32_forward_runs_with_tf32_off_and_tf32_with_it_on(name, expected):
    # PyTorch's default lets cuDNN convolutions run in TF32, so an untouched "fp32" model would
    # be TF32 on an Ampere+ GPU; the flags are readable and settable without a GPU.
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not expected[0],
                                                                              not expected[1])
    try:
        recorder = FlagRecorder()
        chosen = Precision(name, name, "cuda", "constructed")
        wrapped = with_precision(recorder, chosen)
        assert isinstance(wrapped, PrecisionModel)
        assert wrapped(torch.rand(2, 1, 4, 4)).dtype == torch.float32
        assert recorder.seen == [expected]
        assert (torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32) == (not expected[0], not expected[1])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_unknown_precision_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"precision must be one of .*fp32.*bf16.*tf32.*got .fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        AttackGrid(precision="half")


def test_bf16_without_native_support_falls_back_to_fp32_and_says_why(no_native_bf16):
    with pytest.warns(UserWarning, match="no native bf16"):
        chosen = resolve_precision("bf16", "cpu")
    assert (chosen.requested, chosen.used, chosen.fell_back) == ("bf16", "fp32", True)
    assert "fp32" in chosen.reason


def test_bf16_with_native_support_is_used(native_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = resolve_precision("bf16", "cpu")
    assert chosen.used == "bf16" and not chosen.fell_back


def test_tf32_off_cuda_falls_back():
    with pytest.warns(UserWarning, match="TF32 exists only on CUDA"):
        assert resolve_precision("tf32", "cpu").used == "fp32"


def test_bf16_native_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not precision.bf16_native(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.bf16_native(torch.device("cpu"))


def test_precision_model_returns_float32_logits_close_to_fp32_and_passes_gradients():
    model = tiny_model()
    images, _ = labelled_images(16, seed=2)
    fast = PrecisionModel(model, BF16)
    x = images.clone().requires_grad_(True)
    logits = fast(x)
    assert logits.dtype == torch.float32 and logits.shape == (16, 4)
    assert torch.allclose(logits, model(images), atol=0.1 * model(images).abs().max().item())
    logits.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="fp32"):
        PrecisionModel(model, resolve_precision("fp32", "cpu"))


def test_a_bf16_grid_keeps_labels_stays_in_the_ball_and_reports_fp32_outcomes(native_bf16):
    model = tiny_model()
    images, labels = labelled_images(12, seed=4)
    run = run_grid(model, images, labels, AttackGrid(**{**GRID.__dict__, "precision": "bf16"}),
                   seed=1)
    assert run.precision is not None and run.precision.used == "bf16"
    for result in run.results.values():
        delta = result.x_adv - result.x_clean
        assert float(delta.abs().max()) <= 0.1 + 1e-6
        assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
        # What is reported is the bare fp32 model's view of the final images.
        probs = predict_logits(model, result.x_adv).softmax(1)
        assert torch.allclose(result.final_confidence, probs.max(1).values, atol=1e-6)
        kept = result.final_prediction == result.clean_prediction
        assert not bool((result.success & ~kept).any())


def test_same_seed_same_bf16_numbers(native_bf16):
    model = tiny_model()
    images, labels = labelled_images(8, seed=5)
    grid = AttackGrid(**{**GRID.__dict__, "precision": "bf16"})
    a = run_grid(model, images, labels, grid, seed=2).summaries()
    b = run_grid(model, images, labels, grid, seed=2).summaries()
    assert a == b


def test_compare_precisions_reports_every_table1_number(native_bf16):
    model = tiny_model()
    images, labels = labelled_images(20, seed=6)
    check = compare_precisions(model, images, labels, GRID, precision="bf16", seed=0)
    table = check.table()
    assert len(table) == len(GRID.settings) * len(GRID.kinds) * len(CHECKED_METRICS)
    assert set(table.metric) == set(CHECKED_METRICS)
    assert (table.fp32_lo <= table.fp32).all() and (table.fp32 <= table.fp32_hi).all()
    assert 0.0 <= check.agreement <= 1.0
    assert check.passed == (check.agreement == 1.0 and bool(table.inside.all()))
    assert set(check.seconds) == {"fp32", "bf16"}


def test_only_the_reduced_run_goes_through_the_reduced_context(native_bf16):
    """``reduced_context`` wraps the reduced-precision grid run and nothing else: the queries
    made inside it are exactly the reduced run's (bf16 autocast active), none of fp32's."""
    import contextlib

    model = tiny_model()
    images, labels = labelled_images(12, seed=6)
    seen = {"inside": [], "entered": 0}
    inside = [False]

    class Watch(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["inside"].append((inside[0], torch.is_autocast_enabled("cpu")))
            return self.inner(x)

    @contextlib.contextmanager
    def context():
        seen["entered"] += 1
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    compare_precisions(Watch(model), images, labels, GRID, precision="bf16", seed=0,
                       reduced_context=context)
    assert seen["entered"] == 1
    calls = seen["inside"]
    reduced_inside = sum(ins and autocast for ins, autocast in calls)
    reduced_outside = sum(not ins and autocast for ins, autocast in calls)
    fp32_outside = sum(not ins and not autocast for ins, autocast in calls)
    assert reduced_inside > 10  # the reduced grid's attack queries
    assert reduced_outside == 1  # only the clean-agreement pass (12 images, one batch)
    assert fp32_outside > 10  # the fp32 reference grid


def _check(agreement: float, inside: list[bool]) -> PrecisionCheck:
    rows = [{"setting": "square-linf", "kind": "uca", "metric": m, "fp32": 0.5, "fp32_lo": 0.4,
             "fp32_hi": 0.6, "reduced": 0.5 if ok else 0.7, "difference": 0.0 if ok else 0.2,
             "inside": ok} for m, ok in zip(CHECKED_METRICS, inside, strict=False)]
    return PrecisionCheck(BF16, agreement, rows, {"fp32": 2.0, "bf16": 1.0})


@pytest.mark.parametrize("agreement,inside,passed", [
    (1.0, [True] * 5, True),
    (0.998, [True] * 5, False),          # one clean prediction moved
    (1.0, [True, True, False, True, True], False),   # one number left its interval
])
def test_the_verdict_can_fail(agreement, inside, passed):
    check = _check(agreement, inside)
    assert check.passed is passed
    assert check.verdict().startswith("passed" if passed else "FAILED")
    assert check.speedup == pytest.approx(2.0)
    if not inside[2]:
        assert "confidence_after" in check.verdict()


def test_the_reference_estimate_is_always_inside_its_stretched_interval():
    from calib.analysis.precision import moved_inside

    # ECE's percentile interval above its own estimate (upward resampling bias, measured on the
    # default ResNet-18 at eps 0.02): a candidate equal to fp32 passes, one further away fails.
    assert moved_inside(0.0639, 0.0639, 0.0667, 0.1443)
    assert moved_inside(0.0639 - 2.4e-6, 0.0639, 0.0667, 0.1443)  # float32 rounding
    assert moved_inside(0.0650, 0.0639, 0.0667, 0.1443)
    assert not moved_inside(0.0600, 0.0639, 0.0667, 0.1443)
    assert not moved_inside(0.1500, 0.0639, 0.0667, 0.1443)
    # An estimate inside its interval: exactly the interval.
    assert moved_inside(0.40, 0.5, 0.4, 0.6) and not moved_inside(0.39, 0.5, 0.4, 0.6)


def test_a_fallback_is_not_called_a_pass(no_native_bf16):
    with pytest.warns(UserWarning):
        chosen = resolve_precision("bf16", "cpu")
    check = PrecisionCheck(chosen, 1.0, [], {"fp32": 1.0})
    assert check.verdict().startswith("not checked")


def test_label_flips_counts_and_warns():
    kept = [{"setting": "square-linf", "kind": "uca", "n": 10, "label_preserved": 1.0}]
    assert reporting.label_flips(kept).startswith("labels kept in every run (1 runs")
    flipped = [*kept, {"setting": "pgd-linf", "kind": "rca", "n": 10, "label_preserved": 0.8}]
    with pytest.warns(UserWarning, match="pgd-linf/rca: 2 of 10"):
        line = reporting.label_flips(flipped)
    assert "counted as failed" in line
