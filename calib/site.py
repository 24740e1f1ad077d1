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
copied beside the pages. Only the notebooks that a stage of ``dvc.yaml`` writes are rendered, so
stale notebooks of another profile left in the folder do not leak into the site.

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
from pathlib import Path
from typing import Any
from urllib.parse import quote

from calib import paths
from calib.io import atomic_dir

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
    ("figures/resnet/fig1_reliability.png", "Figure 1 (ResNet): reliability before and after"),
    ("figures/resnet/fig2_sweeps.png", "Figure 2 (ResNet): ECE against eps and queries"),
    ("figures/resnet/table2_detection.png", "Table 2 (ResNet): detecting the attacks"),
    ("figures/resnet/table4_ece.png", "Table 4 (ResNet): ECE under attack per defence"),
    ("figures/comparison/size_comparison.png", "Architecture and model size"),
    ("figures/claims/mma_bound.png", "MMA against its theoretical ECE bound"),
)

#: The paper's claims checklist, rendered on the index.
CLAIMS_TABLE = Path("results/claims/claims.md")

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: A tqdm line: "desc:  40%|####      | 4/10 [00:01<00:02, 3.1it/s]" or "12it [00:01, 9.5it/s]".
PROGRESS_LINE = re.compile(r"\d{1,3}%\|.*\||\[\d+:\d\d(:\d\d)?(<[^,\]]*)?,[^\]]*(it/s|s/it)")
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


# --------------------------------------------------------------------------------------------
# Cleaning a notebook


def _text(value: str | list[str]) -> str:
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
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            text = strip_progress(_text(out.get("text", "")))
            if not text:
                continue
            out["text"] = text
        out["metadata"] = {}
        previous = kept[-1] if kept else None
        if (previous is not None and out.get("output_type") == "stream"
                and previous.get("output_type") == "stream"
                and previous.get("name") == out.get("name")):
            previous["text"] = _text(previous["text"]) + _text(out["text"])  # one block
        else:
            kept.append(out)
    return kept


def clean_notebook(nb: Any) -> Any:
    """A copy of an executed notebook without what readers do not want.

    Drops widget outputs, tqdm progress lines on stderr (consecutive stream outputs, split by
    them, become one), the default ``parameters`` cell when
    papermill injected the run's parameters after it, and all execution metadata (times,
    durations, widget state, kernel and Python versions). Code cells left without outputs are
    tagged so the page hides them entirely while code is hidden.
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


def _tag_empty_code_cells(nb: Any) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code" and not cell.outputs:
            cell.metadata.setdefault("tags", []).append(NO_OUTPUT_TAG)


# --------------------------------------------------------------------------------------------
# Reading pages


def _heading_and_summary(nb: Any) -> tuple[str, str]:
    """The first ``# heading`` of the notebook and the paragraph that follows it."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        blocks = re.split(r"\n\s*\n", _text(cell.source).strip())
        for i, block in enumerate(blocks):
            if block.startswith("# "):
                rest = [b for b in blocks[i + 1:] if not b.lstrip().startswith(("#", "|"))]
                return block[2:].strip(), (_first_sentences(rest[0]) if rest else "")
    return "", ""


def _first_sentences(paragraph: str, min_chars: int = 160) -> str:
    """The paragraph's opening sentences, at least ``min_chars`` long (an index summary)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(*`])", " ".join(paragraph.split()))
    summary = ""
    for sentence in sentences:
        summary = f"{summary} {sentence}".strip()
        if len(summary) >= min_chars:
            break
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


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


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


def _figure_html(path: str, *, caption: str | None = None) -> str:
    src = html.escape(quote(path), quote=True)
    label = html.escape(caption) if caption else f"<code>{html.escape(path)}</code>"
    return (f'<figure class="site-figure" id="{figure_id(path)}">'
            f'<a href="{src}"><img src="{src}" alt="{html.escape(Path(path).name, quote=True)}">'
            f"</a><figcaption>{label}</figcaption></figure>")


def place_figures(nb: Any, figures: Sequence[str]) -> None:
    """Show each figure after the first code cell that names its file; the rest at the end."""
    import nbformat

    unplaced = []
    for fig in figures:
        name = Path(fig).name
        cell = next((c for c in nb.cells if c.cell_type == "code" and name in _text(c.source)),
                    None)
        output = nbformat.v4.new_output("display_data", data={"text/html": _figure_html(fig)})
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


def html_exporter() -> Any:
    """nbconvert's ``basic`` template (cells only: no CSS, no JS, no CDN), without prompts.

    No preprocessors: :func:`clean_notebook` does the cleaning, and nbconvert would otherwise
    re-validate the notebook after each one (most of the rendering time).
    """
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="basic", exclude_input_prompt=True,
                        exclude_output_prompt=True, default_preprocessors=[])


def render_body(page: Page, exporter: Any | None = None) -> str:
    """The page's notebook as HTML, with its figures in place."""
    nb = copy.deepcopy(page.notebook)
    place_figures(nb, page.figures)
    _tag_empty_code_cells(nb)
    exporter = exporter or html_exporter()
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": page.name}})
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
    table = re.sub(r'<td([^>]*)>(holds|partly|does not hold|not measured)</td>',
                   lambda m: f'<td{m.group(1)} class="verdict verdict-{_slug(m.group(2))}">'
                             f"{m.group(2)}</td>", table)
    return f'<div class="table-wrap">{table}</div>'


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _env() -> Any:
    import jinja2
    import markupsafe

    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True,
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
    page_template = env.from_string(PAGE_TEMPLATE)
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
                script=TOGGLE_SCRIPT,
                prev=pages[i - 1] if i > 0 else None,
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
        index = env.from_string(INDEX_TEMPLATE).render(
            site_title=SITE_TITLE, script=TOGGLE_SCRIPT, profile=profile, n_pages=len(pages),
            sections=sections, key_figures=key_figures, figure_id=figure_id,
            claims=render_claims(claims) if claims.is_file() else None,
            claims_page=next((p for p in pages if p.section[0] == "claims"), None))
        (tmp / "index.html").write_text(index, encoding="utf-8")
    return Site(index=Path(out) / "index.html", pages=tuple(written), skipped=tuple(skipped))


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
    print(f"wrote {site.index} and {len(site.pages)} pages")
    return 0


# --------------------------------------------------------------------------------------------
# Templates, script and stylesheet

#: Code is hidden unless the reader chose to show it (kept per browser in localStorage). It
#: runs in <head>, before the page is drawn, so hidden code never flashes into view.
TOGGLE_SCRIPT = """\
(function () {
  var key = "calib-site-code", root = document.documentElement;
  try { if (localStorage.getItem(key) === "shown") root.classList.remove("code-hidden"); }
  catch (e) { /* storage disabled: keep the default */ }
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("code-toggle");
    if (!button) return;
    function label() {
      var hidden = root.classList.contains("code-hidden");
      button.textContent = hidden ? "Show code" : "Hide code";
      button.setAttribute("aria-pressed", hidden ? "false" : "true");
    }
    button.addEventListener("click", function () {
      root.classList.toggle("code-hidden");
      try {
        localStorage.setItem(key, root.classList.contains("code-hidden") ? "hidden" : "shown");
      } catch (e) { /* storage disabled: the choice lasts for this page */ }
      label();
    });
    label();
  });
})();
"""

_HEAD = """\
<!DOCTYPE html>
<html lang="en" class="code-hidden">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="style.css">
<script>
{{ script | safe }}</script>
<noscript><style>#code-toggle { display: none; }</style></noscript>
</head>
"""

PAGE_TEMPLATE = _HEAD.replace("{{ title }}", "{{ page.title | plain }} · {{ site_title }}") + """\
<body>
<header class="site-header">
  <nav class="crumbs"><a href="index.html">{{ site_title }}</a> <span>›</span>
    <a href="index.html#{{ page.section[0] }}">{{ page.section[1] }}</a></nav>
  <button id="code-toggle" type="button" aria-pressed="false">Show code</button>
</header>
{% macro pager(where) %}
<nav class="pager pager-{{ where }}">
  {% if prev %}<a class="prev" href="{{ prev.href }}" rel="prev">← {{ prev.name }}</a>
  {% else %}<span></span>{% endif %}
  <a class="up" href="index.html">Index</a>
  {% if next %}<a class="next" href="{{ next.href }}" rel="next">{{ next.name }} →</a>
  {% else %}<span></span>{% endif %}
</nav>
{% endmacro %}
{{ pager("top") }}
<main>
<p class="page-meta">Executed notebook <code>{{ page.name }}.ipynb</code>
{% if page.source %} (from <code>{{ page.source }}</code>){% endif %}.</p>
{% if page.parameters %}
<details class="parameters">
  <summary>Parameters of this run</summary>
  <table>
  {% for name, value in page.parameters | dictsort %}
    <tr><th>{{ name }}</th><td><code>{{ value | value }}</code></td></tr>
  {% endfor %}
  </table>
</details>
{% endif %}
<article class="notebook">
{{ body | safe }}
</article>
</main>
{{ pager("bottom") }}
<footer>{{ site_title }} · rendered from the pipeline's executed notebooks by
<code>python -m calib.site</code></footer>
</body>
</html>
"""

INDEX_TEMPLATE = _HEAD.replace("{{ title }}", "{{ site_title }}") + """\
<body class="index">
<header class="site-header">
  <nav class="crumbs"><a href="index.html">{{ site_title }}</a></nav>
</header>
<main>
<h1>{{ site_title }}</h1>
<p class="lead">The executed notebooks of every pipeline stage{% if profile %}
 (profile <code>{{ profile }}</code>){% endif %}: {{ n_pages }} pages, from the prepared data to the
paper's claims. Each stage's code is folded away; open it with <em>Show code</em> on any page.</p>
<nav class="toc">
  {% if key_figures %}<a href="#key-figures">Key figures</a>{% endif %}
  {% if claims %}<a href="#claims-checklist">Claims checklist</a>{% endif %}
  {% for section in sections %}<a href="#{{ section[0] }}">{{ section[1] }}</a>{% endfor %}
</nav>
{% if key_figures %}
<section id="key-figures">
<h2>Key figures</h2>
<div class="thumbs">
{% for path, caption, page in key_figures %}
  <figure class="thumb">
    <a href="{{ page.href ~ '#' ~ figure_id(path) if page else path | url }}">
      <img src="{{ path | url }}" alt="{{ caption }}"></a>
    <figcaption>{{ caption }}{% if page %} · <a href="{{ page.href }}">{{ page.name }}</a>
    {% endif %}</figcaption>
  </figure>
{% endfor %}
</div>
</section>
{% endif %}
{% if claims %}
<section id="claims-checklist">
<h2>Claims checklist</h2>
<p>Each claim of the paper, what was measured here and the rule that decides the verdict
{% if claims_page %}
 (details: <a href="{{ claims_page.href }}">{{ claims_page.name }}</a>){% endif %}.
</p>
{{ claims | safe }}
</section>
{% endif %}
{% for section, groups in sections.items() %}
<section id="{{ section[0] }}">
<h2>{{ section[1] }}</h2>
{% for source, pages in groups.items() %}
<div class="card">
  <h3><a href="{{ pages[0].href }}">{{ pages[0].title | md_inline }}</a></h3>
  {% if pages[0].summary %}<div class="summary">{{ pages[0].summary | md }}</div>{% endif %}
  {% if pages | length > 1 or pages[0].variant %}
  <p class="variants">
  {% for page in pages %}<a href="{{ page.href }}">{{ page.variant or page.name }}</a>
  {% endfor %}
  </p>
  {% endif %}
</div>
{% endfor %}
</section>
{% endfor %}
</main>
<footer>{{ site_title }} · rendered from the pipeline's executed notebooks by
<code>python -m calib.site</code></footer>
</body>
</html>
"""

_STYLE = """\
:root {
  --text: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0b5cad;
  --code-bg: #f6f8fa; --width: 60rem;
}
* { box-sizing: border-box; }
html { font-size: 16px; }
body {
  margin: 0; color: var(--text); background: #fff; line-height: 1.55;
  font-family: -apple-system, "Segoe UI", "Helvetica Neue", Arial, "Noto Sans",
    "Liberation Sans", sans-serif;
}
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre, kbd {
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono",
    "Liberation Mono", monospace; font-size: 0.86em;
}
main, .pager, footer { max-width: var(--width); margin: 0 auto; padding: 0 1.25rem; }
h1, h2, h3 { line-height: 1.25; margin: 1.6em 0 0.6em; }
h1 { font-size: 1.9rem; }
h2 { font-size: 1.4rem; padding-bottom: 0.25em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.15rem; }
p code, li code, td code, th code, h1 code, h2 code, h3 code {
  background: var(--code-bg); padding: 0.1em 0.3em; border-radius: 4px;
}
.site-header {
  position: sticky; top: 0; z-index: 10; display: flex; align-items: center; gap: 1rem;
  justify-content: space-between; padding: 0.55rem 1.25rem; background: rgba(255,255,255,0.96);
  border-bottom: 1px solid var(--line);
}
.crumbs { font-size: 0.95rem; color: var(--muted); }
.crumbs span { margin: 0 0.3em; }
#code-toggle {
  font: inherit; font-size: 0.9rem; padding: 0.3rem 0.8rem; border-radius: 6px; cursor: pointer;
  white-space: nowrap;
  border: 1px solid var(--line); background: var(--soft); color: var(--text);
}
#code-toggle:hover { background: #eaeef2; }
.pager {
  display: flex; justify-content: space-between; align-items: center; gap: 1rem;
  font-size: 0.92rem; padding-top: 0.8rem; padding-bottom: 0.8rem;
}
.pager-bottom { border-top: 1px solid var(--line); margin-top: 2.5rem; }
footer { color: var(--muted); font-size: 0.85rem; padding-top: 0.5rem; padding-bottom: 2rem; }
.page-meta { color: var(--muted); font-size: 0.9rem; margin: 0.4rem 0; }
details.parameters { margin: 0.5rem 0 1rem; font-size: 0.9rem; }
details.parameters summary { cursor: pointer; color: var(--muted); }
details.parameters table { margin-top: 0.4rem; }
details.parameters th { text-align: left; font-weight: 600; padding-right: 1.5rem; }

/* Notebook cells (nbconvert's classic markup, prompts excluded) */
.cell { margin: 0.9rem 0; }
.text_cell_render > :first-child { margin-top: 0.4em; }
.anchor-link { visibility: hidden; margin-left: 0.3em; font-weight: 400; color: var(--muted); }
h1:hover .anchor-link, h2:hover .anchor-link, h3:hover .anchor-link { visibility: visible; }
.input_area {
  background: var(--code-bg); border: 1px solid var(--line); border-radius: 6px;
  padding: 0.5rem 0.8rem; overflow-x: auto;
}
.input_area pre, .highlight pre { margin: 0; line-height: 1.45; }
.output_wrapper { margin-top: 0.4rem; }
.output_area { overflow-x: auto; }
.output_area pre {
  margin: 0.3rem 0; padding: 0.4rem 0.8rem; line-height: 1.4; white-space: pre-wrap;
  border-left: 3px solid var(--line);
}
.output_stderr pre { background: #fff5f5; border-left-color: #e5a3a3; }
.output_error pre { background: #fff5f5; border-left-color: #cf222e; }
.code-hidden .code_cell .input, .code-hidden .celltag_site-no-output { display: none; }
.code-hidden .code_cell .output_wrapper { margin-top: 0; }
.output_png img, .output_jpeg img, .output_svg svg, .rendered_html img {
  max-width: 100%; height: auto;
}
.site-figure { margin: 1rem 0; text-align: center; }
.site-figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
.site-figure figcaption, .thumb figcaption { color: var(--muted); font-size: 0.85rem; }

/* Tables: notebook markdown, pandas DataFrames, the claims checklist */
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.6rem; vertical-align: top; }
thead th, table.dataframe th { background: var(--soft); }
table.dataframe td, table.dataframe th { text-align: right; }
table.dataframe th { white-space: nowrap; }
table.dataframe td { max-width: 36rem; }
/* Wide tables may use more than the text column, centred on it, up to the window's width. */
.output_area:has(table.dataframe) {
  --wide: min(calc(100vw - 2.5rem), 80rem);
  width: var(--wide); margin-left: calc((100% - var(--wide)) / 2);
}
.output_area:has(table.dataframe) > .output_subarea { width: fit-content; margin: 0 auto; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
details.parameters th, details.parameters td { border: 0; padding: 0.1rem 0.3rem;
  background: none; }
.table-wrap { overflow-x: auto; }
.verdict { font-weight: 600; white-space: nowrap; }
.verdict-holds { color: #1a7f37; }
.verdict-partly { color: #9a6700; }
.verdict-does-not-hold { color: #cf222e; }
.verdict-not-measured { color: var(--muted); }

/* Index */
.lead { font-size: 1.05rem; color: #333; }
.toc { display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; margin: 1rem 0; font-size: 0.95rem; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(17rem, 1fr));
  gap: 1rem; }
.thumb { margin: 0; padding: 0.6rem; border: 1px solid var(--line); border-radius: 8px;
  background: #fff; }
.thumb img { display: block; width: 100%; height: 12rem; object-fit: contain; }
.thumb figcaption { margin-top: 0.4rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 0.2rem 1rem 0.6rem;
  margin: 0.8rem 0; }
.card h3 { margin: 0.8rem 0 0.3rem; }
.card .summary { color: #333; font-size: 0.93rem; }
.card .summary p { margin: 0.3rem 0; }
.variants { display: flex; flex-wrap: wrap; gap: 0.4rem; margin: 0.5rem 0 0.2rem; }
.variants a { font-size: 0.85rem; padding: 0.1rem 0.55rem; border: 1px solid var(--line);
  border-radius: 999px; background: var(--soft); }
.variants a:hover { background: #eaeef2; text-decoration: none; }
#claims-checklist table { font-size: 0.84rem; }
#claims-checklist td { min-width: 8rem; }

/* ANSI colours in outputs (tracebacks, coloured logs) */
.ansi-red-fg { color: #cf222e; } .ansi-green-fg { color: #1a7f37; }
.ansi-yellow-fg { color: #9a6700; } .ansi-blue-fg { color: #0969da; }
.ansi-cyan-fg { color: #1b7c83; } .ansi-magenta-fg { color: #8250df; }
.ansi-bold { font-weight: 700; }
"""


def stylesheet() -> str:
    """The site's stylesheet: layout and notebook styles, then Pygments' code colours."""
    from pygments.formatters import HtmlFormatter

    return _STYLE + "\n/* Code highlighting (Pygments, default style) */\n" + HtmlFormatter(
        style="default").get_style_defs(".highlight") + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
