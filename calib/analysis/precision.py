"""Is a faster query forward safe for a profile? fp32 against bf16/TF32 or a frozen graph.

A profile may set ``attack.precision`` to something other than fp32, or query a frozen graph
of the model (:mod:`calib.query_graph`), only after this check has passed on its models
(SPEC §10, "measured, not assumed"):

1. the clean predictions of the attacked images agree 100% between fp32 and the reduced
   precision (a reduced forward that moves a label would attack a different prediction);
2. every Table 1 number of the grid run with reduced-precision queries (success rate,
   accuracy, confidence, ECE and KS after the attack; all re-read in fp32) lies inside the 95%
   bootstrap interval of the same number from the fp32 run, on the same images and seed.
   Where a percentile interval leaves out its own estimate (ECE and KS are biased upward
   under resampling, so at small values the whole interval can sit above the estimate), the
   interval is stretched to reach the estimate, and a difference under
   :data:`ROUNDING` is float32 rounding, not a move: a candidate that reproduces fp32 always
   passes, and no move away from it passes that the interval alone would refuse.

``benchmarks/precision_check.py`` runs it on the trained pipeline models and prints the table;
its numbers are recorded in ``benchmarks/README.md``.

Example:
    >>> check = compare_precisions(model, images, labels, grid, precision="bf16")
    >>> check.passed, check.speedup
    >>> check.table()          # one row per (setting, kind, metric)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from calib.attacks.grid import AttackGrid, GridRun, run_grid
from calib.precision import Precision, resolve_precision, with_precision
from calib.query_graph import QueryGraph, freeze_for_queries
from calib.runtime import predict_logits

__all__ = [
    "CHECKED_METRICS",
    "ROUNDING",
    "PrecisionCheck",
    "clean_agreement",
    "compare_precisions",
    "moved_inside",
]

#: Table 1 numbers that must stay inside fp32's 95% interval.
CHECKED_METRICS: tuple[str, ...] = ("success_rate", "accuracy_after", "confidence_after",
                                    "ece_after", "ks_after")


def clean_agreement(model: nn.Module, images: torch.Tensor, precision: Precision, *,
                    queried: nn.Module | None = None, batch_size: int = 256) -> float:
    """Fraction of ``images`` (N, C, H, W) whose argmax is the same on ``model`` in fp32 and
    on what the attacks query: ``queried`` (e.g. a frozen graph) or, with None, ``model`` in
    ``precision``."""
    reference = predict_logits(model, images, batch_size=batch_size).argmax(1)
    queried = with_precision(model, precision) if queried is None else queried
    reduced = predict_logits(queried, images, batch_size=batch_size).argmax(1)
    return float((reference == reduced).double().mean())


@dataclass
class PrecisionCheck:
    """Outcome of :func:`compare_precisions`.

    Attributes:
        precision: the reduced precision as resolved on the device (``used`` may be fp32
            after a fallback, in which case the check compares fp32 with itself and says so).
        agreement: clean-prediction agreement with fp32, in [0, 1].
        rows: one dict per (setting, kind, metric): fp32 value and interval, reduced value,
            difference, inside.
        seconds: wall time of the fp32 and the reduced grid run.
    """

    precision: Precision
    agreement: float
    rows: list[dict]
    seconds: dict[str, float]
    query_graph: QueryGraph | None = None

    @property
    def candidate(self) -> str:
        """What the checked run's queries ran in: "bf16", "tf32", "fp32" or "fp32-frozen"."""
        frozen = self.query_graph is not None and self.query_graph.used == "frozen"
        return f"{self.precision.used}-frozen" if frozen else self.precision.used

    @property
    def passed(self) -> bool:
        return self.agreement == 1.0 and all(r["inside"] for r in self.rows)

    @property
    def speedup(self) -> float:
        """fp32 grid time over the checked run's grid time."""
        return self.seconds["fp32"] / self.seconds[self.candidate]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def verdict(self) -> str:
        """One sentence: passed or not, and on what."""
        if self.precision.fell_back:
            return f"not checked: {self.precision.reason}"
        if self.query_graph is not None and self.query_graph.fell_back:
            return f"not checked: {self.query_graph.reason}"
        outside = [f"{r['setting']}/{r['kind']} {r['metric']}" for r in self.rows
                   if not r["inside"]]
        head = (f"{self.candidate}: clean predictions agree {self.agreement:.2%}, "
                f"{len(self.rows) - len(outside)}/{len(self.rows)} Table 1 numbers inside "
                f"fp32's 95% interval, {self.speedup:.2f}x faster")
        if self.passed:
            return f"passed ({head})"
        return f"FAILED ({head}; outside: {', '.join(outside) or 'none'})"


#: Differences below this are float32 rounding of re-read confidences, not moves (a frozen
#: graph's logits differ from eager ones by up to 4e-6; Table 1 prints 3 decimals).
ROUNDING = 1e-5


def moved_inside(value: float, estimate: float, lo: float, hi: float) -> bool:
    """Whether ``value`` stays inside the reference's 95% interval ``[lo, hi]``, stretched to
    reach the reference's own ``estimate`` where the percentile interval leaves it out (ECE's
    upward resampling bias), give or take :data:`ROUNDING`."""
    return min(lo, estimate) - ROUNDING <= value <= max(hi, estimate) + ROUNDING


def _summaries(run: GridRun) -> dict[tuple[str, str], dict]:
    return {(s["setting"], s["kind"]): s for s in run.summaries()}


def compare_precisions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       grid: AttackGrid, *, precision: str = "bf16", query_graph: str = "eager",
                       seed: int = 0, batch_size: int = 256, show_progress: bool = False,
                       reduced_context: Callable[[], AbstractContextManager] | None = None
                       ) -> PrecisionCheck:
    """Run ``grid`` with fp32 queries and with the candidate's queries; compare Table 1.

    Args:
        model: the trained model (images (N, C, H, W) in [0, 1] -> logits (N, K)).
        images, labels: the attacked set, on the model's device.
        grid: the profile's attack grid (its own ``precision`` is ignored).
        precision: the candidate's precision ("bf16", "tf32", or "fp32" with a frozen graph).
        query_graph: "frozen" queries a frozen graph of ``model``
            (:func:`calib.query_graph.freeze_for_queries`) in the black-box settings (white-box
            PGD needs gradients and runs on ``model``, so its numbers match by construction);
            fp32 only. "eager" queries ``model``.
        seed, batch_size, show_progress: as :func:`calib.attacks.grid.run_grid`.
        reduced_context: a factory of the context the candidate run executes in (e.g. a
            candidate rule that confirms some of the reduced queries' decisions in fp32,
            ``benchmarks/precision_decisions.py --check``); None runs it as is.

    Raises:
        ValueError: an unknown name, or a frozen graph with a precision other than fp32.
    """
    chosen = resolve_precision(precision, images.device)
    queries, graph = freeze_for_queries(model, query_graph, input_shape=images.shape[1:])
    if graph.requested == "frozen" and chosen.used != "fp32":
        raise ValueError(f"query_graph 'frozen' runs in fp32; precision {precision!r} resolved "
                         f"to {chosen.used!r}")
    agreement = clean_agreement(model, images, chosen, batch_size=batch_size,
                                queried=queries if graph.used == "frozen" else None)
    reference = run_grid(model, images, labels,
                         replace(grid, precision="fp32", query_graph="eager"), seed=seed,
                         batch_size=batch_size, show_progress=show_progress)
    # The candidate: the frozen graph's Square queries (PGD differentiates through the model
    # in both runs), or every query in the reduced precision. run_grid re-reads every outcome
    # on the eager fp32 model either way.
    candidate = (replace(grid, precision="fp32", query_graph="frozen") if graph.used == "frozen"
                 else replace(grid, precision=chosen.used, query_graph="eager"))
    with (reduced_context or contextlib.nullcontext)():
        reduced = run_grid(model, images, labels, candidate, seed=seed, batch_size=batch_size,
                           show_progress=show_progress)
    ref, red = _summaries(reference), _summaries(reduced)
    rows = []
    for (setting, kind), s in ref.items():
        for metric in CHECKED_METRICS:
            lo, hi, value = s[f"{metric}_lo"], s[f"{metric}_hi"], red[setting, kind][metric]
            rows.append({"setting": setting, "kind": kind, "metric": metric,
                         "fp32": s[metric], "fp32_lo": lo, "fp32_hi": hi,
                         "reduced": value,
                         "difference": value - s[metric],
                         "inside": moved_inside(value, s[metric], lo, hi)})
    check = PrecisionCheck(chosen, agreement, rows, {"fp32": reference.seconds}, graph)
    check.seconds[check.candidate] = (reduced.seconds if check.candidate != "fp32"
                                      else reference.seconds)
    return check
