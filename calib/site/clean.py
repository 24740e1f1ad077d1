"""Cleaning an executed notebook for readers of the site.

Readers do not want tqdm progress bars (stderr or widgets), the notebook's default-parameters
cell (papermill's injected cell follows it) or execution metadata (times, durations, widget
state, kernel and Python versions). All are dropped, and the checkout's own location in
printed paths (a warning names the file that raised it) is cut to a path relative to it, so
the same notebooks clean to the same cells whenever and wherever they ran.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: A tqdm line: "desc:  40%|####      | 4/10 [00:01<00:02, 3.1it/s]" or "12it [00:01, 9.5it/s]".
PROGRESS_LINE = re.compile(r"\d{1,3}%\|.*\||\[\d+:\d\d(:\d\d)?(<[^,\]]*)?,[^\]]*(it/s|s/it)")


#: The folder that holds the ``calib`` package (the checkout, or site-packages when installed).
CODE_ROOT = str(Path(__file__).resolve().parents[2]) + "/"


def relative_paths(text: str, root: str = CODE_ROOT) -> str:
    """``text`` with ``root`` cut from paths: ``<root>/calib/x.py`` -> ``calib/x.py``."""
    return text.replace(root, "")


def as_text(value: str | list[str]) -> str:
    """A notebook's multiline field (a cell's source, a stream's text): stored either way."""
    return "".join(value) if isinstance(value, list) else value


def strip_progress(text: str) -> str:
    """``text`` as a terminal would show it, without tqdm progress-bar lines.

    A carriage return redraws a line, so only what follows the last one counts.
    """
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    kept = [line for line in lines if not PROGRESS_LINE.search(line)]
    return "\n".join(kept).strip("\n") + "\n" if any(s.strip() for s in kept) else ""


def _clean_outputs(outputs: list[Any]) -> list[Any]:
    kept = []
    for out in outputs:
        if WIDGET_MIME in out.get("data", {}):
            continue  # ipywidgets (tqdm.auto in Jupyter): no state to render offline
        if out.get("output_type") == "stream":
            text = relative_paths(as_text(out.get("text", "")))
            if out.get("name") == "stderr":
                text = strip_progress(text)
                if not text:
                    continue
            out["text"] = text
        caption = out.get("metadata", {}).get("caption")  # an image's caption (calib.site)
        out["metadata"] = {"caption": caption} if isinstance(caption, str) and caption else {}
        previous = kept[-1] if kept else None
        if (previous is not None and out.get("output_type") == "stream"
                and previous.get("output_type") == "stream"
                and previous.get("name") == out.get("name")):
            previous["text"] = as_text(previous["text"]) + as_text(out["text"])  # one block
        else:
            kept.append(out)
    return kept


def clean_notebook(nb: Any) -> Any:
    """A copy of an executed notebook without what readers do not want.

    Drops widget outputs, tqdm progress lines on stderr (consecutive stream outputs, split by
    them, become one), the checkout's location from printed paths (:func:`relative_paths`),
    the default ``parameters`` cell when papermill injected the run's parameters after it, and
    all execution metadata (times, durations, widget state, kernel and Python versions).
    """
    nb = copy.deepcopy(nb)
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in nb.cells]
    injected = any("injected-parameters" in t for t in tags)
    cells = []
    for cell, cell_tags in zip(nb.cells, tags, strict=True):
        if injected and "parameters" in cell_tags:
            continue
        cell.metadata = {"tags": sorted(cell_tags)} if cell_tags else {}
        if "injected-parameters" in cell_tags:
            cell.id = "injected-parameters"  # papermill draws a random id at each run
        if cell.cell_type == "code":
            cell.outputs = _clean_outputs(cell.outputs)
        cells.append(cell)
    nb.cells = cells
    lang = nb.metadata.get("language_info", {})
    nb.metadata = {"language_info": {k: lang[k] for k in ("name", "pygments_lexer") if k in lang}}
    return nb
