"""Time per stage, read from the executed notebooks papermill wrote.

Every stage's executed notebook records when it ran and for how long
(``metadata.papermill.start_time`` / ``duration``), so after any ``dvc repro`` (CPU or GPU)
the time per stage is one command away::

    python -m calib.timings                      # reports/notebooks/*.ipynb
    python -m calib.timings path/to/notebooks --markdown
    python -m calib.timings --by-kind            # one line per kind of stage (all defences, ...)

Only stages that actually ran leave a fresh notebook: a stage DVC skipped keeps the time of the
run that produced its cached outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageTime:
    """One executed notebook: its file name, when it started (ISO 8601) and seconds taken."""

    notebook: str
    start_time: str
    seconds: float


def stage_times(folder: str | Path) -> list[StageTime]:
    """Durations of the executed notebooks in ``folder``, in the order they ran.

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no executed notebook.
        ValueError: a notebook has no papermill timing (it was not run by the pipeline).
    """
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no executed notebooks in {folder} (run `dvc repro` first)")
    times = []
    for path in paths:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        papermill = meta.get("papermill", {})
        if papermill.get("duration") is None:
            raise ValueError(f"{path}: no papermill duration; was it executed by the pipeline?")
        times.append(StageTime(path.stem, str(papermill.get("start_time") or ""),
                               float(papermill["duration"])))
    return sorted(times, key=lambda t: (t.start_time, t.notebook))


def format_seconds(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a duration in seconds."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_table(times: list[StageTime], *, markdown: bool = False) -> str:
    """A table of notebook, start time and duration, with the total on the last line."""
    total = sum(t.seconds for t in times)
    rows = [(t.notebook, t.start_time[:19], format_seconds(t.seconds)) for t in times]
    rows.append(("total", "", format_seconds(total)))
    if markdown:
        lines = ["| notebook | started | time |", "|---|---|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:<19}  {c:>8}" for a, b, c in rows)


def stage_kind(notebook: str) -> str:
    """The kind of stage an executed notebook belongs to: its number and first word.

    ``30_defend_resnet-aaa`` -> ``30_defend``, ``40_budget_vit-25`` -> ``40_budget``,
    ``00_data`` -> ``00_data``.
    """
    return "_".join(notebook.split("_")[:2])


def group_by_kind(times: list[StageTime]) -> list[StageTime]:
    """One entry per kind of stage (:func:`stage_kind`), in the order the kinds first ran.

    Each entry's ``notebook`` is ``"<kind> (n stages)"``, its ``start_time`` the first start
    of that kind and its ``seconds`` the sum over the kind's stages.
    """
    groups: dict[str, list[StageTime]] = {}
    for t in times:
        groups.setdefault(stage_kind(t.notebook), []).append(t)
    out = []
    for kind, members in groups.items():
        label = kind if len(members) == 1 else f"{kind} ({len(members)} stages)"
        out.append(StageTime(label, min(m.start_time for m in members),
                             sum(m.seconds for m in members)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.timings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="reports/notebooks",
                        help="folder of executed notebooks (default: reports/notebooks)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--by-kind", action="store_true",
                        help="one line per kind of stage (e.g. all defence stages together)")
    args = parser.parse_args(argv)
    try:
        times = stage_times(args.folder)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.by_kind:
        times = group_by_kind(times)
    print(format_table(times, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
