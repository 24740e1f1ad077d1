"""Open a static site in headless Chromium and report what a reader would see broken.

Used by the tests (``from browser import check_site``); not a test module itself. Chromium is
Debian's ``chromium`` package (``scripts/setup.sh`` installs it), driven by Playwright for
Python through ``executable_path``; Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

#: Where Debian's chromium package puts its launcher; ``CHROMIUM`` overrides.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")

# After "load": every <img> with its decoded size, every link, every id on the page.
_INSPECT = """() => ({
  images: Array.from(document.images).map(i => ({
    src: i.getAttribute("src") || "", complete: i.complete, width: i.naturalWidth})),
  links: Array.from(document.querySelectorAll("a[href]")).map(a => a.getAttribute("href")),
  ids: Array.from(document.querySelectorAll("[id], a[name]")).map(e => e.id || e.name),
  title: document.title,
})"""

#: The window the strict checks lay pages out in (a laptop screen).
VIEWPORT = {"width": 1280, "height": 900}

# What a reader of a paper would find wrong, after "load" (the strict checks). Per table: the
# box it scrolls in (its nearest ancestor with overflow-x auto/scroll, if any) and whether that
# box, or the table itself without one, fits the text column (<main>'s content box) and its
# parent; pandas' marks of an index (rows of the body that start with a header cell <th>
# beside data cells <td>, a blank top-left header).
# Hand-written Markdown tables of a notebook's text cells (.text_cell_render) are prose: a
# blank corner cell there labels row headings the author wrote, not a DataFrame index. Per
# image: the caption of the <figure> it sits in, and whether it is in the page's article.
_INSPECT_STRICT = """() => {
  const main = document.querySelector("main") || document.body;
  const ms = getComputedStyle(main), mr = main.getBoundingClientRect();
  const left = mr.left + parseFloat(ms.paddingLeft), right = mr.right - parseFloat(ms.paddingRight);
  const scrolls = e => ["auto", "scroll"].includes(getComputedStyle(e).overflowX);
  const label = t => ((t.querySelector("caption") || t.querySelector("th, td") || t)
                      .textContent || "").trim().replace(/\\s+/g, " ").slice(0, 40);
  const tables = Array.from(document.querySelectorAll("table")).map(t => {
    let box = null;
    for (let e = t.parentElement; e && e !== document.body; e = e.parentElement) {
      if (scrolls(e)) { box = e; break; }
      if (e === main) break;
    }
    const outside = r => r.left < left - 1 || r.right > right + 1;
    const parent = t.parentElement;
    const head = t.querySelector("thead tr, tr");
    const corner = head ? head.querySelector("th, td") : null;
    return {
      hidden: t.getClientRects().length === 0, label: label(t),
      width: Math.round(t.getBoundingClientRect().width), column: Math.round(right - left),
      scrollBox: box !== null,
      outside: outside(t.getBoundingClientRect()),
      boxOutside: box !== null && outside(box.getBoundingClientRect()),
      overflows: box === null && parent.scrollWidth > parent.clientWidth + 1,
      prose: t.closest(".text_cell_render") !== null,
      rowHeaders: Array.from(t.querySelectorAll("tbody tr")).filter(
        r => r.querySelector("th") && r.querySelector("td")).length,
      blankCorner: corner !== null && corner.tagName === "TH" && corner.textContent.trim() === "",
    };
  });
  const figures = Array.from(document.images).map(i => {
    const fig = i.closest("figure"), cap = fig ? fig.querySelector("figcaption") : null;
    return {src: i.getAttribute("src") || "", caption: cap ? cap.innerText.trim() : null,
            inArticle: i.closest("article") !== null};
  });
  const text = document.body ? document.body.innerText : "";
  return {
    tables, figures,
    truncated: (text.match(/\\b\\d+ rows [×x] \\d+ columns\\b/g) || []),
    pageWidth: document.documentElement.scrollWidth,
    windowWidth: document.documentElement.clientWidth,
  };
}"""

#: A figure caption's number ("Figure 3.") and file names in a caption: neither is a caption.
_FIGURE_NUMBER = re.compile(r"^\s*Figure\s+\d+\.")
_FILE_NAME = re.compile(r"\S+\.(png|svg|jpe?g|gif|pdf)\b", re.I)


def layout_problems(info: dict, page: str) -> list[str]:
    """The strict checks' findings on one page (``info``: what :data:`_INSPECT_STRICT` saw)."""
    problems = []
    if info["pageWidth"] > info["windowWidth"] + 1:
        problems.append(f"{page}: page wider than the window ({info['pageWidth']} > "
                        f"{info['windowWidth']} px): it scrolls sideways")
    for t in info["tables"]:
        name = f"table \"{t['label']}\""
        if t["hidden"]:  # folded away (a closed <details>): no layout to check
            pass
        elif t["overflows"] or (t["outside"] and not t["scrollBox"]):
            problems.append(f"{page}: {name} wider than its column ({t['width']} px, column "
                            f"{t['column']} px) and not in a scroll box of its own")
        elif t["outside"] and t["boxOutside"]:
            problems.append(f"{page}: {name} wider than its column ({t['width']} px, column "
                            f"{t['column']} px), in a scroll box wider than the column")
        if not t["prose"] and t["rowHeaders"]:
            problems.append(f"{page}: {name} has an index column ({t['rowHeaders']} row "
                            "headers <th> in its body)")
        elif not t["prose"] and t["blankCorner"]:
            problems.append(f"{page}: {name} has an index column (blank top-left header)")
    for text in info["truncated"]:
        problems.append(f"{page}: truncated DataFrame (\"{text}\")")
    for fig in info["figures"]:
        src = fig["src"][:80]
        caption = fig["caption"]
        if caption is None:
            problems.append(f"{page}: figure without a caption: {src}")
            continue
        words = re.findall(r"[A-Za-z]{2,}", _FILE_NAME.sub(" ", _FIGURE_NUMBER.sub("", caption)))
        if len(words) < 3:
            problems.append(f"{page}: figure caption is only its number or file name: {src} "
                            f"(\"{caption[:60]}\")")
        if fig["inArticle"] and not _FIGURE_NUMBER.match(caption):
            problems.append(f"{page}: figure without a number (\"Figure N.\"): {src}")
    return problems


def find_chromium() -> str | None:
    """Path of the Chromium binary to drive, or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for candidate in (shutil.which("chromium"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def browser_missing() -> str | None:
    """Why the browser checks cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -r requirements.txt)"
    if find_chromium() is None:
        return ("Chromium not found (apt-get install chromium, or make setup as root; "
                "CHROMIUM=/path/to/chromium to point at another)")
    return None


def require_browser() -> str:
    """The Chromium path; otherwise skip the test, or fail it on CI (``CI`` set)."""
    reason = browser_missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser check required on CI: {reason}")
        pytest.skip(reason)
    return find_chromium()  # type: ignore[return-value]


def _local_target(href: str, page: Path, site: Path) -> tuple[Path, str] | None:
    """The file and fragment a relative link points to; None for external or data links."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith("//"):
        return None  # http(s), mailto, data, file: not a link between pages
    path, fragment = urldefrag(href)
    target = (page.parent / unquote(path)).resolve() if path else page
    return target, fragment


def check_site(index: Path, *, chromium: str | None = None, timeout_ms: int = 30_000,
               strict: bool = False) -> list[str]:
    """Visit ``index`` and every page reachable from it by relative links; list the problems.

    A problem is: a page that does not load; an ``<img>`` not rendered after load
    (``naturalWidth == 0``); a relative link to a missing file or to a missing ``#anchor``; a link
    leaving the site folder; a console error, an uncaught page error, a failed request, or any
    request that is not ``file:``/``data:`` (the site must work offline, so it must not even
    try the network). Returns an empty list for a clean site.

    ``strict`` adds what makes a page read badly, laid out in a :data:`VIEWPORT` window
    (:func:`layout_problems`): a table wider than its column that does not scroll in a box of
    its own (or a scroll box wider than the column, or a page that scrolls sideways), a
    truncated DataFrame ("96 rows × 15 columns"), an index column (row headers ``<th>`` in a
    table's body, or a blank top-left header, outside hand-written Markdown tables), and an
    image without a caption (no ``<figure>``/``<figcaption>``, a caption that is only a number
    or a file name, or on a notebook page a caption without its "Figure N." number).
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    index = Path(index).resolve()
    site = index.parent
    problems: list[str] = []
    if not index.is_file():
        return [f"{index}: no such file"]
    chromium = chromium or find_chromium()
    queue, seen = [index], {index}
    ids: dict[Path, set[str]] = {}
    anchors: list[tuple[Path, Path, str]] = []  # (page, target, fragment)

    def name(path: Path) -> str:
        return path.relative_to(site).as_posix() if path.is_relative_to(site) else str(path)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(java_script_enabled=True, viewport=VIEWPORT)

        def block_network(route) -> None:
            url = route.request.url
            if url.startswith(("file:", "data:")):
                route.continue_()
            else:
                problems.append(f"{name(current)}: network request to {url} (blocked)")
                route.abort()

        context.route("**/*", block_network)
        try:
            while queue:
                current = queue.pop(0)
                page = context.new_page()
                page.on("console", lambda msg, p=current: problems.append(
                    f"{name(p)}: console {msg.type}: {msg.text}") if msg.type == "error" else None)
                page.on("pageerror", lambda err, p=current: problems.append(
                    f"{name(p)}: page error: {err}"))
                page.on("requestfailed", lambda req, p=current: problems.append(
                    f"{name(p)}: failed request {req.url} ({req.failure})"))
                try:
                    page.goto(current.as_uri(), wait_until="load", timeout=timeout_ms)
                    info = page.evaluate(_INSPECT)
                    if strict:
                        problems.extend(layout_problems(page.evaluate(_INSPECT_STRICT),
                                                        name(current)))
                except PlaywrightError as err:
                    problems.append(f"{name(current)}: did not load: {err}")
                    page.close()
                    continue
                page.close()
                if not info["title"].strip():
                    problems.append(f"{name(current)}: empty <title>")
                ids[current] = set(info["ids"])
                for img in info["images"]:
                    if not img["complete"] or img["width"] == 0:
                        problems.append(f"{name(current)}: image not rendered: {img['src'][:80]}")
                for href in info["links"]:
                    local = _local_target(href, current, site)
                    if local is None:
                        continue
                    target, fragment = local
                    if not target.is_relative_to(site):
                        problems.append(f"{name(current)}: link leaves the site: {href}")
                    elif not target.is_file():
                        problems.append(f"{name(current)}: dead link: {href}")
                    else:
                        if fragment:
                            anchors.append((current, target, fragment))
                        if target.suffix == ".html" and target not in seen:
                            seen.add(target)
                            queue.append(target)
        finally:
            context.close()
            browser.close()
    for page_path, target, fragment in anchors:
        # As browsers do (HTML "indicated part"): the raw fragment, then its decoded form.
        if not {fragment, unquote(fragment)} & ids.get(target, set()):
            problems.append(f"{name(page_path)}: missing anchor #{fragment} in {name(target)}")
    return problems
