"""Tests for calib.attacks: invariants (property tests), schedules, windows, effectiveness."""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from calib import checks, runtime
from calib.attacks import (
    KINDS,
    METHODS,
    NORMS,
    AttackResult,
    method_options,
    pgd_attack,
    run_attack,
    square_attack,
)
from calib.attacks import square as sq
from calib.attacks.base import MODE_OCA, MODE_RCA, MODE_UCA, Thresholds, rca_targets

COMBOS = [(k, m, n) for k in KINDS for m in METHODS for n in NORMS]


# --- helpers ---------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int, channels: int, num_classes: int, scale: float) -> nn.Module:
    """A tiny conv net with seeded random weights; ``scale`` spreads its confidences."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model[-1].weight.mul_(scale)
    return model


def random_images(seed: int, n: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def synthetic_task(n: int, gen: torch.Generator, size: int = 8, num_classes: int = 4
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is a faint bright quadrant: learnable, not trivially so."""
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    images = 0.6 * torch.rand(n, 1, size, size, generator=gen)
    half = size // 2
    for c in range(num_classes):
        r, q = divmod(c, 2)
        images[labels == c, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 0.12
    return images.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained for about a second on the synthetic task, and 32 test images."""
    gen = torch.Generator().manual_seed(0)
    x, y = synthetic_task(512, gen)
    with torch.random.fork_rng():  # seeds the layers' initialisation without side effects
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        idx = torch.randint(0, 512, (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    xt, yt = synthetic_task(32, gen)
    return model, xt, yt


def assert_invariants(result: AttackResult, model: nn.Module, images: torch.Tensor,
                      iterations: int) -> None:
    """Every promise of SPEC §3 that can be checked on one result (default thresholds)."""
    thresholds = Thresholds()
    n = images.shape[0]
    # Label kept: as recorded by the attack, and when the model is asked again.
    assert torch.equal(result.final_prediction, result.clean_prediction)
    assert checks.label_preserved(model, images, result.x_adv).all()
    # Inside the eps-ball and [0, 1]; same shape, dtype and device as the input.
    assert result.x_adv.shape == images.shape and result.x_adv.dtype == images.dtype
    assert checks.within_eps_ball(images, result.x_adv, eps=result.eps, norm=result.norm).all()
    # Query accounting.
    assert result.queries.dtype == torch.int64 and result.queries.shape == (n,)
    assert (result.queries >= 1).all() and (result.queries <= iterations + 1).all()
    # Success agrees with the thresholds applied to the final confidences / margins.
    conf, margin = result.final_confidence, result.final_margin
    expected = torch.where(
        result.mode == MODE_UCA, margin <= thresholds.uca_margin,
        torch.where(result.mode == MODE_OCA, conf >= thresholds.oca_confidence,
                    (conf - result.target).abs() <= thresholds.rca_tolerance))
    assert torch.equal(result.success, expected)
    # The recorded confidences are what the model says about x_adv.
    probs = runtime.predict_logits(model, result.x_adv).softmax(1)
    assert torch.allclose(probs.max(1).values, conf.to(probs.dtype), atol=1e-5)
    # History: T + 1 rows, first = clean, last = final, monotone queries and success.
    h = result.history
    assert h.confidence.shape == h.queries.shape == h.success.shape == (iterations + 1, n)
    assert torch.equal(h.confidence[0], result.clean_confidence.float())
    assert torch.equal(h.confidence[-1], conf.float())
    assert torch.equal(h.queries[-1], result.queries) and (h.queries[0] == 1).all()
    assert torch.equal(h.success[-1], result.success)
    assert (h.queries.diff(dim=0) >= 0).all() and (h.queries.diff(dim=0) <= 1).all()
    assert (h.success.int().diff(dim=0) >= 0).all()
    # A sample stops being queried once it succeeds.
    assert (h.queries.diff(dim=0)[h.success[:-1]] == 0).all()


def same_result(a: AttackResult, b: AttackResult) -> bool:
    fields = ("x_adv", "queries", "success", "final_confidence", "final_margin")
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    same &= torch.equal(a.target.isnan(), b.target.isnan())
    same &= torch.equal(a.target.nan_to_num(), b.target.nan_to_num())
    return same and torch.equal(a.history.confidence, b.history.confidence)


# --- property tests: every kind x method x norm ----------------------------------------------

@pytest.mark.parametrize(("kind", "method", "norm"), COMBOS)
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), channels=st.sampled_from([1, 3]),
       size=st.integers(4, 9), num_classes=st.integers(2, 5), scale=st.floats(1.0, 30.0),
       eps_frac=st.floats(0.05, 1.0), iterations=st.integers(0, 12),
       batch_size=st.integers(1, 6))
def test_invariants(kind: str, method: str, norm: str, seed: int, n: int, channels: int,
                    size: int, num_classes: int, scale: float, eps_frac: float,
                    iterations: int, batch_size: int) -> None:
    model = random_model(seed, channels, num_classes, scale).train()
    images = random_images(seed, n, channels, size)
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    eps = 0.5 * eps_frac if norm == "linf" else 3.0 * eps_frac
    snapshot = checks.parameters_snapshot(model)
    flags = runtime.training_flags(model)

    def attack(seed: int) -> AttackResult:
        return run_attack(model, images, kind=kind, method=method, norm=norm, eps=eps,
                          iterations=iterations, labels=labels, seed=seed,
                          batch_size=batch_size)

    result = attack(seed)
    assert_invariants(result, model, images, iterations)
    assert checks.parameters_unchanged(model, snapshot)
    assert all(p.grad is None for p in model.parameters())
    assert runtime.training_flags(model) == flags
    if kind == "mma":
        correct = result.clean_prediction == labels
        assert torch.equal(result.mode == MODE_UCA, correct)
    if kind == "rca":
        low = 1 / num_classes + 0.05
        assert ((result.target >= low - 1e-6) & (result.target <= 0.99 + 1e-6)).all()
        assert (result.mode == MODE_RCA).all()
    else:
        assert result.target.isnan().all()
    assert same_result(result, attack(seed))


# --- Square Attack building blocks -----------------------------------------------------------

def test_p_schedule_is_piecewise_and_rescaled() -> None:
    p = 0.05
    assert sq.p_schedule(p, 0, 10000) == p
    assert sq.p_schedule(p, 10, 10000) == p
    assert sq.p_schedule(p, 11, 10000) == p / 2
    assert sq.p_schedule(p, 51, 10000) == p / 4
    assert sq.p_schedule(p, 1001, 10000) == p / 32
    assert sq.p_schedule(p, 9999, 10000) == p / 512
    values = [sq.p_schedule(p, t, 1000) for t in range(1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    for t in (0, 3, 17, 333, 999):
        assert sq.p_schedule(p, t, 1000) == sq.p_schedule(p, 10 * t, 10000)
    with pytest.raises(ValueError, match="budget"):
        sq.p_schedule(p, 0, 0)


def test_square_sides() -> None:
    assert sq.square_side(0.05, 28, 28) == 6
    assert sq.square_side(1.0, 28, 28) == 27  # at most h - 1
    assert sq.square_side(1e-6, 28, 28) == 1
    assert sq.square_side(0.05, 224, 224) == 50
    for p in (1e-4, 0.01, 0.05, 0.3):
        side = sq.square_side_l2(p, 28, 28)
        assert side % 2 == 1 and 3 <= side <= 28
    assert sq.square_side_l2(1.0, 28, 28) == 28  # clamped to the image
    assert sq.square_side_l2(1.0, 4, 4) == 4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), side=st.integers(1, 7), height=st.integers(8, 12),
       width=st.integers(8, 12))
def test_windows_stay_inside_and_agree(seed: int, side: int, height: int, width: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = sq.random_windows(16, side, height, width, gen, torch.device("cpu"))
    assert (rows >= 0).all() and (rows + side <= height).all()
    assert (cols >= 0).all() and (cols + side <= width).all()
    mask = sq.window_mask(rows, cols, side, height, width)
    assert mask.shape == (16, 1, height, width)
    assert (mask.flatten(1).sum(1) == side * side).all()
    offsets = sq.window_offsets(rows, cols, side, 2, height, width)
    assert offsets.shape == (16, 2, side * side)
    marked = torch.zeros(16, 2, height, width)
    sq._scatter(marked, torch.arange(16), offsets, torch.ones(16, 2, side * side))
    assert torch.equal(marked.bool(), mask.expand(-1, 2, -1, -1))
    values = torch.rand(16, 2, height, width, generator=gen)
    picked = sq._gather(values, torch.arange(16), offsets)
    assert torch.equal(picked.sort(-1).values,
                       values[mask.expand(-1, 2, -1, -1)].view(16, 2, -1).sort(-1).values)


def test_window_positions_cover_the_image() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, cols = sq.random_windows(2000, 3, 6, 6, gen, torch.device("cpu"))
    assert set(rows.tolist()) == {0, 1, 2, 3} and set(cols.tolist()) == {0, 1, 2, 3}


def test_meta_pseudo_gaussian() -> None:
    for side in (2, 3, 7, 10):
        pat = sq.meta_pseudo_gaussian(side)
        assert pat.shape == (side, side)
        assert math.isclose(float(pat.norm()), 1.0, rel_tol=1e-9)
        assert (pat[: side // 2] > 0).all() and (pat[side // 2:] < 0).all()
    bump = sq.pseudo_gaussian_rectangle(5, 5)
    assert bump.argmax() == 12  # peak in the centre
    with pytest.raises(ValueError, match="side"):
        sq.meta_pseudo_gaussian(1)


def test_linf_proposal_is_one_signed_square_that_changes_the_image() -> None:
    gen = torch.Generator().manual_seed(0)
    eps, side = 0.1, 3
    x = torch.rand(64, 2, 8, 8, generator=gen)
    # Every pixel already at +eps: half of the fresh sign draws would change nothing.
    best = (x + eps).clamp(0, 1)
    x_new = best.clone()
    sq.propose_linf(x, torch.arange(64), x_new, eps, side, gen)
    changed = (x_new - best).abs() > 0
    assert changed.flatten(1).any(1).all()
    # Changes stay inside one side x side window, at clamp(x +- eps) with a per-channel sign.
    touched = (x_new != best).any(1)
    assert (touched.flatten(1).sum(1) <= side * side).all()
    delta = x_new - x
    for ch in range(2):
        d = delta[:, ch][touched]
        assert ((d - eps).abs() < 1e-6).logical_or((d + eps).abs() < 1e-6).logical_or(
            (x_new[:, ch][touched] == 0) | (x_new[:, ch][touched] == 1)).all()


def test_l2_proposal_has_norm_eps() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8, 3, 10, 10), 0.5)
    pattern = sq.meta_pseudo_gaussian(3)
    cand = sq.propose_l2(x, x.clone(), 0.7, 3, pattern, gen)
    norms = checks.perturbation_norms(x, cand, "l2")
    assert torch.allclose(norms, torch.full((8,), 0.7, dtype=torch.float64), atol=1e-5)


# --- effectiveness on a trained model --------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_uca_lowers_margin(trained, method: str) -> None:
    model, x, y = trained
    iterations = 150 if method == "square" else 20
    result = run_attack(model, x, kind="uca", method=method, eps=0.1, iterations=iterations,
                        labels=y)
    assert_invariants(result, model, x, iterations)
    assert result.final_margin.mean() < result.clean_margin.mean() - 0.4
    assert result.success.float().mean() > 0.5
    summary = result.summary()
    assert summary["ece_after"] > summary["ece_before"] + 0.2
    assert summary["accuracy_after"] == summary["accuracy_before"]


@pytest.mark.parametrize("method", METHODS)
def test_oca_raises_confidence(trained, method: str) -> None:
    model, x, _ = trained
    iterations = 200 if method == "square" else 20
    result = run_attack(model, x, kind="oca", method=method, eps=0.1, iterations=iterations)
    assert_invariants(result, model, x, iterations)
    assert result.final_confidence.mean() > result.clean_confidence.mean() + 0.05
    assert result.success.float().mean() > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_mma_splits_by_correctness_and_miscalibrates(trained, method: str) -> None:
    model, x, y = trained
    iterations = 150 if method == "square" else 20
    result = run_attack(model, x, kind="mma", method=method, eps=0.1, iterations=iterations,
                        labels=y)
    correct = result.clean_prediction == y
    assert not correct.all()  # the test set has some errors, so both halves run
    assert torch.equal(result.mode, torch.where(correct, MODE_UCA, MODE_OCA).to(torch.int8))
    wrong = ~correct
    assert result.final_confidence[wrong].mean() >= result.clean_confidence[wrong].mean()
    assert result.final_confidence[correct].mean() < result.clean_confidence[correct].mean()
    summary = result.summary()
    assert summary["ece_after"] > summary["ece_before"] + 0.2


@pytest.mark.parametrize("method", METHODS)
def test_rca_moves_confidence_to_targets(trained, method: str) -> None:
    model, x, _ = trained
    iterations = 150 if method == "square" else 20
    result = run_attack(model, x, kind="rca", method=method, eps=0.1, iterations=iterations)
    before = (result.clean_confidence - result.target).abs()
    after = (result.final_confidence - result.target).abs()
    assert after.mean() < before.mean() - 0.1
    assert (after[result.success] <= 0.05).all()
    assert result.success.float().mean() > 0.5


def test_rca_targets_do_not_depend_on_batch_size(trained) -> None:
    model, x, _ = trained
    a = square_attack(model, x, kind="rca", iterations=2, batch_size=32)
    b = square_attack(model, x, kind="rca", iterations=2, batch_size=5)
    assert torch.equal(a.target, b.target)
    assert torch.allclose(rca_targets(torch.tensor([0.0, 1.0]), 10),
                          torch.tensor([0.15, 0.99]))


def test_backtracking_retries_rejected_crossings(trained) -> None:
    model, x, y = trained
    # A big eps makes full squares cross the boundary often; backtracking must not do worse.
    runs = {bt: square_attack(model, x, kind="uca", eps=0.3, iterations=60, labels=y,
                              backtrack_steps=bt) for bt in (0, 4)}
    assert runs[4].success.float().mean() >= runs[0].success.float().mean()
    assert_invariants(runs[4], model, x, 60)


def test_pgd_backtracking_solves_uca_overshoot(trained) -> None:
    model, x, _ = trained
    # Plain sign steps jump over the decision boundary, get rejected and stall the sample;
    # halving the step after a rejection lets it approach the boundary instead.
    runs = {bt: pgd_attack(model, x, kind="uca", eps=0.2, iterations=20, sparsify=False,
                           backtrack_steps=bt) for bt in (0, 8)}
    assert runs[0].success.float().mean() < 0.3
    assert runs[8].success.float().mean() > 0.9
    assert_invariants(runs[8], model, x, 20)


def test_method_options_lists_defaults() -> None:
    square, pgd = method_options("square"), method_options("pgd")
    assert square["p_init"] == 0.05 and square["stripes_init"] is False
    assert pgd["sparsify"] is True and pgd["drop_uca"] == 0.95 and pgd["drop_oca"] == 0.1
    for options in (square, pgd):
        assert {"uca_margin", "oca_confidence", "rca_tolerance", "batch_size",
                "show_progress"} <= set(options)
        assert not {"model", "images", "kind", "eps", "labels", "seed"} & set(options)
    with pytest.raises(ValueError, match="method"):
        method_options("cw")


def test_stripes_init_and_seeds(trained) -> None:
    model, x, _ = trained
    a = square_attack(model, x, kind="uca", iterations=30, stripes_init=True, seed=1)
    assert_invariants(a, model, x, 30)
    b = square_attack(model, x, kind="uca", iterations=30, stripes_init=True, seed=2)
    assert not torch.equal(a.x_adv, b.x_adv)


def test_pgd_without_sparsification_and_l2(trained) -> None:
    model, x, _ = trained
    result = pgd_attack(model, x, kind="oca", norm="l2", eps=1.0, iterations=10,
                        sparsify=False)
    assert_invariants(result, model, x, 10)
    assert result.options["alpha"] == pytest.approx(20 / 51)
    assert result.final_confidence.mean() > result.clean_confidence.mean()


def test_zero_iterations_returns_clean_images(trained) -> None:
    model, x, _ = trained
    result = run_attack(model, x, kind="uca", iterations=0)
    assert torch.equal(result.x_adv, x)
    assert (result.queries == 1).all()
    assert result.history.confidence.shape == (1, x.shape[0])


def test_early_stop_fills_history(trained) -> None:
    model, x, _ = trained
    # Everything succeeds at once with an easy threshold: only the clean query is spent.
    result = square_attack(model, x, kind="oca", iterations=20, oca_confidence=0.01)
    assert result.success.all() and (result.queries == 1).all()
    assert (result.history.queries == 1).all() and result.history.success.all()


def test_summary_and_curve_are_consistent(trained) -> None:
    model, x, y = trained
    result = run_attack(model, x, kind="uca", iterations=40, labels=y)
    summary = result.summary()
    for key in ("accuracy_before", "accuracy_after", "ece_before", "ece_after", "ks_before",
                "ks_after", "success_rate", "queries_mean", "queries_success_mean",
                "queries_success_median", "linf_max", "l2_mean", "label_preserved"):
        assert key in summary
    assert summary["label_preserved"] == 1.0
    assert summary["linf_max"] <= 0.05 + 1e-6
    curve = result.curve()
    assert curve["queries"][0] == 1 and curve["queries"][-1] == 41
    assert curve["ece"][0] == pytest.approx(summary["ece_before"])
    assert curve["ece"][-1] == pytest.approx(summary["ece_after"])
    assert curve["success_rate"][-1] == pytest.approx(summary["success_rate"])
    assert curve["queries_mean"][-1] == pytest.approx(summary["queries_mean"])
    short = result.curve(points=5)
    assert len(short["queries"]) == 5 and short["queries"][-1] == 41
    unlabeled = run_attack(model, x, kind="uca", iterations=2)
    assert "ece_after" not in unlabeled.summary() and "ece" not in unlabeled.curve()
    assert "ece_after" in unlabeled.summary(y)
    assert result.linf_norm().shape == result.l2_norm().shape == (x.shape[0],)


# --- bad input fails fast --------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "xca"}, r"kind must be one of \['uca', 'oca', 'mma', 'rca'\]"),
    ({"kind": "uca", "method": "fgsm"}, r"method must be one of \['square', 'pgd'\]"),
    ({"kind": "uca", "norm": "l1"}, r"norm must be one of \['linf', 'l2'\]"),
    ({"kind": "uca", "eps": 0.0}, "eps"),
    ({"kind": "uca", "eps": 1.5}, r"eps must be in \(0, 1\]"),
    ({"kind": "mma"}, "labels"),
    ({"kind": "uca", "labels": torch.zeros(3, dtype=torch.int64)}, r"shape \(4,\)"),
    ({"kind": "uca", "iterations": -1}, "iterations"),
    ({"kind": "uca", "batch_size": 0}, "batch_size"),
    ({"kind": "uca", "seed": 1.5}, "seed"),
    ({"kind": "uca", "p_iinit": 0.1}, r"unknown option\(s\) \['p_iinit'\].*allowed"),
    ({"kind": "uca", "method": "pgd", "p_init": 0.1}, r"unknown option\(s\) \['p_init'\]"),
    ({"kind": "uca", "p_init": 0.0}, "p_init"),
    ({"kind": "uca", "norm": "l2", "eps": 1.0, "stripes_init": True}, "stripes_init"),
    ({"kind": "uca", "uca_margin": 1.5}, "uca_margin"),
    ({"kind": "uca", "min_margin": -1.0}, "min_margin"),
    ({"kind": "uca", "backtrack_steps": -1}, "backtrack_steps"),
    ({"kind": "uca", "method": "pgd", "alpha": 0.0}, "alpha"),
    ({"kind": "uca", "method": "pgd", "drop_uca": 1.0}, "drop_uca"),
])
def test_bad_arguments_raise_before_any_work(kwargs: dict, match: str) -> None:
    calls = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return x.flatten(1)[:, :3]

    with pytest.raises(ValueError, match=match):
        run_attack(Spy(), torch.rand(4, 1, 4, 4), **kwargs)
    assert calls == []


@pytest.mark.parametrize("images", [torch.rand(4, 1, 4), torch.rand(4, 1, 4, 4) * 2,
                                    torch.rand(4, 1, 4, 4) - 0.5])
def test_bad_images_raise(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images"):
        run_attack(nn.Flatten(), images, kind="uca")


def test_label_out_of_range_and_bad_model_output() -> None:
    model = random_model(0, 1, 3, 5.0)
    x = random_images(0, 4, 1, 6)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        run_attack(model, x, kind="mma", labels=torch.tensor([0, 1, 2, 3]), iterations=1)
    with pytest.raises(ValueError, match="logits"):
        run_attack(nn.Sequential(nn.Flatten(), nn.Linear(36, 1)), x, kind="uca", iterations=1)
    with pytest.raises(ValueError, match="at least 2x2"):
        run_attack(model, torch.rand(2, 1, 1, 5), kind="uca", iterations=1)


def test_probability_output_warns() -> None:
    model = nn.Sequential(random_model(0, 1, 3, 5.0), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="probabilities"):
        run_attack(model, random_images(0, 4, 1, 6), kind="uca", iterations=1)


def test_logit_model_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_attack(random_model(0, 1, 3, 5.0), random_images(0, 4, 1, 6), kind="uca",
                   iterations=1)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), classes=st.integers(2, 12),
       scale=st.floats(0.1, 8.0))
def test_uca_objective_orders_candidates_like_the_margin(seed: int, classes: int,
                                                        scale: float) -> None:
    """The UCA loss is an increasing function of the probability margin (SPEC §3)."""
    from calib.attacks.base import score

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, classes, generator=gen, dtype=torch.float64) * scale
    k = logits.argmax(1)
    mode = torch.full((64,), MODE_UCA, dtype=torch.int8)
    s = score(logits, k, mode, torch.zeros(64, dtype=torch.float64), Thresholds(), 1e-4,
              (MODE_UCA,))
    order = s.margin.argsort()
    assert bool((s.loss[order].diff() >= -1e-9).all())


def test_uca_objective_resolves_confident_samples() -> None:
    """Where p_k rounds to 1 in float32 the margin is flat; the UCA loss still improves."""
    from calib.attacks.base import score

    logits = torch.tensor([[0.0, -20.0, -30.0], [0.0, -19.0, -30.0]])  # second: less confident
    k = torch.zeros(2, dtype=torch.long)
    mode = torch.full((2,), MODE_UCA, dtype=torch.int8)
    s = score(logits, k, mode, torch.zeros(2), Thresholds(), 1e-4, (MODE_UCA,))
    assert s.margin[0] == s.margin[1] == 1.0
    assert s.loss[1] < s.loss[0]


def test_table1_reports_queries_and_norms(trained) -> None:
    from calib import reporting

    model, x, y = trained
    summary = run_attack(model, x, kind="uca", iterations=10, labels=y).summary()
    table = reporting.table1([{"model": "m", "setting": "square-linf", **summary}])
    for column in ("acc_before", "acc_after", "conf_before", "conf_after", "ece_before",
                   "ece_after", "ks_before", "ks_after", "success_rate", "queries_mean",
                   "queries_success_mean", "queries_success_median", "linf_mean", "l2_mean"):
        assert column in table.columns, column
    assert table.loc[0, "linf_mean"] <= 0.05 + 1e-6


# --- outcomes measured by a fresh forward pass (SPEC §10: "measured, not assumed") -----------

def test_reevaluate_agrees_with_the_attack_on_the_attacked_model():
    from tiny_models import centred_conv, images

    from calib.attacks.base import reevaluate

    model, x = centred_conv(0), images(3, 16)
    result = run_attack(model, x, kind="uca", method="square", eps=0.2, iterations=30, seed=1)
    fresh = reevaluate(result, model)
    assert torch.equal(fresh.final_prediction, result.clean_prediction)
    assert torch.allclose(fresh.final_confidence, result.final_confidence, atol=1e-5)
    assert torch.equal(fresh.success, result.success)
    assert fresh.summary()["label_preserved"] == 1.0


def test_reevaluate_catches_a_changed_label():
    from tiny_models import centred_conv, images

    from calib.attacks.base import reevaluate

    model, x = centred_conv(0), images(3, 16)
    result = run_attack(model, x, kind="oca", method="pgd", eps=0.2, iterations=3)
    with torch.no_grad():
        pred = model(x).argmax(1)
    donor = next(i for i in range(1, 16) if pred[i] != pred[0])
    forged = replace(result, x_adv=torch.cat([x[donor:donor + 1], result.x_adv[1:]]),
                     success=torch.ones_like(result.success))
    fresh = reevaluate(forged, model)
    assert fresh.final_prediction[0] != fresh.clean_prediction[0]
    assert not fresh.success[0]
    assert fresh.summary()["label_preserved"] == pytest.approx(15 / 16)


def test_reevaluate_scores_a_transfer_on_another_model():
    from tiny_models import centred_conv, images

    from calib.attacks.base import reevaluate
    from calib.defences.posthoc import CalibratedModel, TemperatureScaling

    base, x = centred_conv(0), images(3, 16)
    scaled = TemperatureScaling()
    scaled.temperature = 3.0
    defended = CalibratedModel(base, scaled).eval()
    result = run_attack(base, x, kind="oca", method="pgd", eps=0.2, iterations=5)
    fresh = reevaluate(result, defended)
    with torch.no_grad():
        want = torch.softmax(base(result.x_adv) / 3.0, 1).max(1).values
    assert torch.allclose(fresh.final_confidence, want, atol=1e-5)
    assert torch.equal(fresh.final_prediction, result.clean_prediction)
