"""The attack grid: settings ("method-norm"), their budgets, running a grid, per-sample records.

Paper: Obadinma, Zhu, Guo, "Calibration Attacks" (TMLR; arXiv:2401.02718), Tables 1, 3 and 4
and Fig. 2 each run the four calibration attacks (UCA, OCA, MMA, RCA) in several settings: a
black-box Square Attack under an L-inf or L2 ball and a white-box PGD under an L-inf ball.
Every stage that attacks a model (the attack stage, the defence evaluation, the eps sweep) runs
the same grid of (setting, kind) pairs through :func:`run_grid`, so the vocabulary, the radius
per norm, the budget per method, the per-sample records and the query curves live here.

Example:
    >>> grid = AttackGrid(settings="square-linf,pgd-linf", kinds="uca,oca", eps_linf=0.1,
    ...                   square_iterations=500, pgd_iterations=100, pgd_alpha=0.04)
    >>> run = run_grid(model, images, labels, grid, seed=0)
    >>> run.summaries(model="resnet")[0]["ece_after"]
    >>> write_records("results/resnet/records", run, index)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from calib.attacks import KINDS, AttackResult, run_attack
from calib.attacks.base import reevaluate
from calib.checks import (
    check_choice,
    check_eps,
    check_images,
    check_int,
    check_labels,
    check_number,
)
from calib.io import load_tensors, save_tensors, write_text
from calib.precision import PRECISIONS, Precision, resolve_precision, with_precision
from calib.query_graph import QUERY_GRAPHS, QueryGraph, freeze_for_queries

__all__ = [
    "ADVERSARIAL_FILE",
    "RECORDS_FILE",
    "SETTINGS",
    "AttackGrid",
    "GridRun",
    "attacked_images",
    "parse_names",
    "read_records",
    "run_grid",
    "split_setting",
    "write_records",
]

#: The "method-norm" pairs an attack grid can run (black-box Square, white-box PGD).
SETTINGS: tuple[str, ...] = ("square-linf", "square-l2", "pgd-linf")

#: Per-sample outcomes of every (setting, kind) run, one row per attacked image.
RECORDS_FILE = "attack_records.csv"
#: The final adversarial images, one (N, C, H, W) tensor per "<setting>/<kind>".
ADVERSARIAL_FILE = "adversarial.safetensors"

#: Columns of :meth:`GridRun.records`, in file order.
RECORD_COLUMNS: tuple[str, ...] = (
    "setting", "kind", "index", "label", "prediction", "confidence_before", "confidence_after",
    "target", "queries", "success", "linf", "l2")


def parse_names(key: str, value: str | Sequence[str], allowed: Sequence[str] | None = None
                ) -> list[str]:
    """A comma-separated string (as params.yaml holds it) or a sequence of names -> list.

    Args:
        key: the parameter's name, for messages (e.g. ``"attack.settings"``).
        value: ``"square-linf,pgd-linf"`` or ``["square-linf", "pgd-linf"]``.
        allowed: the names that may appear (None: any, e.g. model names the schema checked).

    Raises:
        ValueError: empty, a duplicate, or a name not in ``allowed`` (naming ``key``).
    """
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    if not items:
        choices = "" if allowed is None else f"; choose from {list(allowed)}"
        raise ValueError(f"{key} is empty{choices}")
    for item in items:
        if allowed is not None:
            check_choice(key, item, allowed)
    if len(set(items)) != len(items):
        raise ValueError(f"{key} lists a name more than once: {items}")
    return items


def split_setting(setting: str) -> tuple[str, str]:
    """``"square-linf"`` -> ``("square", "linf")``, for a setting of :data:`SETTINGS`."""
    check_choice("setting", setting, SETTINGS)
    method, norm = setting.split("-")
    return method, norm


@dataclass(frozen=True)
class AttackGrid:
    """Which attacks run, at which radius and with which budget.

    Attributes:
        settings: "method-norm" pairs from :data:`SETTINGS` (a comma-separated string is
            accepted and stored as a tuple).
        kinds: attack kinds from :data:`calib.attacks.KINDS` (string or sequence, as above).
        eps_linf, eps_l2: the radius of each norm's ball ([0, 1] pixel scale).
        square_iterations: queries per image of the black-box Square Attack.
        square_p_init: initial fraction of pixels a Square Attack window covers.
        pgd_iterations: gradient steps of the white-box PGD.
        pgd_alpha: PGD step size (None: the attack's default for its eps).
        precision: what the attacks' forward passes run in (:data:`calib.precision.PRECISIONS`;
            falls back to fp32 where not native). Reported outcomes are re-read in fp32.
        query_graph: what the black-box (Square) queries run on (:data:`calib.query_graph.
            QUERY_GRAPHS`): the model itself ("eager") or a frozen fp32 TorchScript graph of it
            ("frozen": a CPU option, BatchNorm models; others fall back to eager and say so).
            White-box PGD always differentiates through the model. fp32 only.
    """

    settings: tuple[str, ...] = ("square-linf", "pgd-linf")
    kinds: tuple[str, ...] = KINDS
    eps_linf: float = 0.1
    eps_l2: float = 1.0
    square_iterations: int = 500
    square_p_init: float = 0.3
    pgd_iterations: int = 100
    pgd_alpha: float | None = None
    precision: str = "fp32"
    query_graph: str = "eager"

    def __post_init__(self) -> None:
        # Frozen: normalise the name lists through object.__setattr__ once, here.
        object.__setattr__(self, "settings",
                           tuple(parse_names("settings", self.settings, SETTINGS)))
        object.__setattr__(self, "kinds", tuple(parse_names("kinds", self.kinds, KINDS)))
        check_eps(self.eps_linf, "linf")
        check_eps(self.eps_l2, "l2")
        check_int("square_iterations", self.square_iterations, minimum=1)
        check_int("pgd_iterations", self.pgd_iterations, minimum=1)
        check_number("square_p_init", self.square_p_init, low=0.0, high=1.0, low_open=True)
        if self.pgd_alpha is not None:
            check_number("pgd_alpha", self.pgd_alpha, low=0.0, low_open=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("query_graph", self.query_graph, QUERY_GRAPHS)
        if self.query_graph == "frozen" and self.precision != "fp32":
            raise ValueError(f"query_graph 'frozen' runs in fp32; got precision "
                             f"{self.precision!r} (use one or the other)")

    def eps(self, norm: str) -> float:
        """The radius of the ``norm`` ball ("linf" or "l2")."""
        return self.eps_linf if norm == "linf" else self.eps_l2

    def arguments(self, setting: str) -> dict[str, Any]:
        """Keyword arguments of :func:`calib.attacks.run_attack` for one setting of the grid."""
        method, norm = split_setting(setting)
        if method == "pgd":
            options: dict[str, Any] = {} if self.pgd_alpha is None else {"alpha": self.pgd_alpha}
            iterations = self.pgd_iterations
        else:
            options, iterations = {"p_init": self.square_p_init}, self.square_iterations
        return {"method": method, "norm": norm, "eps": self.eps(norm),
                "iterations": iterations, **options}

    def config(self) -> dict[str, Any]:
        """JSON-ready fields (recorded with the results, compared across stages)."""
        return {**asdict(self), "settings": list(self.settings), "kinds": list(self.kinds)}


@dataclass
class GridRun:
    """Outcome of :func:`run_grid`.

    Attributes:
        grid: the grid that ran.
        results: (setting, kind) -> :class:`~calib.attacks.AttackResult`, in grid order.
        labels: (N,) int64 true labels of the attacked images, on the CPU.
        seconds: wall time of all the attacks.
        precision: what the attacks' queries ran in (after any fallback).
        query_graph: what the black-box queries ran on (after any fallback).
    """

    grid: AttackGrid
    results: dict[tuple[str, str], AttackResult]
    labels: torch.Tensor
    seconds: float
    precision: Precision | None = None
    query_graph: QueryGraph | None = None

    def queries_info(self) -> dict[str, str]:
        """JSON-ready record of what the queries ran in and on, with the reasons."""
        info: dict[str, str] = {}
        if self.precision is not None:
            info.update(precision=self.precision.used, precision_reason=self.precision.reason)
        if self.query_graph is not None:
            info.update(query_graph=self.query_graph.used,
                        query_graph_reason=self.query_graph.reason)
        return info

    def summaries(self, **columns: Any) -> list[dict[str, Any]]:
        """One flat dict per run: ``columns``, ``setting`` and :meth:`AttackResult.summary`."""
        return [{**columns, "setting": setting, **result.summary(self.labels)}
                for (setting, _), result in self.results.items()]

    def records(self, index: torch.Tensor | None = None) -> pd.DataFrame:
        """Per-sample outcomes of every run as one long table (columns :data:`RECORD_COLUMNS`).

        Args:
            index: (N,) identifiers of the images (e.g. their test-set indices); default
                0..N-1.
        """
        frames = []
        for (setting, kind), r in self.results.items():
            n = r.queries.shape[0]
            ids = torch.arange(n) if index is None else torch.as_tensor(index).reshape(-1)
            frames.append(pd.DataFrame({
                "setting": setting, "kind": kind, "index": ids.numpy(),
                "label": self.labels.numpy(), "prediction": r.clean_prediction.numpy(),
                "confidence_before": r.clean_confidence.numpy(),
                "confidence_after": r.final_confidence.numpy(), "target": r.target.numpy(),
                "queries": r.queries.numpy(), "success": r.success.numpy(),
                "linf": r.linf_norm().numpy(), "l2": r.l2_norm().numpy()}))
        return pd.concat(frames, ignore_index=True)

    def curves(self, *, model_name: str, points: int | None = 60) -> pd.DataFrame:
        """Metrics along each run's trajectory, from its per-iteration history (no re-running).

        Row t of a run's history is where that run stood after t + 1 queries per image; the
        Square schedule is rescaled to the run's whole budget, so this trajectory is not the
        outcome of a shorter run.

        Args:
            model_name: written in the ``model`` column.
            points: rows kept per run (about evenly spaced; None: every iteration). The first
                (the clean state) and the last (the full budget) are always kept.

        Returns:
            Long table with columns model, setting, kind, queries, queries_mean, confidence,
            success_rate, ece, ks. The last row of each run equals its summary's after-values.
        """
        frames = [pd.DataFrame({"model": model_name, "setting": setting, "kind": kind,
                                **result.curve(self.labels, points=points)})
                  for (setting, kind), result in self.results.items()]
        return pd.concat(frames, ignore_index=True)

    def adversarial(self) -> dict[str, torch.Tensor]:
        """The final adversarial images, "<setting>/<kind>" -> (N, C, H, W)."""
        return {f"{setting}/{kind}": r.x_adv for (setting, kind), r in self.results.items()}


def run_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, grid: AttackGrid, *,
             seed: int = 0, batch_size: int = 512, show_progress: bool = False) -> GridRun:
    """Run every (setting, kind) attack of ``grid`` on the same images with the same seed.

    Args:
        model: any ``nn.Module`` mapping images in [0, 1] (N, C, H, W) to logits (N, K);
            black-box settings query its scores, white-box PGD differentiates through it.
        images: (N, C, H, W) clean images in [0, 1] on the model's device.
        labels: (N,) true labels (MMA needs them; ECE and KS use them).
        grid: settings, kinds, radii and budgets.
        seed: seed of every run, so that runs of one grid (and the defences of one table)
            face identical attack randomness.
        batch_size: images attacked together (bounds memory). 512 attacks the attack
            stage's 500 images as one batch: Square's queries then shrink with the images
            still to attack as one batch instead of two small tails (default ResNet-18,
            square-linf, 4 kinds: 44.5 s against 55.3 s at 256; the ViT unchanged).
        show_progress: a tqdm bar per run.

    The attacks query ``model`` in ``grid.precision`` (see :mod:`calib.precision`), Square's
    black-box queries on ``grid.query_graph`` (see :mod:`calib.query_graph`: a frozen graph is
    built once per grid); what is reported (predictions, confidences, success, labels kept)
    comes from a fresh fp32 forward pass of ``model`` itself, so neither can misreport success.

    Raises:
        ValueError: bad images or labels, before any attack runs.
    """
    check_images(images)
    labels = check_labels(labels, images.shape[0]).detach().cpu().long()
    precision = resolve_precision(grid.precision, images.device)
    attacked = with_precision(model, precision)
    start = time.perf_counter()  # freezing counts: it is part of what the grid costs
    black_box = any(split_setting(s)[0] == "square" for s in grid.settings)
    if black_box:
        square_queries, graph = freeze_for_queries(attacked, grid.query_graph,
                                                   input_shape=images.shape[1:])
    else:
        square_queries, graph = attacked, QueryGraph(grid.query_graph, "eager",
                                                     "no black-box setting in the grid")
    results: dict[tuple[str, str], AttackResult] = {}
    for setting in grid.settings:
        arguments = grid.arguments(setting)
        queried = square_queries if arguments["method"] == "square" else attacked
        for kind in grid.kinds:
            result = run_attack(queried, images, kind=kind, labels=labels, seed=seed,
                                batch_size=batch_size, show_progress=show_progress,
                                **arguments)
            # Labels kept, confidences and success as a fresh fp32 eager pass sees them.
            results[setting, kind] = reevaluate(result, model, batch_size=batch_size)
    return GridRun(grid, results, labels, time.perf_counter() - start, precision, graph)


def write_records(folder: str | Path, run: GridRun, index: torch.Tensor, *,
                  images: bool = True) -> None:
    """Write :data:`RECORDS_FILE` (and, with ``images``, :data:`ADVERSARIAL_FILE`) to ``folder``.

    Args:
        folder: e.g. ``results/<model>/records``.
        run: the grid's outcome.
        index: (N,) test-set indices of the attacked images (the ``index`` column).
        images: also save the adversarial images (the analyses read them).
    """
    folder = Path(folder)
    write_text(folder / RECORDS_FILE,
               run.records(index).to_csv(index=False, float_format="%.6f"))
    if images:
        save_tensors(folder / ADVERSARIAL_FILE, run.adversarial())


def read_records(folder: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Read what :func:`write_records` wrote: the records table and the adversarial images.

    Raises:
        FileNotFoundError: a file is missing (naming it and the stage that writes it).
    """
    folder = Path(folder)
    for name in (RECORDS_FILE, ADVERSARIAL_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing; run the attack stage first")
    records = pd.read_csv(folder / RECORDS_FILE)
    return records, load_tensors(folder / ADVERSARIAL_FILE, device)


def attacked_images(records: pd.DataFrame, adversarial: Mapping[str, torch.Tensor],
                    indices: torch.Tensor, *, setting: str, kind: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One run's adversarial images and success mask, checked against the attack split.

    Args:
        records: :data:`RECORDS_FILE` as read by :func:`read_records`.
        adversarial: "<setting>/<kind>" -> (N, C, H, W), as read by :func:`read_records`.
        indices: (N,) the attack split's test indices (the order of the clean images).
        setting, kind: the run, e.g. ("square-linf", "uca").

    Returns:
        ``x_adv`` (N, C, H, W) and ``success`` bool (N,), rows aligned with ``indices``.

    Raises:
        ValueError: the run is missing, or its rows or images do not match the attack split
            (stale records: rerun the attack stage).
    """
    name = f"{setting}/{kind}"
    if name not in adversarial:
        raise ValueError(f"adversarial images lack {name!r}; found {sorted(adversarial)}")
    want = indices.cpu().numpy()
    rows = records[(records["setting"] == setting) & (records["kind"] == kind)]
    if not np.array_equal(rows["index"].to_numpy(), want):
        raise ValueError(f"records of {name!r} are not aligned with the attack split; "
                         "rerun the attack stage")
    x_adv = adversarial[name]
    if x_adv.shape[0] != len(want):
        raise ValueError(f"{name!r} has {x_adv.shape[0]} images, expected {len(want)}")
    return x_adv, torch.from_numpy(rows["success"].astype(bool).to_numpy())
