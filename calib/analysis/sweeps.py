"""Paper Fig. 2: calibration damage against the perturbation budget eps and the query budget.

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (TMLR; arXiv:2401.02718), Fig. 2 (ECE against
eps and against the number of attack iterations); SPEC §4 and §9.

Two curves, obtained differently:

* **against eps**: one DVC stage per (model, eps) (a ``matrix`` in ``dvc.yaml``) runs every
  attack (:func:`run_sweep_point`) at that eps on a prefix of the attack split and writes one
  JSON file, ``results/<model>/sweep/eps_<eps>.json`` (:func:`sweep_file`);
  :func:`collect_sweep` gathers the files of a model into one tidy table.
* **against the query budget**: no re-running. Every attack records its per-iteration history
  (:class:`calib.attacks.AttackHistory`); :meth:`calib.attacks.grid.GridRun.curves` turns a
  grid's runs into the long table the attack stage writes as ``results/<model>/attack_curves.csv``.
  Row t of a run is where that run stood after t + 1 queries; Square's window schedule is
  rescaled to the run's whole budget, so this is a trajectory, not the outcome of a shorter run.

:func:`eps_table` and :func:`query_table` pivot both into wide tables (one column per attack
kind) that ``dvc plots`` draws directly; :func:`calib.plots.sweep_figure` draws the paper-style
figure.

Eps names: a file names eps by Python's shortest round-tripping ``repr`` of the float
(:func:`format_eps`: 0.05 -> "0.05", 1e-05 -> "1e-05"). That is exactly how DVC renders
``${item.eps}`` into paths, so ``dvc.yaml`` and the files agree; the name uses only digits, ".",
"e" and "-", so it is filesystem-safe, and :func:`parse_eps` inverts it exactly.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from calib import paths
from calib.attacks import KINDS
from calib.attacks.grid import SETTINGS, AttackGrid, parse_names, run_grid
from calib.checks import check_choice, check_eps, check_int, check_number
from calib.io import read_json
from calib.query_graph import QUERY_GRAPHS
from calib.reporting import KIND_ORDER
from calib.stats import Comparison, paired_difference

__all__ = [
    "AXES",
    "CLEAN_METRICS",
    "METRICS",
    "PAPER_EPS",
    "SWEEP_SETTINGS",
    "SweepBudget",
    "budget_config",
    "budget_dir",
    "budget_file",
    "budget_from_path",
    "budget_table",
    "collect_budgets",
    "collect_sweep",
    "cross_check",
    "eps_from_path",
    "eps_table",
    "findings",
    "format_eps",
    "parse_eps",
    "point_file",
    "query_table",
    "run_sweep_point",
    "saturation_budget",
    "saturation_queries",
    "sweep_dir",
    "sweep_file",
    "sweep_record",
]

#: Settings "method-norm" swept over eps. L-inf only: one eps grid on the [0, 1] pixel scale
#: cannot serve the L2 ball, whose radius lives on another scale.
SWEEP_SETTINGS: tuple[str, ...] = tuple(s for s in SETTINGS if s.endswith("-linf"))

#: The paper's default L-inf radius (224-px RGB images), marked on the eps axis for reference.
PAPER_EPS: float = 0.05

#: Metrics a sweep table holds per (eps, setting, kind), as named in the tidy table.
METRICS: tuple[str, ...] = ("ece", "ks", "confidence", "accuracy", "success_rate")

#: The metrics that have a clean (before-attack) level; the figure's rows.
CLEAN_METRICS: tuple[str, ...] = ("ece", "ks", "confidence")

#: The two axes of Fig. 2 a point can lie on: eps (sweep stage) or query budget (budget stage).
AXES: tuple[str, ...] = ("eps", "budget")

_FILE_PREFIX = "eps_"
_BUDGET_PREFIX = "queries_"
_FILE_SUFFIX = ".json"
#: A positive float as ``repr`` writes it (no sign, no "inf"/"nan"), e.g. 0.05, 1e-05, 1.5e-05.
_EPS_PATTERN = r"(?:\d+\.\d+(?:e-\d+)?|\de-\d+)"
#: Clean values of two sweep files must agree to this tolerance (JSON keeps 6 digits).
_CLEAN_ATOL = 1e-5
_CURVE_LABELS = {"ece": "ECE", "ks": "KS error", "confidence": "average confidence",
                 "accuracy": "accuracy", "success_rate": "success rate"}


# --- eps names ---------------------------------------------------------------------------------

def format_eps(eps: float) -> str:
    """The canonical name of an L-inf radius eps in (0, 1]: Python's ``repr`` of the float.

    It is what DVC writes for ``${item.eps}``, so ``eps_${item.eps}.json`` in ``dvc.yaml``
    names the same file as :func:`sweep_file`.

    Raises:
        ValueError: eps not a number in (0, 1] (the message names ``eps``).
    """
    if isinstance(eps, np.floating):
        eps = float(eps)
    return repr(check_eps(eps, "linf"))


def parse_eps(text: str) -> float:
    """Invert :func:`format_eps`: "0.05" -> 0.05, exactly.

    Only canonical names are accepted ("0.050" or "5e-2" are not), so one eps has one name.

    Raises:
        ValueError: ``text`` is not the canonical name of an eps in (0, 1].
    """
    if not isinstance(text, str) or not re.fullmatch(_EPS_PATTERN, text):
        raise ValueError(f"eps name must be a positive decimal like '0.05', got {text!r}")
    eps = float(text)
    canonical = format_eps(eps)
    if canonical != text:
        raise ValueError(f"eps name {text!r} is not canonical; write it as {canonical!r} "
                         f"(a float in params.yaml, e.g. 1.0 rather than 1)")
    return eps


def sweep_dir(model_name: str, root: str | os.PathLike[str] = paths.RESULTS) -> Path:
    """Folder of one model's sweep files: ``<root>/<model>/sweep``."""
    return Path(root) / model_name / "sweep"


def sweep_file(model_name: str, eps: float, root: str | os.PathLike[str] = paths.RESULTS
               ) -> Path:
    """The file of one (model, eps) sweep stage: ``<root>/<model>/sweep/eps_<eps>.json``."""
    return sweep_dir(model_name, root) / f"{_FILE_PREFIX}{format_eps(eps)}{_FILE_SUFFIX}"


def budget_dir(model_name: str, root: str | os.PathLike[str] = paths.RESULTS) -> Path:
    """Folder of one model's dedicated budget runs: ``<root>/<model>/budget``."""
    return Path(root) / model_name / "budget"


def budget_file(model_name: str, budget: int, root: str | os.PathLike[str] = paths.RESULTS
                ) -> Path:
    """The file of one (model, budget) stage: ``<root>/<model>/budget/queries_<budget>.json``.

    ``budget`` is the Square Attack's queries per image besides the clean one
    (``square_iterations``), as DVC writes ``${item.budget}``.
    """
    check_int("budget", budget, minimum=1)
    return budget_dir(model_name, root) / f"{_BUDGET_PREFIX}{budget}{_FILE_SUFFIX}"


def budget_from_path(path: str | os.PathLike[str]) -> int:
    """The budget a budget file is named after (inverse of :func:`budget_file`)."""
    name = Path(path).name
    middle = name[len(_BUDGET_PREFIX):-len(_FILE_SUFFIX)]
    if not (name.startswith(_BUDGET_PREFIX) and name.endswith(_FILE_SUFFIX)
            and middle.isdigit() and str(int(middle)) == middle and int(middle) > 0):
        raise ValueError(f"budget file names look like 'queries_100.json', got {name!r}")
    return int(middle)


def point_file(model_name: str, axis: str, *, eps: float, budget: int,
               root: str | os.PathLike[str] = paths.RESULTS) -> Path:
    """The file of one Fig. 2 point: an eps-sweep point (``axis="eps"``, :func:`sweep_file`)
    or a dedicated budget run (``axis="budget"``, :func:`budget_file`)."""
    check_choice("axis", axis, AXES)
    return sweep_file(model_name, eps, root) if axis == "eps" else budget_file(
        model_name, budget, root)


def eps_from_path(path: str | os.PathLike[str]) -> float:
    """The eps a sweep file is named after (inverse of :func:`sweep_file`)."""
    name = Path(path).name
    if not (name.startswith(_FILE_PREFIX) and name.endswith(_FILE_SUFFIX)):
        raise ValueError(f"sweep file names look like 'eps_0.05.json', got {name!r}")
    return parse_eps(name[len(_FILE_PREFIX):-len(_FILE_SUFFIX)])


# --- running one sweep point --------------------------------------------------------------------

@dataclass(frozen=True)
class SweepBudget:
    """Attack budget of a sweep point; the PGD step scales with eps.

    Attributes:
        square_iterations: Square Attack queries per image (besides the clean one).
        square_p_init: Square Attack's initial window fraction.
        pgd_iterations: PGD gradient steps.
        pgd_alpha_fraction: PGD step = this x eps (the attack stage's 0.04 at eps 0.1 is 0.4;
            the paper's 5/255 at eps 0.05 is 0.39), so every eps gets the same number of
            steps across its ball.
        precision: what the attacks' queries run in (:data:`calib.precision.PRECISIONS`).
        query_graph: what Square's queries run on (:class:`calib.attacks.grid.AttackGrid`).
    """

    square_iterations: int = 500
    square_p_init: float = 0.3
    pgd_iterations: int = 20
    pgd_alpha_fraction: float = 0.4
    precision: str = "fp32"
    query_graph: str = "eager"

    def __post_init__(self) -> None:
        check_choice("query_graph", self.query_graph, QUERY_GRAPHS)
        check_int("square_iterations", self.square_iterations, minimum=1)
        check_int("pgd_iterations", self.pgd_iterations, minimum=1)
        check_number("square_p_init", self.square_p_init, low=0.0, high=1.0, low_open=True)
        check_number("pgd_alpha_fraction", self.pgd_alpha_fraction, low=0.0, high=2.0,
                     low_open=True)

    def grid(self, eps: float, *, settings: str | Sequence[str] = SWEEP_SETTINGS,
             kinds: str | Sequence[str] = KINDS) -> AttackGrid:
        """The attack grid of one sweep point: every setting at L-inf radius ``eps``."""
        eps = check_eps(eps, "linf")
        return AttackGrid(settings=tuple(parse_names("settings", settings, SWEEP_SETTINGS)),
                          kinds=kinds, eps_linf=eps,
                          square_iterations=self.square_iterations,
                          square_p_init=self.square_p_init,
                          pgd_iterations=self.pgd_iterations,
                          pgd_alpha=self.pgd_alpha_fraction * eps,
                          precision=self.precision, query_graph=self.query_graph)


def run_sweep_point(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    eps: float, settings: str | Sequence[str] = SWEEP_SETTINGS,
                    kinds: str | Sequence[str] = KINDS, budget: SweepBudget | None = None,
                    seed: int = 0, show_progress: bool = False) -> list[dict[str, Any]]:
    """Run every (setting, kind) attack at one eps; one summary row per run.

    Args:
        model: classifier mapping images in [0, 1] to logits (N, K).
        images: (N, C, H, W) images in [0, 1] on the model's device.
        labels: (N,) true labels (MMA needs them; ECE and KS use them).
        eps: L-inf radius in (0, 1].
        settings: subset of :data:`SWEEP_SETTINGS` (list or comma-separated string).
        kinds: subset of :data:`calib.attacks.KINDS` (list or comma-separated string).
        budget: iterations and step sizes (default :class:`SweepBudget`).
        seed: seed of every run (the same for all, as in the attack stage).
        show_progress: tqdm bars.

    Returns:
        Rows ``{"setting", **AttackResult.summary(labels), "succeeded"}`` in settings x kinds
        order; each has accuracy, confidence, ECE and KS before and after, success rate and
        queries, and ``succeeded``, one "0"/"1" per image in image order (so two runs on the
        same images can be compared paired, :func:`plateau`).

    Raises:
        ValueError: bad eps, settings or kinds (naming the argument), before any attack runs.
    """
    budget = budget if budget is not None else SweepBudget()
    grid = budget.grid(eps, settings=settings, kinds=kinds)
    run = run_grid(model, images, labels, grid, seed=seed, show_progress=show_progress)
    return [{**row, "succeeded": success_bits(result.success)}
            for row, result in zip(run.summaries(), run.results.values(), strict=True)]


def success_bits(success: torch.Tensor) -> str:
    """(N,) bool per-image success as a string of "0"/"1" (compact in JSON, order kept)."""
    return "".join("1" if s else "0" for s in success.reshape(-1).tolist())


def _bits_to_array(bits: str) -> np.ndarray:
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")


def sweep_record(model_name: str, eps: float, rows: Sequence[Mapping[str, Any]], *,
                 config: Mapping[str, Any], environment: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The JSON content of one sweep file: rows, the clean level, and what produced them.

    Args:
        model_name: the model's name.
        eps: the radius every row was attacked at.
        rows: :func:`run_sweep_point` rows (all with labels, so ECE/KS are present).
        config: the settings that must match across the files of one sweep (budget, seed,
            number of images, settings, kinds); :func:`collect_sweep` checks them.
        environment: :func:`calib.io.environment_info` output.

    Raises:
        ValueError: no rows, a row at another eps, or rows that disagree on the clean level.
    """
    if not rows:
        raise ValueError("rows is empty: run at least one attack")
    fmt = format_eps(eps)
    clean: dict[str, float] = {}
    for row in rows:
        if format_eps(row["eps"]) != fmt:
            raise ValueError(f"rows holds eps {row['eps']} in a file for eps {eps}")
        for metric in ("accuracy", "confidence", "ece", "ks"):
            value = float(row[f"{metric}_before"])
            if metric in clean and abs(clean[metric] - value) > _CLEAN_ATOL:
                raise ValueError(f"rows disagree on the clean {metric} ({clean[metric]} vs "
                                 f"{value}): were they run on the same images?")
            clean.setdefault(metric, value)
    return {"model": model_name, "eps": float(eps), "eps_name": fmt, "n": int(rows[0]["n"]),
            "clean": clean, "config": dict(config), "rows": [dict(r) for r in rows],
            "environment": dict(environment or {})}


# --- collecting and tabulating ------------------------------------------------------------------

def collect_sweep(folder: str | os.PathLike[str], *, eps: Sequence[float] | None = None
                  ) -> pd.DataFrame:
    """Read one model's sweep files (``eps_*.json``) into a tidy table.

    The files must come from one sweep: the same model, configuration (budget, seed, images,
    settings, kinds) and clean level. A stale file left by an older grid with other settings
    therefore fails loudly instead of mixing into the curve.

    Args:
        folder: the model's sweep folder (:func:`sweep_dir`).
        eps: the grid to read (``sweep.eps``): exactly these files, each required; any other
            ``eps_*.json`` in the folder (left by a grid point since removed from params.yaml)
            is skipped with a warning naming it. None reads every file in the folder.

    Returns:
        One row per (eps, setting, kind), sorted by setting, kind, eps, with columns model,
        setting, kind, eps, budget (Square queries / PGD steps per image), n, iterations, the
        post-attack ``accuracy``, ``confidence``, ``ece``, ``ks``, ``success_rate``,
        ``queries_mean``, ``queries_success_mean``, ``label_preserved``, ``linf_max``, and the
        clean level ``clean_accuracy``, ``clean_confidence``, ``clean_ece``, ``clean_ks``.

    Raises:
        FileNotFoundError: no folder or no sweep file in it, or a file of ``eps`` missing.
        ValueError: a misnamed file, or files that disagree (naming the file).
    """
    names = None if eps is None else [format_eps(e) for e in eps]
    return _collect(folder, prefix=_FILE_PREFIX, x="eps", names=names)


def collect_budgets(folder: str | os.PathLike[str], *, budgets: Sequence[int] | None = None,
                    sweep_point: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Read one model's dedicated budget runs (``queries_*.json``) into a tidy table.

    Each file is a dedicated run at one query budget, as a user choosing that budget would
    run it (Square's window schedule rescaled to that budget), at the attack stage's eps, on
    the sweep's images: Fig. 2's query axis. The files must agree on everything but the
    budget (model, eps, seed, images, settings, kinds, clean level).

    Args:
        folder: the model's budget folder (:func:`budget_dir`).
        budgets: the budgets to read (``sweep.budgets``): exactly these files, each required;
            any other ``queries_*.json`` in the folder (left by a budget since removed from
            params.yaml) is skipped with a warning naming it. None reads every file.
        sweep_point: the sweep file at the budget runs' eps (:func:`sweep_file`), or None.
            Its Square rows are exactly the dedicated run at the sweep's own budget
            (``square_iterations``): the same attack, eps, images, seed and schedule. So the
            pipeline does not run that budget twice; the sweep's Square rows fill it in,
            unless a dedicated file for that budget exists (then the file is used).

    Returns:
        :func:`collect_sweep`'s columns, one row per (budget, setting, kind), sorted by budget.

    Raises:
        FileNotFoundError: no budget file, a file of ``budgets`` missing, or ``sweep_point``
            given but missing.
        ValueError: files that disagree, or a sweep point that differs from the budget runs
            in anything but its settings and budget (naming the keys).
    """
    names = None if budgets is None else [
        str(check_int("budget", b, minimum=1)) for b in budgets]
    tidy = _collect(folder, prefix=_BUDGET_PREFIX, x="budget", names=names)
    if sweep_point is None:
        return tidy
    first = int(tidy["budget"].iloc[0])
    point = _sweep_point_as_budget(Path(sweep_point),
                                   Path(folder) / f"{_BUDGET_PREFIX}{first}{_FILE_SUFFIX}")
    if point is None or int(point["budget"].iloc[0]) in set(tidy["budget"]):
        return tidy
    return _sort(pd.concat([tidy, point], ignore_index=True), "budget").reset_index(drop=True)


def _sweep_point_as_budget(path: Path, budget_path: Path) -> pd.DataFrame | None:
    """The Square rows of sweep file ``path`` as a budget run, checked against a budget file.

    None when the sweep ran no Square attack.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file {path} (run its sweep stage)")
    record, reference = read_json(path), read_json(budget_path)
    if format_eps(record["eps"]) != format_eps(reference["eps"]):
        raise ValueError(f"{path}: sweep point at eps {record['eps']}, the budget runs at "
                         f"{reference['eps']}")
    square = [r for r in record["rows"] if r["method"] == "square"]
    if not square:
        return None
    # The sweep also runs PGD, so its settings differ; everything else must match.
    _check_same_sweep((budget_path, reference),
                      (path, {**record, "config": {**record["config"],
                                                   "settings": reference["config"]["settings"]}}),
                      varying=("square_iterations",))
    return pd.DataFrame(_tidy_rows({**record, "rows": square}))


def _collect(folder: str | os.PathLike[str], *, prefix: str, x: str,
             names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy rows of the ``<prefix><name>.json`` files of ``folder``: those of ``names`` (each
    required, others skipped with a warning) or, with None, every such file."""
    folder = Path(folder)
    present = sorted(folder.glob(f"{prefix}*{_FILE_SUFFIX}")) if folder.is_dir() else []
    if names is None:
        files = present
    else:
        files = [folder / f"{prefix}{name}{_FILE_SUFFIX}" for name in dict.fromkeys(names)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: no {', '.join(missing)} (run `dvc repro` to write them)")
        stale = sorted(set(p.name for p in present) - set(f.name for f in files))
        if stale:
            warnings.warn(f"{folder}: skipping {', '.join(stale)}, not in the {x} list of "
                          f"params.yaml (left by an earlier configuration)", UserWarning,
                          stacklevel=3)
    if not files:
        raise FileNotFoundError(f"no files {prefix}*.json in {folder} (run their stages)")
    reference: tuple[Path, dict[str, Any]] | None = None
    out = []
    for path in files:
        record = read_json(path)
        if x == "eps":
            eps = eps_from_path(path)
            if format_eps(record["eps"]) != format_eps(eps):
                raise ValueError(f"{path}: holds eps {record['eps']} but is named for eps {eps}")
        else:
            budget = budget_from_path(path)
            square = [r for r in record["rows"] if r["method"] == "square"]
            if any(int(r["iterations"]) != budget for r in square):
                raise ValueError(f"{path}: holds a Square budget other than {budget}")
        if reference is None:
            reference = (path, record)
        else:
            _check_same_sweep(reference, (path, record),
                              varying=("square_iterations",) if x == "budget" else ())
        out.extend(_tidy_rows(record))
    tidy = pd.DataFrame(out)
    return _sort(tidy, x).reset_index(drop=True)


def _tidy_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One tidy row per attack row of a sweep or budget file (:func:`collect_sweep`'s columns)."""
    clean = record["clean"]
    return [{
        "model": record["model"], "setting": row["setting"], "kind": row["kind"],
        "eps": float(record["eps"]), "budget": int(row["iterations"]), "n": row["n"],
        "iterations": row["iterations"],
        "accuracy": row["accuracy_after"], "confidence": row["confidence_after"],
        "ece": row["ece_after"], "ks": row["ks_after"],
        "success_rate": row["success_rate"], "queries_mean": row["queries_mean"],
        "queries_success_mean": row["queries_success_mean"],
        "label_preserved": row["label_preserved"], "linf_max": row["linf_max"],
        "succeeded": row.get("succeeded"),
        **{f"clean_{m}": clean[m] for m in ("accuracy", "confidence", "ece", "ks")},
    } for row in record["rows"]]


def _check_same_sweep(reference: tuple[Path, Mapping[str, Any]],
                      other: tuple[Path, Mapping[str, Any]], *,
                      varying: Sequence[str] = ()) -> None:
    (ref_path, ref), (path, rec) = reference, other
    if rec["model"] != ref["model"]:
        raise ValueError(f"{path}: model {rec['model']!r} differs from {ref['model']!r} in "
                         f"{ref_path}")
    diff = sorted(k for k in set(rec["config"]) | set(ref["config"])
                  if k not in varying and rec["config"].get(k) != ref["config"].get(k))
    if diff:
        raise ValueError(f"{path}: sweep configuration differs from {ref_path} in {diff}; "
                         f"a stale file from another sweep? Rerun or delete it")
    for metric, value in ref["clean"].items():
        if abs(float(rec["clean"][metric]) - float(value)) > _CLEAN_ATOL:
            raise ValueError(f"{path}: clean {metric} {rec['clean'][metric]} differs from "
                             f"{value} in {ref_path}; was the model retrained since?")


def _sort(df: pd.DataFrame, x: str) -> pd.DataFrame:
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    settings = {s: i for i, s in enumerate(dict.fromkeys(df["setting"]))}
    key = df["setting"].map(settings) * 100 + df["kind"].map(lambda k: order.get(k, 99))
    return df.assign(_key=key).sort_values(["_key", x], kind="stable").drop(columns="_key")


def _wide(part: pd.DataFrame, x: str, metric: str) -> pd.DataFrame:
    kinds = [k for k in KIND_ORDER if k in set(part["kind"])]
    kinds += [k for k in dict.fromkeys(part["kind"]) if k not in kinds]
    wide = part.pivot_table(index=x, columns="kind", values=metric, aggfunc="first")
    wide = wide.reindex(columns=kinds).sort_index()
    wide.columns.name = None
    return wide


def eps_table(tidy: pd.DataFrame, setting: str, metric: str = "ece") -> pd.DataFrame:
    """Wide table of one metric against eps for one setting (for ``dvc plots``).

    Args:
        tidy: :func:`collect_sweep` output (one model).
        setting: e.g. "square-linf".
        metric: one of :data:`METRICS`.

    Returns:
        Columns ``eps``, ``clean`` (for ece, ks, confidence, accuracy) and one column per
        attack kind (uca, oca, mma, rca order), one row per eps, eps increasing.
    """
    return _axis_table(tidy, "eps", setting, metric)


def _axis_table(tidy: pd.DataFrame, x: str, setting: str, metric: str) -> pd.DataFrame:
    """One metric of one setting against ``x`` ("eps" or "budget"), with the clean level."""
    check_choice("metric", metric, METRICS)
    part = _one_setting(tidy, setting)
    wide = _wide(part, x, metric)
    if f"clean_{metric}" in part:
        wide.insert(0, "clean", part.groupby(x)[f"clean_{metric}"].first())
    return wide.reset_index()


def budget_table(budgets: pd.DataFrame, setting: str, metric: str = "ece") -> pd.DataFrame:
    """Wide table of one metric against the query budget, from dedicated runs (Fig. 2).

    Args:
        budgets: :func:`collect_budgets` output (one model).
        setting: e.g. "square-linf".
        metric: one of :data:`METRICS`.

    Returns:
        Columns ``budget`` (queries per image), ``clean`` and one column per attack kind,
        one row per budget, increasing.
    """
    return _axis_table(budgets, "budget", setting, metric)


def query_table(curves: pd.DataFrame, setting: str, metric: str = "ece") -> pd.DataFrame:
    """Wide table of one metric against the query budget for one setting (for ``dvc plots``).

    Args:
        curves: long curve table (:meth:`calib.attacks.grid.GridRun.curves`, or the attack stage's
            ``attack_curves.csv``) of one model: columns setting, kind, queries and the
            metric.
        setting: e.g. "square-linf".
        metric: "ece", "ks", "confidence" or "success_rate".

    Returns:
        Columns ``queries``, ``clean`` (the budget-1 value, i.e. before any attack query; not
        for success_rate) and one column per kind, one row per budget, queries increasing.
    """
    check_choice("metric", metric, ("ece", "ks", "confidence", "success_rate"))
    part = _one_setting(curves, setting)
    wide = _wide(part, "queries", metric)
    if metric != "success_rate":
        first = part[part["queries"] == part["queries"].min()]
        wide.insert(0, "clean", float(first[metric].mean()))
    return wide.reset_index()


def _one_setting(df: pd.DataFrame, setting: str) -> pd.DataFrame:
    if "model" in df and df["model"].nunique() > 1:
        raise ValueError(f"the table holds several models {sorted(df['model'].unique())}; "
                         f"pass one model's rows")
    available = list(dict.fromkeys(df["setting"]))
    check_choice("setting", setting, available)
    return df[df["setting"] == setting]


def cross_check(tidy: pd.DataFrame, curves: pd.DataFrame, eps: float, *,
                metric: str = "ece") -> pd.DataFrame:
    """Compare the sweep at ``eps`` with the query curves measured at the same eps.

    The sweep point ran with a budget of ``iterations`` per image; the curve's value at that
    budget (its last point within it) is what the longer run had reached by then. For PGD the
    two are the same run cut short (the curve at budget b *is* a b-step run, up to the image
    sets); for Square Attack the window schedule is rescaled to the whole budget, so a short
    run shrinks its windows sooner and the two may differ.

    Returns:
        One row per (setting, kind) of the sweep at ``eps``: ``sweep`` (the sweep's value),
        ``budget`` (its queries per image), ``curve_queries`` and ``curve`` (the curve's point
        at that budget), ``curve_final`` (the curve's value at its full budget).

    Raises:
        ValueError: ``eps`` is not on the sweep grid.
    """
    at = tidy[np.isclose(tidy["eps"], eps, rtol=0.0, atol=1e-12)]
    if at.empty:
        raise ValueError(f"eps {eps} is not on the sweep grid {sorted(set(tidy['eps']))}")
    rows = []
    for _, r in at.iterrows():
        run = curves[(curves["setting"] == r["setting"]) & (curves["kind"] == r["kind"])]
        if run.empty:
            continue
        run = run.sort_values("queries")
        q = run["queries"].to_numpy(dtype=np.float64)
        budget = float(r["iterations"]) + 1.0
        i = max(0, int(np.searchsorted(q, budget, side="right")) - 1)
        rows.append({"setting": r["setting"], "kind": r["kind"], "sweep": r[metric],
                     "budget": budget, "curve_queries": q[i],
                     "curve": float(run[metric].iloc[i]),
                     "curve_final": float(run[metric].iloc[-1])})
    return pd.DataFrame(rows)


def saturation_queries(curves: pd.DataFrame, setting: str, *, metric: str = "ece",
                       fraction: float = 0.9) -> dict[str, float]:
    """Per kind, the smallest budget at which ``fraction`` of the final change is reached.

    With v(q) the metric at budget q, v(1) the clean value and v(Q) the value at the full
    budget, the answer is the smallest q with ``|v(q) - v(1)| >= fraction * |v(Q) - v(1)|``
    (1 when the run changed nothing). It reads "how early does the damage saturate".

    Args:
        curves: long curve table of one model (:meth:`calib.attacks.grid.GridRun.curves` format).
        setting: e.g. "square-linf".
        metric: a curve column (e.g. "ece", "ks", "confidence").
        fraction: in (0, 1].

    Returns:
        kind -> queries, in the order of :data:`calib.reporting.KIND_ORDER`.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    part = _one_setting(curves, setting)
    out = {}
    for kind in [k for k in KIND_ORDER if k in set(part["kind"])]:
        run = part[part["kind"] == kind].sort_values("queries")
        q = run["queries"].to_numpy(dtype=np.float64)
        v = run[metric].to_numpy(dtype=np.float64)
        change = np.abs(v - v[0])
        reached = change >= fraction * change[-1] - 1e-12
        out[kind] = float(q[np.argmax(reached)])
    return out


def saturation_budget(budgets: pd.DataFrame, setting: str, *, metric: str = "ece",
                      fraction: float = 0.9) -> dict[str, float]:
    """Per kind, the smallest dedicated budget whose run reaches ``fraction`` of the change
    that the largest budget's run reaches (from :func:`collect_budgets`, not a trajectory).

    With v(b) the metric after a b-query run and c the clean value, the answer is the smallest
    budget b with ``|v(b) - c| >= fraction * |v(B) - c|``, B the largest budget.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    part = _one_setting(budgets, setting)
    out = {}
    for kind in [k for k in KIND_ORDER if k in set(part["kind"])]:
        run = part[part["kind"] == kind].sort_values("budget")
        b = run["budget"].to_numpy(dtype=np.float64)
        change = np.abs(run[metric].to_numpy(dtype=np.float64)
                        - run[f"clean_{metric}"].to_numpy(dtype=np.float64))
        reached = change >= fraction * change[-1] - 1e-12
        out[kind] = float(b[np.argmax(reached)])
    return out


def plateau(budgets: pd.DataFrame, setting: str, *, metric: str = "success_rate"
            ) -> dict[str, tuple[float, float]]:
    """Per kind, ``metric`` after the second-largest and the largest dedicated budget.

    The last step of the budget curve: a small change there is the evidence that the largest
    budget is on the plateau (the attack has converged); a large one says more queries would
    still buy damage. :func:`plateau_step` gives the step's paired interval.

    Returns:
        kind -> (value at the second-largest budget, value at the largest budget).

    Raises:
        ValueError: fewer than two budgets.
    """
    return {kind: (float(a[metric]), float(b[metric]))
            for kind, (a, b) in _last_step(budgets, setting).items()}


def plateau_step(budgets: pd.DataFrame, setting: str, *, n_resamples: int = 1000,
                 seed: int = 0) -> dict[str, Comparison]:
    """Per kind, the paired bootstrap of success(largest budget) - success(second-largest).

    Both dedicated runs attack the same images, so each resample draws one set of images and
    reads both runs' per-image success on it (:func:`calib.stats.paired_difference`); the
    outcome is "within noise" when the 95% interval of the gain contains 0.

    Raises:
        ValueError: fewer than two budgets, or runs without per-image success (files written
            before :func:`run_sweep_point` recorded it: rerun the budget stages).
    """
    out = {}
    for kind, (a, b) in _last_step(budgets, setting).items():
        bits = (a.get("succeeded"), b.get("succeeded"))
        if not all(isinstance(x, str) and x for x in bits):
            raise ValueError(f"{setting} {kind}: the budget runs hold no per-image success "
                             "('succeeded'); rerun the budget stages")
        out[kind] = paired_difference("mean", _bits_to_array(bits[1]).astype(np.float64),
                                      _bits_to_array(bits[0]).astype(np.float64),
                                      n_resamples=n_resamples, seed=seed)
    return out


def _last_step(budgets: pd.DataFrame, setting: str) -> dict[str, tuple[pd.Series, pd.Series]]:
    """Per kind, the rows of the second-largest and the largest budget."""
    part = _one_setting(budgets, setting)
    if part["budget"].nunique() < 2:
        raise ValueError(f"{setting}: a plateau needs at least two budgets, got "
                         f"{sorted(set(part['budget']))}")
    out = {}
    for kind in [k for k in KIND_ORDER if k in set(part["kind"])]:
        run = part[part["kind"] == kind].sort_values("budget")
        out[kind] = (run.iloc[-2], run.iloc[-1])
    return out


def findings(tidy: pd.DataFrame, curves: pd.DataFrame | None, *,
             budgets: pd.DataFrame | None = None,
             paper_eps: float = PAPER_EPS) -> list[str]:
    """Plain-language statements read off the sweep (for the notebook's narrative).

    Per setting: the ECE range over the attacks at the smallest and largest eps against the
    clean ECE, for how many attacks ECE grows monotonically with eps, where ``paper_eps`` sits
    (if it is on the grid); with ``budgets`` (dedicated runs), the smallest budget whose run
    reaches 90% of the largest budget's ECE change and the success rates of the two largest
    budgets (:func:`plateau`: has the attack converged?); with ``curves``, where one long run's
    trajectory reaches 90% of its final change (said to be a trajectory: the first b queries of
    a long run are not a b-query run).
    """
    lines = []
    for setting in dict.fromkeys(tidy["setting"]):
        wide = eps_table(tidy, setting, "ece")
        kinds = [c for c in wide.columns if c not in ("eps", "clean")]
        lo, hi = wide.iloc[0], wide.iloc[-1]
        clean = float(wide["clean"].iloc[0])
        text = (f"{setting}: ECE {clean:.3f} clean; {min(lo[kinds]):.3f}-{max(lo[kinds]):.3f} "
                f"across the attacks at eps {format_eps(lo['eps'])}")
        if len(wide) > 1:
            text += (f", {min(hi[kinds]):.3f}-{max(hi[kinds]):.3f} at eps "
                     f"{format_eps(hi['eps'])}")
        lines.append(text + ".")
        if len(wide) > 1:
            rising = [k.upper() for k in kinds if np.all(np.diff(wide[k]) >= -1e-9)]
            lines.append(f"{setting}: ECE grows monotonically with eps for "
                         f"{len(rising)} of {len(kinds)} attacks"
                         f"{' (' + ', '.join(rising) + ')' if rising else ''}.")
        at = wide[np.isclose(wide["eps"], paper_eps)]
        if len(at) and len(wide) > 1:
            share = [(at[k].item() - clean) / (hi[k] - clean) for k in kinds
                     if abs(hi[k] - clean) > 1e-9]
            if share:
                lines.append(
                    f"{setting}: at the paper's eps {format_eps(paper_eps)} the attacks reach "
                    f"{min(share):.0%}-{max(share):.0%} of the ECE rise they reach at eps "
                    f"{format_eps(hi['eps'])}.")
        if budgets is not None and setting in set(budgets["setting"]):
            sat = saturation_budget(budgets, setting)
            dedicated = sorted(set(_one_setting(budgets, setting)["budget"]))
            largest = int(dedicated[-1])
            lines.append(f"{setting}: in dedicated runs, the smallest budget reaching 90% of the "
                         f"ECE change of a {largest}-query run is "
                         + ", ".join(f"{q:.0f} ({k.upper()})" for k, q in sat.items())
                         + " queries per image.")
            if len(dedicated) > 1:
                lines.append(_plateau_line(budgets, setting, dedicated[-2], largest))
        if curves is not None and setting in set(curves["setting"]):
            sat = saturation_queries(curves, setting)
            budget = float(_one_setting(curves, setting)["queries"].max())
            unit = "gradient steps + 1" if setting.startswith("pgd") else "queries"
            length = (f"{budget - 1:.0f}-step" if setting.startswith("pgd")
                      else f"{budget:.0f}-query")
            lines.append(f"{setting}: along one {length} run's trajectory "
                         "(not the outcome of shorter runs), 90% of its final ECE change is "
                         "passed after "
                         + ", ".join(f"{q:.0f} ({k.upper()})" for k, q in sat.items())
                         + f" {unit}.")
    return lines


def _plateau_line(budgets: pd.DataFrame, setting: str, previous: int, largest: int) -> str:
    """The plateau finding: success at the two largest budgets and, where the files hold
    per-image success, the gain's paired 95% interval and whether it is within noise."""
    steps = plateau(budgets, setting)
    part = _one_setting(budgets, setting)
    paired = ("succeeded" in part.columns
              and part["succeeded"].map(lambda x: isinstance(x, str) and bool(x)).all())
    gains = plateau_step(budgets, setting) if paired else {}
    pieces = []
    for kind, (a, b) in steps.items():
        text = f"{a:.0%} -> {b:.0%}"
        if kind in gains:
            d = gains[kind].difference
            text += (f" (gain {d.value * 100:+.0f} points [{d.lo * 100:+.0f}, "
                     f"{d.hi * 100:+.0f}], {gains[kind].outcome})")
        pieces.append(f"{text} {kind.upper()}")
    largest_gain = max(b - a for a, b in steps.values())
    text = (f"{setting}: success rate from the {previous:.0f}- to the {largest}-query run: "
            + ", ".join(pieces) + f"; the largest gain, {largest_gain * 100:.0f} points, is what "
            "more queries still buy at the largest budget")
    if gains:
        noise = [k.upper() for k, c in gains.items() if c.outcome == "within noise"]
        text += (f" ({len(noise)} of {len(gains)} gains within noise: paired bootstrap over the "
                 "same images, 1,000 resamples)")
    return text + "."


# --- figure -------------------------------------------------------------------------------------

# --- configuration ------------------------------------------------------------------------------

def budget_config(budget: SweepBudget, *, settings: Iterable[str], kinds: Iterable[str],
                  n_images: int, seed: int) -> dict[str, Any]:
    """The configuration a sweep file records (and :func:`collect_sweep` compares)."""
    return {**asdict(budget), "settings": ",".join(settings), "kinds": ",".join(kinds),
            "n_images": int(n_images), "seed": int(seed)}
