"""Does a reproduction agree with the committed results? (``make compare``)

Retraining on another machine gives slightly different models (CPU kernels differ between
processors), so a reproduction never matches the committed numbers byte for byte. What a reader
can check is whether each new number lies inside the committed number's 95% interval: every
table the pipeline commits carries ``<metric>_lo`` / ``<metric>_hi`` columns beside
``<metric>`` (bootstrap over the evaluated images, :mod:`calib.stats`). This module compares,
for every such number, the reproduction's value with the reference interval.

The reference is a git revision's committed ``results/`` (default ``HEAD``: what was cloned)
or a folder; the reproduction is the working tree's ``results/``. Rows are matched on the
tables' text columns (model, setting, attack, ...). A number outside its interval is not an
error by itself (one in twenty is expected outside a 95% interval by chance); the summary says
how many were inside and lists the others.

Run as ``python -m calib.reproduction [--reference REV | --reference-dir DIR] [--strict]``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

LO, HI = "_lo", "_hi"


@dataclass(frozen=True)
class Check:
    """One headline number: the reproduction's value against the reference interval."""

    table: str
    row: str
    metric: str
    reference: float
    lo: float
    hi: float
    value: float | None

    @property
    def inside(self) -> bool:
        return self.value is not None and self.lo <= self.value <= self.hi

    def describe(self) -> str:
        got = "missing" if self.value is None else f"{self.value:.4g}"
        return (f"{self.table} [{self.row}] {self.metric}: {got} against "
                f"{self.reference:.4g} [{self.lo:.4g}, {self.hi:.4g}]")


def interval_metrics(frame: pd.DataFrame) -> list[str]:
    """Columns ``m`` of ``frame`` that come with ``m_lo`` and ``m_hi``."""
    return [c for c in frame.columns if f"{c}{LO}" in frame and f"{c}{HI}" in frame]


def _keys(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if frame[c].dtype == object]


def _row_ids(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    if not keys:
        return pd.Series([str(i) for i in range(len(frame))], index=frame.index)
    return frame[list(keys)].astype(str).agg(" / ".join, axis=1)


def compare_tables(name: str, reference: pd.DataFrame, reproduced: pd.DataFrame | None
                   ) -> list[Check]:
    """Every interval number of ``reference`` checked against ``reproduced``.

    Args:
        name: the table's name (its path under results/), for the report.
        reference: the committed table, with ``<metric>_lo`` / ``_hi`` columns.
        reproduced: the same table from the reproduction, or None if it is missing.

    Raises:
        ValueError: the reference's text columns do not identify its rows uniquely.
    """
    metrics = interval_metrics(reference)
    if not metrics:
        return []
    keys = _keys(reference)
    ref_ids = _row_ids(reference, keys)
    if ref_ids.duplicated().any():
        raise ValueError(f"{name}: rows are not unique on {keys}; cannot match them")
    values: dict[tuple[str, str], float] = {}
    if reproduced is not None:
        new_ids = _row_ids(reproduced, [k for k in keys if k in reproduced])
        for metric in metrics:
            if metric in reproduced:
                for row_id, value in zip(new_ids, reproduced[metric], strict=True):
                    values[row_id, metric] = float(value)
    checks = []
    for row_id, (_, row) in zip(ref_ids, reference.iterrows(), strict=True):
        for metric in metrics:
            if pd.isna(row[metric]):
                continue
            checks.append(Check(name, row_id, metric, float(row[metric]),
                                float(row[f"{metric}{LO}"]), float(row[f"{metric}{HI}"]),
                                values.get((row_id, metric))))
    return checks


def _committed_tables(revision: str, folder: str, repo: Path) -> Iterator[tuple[str, str]]:
    """(path relative to ``folder``, text) of every CSV under ``folder`` at ``revision``."""
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "--", folder],
                             cwd=repo, capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise ValueError(f"git cannot read {revision!r}: {listing.stderr.strip()}")
    for path in sorted(p for p in listing.stdout.splitlines() if p.endswith(".csv")):
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=repo,
                               capture_output=True, text=True, check=True)
        yield str(Path(path).relative_to(folder)), shown.stdout


def _folder_tables(folder: Path) -> Iterator[tuple[str, str]]:
    """(path relative to ``folder``, text) of every CSV under ``folder``."""
    for path in sorted(folder.rglob("*.csv")):
        yield str(path.relative_to(folder)), path.read_text()


def compare(reference: Iterable[tuple[str, str]], results: Path) -> list[Check]:
    """All checks of the reference tables (relative path, CSV text) against ``results``."""
    checks: list[Check] = []
    for relative, text in reference:
        ref = pd.read_csv(io.StringIO(text))
        if not interval_metrics(ref):
            continue
        new_path = results / relative
        new = pd.read_csv(new_path) if new_path.is_file() else None
        checks += compare_tables(f"results/{relative}", ref, new)
    return checks


def report(checks: Sequence[Check]) -> str:
    """A short summary: how many numbers are inside their reference interval, and the rest."""
    if not checks:
        return ("The reference holds no interval columns (<metric>_lo/_hi): it predates the "
                "intervals, so there is nothing to compare against; regenerate it first.")
    inside = sum(c.inside for c in checks)
    missing = [c for c in checks if c.value is None]
    outside = [c for c in checks if c.value is not None and not c.inside]
    tables = len({c.table for c in checks})
    lines = [f"{inside} of {len(checks)} headline numbers in {tables} tables lie inside the "
             f"committed 95% interval ({inside / len(checks):.0%}; about 95% is what agreement "
             "looks like)."]
    if outside:
        lines.append(f"Outside ({len(outside)}):")
        lines += [f"  {c.describe()}" for c in outside]
    if missing:
        lines.append(f"Missing from the reproduction ({len(missing)}):")
        lines += [f"  {c.describe()}" for c in missing[:20]]
        if len(missing) > 20:
            lines.append(f"  ... and {len(missing) - 20} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.reproduction",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--reference", default="HEAD",
                        help="git revision whose committed results/ are the reference")
    source.add_argument("--reference-dir", type=Path,
                        help="a folder of reference tables instead of a git revision")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="the reproduction's results folder (default results/)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when more than 5%% of the numbers lie outside")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    try:
        if args.reference_dir is not None:
            if not args.reference_dir.is_dir():
                raise ValueError(f"--reference-dir {args.reference_dir} is not a folder")
            reference = _folder_tables(args.reference_dir)
        else:
            reference = _committed_tables(args.reference, "results", repo)
        if not args.results.is_dir():
            raise ValueError(f"no results folder {args.results}; run `make reproduce` first")
        checks = compare(reference, args.results)
    except ValueError as err:
        print(f"make compare: {err}", file=sys.stderr)
        return 2
    print(report(checks))
    outside = sum(not c.inside for c in checks)
    return 1 if args.strict and checks and outside > 0.05 * len(checks) else 0


if __name__ == "__main__":
    sys.exit(main())
