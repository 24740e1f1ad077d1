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
     effect of a defence can be told apart from the effect of fine-tuning at all.

2. :func:`evaluate_defence` runs every calibration attack (UCA, OCA, MMA, RCA) in every
   setting on the defended model: black-box Square Attack querying the DEFENDED model's
   scores, and white-box PGD through its gradients. How PGD gets those gradients is recorded
   per defence (:attr:`DefendedModel.white_box`): ``exact`` for differentiable defences,
   ``bpda`` for AAA, which is not differentiable (it masks gradients; the adaptive attacker
   passes the gradient of the undefended logits straight through, Athalye et al. 2018), and
   ``T held constant`` for Compression Scaling, whose per-input temperature is solved by
   bisection and treated as a constant.

Example:
    >>> defended = build_defence("cs", model)
    >>> ev = evaluate_defence(defended, images, labels, grid=AttackGrid(), model_name="resnet")
    >>> ev.summaries[0]["ece_after"]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from calib.attacks import run_attack
from calib.attacks.grid import AttackGrid, GridRun, run_grid
from calib.checks import check_choice, check_int, check_number
from calib.defences.posthoc import POSTHOC, CalibratedModel, Recalibrator, make_recalibrator
from calib.defences.training import make_train_step
from calib.runtime import predict_logits
from calib.train import fit

__all__ = [
    "DEFENCES",
    "POSTHOC_DEFENCES",
    "TRAINING_TIME_DEFENCES",
    "DefenceEvaluation",
    "DefendedModel",
    "FineTune",
    "attacked_domains",
    "build_defence",
    "check_options",
    "defence_family",
    "evaluate_defence",
    "findings",
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

#: Every defence name, in the order of the tables and figures.
DEFENCES: tuple[str, ...] = (NO_DEFENCE, *POSTHOC_DEFENCES, *TRAINING_TIME_DEFENCES)

#: Training steps whose adversarial examples are drawn from a seeded generator.
_SEEDED_STEPS = ("pgd_at", "caat")


def defence_family(name: str) -> str:
    """"none", "posthoc" or "training" for a defence of :data:`DEFENCES`."""
    check_choice("defence", name, DEFENCES)
    if name == NO_DEFENCE:
        return "none"
    return "posthoc" if name in POSTHOC_DEFENCES else "training"


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a defence's options by building it; returns them as a plain dict.

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
    return opts


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


@dataclass
class DefendedModel:
    """A classifier with a defence applied: images (N, C, H, W) in [0, 1] -> logits (N, K).

    Attributes:
        name: the defence (one of :data:`DEFENCES`).
        family: "none", "posthoc" or "training".
        model: the defended classifier; the attacks query it.
        white_box: how white-box PGD gets its gradients through the defence: "exact",
            "bpda" (AAA's adaptive variant), "masked" (AAA without it: zero gradients) or
            "T held constant" (Compression Scaling).
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
                the weights changed (training-time defences).
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
    for kind in ("uca", "oca"):
        result = run_attack(model, images, kind=kind, method="pgd", eps=eps,
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
    """Fit or train the defence ``name`` around ``model`` (whose weights are left untouched).

    Args:
        name: one of :data:`DEFENCES`.
        model: the clean classifier, images in [0, 1] -> logits.
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
        device: where fine-tuning runs.
        show_progress: progress bars while fine-tuning.

    Returns:
        A :class:`DefendedModel` in eval mode.

    Raises:
        ValueError: unknown name or option, or the inputs that defence needs are missing.
    """
    family = defence_family(name)
    opts = check_options(name, options or {})
    start = time.perf_counter()
    if family == "none":
        return DefendedModel(name, family, model.eval())
    if family == "posthoc":
        recal = make_recalibrator(name, **opts)
        if name == "mdts":
            if not domains:
                raise ValueError("defence 'mdts' needs domains=attacked_domains(...) "
                                 "(clean, UCA- and OCA-attacked validation logits)")
            recal.fit_domains(domains)  # type: ignore[attr-defined]
        elif name in ("temperature", "spline"):
            if val_logits is None or val_labels is None:
                raise ValueError(f"defence {name!r} needs val_logits and val_labels to fit on")
            recal.fit(val_logits, val_labels)
        white_box = "exact"
        if name == "aaa":
            white_box = "bpda" if opts.get("bpda", False) else "masked"
        elif name == "cs":
            white_box = "T held constant"
        return DefendedModel(name, family, CalibratedModel(model.eval(), recal).eval(),
                             white_box=white_box, recalibrator=recal,
                             params={"options": opts, **recal.params()},
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


def evaluate_defence(defended: DefendedModel, images: torch.Tensor, labels: torch.Tensor, *,
                     grid: AttackGrid, model_name: str, seed: int = 0,
                     batch_size: int = 256, show_progress: bool = False) -> DefenceEvaluation:
    """Attack a defended model with every kind in every setting of ``grid``.

    Black-box settings query the defended model's scores; white-box PGD differentiates
    through it (see :attr:`DefendedModel.white_box`). Every run uses the same ``seed``, so
    the defences of one table face identical attack randomness.

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
    summaries = [{"defence": defended.name, "family": defended.family,
                  "white_box": defended.white_box if s["method"] == "pgd" else None, **s}
                 for s in run.summaries(model=model_name)]
    return DefenceEvaluation(summaries, run)


# ---------------------------------------------------------------------------------------------
# Reading Table 4
# ---------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return f"{x:.3f}"


def findings(table: pd.DataFrame, *, reference: str = NO_DEFENCE) -> list[str]:
    """Key sentences about one model's Table 4, each computed from the table itself.

    Args:
        table: :func:`calib.reporting.table4` rows of ONE model (columns defence, setting,
            attack, ece_before, ece_after, conf_after, ...).
        reference: the undefended row the others are compared with.

    Returns:
        Markdown sentences: per setting, the defence with the lowest mean post-attack ECE and
        the attack each defence fares worst against; how the defences compare with the
        reference on clean data and after the attacks; and, where those defences were run,
        what Compression Scaling and AAA did.
    """
    if table.empty:
        return ["No defence was evaluated."]
    if table["model"].nunique() > 1:
        raise ValueError("findings() reads one model's table; filter it by model first")
    out: list[str] = []
    has_ref = reference in set(table["defence"])
    for setting, part in table.groupby("setting", sort=True):
        mean_after = part.groupby("defence", sort=False)["ece_after"].mean()
        clean = part.groupby("defence", sort=False)["ece_before"].first()
        best = mean_after.idxmin()
        line = (f"**{setting}**: the lowest post-attack ECE averaged over the attacks is "
                f"**{best}** ({_fmt(mean_after[best])})")
        if has_ref:
            ref_after = mean_after[reference]
            line += f", against {_fmt(ref_after)} without a defence"
            helped = [d for d in mean_after.index if d != reference and mean_after[d] < ref_after]
            hurt = [d for d in mean_after.index if d != reference and mean_after[d] > ref_after]
            line += (f". Lower than the undefended model's: {', '.join(helped) or 'none'}; "
                     f"higher: {', '.join(hurt) or 'none'}")
            better_clean = [d for d in clean.index if d != reference
                            and clean[d] < clean[reference]]
            line += (f". On clean inputs (ECE {_fmt(clean[reference])} undefended), better "
                     f"calibrated: {', '.join(better_clean) or 'none'}.")
        else:
            line += "."
        out.append(line)
        worst = part.loc[part.groupby("defence", sort=False)["ece_after"].idxmax()]
        pairs = "; ".join(f"{r.defence}: {r.attack} ({_fmt(r.ece_after)})"
                          for r in worst.itertuples())
        out.append(f"**{setting}**, the attack that hurts each defence most: {pairs}.")
    out += _cs_findings(table, reference) + _aaa_findings(table, reference)
    return out


def _cs_findings(table: pd.DataFrame, reference: str) -> list[str]:
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
        clean_cmp = "higher" if c["ece_before"].iloc[0] > r["ece_before"].iloc[0] else "lower"
        sentence = (f"**CS, {setting}**: clean ECE {_fmt(c['ece_before'].iloc[0])} vs "
                    f"{_fmt(r['ece_before'].iloc[0])} undefended ({clean_cmp})")
        if "UCA" in c.index and "UCA" in r.index:
            uca_cmp = "lower" if c.loc["UCA", "ece_after"] < r.loc["UCA", "ece_after"] \
                else "not lower"
            sentence += (f"; after UCA {_fmt(c.loc['UCA', 'ece_after'])} vs "
                         f"{_fmt(r.loc['UCA', 'ece_after'])} undefended ({uca_cmp})")
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
    gradient = str(white["white_box"].iloc[0])
    out = (f"**AAA**: mean post-attack ECE {_fmt(black['ece_after'].mean())} against the "
           f"black-box attacks and {_fmt(white['ece_after'].mean())} against white-box PGD "
           f"({gradient} gradients)")
    ref = table[table["defence"] == reference]
    if not ref.empty:
        out += (f"; undefended: {_fmt(ref[ref['white_box'].isna()]['ece_after'].mean())} "
                f"and {_fmt(ref[ref['white_box'].notna()]['ece_after'].mean())}")
    success = black["success_rate"].mean()
    return [out + f". Black-box success rate against AAA: {success:.0%}."]

