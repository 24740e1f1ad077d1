"""Defences under calibration attacks (paper Table 4; SPEC §8): build, then attack, a defence.

Two steps, each one call from the defence stage's notebook:

1. :func:`build_defence` turns a defence name into a :class:`DefendedModel`, a classifier that
   maps images in [0, 1] (N, C, H, W) to logits (N, K):

   * ``none``: the clean checkpoint as it is (the reference row of the table);
   * post-hoc (:data:`POSTHOC_DEFENCES`): a recalibrator fit on the stored validation logits
     and put behind the classifier with :class:`~calib.defences.CalibratedModel`, so attacks
     query the defended model. MDTS also needs UCA- and OCA-attacked validation logits
     (:func:`attacked_domains`);
   * training-time (:data:`TRAINING_TIME_DEFENCES`): the clean checkpoint fine-tuned for a few
     epochs with the defence's training step (:func:`calib.defences.make_train_step`).
     ``finetune`` is the control: the same fine-tuning with plain cross-entropy, so that the
     effect of a defence can be told apart from the effect of fine-tuning at all;
   * robust models (:data:`ROBUST_MODELS`): not a defence of the clean checkpoint but a robust
     pretrained model with its own weights (``robustbench``: a RobustBench CIFAR-100 L-inf
     model, :mod:`calib.defences.robust`; paper profile only, it needs internet), attacked at
     its native resolution (:func:`input_shape`).

2. :func:`evaluate_defence` runs every calibration attack (UCA, OCA, MMA, RCA) in every
   setting on the defended model: black-box Square Attack querying the DEFENDED model's
   scores, and white-box PGD adapted to the defence (Carlini et al. 2019, Tramer et al.
   2020): besides PGD through the defended model's own gradients (recorded as
   :attr:`DefendedModel.white_box`: ``exact``, ``exact, clamped`` for splines, ``masked``
   for AAA, ``T held constant`` for Compression Scaling), a post-hoc defence is attacked
   with BPDA (the recalibrator's backward pass replaced by the identity) and AAA also by an
   attack on the undefended model scored through it (:func:`white_box_attacks`). Every
   candidate is scored by a fresh forward pass through the defended model and the strongest
   is reported, by name.

Example:
    >>> defended = build_defence("cs", model)
    >>> ev = evaluate_defence(defended, images, labels, grid=AttackGrid(), model_name="resnet")
    >>> ev.summaries[0]["ece_after"]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from calib.attacks import AttackResult, run_attack
from calib.attacks.base import reevaluate
from calib.attacks.grid import AttackGrid, GridRun, run_grid, split_setting
from calib.attacks.pgd import pgd_linf
from calib.checks import check_choice, check_int, check_number
from calib.defences import robust
from calib.defences.posthoc import POSTHOC, CalibratedModel, Recalibrator, make_recalibrator
from calib.defences.training import make_train_step
from calib.runtime import predict_logits
from calib.train import fit

__all__ = [
    "ADAPTIVE_REASONS",
    "ADVERSARIAL_TRAINING",
    "DEFENCES",
    "MDTS_DOMAIN_SETTING",
    "POSTHOC_DEFENCES",
    "ROBUST_MODELS",
    "TRAINING_TIME_DEFENCES",
    "WHITE_BOX_ATTACKS",
    "DefenceEvaluation",
    "DefendedModel",
    "FineTune",
    "StraightThrough",
    "adaptive_reason",
    "attacked_domains",
    "build_defence",
    "check_options",
    "defence_family",
    "evaluate_defence",
    "findings",
    "finetune_recipe",
    "input_shape",
    "options_at",
    "robust_accuracy",
    "training_evidence",
    "white_box_attacks",
]

#: The undefended reference.
NO_DEFENCE = "none"

#: Post-hoc recalibrators (fit on validation logits, nothing retrained).
POSTHOC_DEFENCES: tuple[str, ...] = tuple(POSTHOC)

#: Training-time defences -> the training step they fine-tune with.
_TRAIN_STEPS: dict[str, str] = {
    "finetune": "none",
    "label_smoothing": "label_smoothing",
    "dca": "dca",
    "sam": "sam",
    "pgd_at": "pgd_at",
    "caat": "caat",
}
TRAINING_TIME_DEFENCES: tuple[str, ...] = tuple(_TRAIN_STEPS)

#: Robust pretrained models with weights of their own (not derived from the clean checkpoint),
#: attacked like the defences: RobustBench's (:mod:`calib.defences.robust`, needs internet).
ROBUST_MODELS: tuple[str, ...] = ("robustbench",)

#: Every defence name, in the order of the tables and figures.
DEFENCES: tuple[str, ...] = (NO_DEFENCE, *POSTHOC_DEFENCES, *TRAINING_TIME_DEFENCES,
                             *ROBUST_MODELS)

#: Training steps whose adversarial examples are drawn from a seeded generator.
_SEEDED_STEPS = ("pgd_at", "caat")


def defence_family(name: str) -> str:
    """"none", "posthoc", "training" or "robust" (a robust pretrained model, not a defence of
    the clean checkpoint) for a defence of :data:`DEFENCES`."""
    check_choice("defence", name, DEFENCES)
    if name == NO_DEFENCE:
        return "none"
    if name in ROBUST_MODELS:
        return "robust"
    return "posthoc" if name in POSTHOC_DEFENCES else "training"


def input_shape(name: str, spec: Mapping[str, Any]) -> dict[str, int]:
    """``img_size`` and ``in_chans`` of the images the defended model takes.

    A robust model takes its own native input (RobustBench's CIFAR-100 models: 32x32 RGB), so
    it is attacked at that resolution; every other defence wraps the clean model, whose
    ``spec`` (its model.json) says.
    """
    if defence_family(name) == "robust":
        return {"img_size": robust.IMG_SIZE, "in_chans": robust.IN_CHANS}
    return {"img_size": int(spec["img_size"]), "in_chans": int(spec["in_chans"])}


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a defence's options by building it; returns them as a plain dict (a robust
    model's are checked against its registry, nothing loaded, and completed with defaults).

    Raises:
        ValueError: unknown defence, unknown option or a value out of range (the message of
            the defence's own constructor, which names the option and what it allows).
    """
    family = defence_family(name)
    opts = dict(options)
    if name in (NO_DEFENCE, "finetune") and opts:
        raise ValueError(f"defence {name!r} takes no options, got {sorted(opts)}")
    if family == "posthoc":
        make_recalibrator(name, **opts)
    elif family == "training":
        make_train_step(_TRAIN_STEPS[name], **opts)
    elif family == "robust":  # completed with the defaults (model_dir)
        try:
            opts = robust.check_options(**opts)
        except TypeError as err:
            raise ValueError(f"bad options for {name!r}: {err}; allowed: "
                             f"['model_name', 'threat_model', 'model_dir']") from None
    return opts


#: Adversarial-training defences: trained at the evaluation's L-inf radius.
ADVERSARIAL_TRAINING: tuple[str, ...] = ("pgd_at", "caat")

#: The attack setting MDTS's attacked domains are made with (:func:`attacked_domains`).
MDTS_DOMAIN_SETTING = "pgd-linf"


def options_at(name: str, options: Mapping[str, Any], *, eps: float) -> dict[str, Any]:
    """The defence's options with the evaluation's radius ``eps`` set where it trains on it.

    PGD-AT and CAAT train on adversarial examples; trained at another radius than the one
    they are attacked at, a success or a failure would say little (SPEC §10, fair defences).
    Giving ``eps`` in their options as well is an error, not silently overridden.
    """
    opts = dict(options)
    if name in ADVERSARIAL_TRAINING:
        if "eps" in opts:
            raise ValueError(f"defence {name!r} trains at the evaluation's eps ({eps}); "
                             f"remove 'eps' from its options")
        opts["eps"] = eps
    return check_options(name, opts)


# ---------------------------------------------------------------------------------------------
# Building a defended model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FineTune:
    """How training-time defences fine-tune the clean checkpoint (SGD + Nesterov + cosine).

    Attributes:
        epochs: passes over the (subset of the) training split.
        batch_size: images per step.
        lr: peak learning rate of the cosine schedule.
        weight_decay: L2 penalty of SGD.
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)


def finetune_recipe(name: str, finetune: Mapping[str, Any]) -> FineTune:
    """The fine-tuning recipe of defence ``name`` from params.yaml's ``defend.finetune``.

    Args:
        name: the defence (one of :data:`DEFENCES`).
        finetune: ``{"epochs", "batch_size", "lr"[, "overrides"]}``; ``overrides`` maps a
            training-time defence to the ``epochs`` and/or ``lr`` it uses instead of the
            shared ones (other keys: ``subset``, read by the caller, are ignored here).

    Returns:
        The :class:`FineTune` recipe ``name`` is trained with.

    Raises:
        ValueError: an override names a defence that is not trained, or a key other than
            ``epochs`` and ``lr``.
    """
    overrides = dict(finetune.get("overrides") or {})
    for key, override in overrides.items():
        if key not in TRAINING_TIME_DEFENCES:
            raise ValueError(f"defend.finetune.overrides: {key!r} is not a training-time "
                             f"defence; choose from {list(TRAINING_TIME_DEFENCES)}")
        unknown = sorted(set(override) - {"epochs", "lr"})
        if unknown:
            raise ValueError(f"defend.finetune.overrides.{key}: unknown keys {unknown}; "
                             f"allowed: ['epochs', 'lr']")
    own = {k: v for k, v in overrides.get(name, {}).items() if v is not None}
    return FineTune(epochs=own.get("epochs", finetune["epochs"]),
                    batch_size=finetune["batch_size"], lr=own.get("lr", finetune["lr"]))


@dataclass
class DefendedModel:
    """A classifier with a defence applied: images (N, C, H, W) in [0, 1] -> logits (N, K).

    Attributes:
        name: the defence (one of :data:`DEFENCES`).
        family: "none", "posthoc", "training" or "robust" (a robust pretrained model of its
            own, which takes images of its native size: :func:`input_shape`).
        model: the defended classifier; the attacks query it.
        white_box: what autograd's gradient through the defence is: "exact", "exact,
            clamped" (splines: zero where the output is clamped at 1), "masked" (AAA: zero),
            "bpda" (AAA built with ``bpda=True``) or "T held constant" (Compression
            Scaling). :func:`evaluate_defence` tries stronger attacks where it is not exact.
        recalibrator: the fitted post-hoc method, for post-hoc defences.
        params: fitted parameters and options, JSON-ready.
        history: per-epoch fine-tuning records, for training-time defences.
        seconds: wall time spent fitting or fine-tuning.
    """

    name: str
    family: str
    model: nn.Module
    white_box: str = "exact"
    recalibrator: Recalibrator | None = None
    params: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def test_logits(self, base_logits: torch.Tensor, data: Dataset | torch.Tensor | None = None,
                    *, device: str | torch.device = "cpu", batch_size: int = 512
                    ) -> torch.Tensor:
        """The defended model's logits (N, K) on a test set, on the CPU.

        Args:
            base_logits: (N, K) the undefended model's logits on that set (stored by the
                training stage); enough for "none" and the post-hoc defences.
            data: the test images (a dataset or an (N, C, H, W) tensor), needed only when
                the weights changed (training-time defences, robust models: at the size
                :func:`input_shape` gives).
            device: where a training-time defence's model runs.
            batch_size: images per forward pass.
        """
        if self.family == "none":
            return base_logits
        if self.recalibrator is not None:
            return self.recalibrator(base_logits)
        if data is None:
            raise ValueError(f"defence {self.name!r} changed the weights: pass the test data")
        return predict_logits(self.model, data, batch_size=batch_size, device=device)


def attacked_domains(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     eps: float, iterations: int, alpha: float | None = None, seed: int = 0,
                     batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MDTS's domains: clean, UCA- and OCA-attacked logits of a validation subset.

    The undefended model is attacked white-box (PGD, L-inf), the way an MDTS user anticipates
    the attacks it should be robust to (Yu et al. 2022 fit on clean and corrupted domains).

    Args:
        model: the undefended classifier.
        images: (N, C, H, W) validation images in [0, 1], on the model's device.
        labels: (N,) their true labels.
        eps, iterations, alpha: the PGD budget.
        seed: seed of the attacks.
        batch_size: images per attack chunk and per forward pass.

    Returns:
        ``{"clean": (logits, labels), "uca": ..., "oca": ...}``, logits (N, K) float32 on the
        CPU and labels (N,) int64, ready for :meth:`calib.defences.MDTS.fit_domains`.
    """
    labels = labels.detach().cpu().long()
    options = {} if alpha is None else {"alpha": alpha}
    domains = {"clean": (predict_logits(model, images, batch_size=batch_size,
                                        device=images.device), labels)}
    method, norm = split_setting(MDTS_DOMAIN_SETTING)
    for kind in ("uca", "oca"):
        result = run_attack(model, images, kind=kind, method=method, norm=norm, eps=eps,
                            iterations=iterations, labels=labels, seed=seed,
                            batch_size=batch_size, **options)
        domains[kind] = (predict_logits(model, result.x_adv, batch_size=batch_size,
                                        device=images.device), labels)
    return domains


def build_defence(
    name: str,
    model: nn.Module,
    *,
    options: Mapping[str, Any] | None = None,
    val_logits: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    domains: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
    finetune: FineTune | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
) -> DefendedModel:
    """Fit or train the defence ``name`` around ``model`` (whose weights are left untouched),
    or load the robust model ``name`` names (:data:`ROBUST_MODELS`: its own weights).

    Args:
        name: one of :data:`DEFENCES`.
        model: the clean classifier, images in [0, 1] -> logits (not used by robust models).
        options: the defence's keyword options (see :func:`check_options`); for AAA,
            ``bpda`` chooses how white-box attacks see it.
        val_logits, val_labels: (N, K) and (N,) validation logits and labels of ``model``
            (post-hoc defences other than MDTS fit on them).
        domains: MDTS only, e.g. :func:`attacked_domains` of a validation subset.
        train_data, val_data: training-time defences only: the (subset of the) training
            split to fine-tune on, and the validation split that picks the best epoch.
        finetune: the fine-tuning recipe (default :class:`FineTune`).
        seed: seed of the fine-tuning (data order) and of the adversarial examples PGD-AT
            and CAAT generate.
        device: where fine-tuning runs (and where a robust model is put).
        show_progress: progress bars while fine-tuning.

    Returns:
        A :class:`DefendedModel` in eval mode.

    Raises:
        ValueError: unknown name or option, or the inputs that defence needs are missing.
        FileNotFoundError: a robust model's checkpoint is absent and cannot be downloaded.
    """
    family = defence_family(name)
    opts = check_options(name, options or {})
    start = time.perf_counter()
    if family == "none":
        return DefendedModel(name, family, model.eval())
    if family == "robust":  # its own weights: ``model`` is not used
        from importlib.metadata import version

        net = robust.load_robust_model(**opts, device=device)
        return DefendedModel(name, family, net, params={
            "options": opts, "source": f"RobustBench {version('robustbench')}",
            "dataset": robust.DATASET, "img_size": robust.IMG_SIZE,
            "checkpoint": str(robust.checkpoint_path(opts["model_name"], opts["model_dir"])),
            "parameters": sum(p.numel() for p in net.parameters())},
            seconds=time.perf_counter() - start)
    if family == "posthoc":
        recal = make_recalibrator(name, **opts)
        if name == "mdts":
            if not domains:
                raise ValueError("defence 'mdts' needs domains=attacked_domains(...) "
                                 "(clean, UCA- and OCA-attacked validation logits)")
            recal.fit_domains(domains)  # type: ignore[attr-defined]
        elif name in ("temperature", "spline", "aaa"):  # AAA: its anchor's temperature
            if val_logits is None or val_labels is None:
                raise ValueError(f"defence {name!r} needs val_logits and val_labels to fit on")
            recal.fit(val_logits, val_labels)
        white_box = "exact"
        if name == "aaa":
            white_box = "bpda" if opts.get("bpda", False) else "masked"
        elif name == "spline":
            white_box = "exact, clamped"
        elif name == "cs":
            white_box = "T held constant"
        fitted_on = {"domain_setting": MDTS_DOMAIN_SETTING} if name == "mdts" else {}
        return DefendedModel(name, family, CalibratedModel(model.eval(), recal).eval(),
                             white_box=white_box, recalibrator=recal,
                             params={"options": opts, **fitted_on, **recal.params()},
                             seconds=time.perf_counter() - start)
    if train_data is None or val_data is None:
        raise ValueError(f"training-time defence {name!r} needs train_data and val_data")
    recipe = finetune or FineTune()
    step_name = _TRAIN_STEPS[name]
    step_opts = {**({"seed": seed} if step_name in _SEEDED_STEPS else {}), **opts}
    net = copy.deepcopy(model)
    result = fit(net, train_data, val_data, epochs=recipe.epochs, batch_size=recipe.batch_size,
                 lr=recipe.lr, weight_decay=recipe.weight_decay, seed=seed, device=device,
                 train_step=make_train_step(step_name, **step_opts),
                 show_progress=show_progress)
    params = {"options": opts, "train_step": step_name, "epochs": recipe.epochs,
              "batch_size": recipe.batch_size, "lr": recipe.lr,
              "weight_decay": recipe.weight_decay, "train_size": len(train_data),  # type: ignore[arg-type]
              "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy}
    return DefendedModel(name, family, net.eval(), params=params, history=result.history,
                         seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Evaluating a defended model under attack
# ---------------------------------------------------------------------------------------------

@dataclass
class DefenceEvaluation:
    """Outcome of :func:`evaluate_defence`.

    Attributes:
        summaries: one flat dict per (setting, kind): :meth:`AttackResult.summary` plus
            ``model``, ``defence``, ``family``, ``setting`` and ``white_box`` (how PGD got
            its gradients; None for black-box settings).
        run: the grid's outcome (per-sample records: :meth:`GridRun.records`).
    """

    summaries: list[dict[str, Any]]
    run: GridRun

    @property
    def seconds(self) -> float:
        """Wall time of all attacks."""
        return self.run.seconds


#: White-box attacks, by name: "exact" differentiates through the defended model as it is
#: (whatever gradient autograd gives: zero through a masking defence, T held constant through
#: Compression Scaling); "bpda" replaces the recalibrator's backward pass by the identity
#: (straight-through, Athalye et al. 2018: the attack follows the undefended logits' gradient
#: while every step is still accepted or rejected on the defended outputs); "transfer" runs the
#: whole attack on the undefended model and scores its final images through the defence (the
#: defence's outputs never steer the attacker, which defeats AAA's reversed-margin trap).
WHITE_BOX_ATTACKS: tuple[str, ...] = ("exact", "bpda", "transfer")

#: Why each defence gets the white-box attacks it gets (one sentence per defence, for Table 4).
ADAPTIVE_REASONS: dict[str, str] = {
    "none": "no defence: exact gradients are the white-box attack.",
    "temperature": "a constant rescaling of the logits: exact gradients are informative.",
    "spline": "the spline's output is clamped at confidence 1, so the most confident inputs get "
              "vanishing gradients; BPDA passes the undefended gradient through the clamp.",
    "cs": "the per-input temperature is found by bisection (held constant by autograd); BPDA "
          "follows the undefended gradient instead.",
    "aaa": "AAA optimises the logits per input and reverses the margin trend an attacker sees, "
           "so its gradient is zero (masked) and greedy steps on its outputs are misled; BPDA "
           "and an attack on the undefended model scored through AAA avoid both.",
    "mdts": "a temperature regressed from logit features, differentiable end to end: exact "
            "gradients; BPDA checks that they are not weaker than the undefended ones.",
    "robustbench": "a robust pretrained model of its own (RobustBench), no post-processing: "
                   "exact gradients at its native 32 px are the white-box attack.",
}
_TRAINING_REASON = ("new weights, no post-processing: exact gradients of the fine-tuned model "
                    "are the white-box attack.")


def white_box_attacks(defended: DefendedModel) -> tuple[str, ...]:
    """The white-box attacks tried against ``defended`` (a subset of :data:`WHITE_BOX_ATTACKS`).

    Every post-hoc defence other than temperature scaling gets "exact" and "bpda"; AAA also
    gets "transfer". The undefended model, temperature scaling, the training-time
    defences (new weights, nothing between the network and its logits) and the robust models
    get "exact".
    """
    if defended.family != "posthoc" or defended.name == "temperature":
        return ("exact",)
    if defended.name == "aaa":
        return WHITE_BOX_ATTACKS
    return ("exact", "bpda")


def adaptive_reason(defended: DefendedModel) -> str:
    """One sentence: why the white-box attacks of :func:`white_box_attacks` fit this defence."""
    return ADAPTIVE_REASONS.get(defended.name, _TRAINING_REASON)


class StraightThrough(nn.Module):
    """A defended model whose backward pass skips the recalibrator (BPDA with the identity).

    ``forward(x)`` returns exactly ``recalibrator(model(x))``, but its gradient is that of
    ``model(x)``: ``z + (r(z) - z).detach()`` (Athalye et al. 2018, arXiv:1802.00420).
    """

    def __init__(self, model: nn.Module, recalibrator: Recalibrator) -> None:
        super().__init__()
        self.model = model
        self.recalibrator = recalibrator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return z + (self.recalibrator(z.detach()) - z).detach()


def _strength(result: AttackResult, labels: torch.Tensor) -> tuple[float, float]:
    """How much an attack hurt: (ECE after, success rate), compared lexicographically."""
    s = result.summary(labels, intervals=False)
    return (s["ece_after"], s["success_rate"])


def evaluate_defence(defended: DefendedModel, images: torch.Tensor, labels: torch.Tensor, *,
                     grid: AttackGrid, model_name: str, seed: int = 0,
                     batch_size: int = 256, show_progress: bool = False) -> DefenceEvaluation:
    """Attack a defended model with every kind in every setting of ``grid``, adaptively.

    Black-box settings query the defended model's scores. For each white-box (PGD) setting
    every attack of :func:`white_box_attacks` runs with the same budget and seed, each is
    scored by a fresh forward pass through the DEFENDED model, and the strongest (highest
    post-attack ECE, then highest success rate) is the one reported, with its name in
    ``white_box`` (the exact attack under :attr:`DefendedModel.white_box`'s name: "masked"
    for AAA, "T held constant" for CS, "exact, clamped" for splines) and every candidate's
    ECE in ``ece_after_<attack>``. Every run uses the
    same ``seed``, so the defences of one table face identical attack randomness.

    Args:
        defended: from :func:`build_defence`.
        images: (N, C, H, W) clean images in [0, 1] on the model's device.
        labels: (N,) true labels (MMA needs them; the summaries use them for ECE and KS).
        grid: the settings, kinds, radii and budgets (:class:`calib.attacks.grid.AttackGrid`).
        model_name: recorded in every summary.
        seed: seed of every attack.
        batch_size: images per attack chunk.
        show_progress: progress bars per attack.
    """
    run = run_grid(defended.model, images, labels, grid, seed=seed, batch_size=batch_size,
                   show_progress=show_progress)
    attacks = white_box_attacks(defended)
    white = [s for s in grid.settings if split_setting(s)[0] == "pgd"]
    tried: dict[tuple[str, str], dict[str, AttackResult]] = {
        key: {"exact": result} for key, result in run.results.items() if key[0] in white}
    exact_name = defended.white_box  # "exact", or "masked" / "T held constant" where it is not
    if white and len(attacks) > 1:
        pgd_grid = replace(grid, settings=tuple(white))
        recal = defended.recalibrator
        base = defended.model.model if isinstance(defended.model, CalibratedModel) else None
        if recal is None or base is None:
            raise ValueError(f"defence {defended.name!r}: adaptive attacks need a post-hoc "
                             "recalibrator behind the classifier")
        surrogates = {"bpda": StraightThrough(base, recal).eval(), "transfer": base}
        for attack in attacks[1:]:
            extra = run_grid(surrogates[attack], images, labels, pgd_grid, seed=seed,
                             batch_size=batch_size, show_progress=show_progress)
            for key, result in extra.results.items():
                # Scored on the defended model, whatever the attack differentiated.
                tried[key][attack] = reevaluate(result, defended.model, batch_size=batch_size)
    chosen: dict[tuple[str, str], str] = {}
    for key, candidates in tried.items():
        best = max(candidates, key=lambda a: _strength(candidates[a], run.labels))
        run.results[key] = candidates[best]
        chosen[key] = best
    summaries = []
    for (setting, kind), s in zip(run.results, run.summaries(model=model_name), strict=True):
        row = {"defence": defended.name, "family": defended.family, "white_box": None, **s}
        # A defence fit on attacked data (MDTS) is told apart on the attacks it was fit on.
        domain = defended.params.get("domain_setting")
        row["attack_seen_in_fit"] = None if domain is None else setting == domain
        if (setting, kind) in tried:
            best = chosen[setting, kind]
            row["white_box"] = exact_name if best == "exact" else best
            for attack, result in tried[setting, kind].items():
                row[f"ece_after_{attack}"] = result.summary(run.labels,
                                                            intervals=False)["ece_after"]
        summaries.append(row)
    return DefenceEvaluation(summaries, run)


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    eps: float, steps: int = 20, alpha: float | None = None, seed: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """Per-image correctness under ordinary L-inf PGD: bool (N,) on the CPU.

    The evidence that adversarial training worked (SPEC §10, fair defences; Madry et al.
    2018): the true-label cross-entropy is ascended from a random start in the eps-ball
    (:func:`calib.attacks.pgd.pgd_linf`, all ``steps`` steps), and the image counts as
    robust if the model still predicts its label. Compare defences on the same images with
    a paired bootstrap (:func:`calib.stats.paired_difference`).

    Args:
        model: images in [0, 1] (N, C, H, W) -> logits (N, K).
        images: (N, C, H, W) clean images in [0, 1] on the model's device.
        labels: (N,) true labels.
        eps: the L-inf radius (the evaluation's).
        steps: PGD steps.
        alpha: step size (default ``2.5 * eps / steps``, Madry et al.'s rule).
        seed: seed of the random start.
        batch_size: images per chunk.
    """
    check_int("steps", steps, minimum=1)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    labels = labels.detach().cpu().long()
    generator = torch.Generator().manual_seed(seed)
    correct = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        y = labels[start:start + batch_size].to(x.device)
        adv = pgd_linf(model, x, y, eps=eps, alpha=alpha, steps=steps, generator=generator)
        pred = predict_logits(model, adv, batch_size=batch_size, device=x.device).argmax(1)
        correct.append(pred == y.cpu())
    return torch.cat(correct)


def training_evidence(runs: Mapping[str, Mapping[str, Any]], *, reference: str = NO_DEFENCE,
                      n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Did each defence with new weights train, and does it resist ordinary PGD? (Table 4 notes)

    Args:
        runs: defence -> its ``summary.json`` (the defence stage's), with ``robust`` (per-image
            correctness under ordinary PGD at the evaluation eps, or None) and
            ``levelled_off`` (per curve, or None).
        reference: the undefended row; robust accuracies are compared with it, paired on the
            same images (:func:`calib.stats.paired_difference`).

    Returns:
        One row per defence with a robust accuracy: ``robust_accuracy`` with its 95% interval,
        ``vs_undefended`` (difference and interval, points of accuracy), ``outcome``
        ("higher", "lower", "within noise"; "reference" for the reference), ``levelled_off``
        ("val loss and accuracy", one of them, "no", or empty for the reference),
        ``fine_tuning`` (the recipe from ``params``: epochs, steps, batch, peak lr; empty
        for rows not fine-tuned), and
        ``verdict``: for adversarial training "worked" when the robust accuracy is above the
        undefended model's beyond noise, "failed" otherwise; "not adversarial training" for
        the other rows.
    """
    from calib.stats import bootstrap_interval, paired_difference

    if reference not in runs or not runs[reference].get("robust"):
        raise ValueError(f"the reference {reference!r} has no robust accuracy to compare with")
    base = runs[reference]["robust"]
    rows = []
    for name, run in runs.items():
        robust = run.get("robust")
        if not robust:
            continue
        if robust["eps"] != base["eps"] or len(robust["correct"]) != len(base["correct"]):
            raise ValueError(f"{name}: robust accuracy measured unlike {reference!r}'s "
                             "(eps or images differ); rerun the defence stage")
        correct = [float(c) for c in robust["correct"]]
        row: dict[str, Any] = {"defence": name, "family": run.get("family"),
                               "eps": robust["eps"], "pgd_steps": robust["steps"],
                               **bootstrap_interval("accuracy", correct, n_resamples=n_resamples,
                                                    seed=seed).to_columns("robust_accuracy")}
        if name != reference:
            cmp = paired_difference("accuracy", correct, [float(c) for c in base["correct"]],
                                    n_resamples=n_resamples, seed=seed)
            row.update({**cmp.difference.to_columns("vs_undefended"), "outcome": cmp.outcome})
        else:
            row["outcome"] = "reference"
        params = run.get("params") or {}
        if "epochs" in params:  # fine-tuned: the recipe the table's notes quote
            steps = -(-int(params["train_size"]) // int(params["batch_size"]))
            row["fine_tuning"] = (f"{params['epochs']} epochs x {steps} steps "
                                  f"(batch {params['batch_size']}), lr {params['lr']:g}")
        else:
            row["fine_tuning"] = ""
        flags = run.get("levelled_off") or {}
        row["levelled_off"] = ("" if not flags else "val loss and accuracy" if all(
            flags.values()) else ", ".join(k for k, v in flags.items() if v) or "no")
        # the verdict judges adversarial training only; other rows say so instead of NaN
        row["verdict"] = (("worked" if row["outcome"] == "higher" else "failed")
                          if name in ADVERSARIAL_TRAINING else "not adversarial training")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Reading Table 4
# ---------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _judged(part: pd.DataFrame, outcome_col: str, diff: str) -> str:
    groups = []
    for outcome in ("lower", "higher", "within noise"):
        rows = part[part[outcome_col] == outcome]
        names = ", ".join(f"{r['defence']} ({r[diff]:+.3f} [{r[diff + '_lo']:+.3f}, "
                          f"{r[diff + '_hi']:+.3f}])" for _, r in rows.iterrows())
        groups.append(f"{outcome}: {names or 'none'}")
    return "; ".join(groups)


def findings(table: pd.DataFrame, *, paired: pd.DataFrame | None = None,
             reference: str = NO_DEFENCE) -> list[str]:
    """Key sentences about one model's Table 4, each computed from the tables themselves.

    Args:
        table: :func:`calib.reporting.table4` rows of ONE model (columns defence, setting,
            attack, ece_before, ece_after, conf_after, ...).
        paired: every defence against ``reference`` on the same images, per setting
            (:func:`calib.analysis.claims.defence_comparison` of one setting's records, with a
            ``setting`` column): ``diff`` (mean post-attack ECE, defence - undefended) and
            ``clean_diff`` with their 95% paired-bootstrap intervals and outcomes ("lower",
            "higher", "within noise"). Without it no sentence says a defence is above or
            below the undefended model: a difference of means over a few hundred images can
            be noise (SPEC §10).
        reference: the undefended row the others are compared with.

    Returns:
        Markdown sentences: per setting, the defence with the lowest mean post-attack ECE and
        the attack each defence fares worst against; with ``paired``, which defences lower or
        raise the post-attack and the clean ECE beyond noise and which are within noise; and,
        where those defences were run, what Compression Scaling and AAA did.
    """
    if table.empty:
        return ["No defence was evaluated."]
    if table["model"].nunique() > 1:
        raise ValueError("findings() reads one model's table; filter it by model first")
    if paired is not None:
        need = {"defence", "setting", "diff", "diff_lo", "diff_hi", "outcome", "clean_diff",
                "clean_diff_lo", "clean_diff_hi", "clean_outcome"}
        if not need <= set(paired.columns):
            raise ValueError(f"paired lacks column(s) {sorted(need - set(paired.columns))}")
    out: list[str] = []
    has_ref = reference in set(table["defence"])
    for setting, part in table.groupby("setting", sort=True):
        mean_after = part.groupby("defence", sort=False)["ece_after"].mean()
        best = mean_after.idxmin()
        line = (f"**{setting}**: the lowest post-attack ECE averaged over the attacks is "
                f"**{best}** ({_fmt(mean_after[best])})")
        if has_ref:
            line += f", against {_fmt(mean_after[reference])} without a defence"
        out.append(line + ".")
        judged = (paired[(paired["setting"] == setting) & (paired["defence"] != reference)]
                  if paired is not None else pd.DataFrame())
        if not judged.empty:
            out.append(f"**{setting}**, mean post-attack ECE against the undefended model on the "
                       f"same images (difference, paired 95% interval): "
                       f"{_judged(judged, 'outcome', 'diff')}.")
            out.append(f"**{setting}**, clean ECE on the same images against the undefended "
                       f"model: {_judged(judged, 'clean_outcome', 'clean_diff')}.")
        worst = part.loc[part.groupby("defence", sort=False)["ece_after"].idxmax()]
        pairs = "; ".join(f"{r.defence}: {r.attack} ({_fmt(r.ece_after)})"
                          for r in worst.itertuples())
        out.append(f"**{setting}**, the attack that hurts each defence most: {pairs}.")
    out += _cs_findings(table, reference, paired) + _aaa_findings(table, reference)
    return out


def _cs_findings(table: pd.DataFrame, reference: str,
                 paired: pd.DataFrame | None = None) -> list[str]:
    cs = table[table["defence"] == "cs"]
    if cs.empty:
        return []
    out = []
    lowest = cs["conf_after"].min()
    out.append(f"**CS** keeps every confidence in [0.8, 1] by construction: its lowest mean "
               f"confidence after any attack is {_fmt(lowest)}.")
    ref = table[table["defence"] == reference]
    if ref.empty:
        return out
    for setting in sorted(set(cs["setting"]) & set(ref["setting"])):
        c = cs[cs["setting"] == setting].set_index("attack")
        r = ref[ref["setting"] == setting].set_index("attack")
        sentence = (f"**CS, {setting}**: clean ECE {_fmt(c['ece_before'].iloc[0])} vs "
                    f"{_fmt(r['ece_before'].iloc[0])} undefended")
        row = (paired[(paired["setting"] == setting) & (paired["defence"] == "cs")]
               if paired is not None else pd.DataFrame())
        if not row.empty:  # judged on the same images (paired), not on the two means
            row = row.iloc[0]
            sentence += (f" (paired difference {row['clean_diff']:+.3f} "
                         f"[{row['clean_diff_lo']:+.3f}, {row['clean_diff_hi']:+.3f}]: "
                         f"{row['clean_outcome']})")
        if "UCA" in c.index and "UCA" in r.index:
            sentence += (f"; after UCA {_fmt(c.loc['UCA', 'ece_after'])} vs "
                         f"{_fmt(r.loc['UCA', 'ece_after'])} undefended")
        if "OCA" in c.index and "OCA" in r.index:
            sentence += (f"; after OCA {_fmt(c.loc['OCA', 'ece_after'])} vs "
                         f"{_fmt(r.loc['OCA', 'ece_after'])}")
        out.append(sentence + ".")
    return out


def _aaa_findings(table: pd.DataFrame, reference: str) -> list[str]:
    aaa = table[table["defence"] == "aaa"]
    if aaa.empty:
        return []
    black = aaa[aaa["white_box"].isna()]
    white = aaa[aaa["white_box"].notna()]
    if black.empty or white.empty:
        return []
    winners = ", ".join(f"{name} ({count}x)" for name, count in
                        white["white_box"].value_counts(sort=True).items())
    out = (f"**AAA**: mean post-attack ECE {_fmt(black['ece_after'].mean())} against the "
           f"black-box attacks and {_fmt(white['ece_after'].mean())} against the strongest "
           f"white-box attack per kind (winning: {winners})")
    ref = table[table["defence"] == reference]
    if not ref.empty:
        out += (f"; undefended: {_fmt(ref[ref['white_box'].isna()]['ece_after'].mean())} "
                f"and {_fmt(ref[ref['white_box'].notna()]['ece_after'].mean())}")
    success = black["success_rate"].mean()
    return [out + f". Black-box success rate against AAA: {success:.0%}."]

