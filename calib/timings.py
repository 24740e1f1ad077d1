"""Time per stage, read from the executed notebooks papermill wrote.

Every stage's executed notebook records when it ran and for how long
(``metadata.papermill.start_time`` / ``duration``), so after any ``dvc repro`` (CPU or GPU)
the time per stage is one command away::

    python -m calib.timings                      # reports/notebooks/*.ipynb
    python -m calib.timings path/to/notebooks --markdown

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.timings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="reports/notebooks",
                        help="folder of executed notebooks (default: reports/notebooks)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        times = stage_times(args.folder)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(times, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
