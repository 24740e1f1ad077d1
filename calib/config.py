"""Validation of ``params.yaml``: fail fast, before any work, naming the key and what is allowed.

``check_params`` is run by :mod:`calib.pipeline` before every stage's notebook starts, and by
``python -m calib.config [params.yaml]`` on its own. Each top-level section has one checker;
a section a checker does not know is left alone, so stages can be added section by section.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A parameter is missing, of the wrong type or out of range."""


def _get(section: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in section:
        raise ConfigError(f"missing parameter {prefix}.{key}")
    return section[key]


def require_choice(value: Any, allowed: Iterable[str], key: str) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {allowed}")


def require_int(value: Any, key: str, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def require_number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ConfigError(f"{key} = {value} is out of range; allowed: {interval}")


def require_bool(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _check_top(params: Mapping[str, Any]) -> None:
    require_int(_get(params, "seed", "params"), "seed", minimum=0)
    device = _get(params, "device", "params")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfigError(f"device = {device!r} is not allowed; choose 'auto', 'cpu' or 'cuda[:N]'")


def _check_data(data: Mapping[str, Any]) -> None:
    from calib.data import DATASETS

    require_choice(_get(data, "dataset", "data"), sorted(DATASETS), "data.dataset")
    if not isinstance(_get(data, "root", "data"), str):
        raise ConfigError("data.root must be a path string")
    require_bool(_get(data, "download", "data"), "data.download")
    mirror = _get(data, "mirror", "data")
    if not isinstance(mirror, str):
        raise ConfigError(f"data.mirror must be a folder path string (\"\" for none), "
                          f"got {mirror!r}")
    if mirror and not Path(mirror).is_dir():
        raise ConfigError(f"data.mirror = {mirror!r} is not a folder; it should hold "
                          f"<dataset>/ with the raw files (\"\" for none)")
    checksums = _get(data, "checksums", "data")
    if not isinstance(checksums, str):
        raise ConfigError(f"data.checksums must be a path string to a JSON file (\"\" for the "
                          f"published checksums), got {checksums!r}")
    if checksums:
        from calib.data import read_checksums

        try:
            read_checksums(checksums)
        except ValueError as err:
            raise ConfigError(f"data.checksums: {err}") from None
    require_number(_get(data, "val_fraction", "data"), "data.val_fraction", low=0, high=1,
                   low_open=True, high_open=True)
    require_int(_get(data, "attack_size", "data"), "data.attack_size", minimum=1)
    require_int(_get(data, "subset_train", "data"), "data.subset_train", minimum=0)


def _check_models(models: Mapping[str, Any]) -> None:
    from calib.models import check_arch

    if not isinstance(models, Mapping) or not models:
        raise ConfigError("models must map model names to {arch, pretrained, img_size, train}")
    for name, spec in models.items():
        prefix = f"models.{name}"
        arch = _get(spec, "arch", prefix)
        try:
            check_arch(arch)
        except ValueError as err:
            raise ConfigError(f"{prefix}.arch: {err}") from None
        require_bool(_get(spec, "pretrained", prefix), f"{prefix}.pretrained")
        require_int(_get(spec, "img_size", prefix), f"{prefix}.img_size", minimum=8)
        _check_train(_get(spec, "train", prefix), f"{prefix}.train")


def _check_train(spec: Mapping[str, Any], prefix: str) -> None:
    from calib.train import OPTIMIZERS

    require_int(_get(spec, "epochs", prefix), f"{prefix}.epochs", minimum=1)
    require_int(_get(spec, "batch_size", prefix), f"{prefix}.batch_size", minimum=1)
    require_choice(_get(spec, "optimizer", prefix), OPTIMIZERS, f"{prefix}.optimizer")
    require_number(_get(spec, "lr", prefix), f"{prefix}.lr", low=0, low_open=True)
    require_number(_get(spec, "weight_decay", prefix), f"{prefix}.weight_decay", low=0)
    require_number(_get(spec, "warmup_epochs", prefix), f"{prefix}.warmup_epochs", low=0)
    require_int(_get(spec, "augment_pad", prefix), f"{prefix}.augment_pad", minimum=0)
    require_bool(_get(spec, "augment_flip", prefix), f"{prefix}.augment_flip")
    require_number(_get(spec, "imbalance_ratio", prefix), f"{prefix}.imbalance_ratio", low=1)


#: The method-norm pairs the attack stage runs.
ATTACK_SETTINGS = ("square-linf", "square-l2", "pgd-linf")


def _check_attack(attack: Mapping[str, Any]) -> None:
    from calib.attacks import KINDS

    for key, allowed in (("settings", ATTACK_SETTINGS), ("kinds", KINDS)):
        value = _get(attack, key, "attack")
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise ConfigError(f"attack.{key} is empty; choose from {list(allowed)}")
        for item in items:
            require_choice(item, allowed, f"attack.{key} item")
    require_number(_get(attack, "eps", "attack"), "attack.eps", low=0, high=1,
                   low_open=True)
    require_number(_get(attack, "eps_l2", "attack"), "attack.eps_l2", low=0, low_open=True)
    require_int(_get(attack, "square_iterations", "attack"), "attack.square_iterations",
                minimum=1)
    require_number(_get(attack, "square_p_init", "attack"), "attack.square_p_init", low=0,
                   high=1, low_open=True)
    require_int(_get(attack, "pgd_iterations", "attack"), "attack.pgd_iterations", minimum=1)
    require_number(_get(attack, "pgd_alpha", "attack"), "attack.pgd_alpha", low=0,
                   low_open=True)


#: The options of each defence that the defence stage passes to its notebook (all required).
DEFEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "spline": ("n_knots",),
    "aaa": ("tau", "lr", "steps", "calib_weight", "bpda"),
    "mdts": ("ridge",),
    "label_smoothing": ("smoothing",),
    "dca": ("beta",),
    "sam": ("rho",),
    "pgd_at": ("eps", "alpha", "steps"),
    "caat": ("eps", "iterations", "alpha"),
}


def _comma_items(value: Any, key: str, allowed: Iterable[str]) -> list[str]:
    allowed = list(allowed)
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise ConfigError(f"{key} is empty; choose from {allowed}")
    for item in items:
        require_choice(item, allowed, f"{key} item")
    return items


def _name_list(value: Any, key: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list; choose from {allowed}")
    for item in value:
        require_choice(item, allowed, f"{key} item")
    duplicates = sorted({v for v in value if value.count(v) > 1})
    if duplicates:
        raise ConfigError(f"{key} lists {duplicates} more than once")


def _check_defend(defend: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    from calib.attacks import KINDS
    from calib.defences.evaluate import DEFENCES, SETTINGS, check_options

    if not isinstance(defend, Mapping):
        raise ConfigError("defend must be a mapping (models, defences, settings, ...)")
    _name_list(_get(defend, "models", "defend"), "defend.models", list(params["models"]))
    _name_list(_get(defend, "defences", "defend"), "defend.defences", DEFENCES)
    _comma_items(_get(defend, "settings", "defend"), "defend.settings", SETTINGS)
    _comma_items(_get(defend, "kinds", "defend"), "defend.kinds", KINDS)
    n_images = _get(defend, "n_images", "defend")
    require_int(n_images, "defend.n_images", minimum=1)
    attack_size = params["data"]["attack_size"]
    if n_images > attack_size:
        raise ConfigError(f"defend.n_images = {n_images} exceeds data.attack_size = "
                          f"{attack_size} (the defences are attacked on the attack split)")
    for key in ("square_iterations", "pgd_iterations", "mdts_val_size"):
        require_int(_get(defend, key, "defend"), f"defend.{key}", minimum=1)
    finetune = _get(defend, "finetune", "defend")
    if not isinstance(finetune, Mapping):
        raise ConfigError("defend.finetune must be a mapping (epochs, subset, batch_size, lr)")
    require_int(_get(finetune, "epochs", "defend.finetune"), "defend.finetune.epochs",
                minimum=1)
    require_int(_get(finetune, "subset", "defend.finetune"), "defend.finetune.subset",
                minimum=0)
    require_int(_get(finetune, "batch_size", "defend.finetune"),
                "defend.finetune.batch_size", minimum=1)
    require_number(_get(finetune, "lr", "defend.finetune"), "defend.finetune.lr", low=0,
                   low_open=True)
    options = _get(defend, "options", "defend")
    if not isinstance(options, Mapping):
        raise ConfigError(f"defend.options must map defences to their options: "
                          f"{sorted(DEFEND_OPTIONS)}")
    unknown = sorted(set(options) - set(DEFEND_OPTIONS))
    if unknown:
        raise ConfigError(f"defend.options has unknown defence(s) {unknown}; allowed: "
                          f"{sorted(DEFEND_OPTIONS)}")
    for name, keys in DEFEND_OPTIONS.items():
        prefix = f"defend.options.{name}"
        opts = _get(options, name, "defend.options")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{prefix} must be a mapping with keys {list(keys)}")
        extra = sorted(set(opts) - set(keys))
        if extra:
            raise ConfigError(f"{prefix} has unknown option(s) {extra}; allowed: {list(keys)}")
        for key in keys:
            _get(opts, key, prefix)
        if name == "aaa":  # AAA would take any truthy value
            require_bool(opts["bpda"], f"{prefix}.bpda")
        try:
            check_options(name, opts)
        except ValueError as err:
            raise ConfigError(f"{prefix}: {err}") from None


def _check_sweep(params: Mapping[str, Any]) -> None:
    from calib.analysis.sweeps import check_sweep_params

    check_sweep_params(params)


def _check_analysis(analysis: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    if not isinstance(analysis, Mapping):
        raise ConfigError("analysis must be a mapping (models, setting, representations, ...)")
    names = list(params["models"])
    attacked = _comma_items(params["attack"]["settings"], "attack.settings", ATTACK_SETTINGS)
    _name_list(_get(analysis, "models", "analysis"), "analysis.models", names)
    require_choice(_get(analysis, "setting", "analysis"), attacked, "analysis.setting")
    rep = _get(analysis, "representations", "analysis")
    require_int(_get(rep, "n_fit", "analysis.representations"), "analysis.representations.n_fit",
                minimum=10)
    require_int(_get(rep, "n_arrows", "analysis.representations"),
                "analysis.representations.n_arrows", minimum=1)
    sal = _get(analysis, "saliency", "analysis")
    require_int(_get(sal, "n_examples", "analysis.saliency"), "analysis.saliency.n_examples",
                minimum=1)
    require_number(_get(sal, "top_fraction", "analysis.saliency"),
                   "analysis.saliency.top_fraction", low=0, high=1, low_open=True)
    det = _get(analysis, "detection", "analysis")
    require_choice(_get(det, "model", "analysis.detection"), names, "analysis.detection.model")
    n_fit = _get(det, "n_fit", "analysis.detection")
    require_int(n_fit, "analysis.detection.n_fit", minimum=10)
    require_int(_get(det, "lid_k", "analysis.detection"), "analysis.detection.lid_k", minimum=2)
    if det["lid_k"] >= n_fit:
        raise ConfigError(f"analysis.detection.lid_k = {det['lid_k']} must be below "
                          f"analysis.detection.n_fit = {n_fit}")
    compare = _get(analysis, "compare", "analysis")
    _comma_items(_get(compare, "models", "analysis.compare"), "analysis.compare.models", names)
    for key in ("balanced", "long_tailed"):
        require_choice(_get(compare, key, "analysis.compare"), names, f"analysis.compare.{key}")
    require_choice(_get(compare, "setting", "analysis.compare"), attacked,
                   "analysis.compare.setting")
    claims = _get(analysis, "claims", "analysis")
    _comma_items(_get(claims, "main_models", "analysis.claims"), "analysis.claims.main_models",
                 names)
    require_choice(_get(claims, "defence_model", "analysis.claims"), params["defend"]["models"],
                   "analysis.claims.defence_model")
    require_choice(_get(claims, "setting", "analysis.claims"), attacked, "analysis.claims.setting")


#: section name -> checker(params) ; each reads what it needs from the whole mapping.
SECTION_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "data": lambda p: _check_data(p["data"]),
    "models": lambda p: _check_models(p["models"]),
    "attack": lambda p: _check_attack(p["attack"]),
    "defend": lambda p: _check_defend(p["defend"], p),
    "sweep": lambda p: _check_sweep(p),
    "analysis": lambda p: _check_analysis(p["analysis"], p),
}


def check_params(params: Mapping[str, Any]) -> None:
    """Validate a parsed params.yaml; raise :class:`ConfigError` naming the offending key."""
    if not isinstance(params, Mapping):
        raise ConfigError("params.yaml must be a mapping of sections")
    _check_top(params)
    for section, check in SECTION_CHECKS.items():
        if section not in params:
            raise ConfigError(f"missing section {section!r} in params.yaml")
        check(params)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"no parameters file at {p}")
    with p.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    check_params(params)
    return params


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        load_params(path)
    except ConfigError as err:
        print(f"invalid configuration in {path}: {err}", file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
