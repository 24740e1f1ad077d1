"""Training-time defences as one-batch training steps (SPEC §8, paper Table 4).

:func:`make_train_step` builds a ``TrainStep``: a callable ``(model, images, labels,
optimizer) -> loss`` that runs the forward and backward passes AND ``optimizer.step()`` for one
batch (SAM needs two passes, so the step owns the update). It is called with the model in
train mode and plugs into :func:`calib.train.fit` as ``train_step=``.

Defences (:data:`TRAINING_DEFENCES`):
    * ``none``: cross-entropy.
    * ``label_smoothing``: cross-entropy with label smoothing (Szegedy et al. 2016).
    * ``dca``: difference between confidence and accuracy (Liang et al. 2020).
    * ``sam``: sharpness-aware minimisation (Foret et al. 2021).
    * ``pgd_at``: L-inf PGD adversarial training (Madry et al. 2018).
    * ``caat``: calibration-attack adversarial training (the paper's proposal): cross-entropy
      on white-box UCA and OCA examples generated on the fly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from calib.attacks import method_options, run_attack
from calib.attacks.pgd import pgd_linf
from calib.checks import (
    GradientMaskingWarning,
    check_bool,
    check_eps,
    check_int,
    check_number,
)

if TYPE_CHECKING:
    from calib.train import TrainStep

__all__ = [
    "TRAINING_DEFENCES",
    "CAATStep",
    "CrossEntropyStep",
    "DCAStep",
    "PGDATStep",
    "SAMStep",
    "make_train_step",
]

#: Names accepted by :func:`make_train_step`.
TRAINING_DEFENCES: tuple[str, ...] = ("none", "pgd_at", "caat", "dca", "sam", "label_smoothing")


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass(frozen=True)
class CrossEntropyStep:
    """Cross-entropy step, optionally with label smoothing (Szegedy et al. 2016).

    Attributes:
        smoothing: label-smoothing factor in [0, 1) (0 = plain cross-entropy).
    """

    smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_number("smoothing", self.smoothing, low=0, high=1, high_open=True)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> float:
        loss = F.cross_entropy(model(images), labels, label_smoothing=self.smoothing)
        return _update(loss, optimizer)


@dataclass(frozen=True)
class DCAStep:
    """DCA (Liang et al. 2020, "Improved trainable calibration method for neural networks").

    loss = CE + beta * |mean confidence - mean accuracy| over the batch; the accuracy term is
    a constant, so the penalty pulls the batch's mean confidence towards its accuracy.

    With beta = 10 the penalty dominates a model at chance level (it is minimised by uniform
    outputs, where mean confidence = accuracy = 1/K), so on tiny problems trained from scratch
    DCA can stall there; it is meant to refine a model that already learns (the paper
    fine-tunes pretrained networks).

    Attributes:
        beta: weight of the penalty (paper: 10).
    """

    beta: float = 10.0

    def __post_init__(self) -> None:
        check_number("beta", self.beta, low=0)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> float:
        logits = model(images)
        conf, pred = logits.softmax(-1).max(-1)
        acc = (pred == labels).to(conf.dtype)
        loss = F.cross_entropy(logits, labels) + self.beta * (conf.mean() - acc.mean()).abs()
        return _update(loss, optimizer)


@dataclass(frozen=True)
class SAMStep:
    """SAM, sharpness-aware minimisation (Foret et al. 2021), around any base optimizer.

    First pass: gradient g at w. Ascend to w + rho g / ||g|| (global L2 norm over all
    parameters), take the gradient there (second pass), restore w and let the given optimizer
    step with that gradient. Returns the first-pass loss.

    Attributes:
        rho: radius of the weight perturbation (paper: 0.05).
    """

    rho: float = 0.05

    def __post_init__(self) -> None:
        check_number("rho", self.rho, low=0, low_open=True)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                raise ValueError("SAM needs a model whose parameters receive gradients")
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            scale = self.rho / (norm + 1e-12)
            shifts = [None if p.grad is None else p.grad * scale for p in params]
            for p, e in zip(params, shifts, strict=True):
                if e is not None:
                    p.add_(e)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        with torch.no_grad():
            for p, e in zip(params, shifts, strict=True):
                if e is not None:
                    p.sub_(e)
        optimizer.step()
        return float(loss.detach())


@dataclass
class PGDATStep:
    """PGD adversarial training (Madry et al. 2018): CE on L-inf PGD examples of the batch.

    The examples are generated with the model in eval mode (so batch-norm statistics are not
    updated by the attack), then the model is trained on them in train mode.

    Defaults: eps = 8/255 (the standard L-inf budget for [0, 1] images, a little below the
    paper's calibration-attack eps of 0.05), alpha = 2/255, 10 steps, random start (the usual
    PGD-10 recipe).

    Attributes:
        eps, alpha, steps, random_start: the PGD settings (see
            :func:`calib.attacks.pgd.pgd_linf`).
        seed: seed of the generator that draws the random starts.
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_eps(self.eps, "linf")
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_int("steps", self.steps, minimum=0)
        check_bool("random_start", self.random_start)
        check_int("seed", self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> float:
        x_adv = pgd_linf(model, images, labels, eps=self.eps, alpha=self.alpha,
                         steps=self.steps, random_start=self.random_start,
                         generator=self.generator, check_gradients=False)
        return _update(F.cross_entropy(model(x_adv), labels), optimizer)


@dataclass
class CAATStep:
    """CAAT, calibration-attack adversarial training (the paper's proposal; SPEC §8).

    For every batch, white-box (PGD) UCA and OCA examples are generated on the fly with
    :func:`calib.attacks.run_attack` (label-preserving by construction: the attack accepts a
    step only if the clean prediction is kept), and the model is trained on
    loss = CE(f(x_uca), y) + CE(f(x_oca), y) with the true labels y (one forward pass over
    both halves, so batch-norm sees them together).

    Defaults follow the released code: eps = 0.1, 10 steps, alpha = 2/255.

    Attributes:
        eps: L-inf radius of both attacks.
        iterations: PGD steps per attack.
        alpha: PGD step size.
        seed: seed passed to the attacks (incremented per batch so batches differ).
        attack_options: further keyword options for ``run_attack`` (e.g. sparsification).
    """

    eps: float = 0.1
    iterations: int = 10
    alpha: float = 2 / 255
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)
    batches_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        check_eps(self.eps, "linf")
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_int("iterations", self.iterations, minimum=1)
        check_int("seed", self.seed)
        allowed = sorted(set(method_options("pgd")) - {"alpha"})
        unknown = sorted(set(self.attack_options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown attack_options {unknown} for CAAT; allowed: {allowed}")

    def adversarial_examples(self, model: nn.Module, images: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """White-box UCA and OCA examples (N, C, H, W) of ``images``, both detached."""
        # run_attack evaluates the model in eval mode and restores its modes afterwards.
        seed = self.seed + self.batches_seen
        # Training examples, not an evaluation: a vanished gradient on some samples only
        # means they add a clean-like example, so the masking warning is not raised here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientMaskingWarning)
            adv = [run_attack(model, images, kind=kind, method="pgd", eps=self.eps,
                              iterations=self.iterations, alpha=self.alpha, seed=seed,
                              **self.attack_options).x_adv.detach()
                   for kind in ("uca", "oca")]
        return adv[0], adv[1]

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> float:
        x_uca, x_oca = self.adversarial_examples(model, images)
        self.batches_seen += 1
        logits = model(torch.cat([x_uca, x_oca]))
        n = images.shape[0]
        loss = (F.cross_entropy(logits[:n], labels) + F.cross_entropy(logits[n:], labels))
        return _update(loss, optimizer)


#: name -> (step class, default options); "none" and "label_smoothing" share one class.
_STEPS: dict[str, tuple[type, dict[str, Any]]] = {
    "none": (CrossEntropyStep, {"smoothing": 0.0}),
    "label_smoothing": (CrossEntropyStep, {"smoothing": 0.1}),
    "dca": (DCAStep, {}),
    "sam": (SAMStep, {}),
    "pgd_at": (PGDATStep, {}),
    "caat": (CAATStep, {}),
}


def make_train_step(name: str, **options: Any) -> TrainStep:
    """Build the one-batch training step of the defence ``name``.

    Options and defaults: ``none`` (no options); ``label_smoothing``: smoothing=0.1;
    ``dca``: beta=10; ``sam``: rho=0.05; ``pgd_at``: eps=8/255, alpha=2/255, steps=10,
    random_start=True, seed=0; ``caat``: eps=0.1, iterations=10, alpha=2/255, seed=0,
    attack_options={}.

    Args:
        name: one of :data:`TRAINING_DEFENCES`.
        **options: keyword options of that defence.

    Returns:
        A callable ``(model, images, labels, optimizer) -> float`` (the batch loss).

    Raises:
        ValueError: unknown ``name`` or option, naming the allowed values.
    """
    if name not in _STEPS:
        raise ValueError(f"unknown training defence {name!r}; allowed: {list(TRAINING_DEFENCES)}")
    cls, defaults = _STEPS[name]
    allowed = sorted(f.name for f in fields(cls) if f.init)
    if name == "none":
        allowed = []
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for training defence {name!r}; allowed: {allowed}")
    return cls(**{**defaults, **options})
