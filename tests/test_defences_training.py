"""calib.defences.training: every training step updates the model; PGD-AT and CAAT examples
stay inside their budget, and CAAT's keep the predicted label."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib.attacks.pgd import pgd_linf
from calib.defences import (
    TRAINING_DEFENCES,
    CAATStep,
    CrossEntropyStep,
    PGDATStep,
    SAMStep,
    make_train_step,
)


def _separable(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny four-class images (N, 1, 4, 4) in [0, 1]: class c lights up quadrant c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.full((n, 1, 4, 4), 0.1)
    for c in range(4):
        r, q = divmod(c, 2)
        images[labels == c, :, 2 * r:2 * r + 2, 2 * q:2 * q + 2] = 0.9
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, labels


def _tiny_net(seed: int = 3, batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)]
    net = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("bias"):
                p.zero_()
    return net.train()


def _full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        loss = float(F.cross_entropy(model(x), y))
        model.train(was)
    return loss


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before: list[torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_registry_and_bad_options():
    assert TRAINING_DEFENCES == ("none", "pgd_at", "caat", "dca", "sam", "label_smoothing")
    assert isinstance(make_train_step("none"), CrossEntropyStep)
    assert make_train_step("label_smoothing").smoothing == 0.1
    assert make_train_step("sam").rho == 0.05
    assert make_train_step("dca").beta == 10.0
    step = make_train_step("pgd_at", eps=0.03)
    assert isinstance(step, PGDATStep) and step.eps == 0.03 and step.steps == 10
    with pytest.raises(ValueError, match=r"allowed.*none.*pgd_at.*caat"):
        make_train_step("mixup")
    with pytest.raises(ValueError, match=r"allowed: \['rho'\]"):
        make_train_step("sam", lr=0.1)
    with pytest.raises(ValueError, match=r"allowed: \[\]"):
        make_train_step("none", smoothing=0.2)
    with pytest.raises(ValueError, match="eps"):
        make_train_step("pgd_at", eps=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        make_train_step("label_smoothing", smoothing=1.5)
    with pytest.raises(ValueError, match="attack_options"):
        CAATStep(attack_options={"nonsense": 1})


def _warm_net(x: torch.Tensor, y: torch.Tensor, *, steps: int = 8) -> nn.Module:
    """A tiny net after a few cross-entropy steps: accurate, but not yet saturated."""
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    step = make_train_step("none")
    for _ in range(steps):
        step(model, x, y, opt)
    return model


def _dca_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x)
        conf, pred = logits.softmax(-1).max(-1)
        gap = (conf.mean() - (pred == y).float().mean()).abs()
        return float(F.cross_entropy(logits, y) + 10.0 * gap)


@pytest.mark.parametrize("name", ["none", "label_smoothing", "sam"])
def test_standard_steps_reduce_loss(name):
    x, y = _separable()
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    step = make_train_step(name)
    start = _full_loss(model, x, y)
    losses = [step(model, x, y, opt) for _ in range(12)]
    assert all(isinstance(v, float) for v in losses)
    assert _full_loss(model, x, y) < 0.5 * start
    assert losses[-1] < losses[0]
    assert model.training


def test_dca_step_reduces_its_objective_from_a_warm_start():
    # From a random start, beta = 10 pins a near-chance model at uniform confidence
    # (mean confidence = accuracy = 1/K); DCA is meant to refine a model that already learns,
    # so a few cross-entropy steps come first.
    x, y = _separable()
    model = _warm_net(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = make_train_step("dca")
    start = _dca_objective(model, x, y)
    losses = [step(model, x, y, opt) for _ in range(8)]
    assert losses[0] == pytest.approx(start, rel=1e-4)  # the step returns the DCA objective
    assert _dca_objective(model, x, y) < 0.5 * start


def test_sam_restores_weights_before_the_base_step():
    x, y = _separable()
    model = _tiny_net(seed=2)
    before = _weights(model)
    # lr = 0: the base optimizer's step is a no-op, so the weights must come back exactly.
    SAMStep(rho=0.05)(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert all(torch.allclose(a, b, atol=1e-7)
               for a, b in zip(before, model.parameters(), strict=True))


def test_pgd_linf_stays_in_ball_raises_loss_and_is_seeded():
    x, y = _separable(16)
    model = _tiny_net(seed=3, batchnorm=True)
    eps = 8 / 255
    adv = pgd_linf(model, x, y, eps=eps, alpha=2 / 255, steps=5,
                   generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert _full_loss(model, adv, y) > _full_loss(model, x, y)
    assert model.training  # eval mode only during the attack
    again = pgd_linf(model, x, y, eps=eps, alpha=2 / 255, steps=5,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_at_step_updates_weights():
    x, y = _separable(16)
    model = _tiny_net(seed=4, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _weights(model)
    loss = make_train_step("pgd_at", steps=3)(model, x, y, opt)
    assert loss > 0 and _changed(before, model) and model.training


def test_caat_examples_keep_labels_inside_eps_and_step_updates_weights():
    x, y = _separable(16)
    model = _warm_net(x, y, steps=6)  # confident enough for both attacks to have room
    step = make_train_step("caat", iterations=3)
    assert isinstance(step, CAATStep) and step.eps == 0.1
    x_uca, x_oca = step.adversarial_examples(model, x)
    model.eval()
    with torch.no_grad():
        clean_pred = model(x).argmax(-1)
        conf = model(x).softmax(-1).max(-1).values
        conf_uca = model(x_uca).softmax(-1).max(-1).values
        conf_oca = model(x_oca).softmax(-1).max(-1).values
        assert torch.equal(model(x_uca).argmax(-1), clean_pred)
        assert torch.equal(model(x_oca).argmax(-1), clean_pred)
    model.train()
    for adv in (x_uca, x_oca):
        assert (adv - x).abs().max() <= 0.1 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
    # The attacks moved the confidence in their directions.
    assert conf_uca.mean() < conf.mean() < conf_oca.mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _weights(model)
    loss = step(model, x, y, opt)
    assert loss > 0 and _changed(before, model) and model.training
