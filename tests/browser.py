"""Open a static site in headless Chromium and report what a reader would see broken.

Used by the tests (``from browser import check_site``); not a test module itself. Chromium is
Debian's ``chromium`` package (``scripts/setup.sh`` installs it), driven by Playwright for
Python through ``executable_path``; Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
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


def check_site(index: Path, *, chromium: str | None = None, timeout_ms: int = 30_000
               ) -> list[str]:
    """Visit ``index`` and every page reachable from it by relative links; list the problems.

    A problem is: a page that does not load; an ``<img>`` not rendered after load
    (``naturalWidth == 0``); a relative link to a missing file or to a missing ``#anchor``; a link
    leaving the site folder; a console error, an uncaught page error, a failed request, or any
    request that is not ``file:``/``data:`` (the site must work offline, so it must not even
    try the network). Returns an empty list for a clean site.
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
        context = browser.new_context(java_script_enabled=True)

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
