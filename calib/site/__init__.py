"""Render the executed notebooks into a static HTML site (the pipeline's ``report`` stage).

Usage (what the ``report`` stage of ``dvc.yaml`` runs)::

    python -m calib.site --notebooks reports/notebooks --out reports/site

One page per executed notebook plus ``index.html``, which groups the pages by stage (data,
training, attacks, defences, analyses, claims), shows the key figures and the paper's claims
checklist (``results/claims/claims.md``). The site works offline from ``file://``: one local
stylesheet, a few lines of inline script (the "Show code" toggle, code hidden by default, the
reader's choice kept in ``localStorage``), no CDN, fonts, require.js or MathJax.

The stages save their figures to ``figures/`` instead of showing them inline, so each page gets
the figures its stage writes, read from the stage's outputs in ``dvc.yaml`` (DVC resolves the
``foreach``/``matrix`` templating); each is placed after the code cell that names its file and
copied beside the pages. Every figure of a page, saved or an image output, is numbered in
reading order ("Figure 2.") and captioned: saved figures from :mod:`calib.site.captions` (by
file name), image outputs from their output's ``metadata["caption"]``. Every table sits in its
own horizontal scroll box, so a wide one never widens the page; the notebooks show their
DataFrames through :func:`calib.reporting.show_table` (no index, display names, formatted
numbers). Only the notebooks that a stage of ``dvc.yaml`` writes are rendered, so stale
notebooks of another profile left in the folder do not leak into the site. Pages are in natural
order: numbers by value, so the eps sweep reads 0.02, 0.05, 0.1, 0.2.

Readers do not want tqdm progress bars (stderr or widgets), the notebook's default-parameters
cell (papermill's injected cell follows it) or execution metadata; all are dropped, and nothing
time- or machine-dependent is written, so the same notebooks give byte-identical pages. The site
is built in a temporary folder and swapped in whole (:func:`calib.io.atomic_dir`).
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import re
import shutil
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from calib import paths
from calib.io import atomic_dir
from calib.site.captions import caption_for
from calib.site.clean import as_text, clean_notebook

SITE_TITLE = "Calibration attacks companion"

#: Index sections by the notebooks' numeric prefix (``00_data`` ... ``50_claims``): its tens digit.
SECTIONS: dict[int, tuple[str, str]] = {
    0: ("data", "Data"),
    1: ("training", "Training"),
    2: ("attacks", "Attacks"),
    3: ("defences", "Defences"),
    4: ("analyses", "Analyses"),
    5: ("claims", "Claims"),
}
OTHER_SECTION = ("other", "Other notebooks")

#: Figures shown as thumbnails on the index, when they exist (path from the repository root).
KEY_FIGURES: tuple[tuple[str, str], ...] = (
    ("figures/resnet/fig1_reliability.png",
     "Fig. 1 (ResNet): reliability diagrams before and after each attack."),
    ("figures/resnet/fig2_sweeps.png",
     "Fig. 2 (ResNet): calibration error against eps and against the query budget."),
    ("figures/resnet/table2_detection.png",
     "Table 2 (ResNet): how often two detectors spot each attack."),
    ("figures/resnet/table4_ece.png",
     "Table 4 (ResNet): ECE of every defence before and after each attack."),
    ("figures/comparison/size_comparison.png",
     "Architecture and model size against attack damage."),
    ("figures/claims/mma_bound.png", "MMA's calibration error against its theoretical bound."),
)

#: The paper's claims checklist, rendered on the index.
CLAIMS_TABLE = Path("results/claims/claims.md")

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
NO_OUTPUT_TAG = "site-no-output"  # rendered as class celltag_site-no-output: hidden with code


class SiteError(RuntimeError):
    """The site cannot be built from what is on disk (the message names the path)."""


@dataclass(frozen=True)
class Page:
    """One executed notebook and where it goes in the site."""

    name: str                 # file stem: reports/notebooks/<name>.ipynb -> <name>.html
    notebook: Any             # the cleaned nbformat NotebookNode
    title: str                # the notebook's first heading, Markdown inline
    summary: str              # the first paragraph after it, Markdown
    section: tuple[str, str]  # (anchor, heading) on the index
    source: str               # the source notebook papermill executed ("" if unknown)
    variant: str              # what distinguishes it from pages of the same source notebook
    parameters: dict[str, Any]
    figures: tuple[str, ...]  # figure paths (from the repository root) shown on the page

    @property
    def filename(self) -> str:
        return f"{self.name}.html"

    @property
    def href(self) -> str:
        return quote(self.filename)


@dataclass(frozen=True)
class Site:
    """What :func:`build_site` wrote."""

    index: Path
    pages: tuple[Path, ...]
    skipped: tuple[str, ...]  # notebooks in the folder that no pipeline stage writes
    uncaptioned: tuple[str, ...] = ()  # figures shown without a caption (calib.site.captions)


# --------------------------------------------------------------------------------------------
# Reading pages


def _heading_and_summary(nb: Any) -> tuple[str, str]:
    """The first ``# heading`` of the notebook and a summary of the paragraph that follows it
    (its opening sentences, whole: :func:`_first_sentences`)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        blocks = re.split(r"\n\s*\n", as_text(cell.source).strip())
        for i, block in enumerate(blocks):
            if block.startswith("# "):
                rest = [b for b in blocks[i + 1:] if not b.lstrip().startswith(("#", "|"))]
                return block[2:].strip(), (_first_sentences(rest[0]) if rest else "")
    return "", ""


def _first_sentences(paragraph: str, min_chars: int = 160) -> str:
    """The paragraph's opening sentences, at least ``min_chars`` long (an index summary).

    Only whole sentences: the summary ends where a sentence does. A paragraph that introduces
    a list or table (its last sentence ends with a colon) gets a full stop instead, so the
    summary never stops mid-thought ("...every later stage uses:").
    """
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(*`])", " ".join(paragraph.split()))
    summary = ""
    for sentence in sentences:
        summary = f"{summary} {sentence}".strip()
        if len(summary) >= min_chars:
            break
    if summary.endswith(":"):
        summary = summary[:-1].rstrip() + "."
    elif summary and not re.search(r"[.!?][)*_`'\"]*$", summary):
        summary += "."
    return summary


def _section(name: str) -> tuple[str, str]:
    match = re.match(r"(\d+)_", name)
    return SECTIONS.get(int(match.group(1)) // 10, OTHER_SECTION) if match else OTHER_SECTION


def read_page(path: Path, figures: Sequence[str] = ()) -> Page:
    """Read and clean one executed notebook; ``figures`` are the files its stage wrote."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:
        raise SiteError(f"{path}: not a readable notebook ({err})") from err
    papermill = nb.metadata.get("papermill", {})
    source = str(papermill.get("input_path") or "")
    base = Path(source).stem
    name = path.stem
    variant = name[len(base) + 1:] if base and name.startswith(base + "_") else ""
    title, summary = _heading_and_summary(nb)
    return Page(name=name, notebook=clean_notebook(nb), title=title or name, summary=summary,
                section=_section(name), source=source, variant=variant,
                parameters=dict(papermill.get("parameters") or {}),
                figures=tuple(figures))


def _natural_key(name: str) -> tuple[list[Any], str]:
    """Sort key of a page name: numbers by value, decimals included (eps 0.02 < 0.05 < 0.1)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", name)
    return [float(t) if i % 2 else t for i, t in enumerate(parts)], name


def find_notebooks(folder: str | Path, select: Collection[str] | None = None
                   ) -> tuple[list[Path], list[str]]:
    """The executed notebooks of ``folder`` to render (in reading order) and those skipped.

    ``select`` restricts them to these stems (the notebooks the pipeline writes). Hidden files
    (papermill's ``.name.partial.ipynb`` of a stage in progress) are never rendered.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteError(f"notebooks folder {folder} does not exist; run the pipeline first "
                        "(dvc repro) or pass --notebooks")
    found = sorted((p for p in folder.glob("*.ipynb") if not p.name.startswith(".")),
                   key=lambda p: _natural_key(p.stem))
    if not found:
        raise SiteError(f"notebooks folder {folder} holds no executed notebooks (*.ipynb)")
    if select is None:
        return found, []
    chosen = [p for p in found if p.stem in select]
    if not chosen:
        raise SiteError(f"none of the notebooks in {folder} is written by a pipeline stage "
                        f"(expected e.g. {sorted(select)[:3]})")
    return chosen, [p.name for p in found if p.stem not in select]


def pipeline_figures(root: str | Path, notebooks: str | Path) -> dict[str, list[str]]:
    """For each executed notebook a stage of ``root/dvc.yaml`` writes into the folder
    ``notebooks``, the figures the same stage writes (its outputs under ``figures/``; folders
    are listed).

    Keys are notebook stems, values figure paths relative to ``root``. DVC resolves the
    ``foreach``/``matrix`` stages with the current ``params.yaml``.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root)
    folder = Path(notebooks).resolve()
    try:
        with Repo(str(root)) as repo:
            stages = list(repo.index.stages)
    except DvcException as err:
        raise SiteError(f"cannot read the pipeline in {root / 'dvc.yaml'}: {err}") from err
    plan: dict[str, list[str]] = {}
    for stage in stages:
        outs = [Path(o.def_path) for o in stage.outs]
        notebooks_out = [p for p in outs if p.suffix == ".ipynb"
                         and (root / p).resolve().parent == folder]
        figures: list[str] = []
        for out in outs:
            if out.parts[:1] != paths.FIGURES.parts:
                continue
            if out.suffix.lower() in IMAGE_SUFFIXES:
                figures.append(out.as_posix())
            elif (root / out).is_dir():
                figures += sorted(p.relative_to(root).as_posix() for p in (root / out).rglob("*")
                                  if p.suffix.lower() in IMAGE_SUFFIXES)
        for nb in notebooks_out:
            plan[nb.stem] = figures
    return plan


# --------------------------------------------------------------------------------------------
# Rendering


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def figure_id(path: str) -> str:
    """The HTML id of a figure on its page (the index links to it)."""
    return "figure-" + _slug(Path(path).with_suffix("").as_posix().replace("/", "-"))


def _figure_html(src: str, *, number: int, caption: str | None, path: str | None = None
                 ) -> str:
    """A numbered figure: the image (linked to its file), "Figure N." and its caption.

    ``path`` is a saved figure's path (it gives the figure its id); without a caption the
    caption is that path, which the report's browser check reports as missing.
    """
    link = html.escape(src, quote=True)
    if caption:
        text, alt = html.escape(caption), html.escape(caption, quote=True)
    else:
        text = f"<code>{html.escape(path or 'figure')}</code>"
        alt = html.escape(Path(path).name if path else "figure", quote=True)
    ident = f' id="{figure_id(path)}"' if path else ""
    image = f'<img src="{link}" alt="{alt}">'
    if path:
        image = f'<a href="{link}">{image}</a>'
    return (f'<figure class="site-figure"{ident}>{image}<figcaption>'
            f'<span class="figure-number">Figure {number}.</span> {text}'
            f"</figcaption></figure>")


#: Output metadata key marking a saved figure placed by :func:`place_figures`.
_FIGURE_KEY = "site_figure"
#: Image outputs of a notebook cell, shown as numbered figures (caption: the output's
#: ``metadata["caption"]``, e.g. ``display(Image(...), metadata={"caption": "..."})``).
_IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif")


def place_figures(nb: Any, figures: Sequence[str]) -> None:
    """Show each figure after the first code cell that names its file; the rest at the end."""
    import nbformat

    unplaced = []
    for fig in figures:
        name = Path(fig).name
        cell = next((c for c in nb.cells if c.cell_type == "code" and name in as_text(c.source)),
                    None)
        output = nbformat.v4.new_output("display_data", data={"text/html": ""},
                                        metadata={_FIGURE_KEY: fig})
        if cell is None:
            unplaced.append(output)
        else:
            cell.outputs.append(output)
    if unplaced:  # fixed cell ids: nbformat would draw random ones
        nb.cells.append(nbformat.v4.new_markdown_cell("## Figures written by this stage",
                                                      id="site-figures-heading"))
        cell = nbformat.v4.new_code_cell("# figures saved by the code above",
                                         id="site-figures")
        cell.outputs = unplaced
        nb.cells.append(cell)


def number_figures(nb: Any) -> list[str]:
    """Turn every figure of the page, saved (placed by :func:`place_figures`) or an image
    output, into a numbered, captioned ``<figure>`` in reading order; returns the saved figures
    that have no caption in :data:`calib.site.captions.CAPTIONS`."""
    uncaptioned: list[str] = []
    number = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            meta = out.get("metadata", {})
            data = out.get("data", {})
            if _FIGURE_KEY in meta:
                number += 1
                path = meta.pop(_FIGURE_KEY)
                caption = caption_for(path)
                if caption is None:
                    uncaptioned.append(path)
                data["text/html"] = _figure_html(quote(path), number=number, caption=caption,
                                                 path=path)
            elif out.get("output_type") in ("display_data", "execute_result") and (
                    mime := next((m for m in _IMAGE_MIMES if m in data), None)):
                number += 1
                payload = "".join(as_text(data[mime]).split())
                out["data"] = {"text/html": _figure_html(
                    f"data:{mime};base64,{payload}", number=number,
                    caption=meta.get("caption"))}
                out["metadata"] = {}
    return uncaptioned


def html_exporter() -> Any:
    """nbconvert's ``basic`` template (cells only: no CSS, no JS, no CDN), without prompts.

    No preprocessors: :func:`clean_notebook` does the cleaning, and nbconvert would otherwise
    re-validate the notebook after each one (most of the rendering time).
    """
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="basic", exclude_input_prompt=True,
                        exclude_output_prompt=True, default_preprocessors=[])


def _tag_empty_code_cells(nb: Any) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code" and not cell.outputs:
            cell.metadata.setdefault("tags", []).append(NO_OUTPUT_TAG)


_TABLE = re.compile(r"<table\b.*?</table>", re.S)
_WRAPPED = '<div class="table-wrap">'


def wrap_tables(body: str) -> str:
    """Put every table not already in one into its own horizontal scroll box, so a wide table
    scrolls inside the text column instead of widening the page."""
    out, pos = [], 0
    for match in _TABLE.finditer(body):
        out.append(body[pos:match.start()])
        before = body[:match.start()].rstrip()
        if before.endswith(_WRAPPED):
            out.append(match.group(0))
        else:
            out.append(f"{_WRAPPED}{match.group(0)}</div>")
        pos = match.end()
    out.append(body[pos:])
    return "".join(out)


def render_body(page: Page, exporter: Any | None = None) -> str:
    """The page's notebook as HTML, with its figures in place, numbered and captioned."""
    nb = copy.deepcopy(page.notebook)
    place_figures(nb, page.figures)
    number_figures(nb)
    _tag_empty_code_cells(nb)
    exporter = exporter or html_exporter()
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": page.name}})
    body = wrap_tables(body)
    return "\n".join(line.rstrip() for line in body.strip().splitlines()) + "\n"


def _markdown(text: str, *, inline: bool = False) -> str:
    import mistune

    out = mistune.create_markdown(plugins=["table"])(text).strip()
    if inline and out.startswith("<p>") and out.endswith("</p>"):
        out = out[3:-4]
    return out


def _plain(markdown_inline: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", _markdown(markdown_inline, inline=True)))


def render_claims(path: Path) -> str:
    """The claims checklist (Markdown table) as HTML, verdict cells marked for colour."""
    table = _markdown(path.read_text(encoding="utf-8"))
    table = re.sub(r"(<th[^>]*>)([a-z])", lambda m: m.group(1) + m.group(2).upper(), table)
    table = re.sub(r'<td([^>]*)>(holds|partly|does not hold|not measured)</td>',
                   lambda m: f'<td{m.group(1)} class="verdict verdict-{_slug(m.group(2))}">'
                             f"{m.group(2)}</td>", table)
    return f'<div class="table-wrap">{table}</div>'


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _asset(folder: str, name: str) -> str:
    """A file shipped in this package: ``templates/`` (Jinja) or ``static/`` (CSS, script)."""
    return (resources.files(__name__) / folder / name).read_text(encoding="utf-8")


def _env() -> Any:
    import jinja2
    import markupsafe

    env = jinja2.Environment(loader=jinja2.FunctionLoader(partial(_asset, "templates")),
                             autoescape=True, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = lambda s: markupsafe.Markup(_markdown(s))
    env.filters["md_inline"] = lambda s: markupsafe.Markup(_markdown(s, inline=True))
    env.filters["plain"] = _plain
    env.filters["value"] = _format_value
    env.filters["url"] = quote
    return env


def build_site(notebooks: str | Path, out: str | Path, *, root: str | Path = ".",
               figures: Mapping[str, Sequence[str]] | None = None,
               select: Collection[str] | None = None,
               profile: str | None = None) -> Site:
    """Render every executed notebook of ``notebooks`` into a static site at ``out``.

    Args:
        notebooks: folder of executed notebooks (``reports/notebooks``).
        out: the site folder (``reports/site``); replaced whole, atomically.
        root: the repository root; figure and claims paths are relative to it.
        figures: per notebook stem, the figures (paths from ``root``) its page shows.
        select: render only these notebook stems (default: every notebook in the folder).
        profile: the pipeline profile named on the index (omitted when ``None``).
    """
    root = Path(root)
    figures = dict(figures or {})
    found, skipped = find_notebooks(notebooks, select)
    pages = [read_page(p, figures.get(p.stem, ())) for p in found]
    shown = sorted({f for page in pages for f in page.figures}
                   | {f for f, _ in KEY_FIGURES if (root / f).is_file()})
    for fig in shown:
        if not (root / fig).is_file():
            raise SiteError(f"figure {root / fig} is missing; rerun the stage that writes it")
        if Path(fig).is_absolute() or ".." in Path(fig).parts:
            raise SiteError(f"figure path {fig} must be relative to the repository root")
    claims = root / CLAIMS_TABLE
    env = _env()
    page_template = env.get_template("page.html.j2")
    script = _asset("static", "toggle.js")
    exporter = html_exporter()
    written = []
    with atomic_dir(out) as tmp:
        (tmp / "style.css").write_text(stylesheet(), encoding="utf-8")
        for fig in shown:
            (tmp / fig).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / fig, tmp / fig)
        for i, page in enumerate(pages):
            text = page_template.render(
                page=page, body=render_body(page, exporter), site_title=SITE_TITLE,
                script=script, prev=pages[i - 1] if i > 0 else None,
                next=pages[i + 1] if i + 1 < len(pages) else None)
            (tmp / page.filename).write_text(text, encoding="utf-8")
            written.append(Path(out) / page.filename)
        where = {f: page for page in reversed(pages) for f in page.figures}
        key_figures = [(f, caption, where.get(f)) for f, caption in KEY_FIGURES
                       if (root / f).is_file()]
        sections: dict[tuple[str, str], dict[str, list[Page]]] = {}
        for page in pages:
            sections.setdefault(page.section, {}).setdefault(page.source or page.name,
                                                             []).append(page)
        index = env.get_template("index.html.j2").render(
            site_title=SITE_TITLE, script=script, profile=profile, n_pages=len(pages),
            sections=sections, key_figures=key_figures, figure_id=figure_id,
            claims=render_claims(claims) if claims.is_file() else None,
            claims_page=next((p for p in pages if p.section[0] == "claims"), None))
        (tmp / "index.html").write_text(index, encoding="utf-8")
    uncaptioned = sorted({f for page in pages for f in page.figures if caption_for(f) is None})
    return Site(index=Path(out) / "index.html", pages=tuple(written), skipped=tuple(skipped),
                uncaptioned=tuple(uncaptioned))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m calib.site", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", default="reports/notebooks",
                        help="folder of executed notebooks (default: %(default)s)")
    parser.add_argument("--out", default="reports/site",
                        help="site folder, replaced whole (default: %(default)s)")
    parser.add_argument("--root", default=".",
                        help="repository root: dvc.yaml, figures/, results/ (default: %(default)s)")
    parser.add_argument("--profile", default=None,
                        help="the params profile, named on the index (the stage passes it)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="render every notebook in the folder, without reading dvc.yaml "
                             "(pages then show no saved figures)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        figures = select = None
        if not args.no_pipeline and (root / "dvc.yaml").is_file():
            figures = pipeline_figures(root, args.notebooks)
            select = set(figures)
        site = build_site(args.notebooks, args.out, root=root, figures=figures, select=select,
                          profile=args.profile)
    except SiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if site.skipped:
        print(f"skipped {len(site.skipped)} notebooks no stage of dvc.yaml writes (stale?): "
              + ", ".join(site.skipped), file=sys.stderr)
    if site.uncaptioned:
        print(f"{len(site.uncaptioned)} figures have no caption in calib/site/captions.py "
              "(shown with their path): " + ", ".join(site.uncaptioned), file=sys.stderr)
    print(f"wrote {site.index} and {len(site.pages)} pages")
    return 0


def stylesheet() -> str:
    """The site's stylesheet: layout and notebook styles, then Pygments' code colours."""
    from pygments.formatters import HtmlFormatter

    pygments = HtmlFormatter(style="default").get_style_defs(".highlight")
    return (_asset("static", "style.css") + "\n/* Code highlighting (Pygments, default style) */\n"
            + pygments + "\n")

