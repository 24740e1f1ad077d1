"""The schema of ``params.yaml``: fail fast, before any work, naming the key and what is allowed.

One tree of pydantic models, one per section of params.yaml. Every model refuses keys it does
not know and values of the wrong type (strict: a bool is not an integer, a string is not a
number; an integer is a fine float), checks ranges, and checks names against the package's own
vocabularies (datasets, architectures, optimizers, attack settings and kinds, defences). Once
every section is valid, :class:`Params` checks the rules that tie sections together (model
names, attack settings, image counts). Any failure is one :class:`ConfigError` with one line
per problem, each naming the full dotted key, what is wrong and what is allowed; a misspelt
key gets the closest allowed one.

``check_params`` is run by :mod:`calib.pipeline` before every stage's notebook starts, and by
``python -m calib.config [params.yaml]`` on its own. ``python -m calib.config --schema`` writes
the schema as JSON Schema to ``params.schema.json``; the first line of params.yaml points the
YAML language server at it, so editors complete and check the file as it is typed.

The vocabularies live in modules that import torch and timm. They are read when a value is
checked or the JSON Schema is written, never on import, so importing this module stays cheap:
:func:`calib.pipeline.validate_params_once` imports it before deciding whether to validate.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core import core_schema as cs

__all__ = [
    "PROFILES",
    "SCHEMA_FILE",
    "ConfigError",
    "Params",
    "check_params",
    "load_params",
    "schema_text",
]

#: Where ``python -m calib.config --schema`` writes the JSON Schema (beside params.yaml).
SCHEMA_FILE = "params.schema.json"

#: The pipeline's scales: profiles/<name>.yaml, rendered into params.yaml by calib.profiles.
ProfileName = Literal["smoke", "default", "paper"]
PROFILES: tuple[str, ...] = get_args(ProfileName)

#: ``device``: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class ConfigError(ValueError):
    """A parameter is unknown, missing, of the wrong type or out of range (one line each)."""


# --- the package's vocabularies, read on first use --------------------------------------------

def _datasets() -> Sequence[str]:
    from calib.data import DATASETS

    return tuple(DATASETS)


def _optimizers() -> Sequence[str]:
    from calib.train import OPTIMIZERS

    return OPTIMIZERS


def _settings() -> Sequence[str]:
    from calib.attacks.grid import SETTINGS

    return SETTINGS


def _sweep_settings() -> Sequence[str]:
    from calib.analysis.sweeps import SWEEP_SETTINGS

    return SWEEP_SETTINGS


def _kinds() -> Sequence[str]:
    from calib.attacks import KINDS

    return KINDS


def _defences() -> Sequence[str]:
    from calib.defences.evaluate import DEFENCES

    return DEFENCES


def _training_defences() -> Sequence[str]:
    from calib.defences.evaluate import TRAINING_TIME_DEFENCES

    return TRAINING_TIME_DEFENCES


def _check_robustbench_model(name: str) -> None:
    from calib.defences.robust import check_options

    check_options(model_name=name)


def _parse_names(key: str, value: str, allowed: Sequence[str] | None) -> list[str]:
    from calib.attacks.grid import parse_names

    return parse_names(key, value, allowed)


@dataclass(frozen=True)
class _OneOf:
    """Annotation of a ``str``: one name of a vocabulary of the package (an enum in the JSON
    Schema)."""

    vocabulary: Callable[[], Sequence[str]]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler
                                     ) -> CoreSchema:
        return cs.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler
                                     ) -> JsonSchemaValue:
        return {**handler(schema), "enum": list(self.vocabulary())}

    def _check(self, value: str) -> str:
        allowed = list(self.vocabulary())
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; choose one of {allowed}")
        return value


@dataclass(frozen=True)
class _Names:
    """Annotation of a ``str``: comma-separated names of a vocabulary, e.g. "uca,oca".

    They stay one string in params.yaml because DVC renders them into command lines. The JSON
    Schema gets a pattern; the names are plain identifiers (letters, digits, "_", "-"), so they
    need no escaping in it.
    """

    vocabulary: Callable[[], Sequence[str]]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler
                                     ) -> CoreSchema:
        return cs.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler
                                     ) -> JsonSchemaValue:
        name = rf"\s*({'|'.join(self.vocabulary())})\s*"
        return {**handler(schema), "pattern": rf"^{name}(,{name})*$"}

    def _check(self, value: str, info: ValidationInfo) -> str:
        _parse_names(info.field_name or "value", value, self.vocabulary())
        return value


T = TypeVar("T")


def _distinct(values: list[T]) -> list[T]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"lists {repeated} more than once")
    return values


#: A non-empty list without repeats.
Distinct = Annotated[list[T], Field(min_length=1, json_schema_extra={"uniqueItems": True}),
                     AfterValidator(_distinct)]


def _float_not_int(value: Any) -> Any:
    # DVC writes ${item.eps} into file names as params.yaml spells it, the sweep names its files
    # by the float's repr: 1 and 1.0 would name two files for one eps.
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"write {value} as a float, {float(value)!r}: sweep files are named "
                         f"after the float (calib.analysis.sweeps.format_eps)")
    return value


# --- the sections -------------------------------------------------------------------------------

class _Section(BaseModel):
    """Strict, closed, documented: the settings every section of the schema shares."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class Data(_Section):
    """The dataset, where its raw files come from, and how it is split."""

    dataset: Annotated[str, _OneOf(_datasets)]
    """The dataset (Fashion-MNIST for the default profile)."""
    root: str
    """Folder of the raw files (data/raw)."""
    download: bool
    """Allow torchvision downloads when the files are not on disk."""
    mirror: str
    """Local folder holding <dataset>/ raw files (e.g. a lab's copy), copied in before any
    download; "" = none."""
    checksums: str
    """JSON file {raw path: MD5} replacing the published checksums (re-packaged files);
    "" = the published ones."""
    val_fraction: float = Field(gt=0, lt=1)
    """Fraction of the training images held out for validation (0.0833333: 5,000 of 60,000)."""
    attack_size: int = Field(ge=1)
    """The first N test images are attacked (paper: 500)."""
    subset_train: int = Field(ge=0)
    """0 = all training images; >0 keeps a seeded subset (smoke runs)."""

    @field_validator("mirror")
    @classmethod
    def _mirror_is_a_folder(cls, mirror: str) -> str:
        if mirror and not Path(mirror).is_dir():
            raise ValueError(f"{mirror!r} is not a folder; it should hold <dataset>/ with the "
                             f"raw files (\"\" for none)")
        return mirror

    @field_validator("checksums")
    @classmethod
    def _checksums_are_readable(cls, checksums: str) -> str:
        from calib.data import read_checksums

        read_checksums(checksums)
        return checksums


class Train(_Section):
    """Training hyper-parameters of one model (SPEC §7 recipe)."""

    epochs: int = Field(ge=1)
    """Passes over the training split."""
    batch_size: int = Field(ge=1)
    """Images per step."""
    optimizer: Annotated[str, _OneOf(_optimizers)]
    """SGD (Nesterov) or AdamW (for ViTs trained from scratch)."""
    lr: float = Field(gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(ge=0)
    """Weight decay."""
    warmup_epochs: float = Field(ge=0)
    """Epochs of linear learning-rate warm-up (may be fractional)."""
    augment_pad: int = Field(ge=0)
    """Random-crop padding in pixels (0 = no crop augmentation)."""
    augment_flip: bool
    """Random horizontal flips."""
    imbalance_ratio: float = Field(ge=1)
    """>1: long-tailed training set (head/tail class size ratio)."""


class Model(_Section):
    """One model: architecture, input size and training recipe."""

    arch: str
    """A calib zoo name (e.g. resnet18, vit_fmnist_d6) or a timm architecture name."""
    pretrained: bool
    """Start from timm's pretrained weights."""
    img_size: int = Field(ge=8)
    """Input side in pixels; images are resized to it."""
    train: Train
    """Training hyper-parameters."""
    attack_settings: Annotated[str, _Names(_settings)] | None = None
    """Settings the attack stage runs on this model (default: all of attack.settings). A model
    only the architecture/imbalance comparison reads needs only analysis.compare.setting."""

    @field_validator("arch")
    @classmethod
    def _arch_is_known(cls, arch: str) -> str:
        from calib.models import check_arch

        check_arch(arch)
        return arch


class TrainSeeds(_Section):
    """Independently trained copies of a model (the paper's a/b/c versions): how much a
    headline number moves when only the training seed changes."""

    seeds: int = Field(ge=1)
    """Models per architecture: the main checkpoint (trained with seed) and seeds - 1 copies
    trained the same way with seed + 1, seed + 2, ..."""
    models: Distinct[str]
    """Models that get the copies (keys of models)."""
    setting: Annotated[str, _OneOf(_settings)]
    """The headline attack's method-norm pair, run on every copy with the attack stage's
    budget and images."""
    kinds: Annotated[str, _Names(_kinds)]
    """Its attack kinds, comma-separated."""


class Attack(_Section):
    """The attack stage (SPEC §3-5); radii on the [0, 1] pixel scale."""

    settings: Annotated[str, _Names(_settings)]
    """Method-norm pairs, comma-separated (e.g. square-linf,square-l2,pgd-linf)."""
    kinds: Annotated[str, _Names(_kinds)]
    """Attack kinds, comma-separated (e.g. uca,oca,mma,rca)."""
    eps: float = Field(gt=0, le=1)
    """L-inf radius (the paper's eps)."""
    eps_l2: float = Field(gt=0)
    """L2 radius."""
    square_iterations: int = Field(ge=1)
    """Query budget per image (black-box Square Attack)."""
    square_p_init: float = Field(gt=0, le=1)
    """Square Attack's initial window (fraction of pixels; 0.05 is the ImageNet setting)."""
    pgd_iterations: int = Field(ge=1)
    """Gradient steps (white-box PGD)."""
    pgd_alpha: float = Field(gt=0)
    """PGD step size."""
    precision: Literal["fp32", "bf16", "tf32"] = "fp32"
    """What attack queries run in (fp32, bf16 autocast, TF32 on GPUs; falls back to fp32 where
    not native). Reported outcomes are re-read in fp32; see benchmarks/precision_check.py."""
    query_graph: Literal["eager", "frozen"] = "eager"
    """What Square's black-box queries run on in the attack, sweep, budget and seeds stages:
    the model itself, or a frozen fp32 TorchScript graph of it (CPU, BatchNorm models; others
    stay eager and say so). Needs precision fp32; see benchmarks/precision_check.py
    --query-graph frozen. Outcomes are re-read on the eager model."""


class FineTuneOverride(_Section):
    """One training-time defence's own fine-tuning recipe (keys left out keep the shared one)."""

    epochs: int | None = Field(default=None, ge=1)
    """Passes over the training subset."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the cosine schedule."""


class FineTune(_Section):
    """How training-time defences fine-tune the clean checkpoint."""

    epochs: int = Field(ge=1)
    """Passes over the (subset of the) training split."""
    subset: int = Field(ge=0)
    """Seeded subset of the training split (0 = all of it)."""
    batch_size: int = Field(ge=1)
    """Images per step."""
    lr: float = Field(gt=0)
    """Peak learning rate of the cosine schedule."""
    overrides: dict[Annotated[str, _OneOf(_training_defences)], FineTuneOverride] = {}
    """Per training-time defence, the epochs or learning rate it needs instead (e.g. DCA's
    calibration term is unstable at lr 0.01 and levels off at a lower rate over more epochs)."""


class SplineOptions(_Section):
    """Spline calibration (calib.defences.posthoc.SplineCalibration)."""

    n_knots: int = Field(ge=3)
    """Knots of the natural cubic spline."""


class AAAOptions(_Section):
    """Adaptive Attack Against (calib.defences.posthoc.AAA)."""

    tau: float = Field(gt=0)
    """Period of the attractors on the logit margin."""
    lr: float = Field(gt=0)
    """Adam learning rate."""
    steps: int = Field(ge=0)
    """Adam steps."""
    calib_weight: float = Field(ge=0)
    """Weight of the confidence-preservation term. (White-box attacks on AAA need no option:
    the defence stage tries masked, BPDA and transfer PGD and reports the strongest.)"""


class MDTSOptions(_Section):
    """Multi-domain temperature scaling (calib.defences.posthoc.MDTS)."""

    ridge: float = Field(ge=0)
    """Ridge penalty of the temperature regression."""


class LabelSmoothingOptions(_Section):
    """Label smoothing (calib.defences.training.CrossEntropyStep)."""

    smoothing: float = Field(ge=0, lt=1)
    """Label-smoothing factor (0 = plain cross-entropy)."""


class DCAOptions(_Section):
    """DCA, difference between confidence and accuracy (calib.defences.training.DCAStep)."""

    beta: float = Field(ge=0)
    """Weight of the penalty (paper: 10)."""


class SAMOptions(_Section):
    """Sharpness-aware minimisation (calib.defences.training.SAMStep)."""

    rho: float = Field(gt=0)
    """Radius of the weight perturbation (paper: 0.05)."""


class PGDATOptions(_Section):
    """PGD adversarial training (calib.defences.training.PGDATStep), at the evaluation's
    radius attack.eps (a defence is trained against the threat it is evaluated on)."""

    alpha: float = Field(gt=0)
    """PGD step size (Madry et al.'s rule 2.5 eps / steps: 0.025 at eps 0.1, 10 steps)."""
    steps: int = Field(ge=0)
    """PGD steps (10)."""


class CAATOptions(_Section):
    """Calibration-attack adversarial training (calib.defences.training.CAATStep), at the
    evaluation's radius attack.eps (the released code's 0.1 in the default profile)."""

    iterations: int = Field(ge=1)
    """PGD steps per attack (released code: 10)."""
    alpha: float = Field(gt=0)
    """PGD step size (released code: 2/255)."""


class RobustBenchOptions(_Section):
    """A robust pretrained CIFAR-100 model from RobustBench (calib.defences.robust): its own
    weights, not a defence of the clean checkpoint, attacked at its native 32 px. Paper profile
    only: the first run downloads the checkpoint (or put it in model_dir)."""

    model_name: str
    """RobustBench model id of its CIFAR-100 Linf zoo (e.g. Rebuffi2021Fixing_28_10_cutmix_ddpm);
    checked against robustbench's registry where defend.defences lists robustbench."""
    threat_model: Literal["Linf"]
    """RobustBench threat model: Linf only (the attacks' eps is an L-inf radius)."""
    model_dir: str = Field(min_length=1)
    """Checkpoint folder: <model_dir>/cifar100/Linf/<model_name>.pt, downloaded when absent."""


class DefenceOptions(_Section):
    """Per defence, the options its constructor takes (SPEC §8 defaults)."""

    spline: SplineOptions
    """Spline calibration."""
    aaa: AAAOptions
    """AAA."""
    mdts: MDTSOptions
    """MDTS."""
    label_smoothing: LabelSmoothingOptions
    """Label smoothing."""
    dca: DCAOptions
    """DCA."""
    sam: SAMOptions
    """SAM."""
    pgd_at: PGDATOptions
    """PGD adversarial training (PGD-10 at 8/255 with steps of 2/255)."""
    caat: CAATOptions
    """CAAT (released code: eps 0.1, 10 steps of 2/255)."""
    robustbench: RobustBenchOptions
    """RobustBench robust model (paper profile: Rebuffi et al. 2021's WideResNet-28-10)."""


class Defend(_Section):
    """The defence stage (SPEC §8, paper Table 4): each defence is fit or trained, then
    attacked."""

    models: Distinct[str]
    """Trained models to defend (keys of models)."""
    defences: Distinct[Annotated[str, _OneOf(_defences)]]
    """Defences to evaluate; "none" is the reference, "finetune" the control of the
    training-time ones."""
    settings: Annotated[str, _Names(_settings)]
    """Method-norm pairs, comma-separated: black-box Square queries the defended model,
    white-box PGD differentiates through it."""
    kinds: Annotated[str, _Names(_kinds)]
    """Attack kinds, comma-separated."""
    n_images: int = Field(ge=1)
    """The first N images of the attack split (at most data.attack_size)."""
    square_iterations: int = Field(ge=1)
    """Queries per image (eps and PGD step size: from attack)."""
    pgd_iterations: int = Field(ge=1)
    """Gradient steps."""
    mdts_val_size: int = Field(ge=1)
    """Validation images attacked (PGD UCA and OCA) to fit MDTS."""
    finetune: FineTune
    """Fine-tuning of the training-time defences."""
    options: DefenceOptions
    """Per defence, its options."""


class Sweep(_Section):
    """Paper Fig. 2: every attack at each eps (one stage per model x eps)."""

    models: Distinct[str]
    """Models swept (keys of models)."""
    eps: Distinct[Annotated[float, Field(gt=0, le=1), BeforeValidator(_float_not_int)]]
    """L-inf radii on the [0, 1] scale; write floats (file names use their repr)."""
    settings: Annotated[str, _Names(_sweep_settings)]
    """L-inf method-norm pairs, comma-separated."""
    kinds: Annotated[str, _Names(_kinds)]
    """Attack kinds, comma-separated."""
    n_images: int = Field(ge=1)
    """The first N images of the attack split (at most data.attack_size)."""
    square_iterations: int = Field(ge=1)
    """Queries per image of the eps sweep."""
    budgets: Distinct[Annotated[int, Field(ge=1)]]
    """Fig. 2's query axis: Square queries per image of dedicated runs (each its own run, as a
    user choosing that budget would run it) at attack.eps on the sweep's images. The point at
    square_iterations needs no entry when attack.eps is on the eps grid: the sweep's run there
    is that run, and the plot reads it."""
    pgd_iterations: int = Field(ge=1)
    """Gradient steps."""
    pgd_alpha_fraction: float = Field(gt=0, le=2)
    """PGD step = this x eps (0.4: 0.04 at eps 0.1, as in attack)."""


class Representations(_Section):
    """Class means and PCA of the penultimate features."""

    n_fit: int = Field(ge=10)
    """Clean training images for the class means and the PCA."""
    n_arrows: int = Field(ge=1)
    """Attacked images drawn as arrows in the projection."""


class Saliency(_Section):
    """Saliency maps before and after the attacks."""

    n_examples: int = Field(ge=1)
    """Images whose maps are drawn."""
    top_fraction: float = Field(gt=0, le=1)
    """Top-k pixel overlap (IoU) uses this fraction of each map."""


def _detectors() -> Sequence[str]:
    from calib.analysis.detection import DETECTORS

    return DETECTORS


class Detection(_Section):
    """Table 2: Mahalanobis, LID and SpectralDefense (ResNet only, as the paper)."""

    model: str
    """The model the detectors watch (a key of models)."""
    detectors: Annotated[str, _Names(_detectors)]
    """Detectors run against every attack, comma-separated (mahalanobis, lid, spectral)."""
    n_fit: int = Field(ge=10)
    """Clean training images the detectors are fit on (seeded subset)."""
    lid_k: int = Field(ge=2)
    """LID nearest neighbours (Ma et al. 2018); below n_fit."""
    norm_bins: int = Field(ge=1)
    """L2-norm bins per attack setting of the norm-matched family comparison."""


class Compare(_Section):
    """Architecture/size and class imbalance (every model is attacked)."""

    models: str
    """Models compared, comma-separated (keys of models)."""
    balanced: str
    """The model trained on the balanced set (a key of models)."""
    long_tailed: str
    """The same model trained on the long-tailed set (a key of models)."""
    setting: Annotated[str, _OneOf(_settings)]
    """Attack setting compared (one of attack.settings)."""


class Claims(_Section):
    """The paper's claims checked on the results."""

    main_models: str
    """The main models, comma-separated (keys of models)."""
    defence_model: str
    """The model whose defences are judged (one of defend.models)."""
    setting: Annotated[str, _OneOf(_settings)]
    """Attack setting the claims read (one of attack.settings)."""
    bound_images: int = Field(ge=1)
    """Images (the first N of the attack split, at most data.attack_size) that MMA with UCA
    minimising p_k (the push-to-the-bound variant) runs on, per main model."""
    bound_iterations: int = Field(ge=1)
    """That run's budget: Square queries or PGD steps, whichever the setting runs."""


class Analysis(_Section):
    """SPEC §9 characteristic analyses."""

    models: Distinct[str]
    """Models of the per-model analyses (representations, saliency; keys of models)."""
    setting: Annotated[str, _OneOf(_settings)]
    """Attack setting analysed (one of attack.settings)."""
    representations: Representations
    """Feature-space analysis."""
    saliency: Saliency
    """Saliency analysis."""
    detection: Detection
    """Adversarial-example detectors."""
    compare: Compare
    """Model comparison."""
    claims: Claims
    """Claims check."""


class Params(_Section):
    """Parameters of the Calibration Attacks pipeline (params.yaml, rendered from profiles/ by
    `python -m calib.profiles <profile>`)."""

    profile: ProfileName
    """The profile params.yaml was rendered from."""
    seed: int = Field(ge=0)
    """Seed of every random draw."""
    device: str = Field(json_schema_extra={"pattern": DEVICE_PATTERN})
    """auto (cuda when available), cpu, cuda or cuda:N."""
    data: Data
    """Dataset and splits."""
    models: dict[str, Model] = Field(min_length=1)
    """Per model name: architecture, then its training hyper-parameters."""
    train: TrainSeeds
    """Training seeds: copies of the main models trained with other seeds."""
    attack: Attack
    """The attack stage."""
    defend: Defend
    """The defence stage."""
    sweep: Sweep
    """The eps sweep."""
    analysis: Analysis
    """The characteristic analyses."""

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, device: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, device):
            raise ValueError(f"{device!r} is not allowed; choose 'auto', 'cpu' or 'cuda[:N]'")
        return device

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Params:
        """The rules that tie sections together, each reported at the key that breaks them."""
        errors: list[tuple[tuple[str | int, ...], Any, str]] = []
        names = list(self.models)

        def model_name(loc: tuple[str | int, ...], name: str) -> None:
            if name not in names:
                errors.append((loc, name, f"{name!r} is not a key of models; choose one of "
                                          f"{names}"))

        def model_names(loc: tuple[str | int, ...], value: str) -> None:
            try:
                _parse_names(str(loc[-1]), value, names)
            except ValueError as err:
                errors.append((loc, value, f"{err} (the keys of models)"))

        for section, listed in (("defend", self.defend.models), ("sweep", self.sweep.models),
                                ("analysis", self.analysis.models), ("train", self.train.models)):
            for i, name in enumerate(listed):
                model_name((section, "models", i), name)
        analysis = self.analysis
        model_name(("analysis", "detection", "model"), analysis.detection.model)
        model_names(("analysis", "compare", "models"), analysis.compare.models)
        model_name(("analysis", "compare", "balanced"), analysis.compare.balanced)
        model_name(("analysis", "compare", "long_tailed"), analysis.compare.long_tailed)
        model_names(("analysis", "claims", "main_models"), analysis.claims.main_models)
        if analysis.claims.defence_model not in self.defend.models:
            errors.append((("analysis", "claims", "defence_model"), analysis.claims.defence_model,
                           f"{analysis.claims.defence_model!r} is not defended; choose one of "
                           f"defend.models {self.defend.models}"))
        if "robustbench" in self.defend.defences:
            where = ("defend", "defences", self.defend.defences.index("robustbench"))
            if self.data.dataset != "cifar100":
                errors.append((where, "robustbench", f"'robustbench' loads a CIFAR-100 model of "
                               f"RobustBench; it needs data.dataset cifar100, not "
                               f"{self.data.dataset!r} (remove it from defend.defences)"))
            name = self.defend.options.robustbench.model_name
            try:
                _check_robustbench_model(name)
            except ValueError as err:
                errors.append((("defend", "options", "robustbench", "model_name"), name,
                               str(err).removeprefix("model_name ")))
        attacked = _parse_names("settings", self.attack.settings, _settings())
        for loc, setting in (
                (("train", "setting"), self.train.setting),
                (("analysis", "setting"), analysis.setting),
                (("analysis", "compare", "setting"), analysis.compare.setting),
                (("analysis", "claims", "setting"), analysis.claims.setting)):
            if setting not in attacked:
                errors.append((loc, setting, f"{setting!r} is not attacked; choose one of "
                                             f"attack.settings {attacked}"))
        errors += self._restricted_attacks(attacked)
        if self.attack.query_graph == "frozen" and self.attack.precision != "fp32":
            errors.append((("attack", "query_graph"), "frozen", "a frozen query graph runs in "
                           f"fp32; attack.precision is {self.attack.precision!r} (set "
                           "attack.precision to fp32 or attack.query_graph to eager)"))
        size = self.data.attack_size
        for section, n_images in (("defend", self.defend.n_images),
                                  ("sweep", self.sweep.n_images)):
            if n_images > size:  # both attack a prefix of the attack split
                errors.append(((section, "n_images"), n_images, f"{n_images} exceeds "
                               f"data.attack_size = {size} (images come from the attack split)"))
        if analysis.claims.bound_images > size:  # also a prefix of the attack split
            errors.append((("analysis", "claims", "bound_images"), analysis.claims.bound_images,
                           f"{analysis.claims.bound_images} exceeds data.attack_size = {size} "
                           "(images come from the attack split)"))
        detection = analysis.detection
        if detection.lid_k >= detection.n_fit:
            errors.append((("analysis", "detection", "lid_k"), detection.lid_k,
                           f"{detection.lid_k} must be below analysis.detection.n_fit = "
                           f"{detection.n_fit}"))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("cross_section", "{message}",
                                                          {"message": message}),
                                 loc=loc, input=value)
                for loc, value, message in errors])
        return self

    def _restricted_attacks(self, attacked: list[str]
                            ) -> list[tuple[tuple[str | int, ...], Any, str]]:
        """``models.<m>.attack_settings``: within attack.settings, and covering what reads it.

        The models whose whole attack grid is read (analysis.models, the detection model, the
        claims' main models) may not restrict it; a compared model must attack
        analysis.compare.setting and a model with training-seed copies train.setting.
        """
        analysis = self.analysis
        def names(text: str) -> set[str]:  # lists are checked elsewhere; read them leniently
            return {name.strip() for name in text.split(",") if name.strip()}

        whole = {*self.analysis.models, analysis.detection.model,
                 *names(analysis.claims.main_models)}
        compared = names(analysis.compare.models)
        errors: list[tuple[tuple[str | int, ...], Any, str]] = []
        for name, model in self.models.items():
            if model.attack_settings is None:
                continue
            loc = ("models", name, "attack_settings")
            chosen = sorted(names(model.attack_settings))  # the field checked the names
            if name in whole:
                errors.append((loc, model.attack_settings, f"{name!r} is read by the analyses "
                               "(analysis.models, analysis.detection.model or "
                               "analysis.claims.main_models), which need every setting of "
                               "attack.settings; remove the key"))
                continue
            needed = [*([analysis.compare.setting] if name in compared else []),
                      *([self.train.setting] if name in self.train.models else [])]
            for setting in chosen:
                if setting not in attacked:
                    errors.append((loc, setting, f"{setting!r} is not attacked; choose from "
                                                 f"attack.settings {attacked}"))
            for setting in needed:
                if setting not in chosen:
                    errors.append((loc, model.attack_settings, f"must include {setting!r} "
                                   f"(read by the analyses of {name!r})"))
        return errors


# --- readable messages ----------------------------------------------------------------------------

#: pydantic's type errors -> what the key must be.
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
             "dict_type": "a mapping", "model_type": "a mapping"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _one_line(text: str) -> str:
    """A docstring's text on one line (messages are one line per problem)."""
    return " ".join(text.split())


def _dotted(loc: Sequence[str | int]) -> str:
    """("sweep", "eps", 1) -> "sweep.eps[1]"; a mapping's bad key ends its path (pydantic
    adds "[key]" after it)."""
    text = ""
    for key in loc:
        if key == "[key]":
            continue
        text += f"[{key}]" if isinstance(key, int) else f".{key}" if text else str(key)
    return text or "(top level)"


def _node(loc: Sequence[str | int]) -> tuple[Any, list[Any]]:
    """The type the schema expects at ``loc`` and its constraints; (None, []) if none."""
    annotation: Any = Params
    metadata: list[Any] = []
    for key in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(key))
            if field is None:
                return None, []
            annotation, metadata = field.annotation, list(field.metadata)
        elif get_origin(annotation) in (list, dict):
            annotation, metadata = get_args(annotation)[-1], []
        else:
            return None, []
        while get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return annotation, metadata


def _bounds(metadata: Sequence[Any]) -> str:
    """The range the constraints allow: "in (0, 1]", ">= 1", or "" when unbounded."""
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low = ("(", ">", item.gt)
        elif isinstance(item, annotated_types.Ge):
            low = ("[", ">=", item.ge)
        elif isinstance(item, annotated_types.Lt):
            high = (")", "<", item.lt)
        elif isinstance(item, annotated_types.Le):
            high = ("]", "<=", item.le)
    if low and high:
        return f"in {low[0]}{low[2]}, {high[2]}{high[0]}"
    bound = low or high
    return f"{bound[1]} {bound[2]}" if bound else ""


def _message(error: ErrorDetails) -> str:
    """One readable line for one pydantic error: the dotted key, what is wrong, what is
    allowed."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    path = _dotted(loc)
    if kind == "extra_forbidden":
        parent, _ = _node(loc[:-1])
        allowed = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"in {_dotted(loc[:-1])}" if loc[:-1] else "at the top level"
        return f"{path}: unknown key; {hint}allowed {where}: {', '.join(allowed)}"
    if kind == "missing":
        parent, _ = _node(loc[:-1])
        field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
        described = f". {_one_line(field.description)}" if field and field.description else ""
        return f"{path}: missing key{described}"
    if kind in _EXPECTED:
        bounds = _bounds(_node(loc)[1])
        return f"{path}: must be {_EXPECTED[kind]}{' ' + bounds if bounds else ''}, " \
               f"got {value!r}"
    if kind in _RANGE_ERRORS:
        return f"{path}: {value!r} is out of range; must be {_bounds(_node(loc)[1])}"
    if kind == "too_short":
        return f"{path}: must not be empty"
    if kind == "literal_error":
        return f"{path}: {value!r} is not allowed; choose one of {error['ctx']['expected']}"
    if kind == "value_error":
        return f"{path}: {error['ctx']['error']}"
    return f"{path}: {error['msg']}"


# --- checking and loading ---------------------------------------------------------------------

def check_params(params: Mapping[str, Any]) -> None:
    """Validate a parsed params.yaml against :class:`Params`.

    Raises:
        ConfigError: one line per problem, each naming the dotted key, what is wrong and what
            is allowed.
    """
    try:
        Params.model_validate(params)
    except ValidationError as err:
        raise ConfigError("\n".join(_message(e) for e in err.errors(include_url=False))
                          ) from None


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file; the parsed mapping as it is in the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no parameters file at {p}")
    try:
        params = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    check_params(params)
    return params


def schema_text() -> str:
    """The JSON Schema of params.yaml, as ``python -m calib.config --schema`` writes it."""
    def tidy(node: Any) -> Any:  # descriptions come from docstrings: one line each
        if isinstance(node, dict):
            return {k: _one_line(v) if k == "description" and isinstance(v, str) else tidy(v)
                    for k, v in node.items()}
        return [tidy(v) for v in node] if isinstance(node, list) else node

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              **tidy(Params.model_json_schema())}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.config",
                                     description="Check a params file against the schema.")
    parser.add_argument("params", nargs="?", default="params.yaml",
                        help="the file to check (default: params.yaml)")
    parser.add_argument("--schema", action="store_true",
                        help=f"write the JSON Schema of params.yaml to {SCHEMA_FILE} instead")
    args = parser.parse_args(argv)
    if args.schema:
        from calib.io import write_text

        write_text(SCHEMA_FILE, schema_text())
        print(f"wrote {SCHEMA_FILE}")
        return 0
    try:
        load_params(args.params)
    except ConfigError as err:
        lines = "".join(f"\n  {line}" for line in str(err).splitlines())
        print(f"invalid configuration in {args.params}:{lines}", file=sys.stderr)
        return 2
    print(f"{args.params}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
