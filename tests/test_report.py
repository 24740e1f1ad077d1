"""The HTML report (calib.site): cleaning, rendering, determinism, atomicity, the DVC stage, and
what a reader sees in a real headless Chromium (tests/browser.py).

The notebooks here are tiny executed notebooks built with nbformat, shaped like papermill's:
parameters and injected-parameters cells, stdout, a tqdm bar on stderr, a tqdm widget, a PNG
output, a cell that saves a figure to figures/, and execution metadata.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import browser
import nbformat
import pytest
from browser import check_site, require_browser

from calib import site
from calib.site import SiteError, build_site
from calib.site.clean import WIDGET_MIME, clean_notebook, strip_progress

ROOT = Path(__file__).resolve().parents[1]
TQDM = ("\r  0%|          | 0/3 [00:00<?, ?it/s]\r 67%|######6   | 2/3 [00:00<00:00, 9.1it/s]"
        "\r100%|##########| 3/3 [00:00<00:00, 9.4it/s]\n")
CLAIMS = ("| claim | measured here | verdict |\n|:--|:--|:--|\n"
          "| UCA needs fewer queries | 59 vs 23 | partly |\n"
          "| MMA below its bound | 0.55 | holds |\n")


def _png(colour: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (12, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def executed_notebook(title: str, *, source: str | None, parameters: dict, figure: str | None,
                      run: int = 0) -> nbformat.NotebookNode:
    """A small notebook as papermill leaves it; ``run`` varies what differs between reruns."""
    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell(f"# {title}\n\nOne run per model. It trains a *tiny* model and "
                             "measures it on the test set, then saves its figures.\n\n## Setup",
                             id="cell-00"),
        v4.new_code_cell('model_name = "default"', id="cell-01",
                         metadata={"tags": ["parameters"]}),
        v4.new_code_cell("# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in
                                                    parameters.items()),
                         id=f"{run:08x}", metadata={"tags": ["injected-parameters"],
                                                    "papermill": {"duration": 0.1 + run}}),
        v4.new_code_cell("print('hello')\ntrain()\nprint('done')", id="cell-02", outputs=[
            v4.new_output("stream", name="stdout", text="hello\n"),
            v4.new_output("display_data", data={
                WIDGET_MIME: {"model_id": f"{run:032x}", "version_major": 2},
                "text/plain": "train:   0%|          | 0/3 [00:00<?, ?it/s]"}),
            v4.new_output("stream", name="stderr", text=TQDM),
            v4.new_output("stream", name="stdout", text="done\n"),
            v4.new_output("stream", name="stderr", text="UserWarning: worth reading\n"),
        ], execution_count=3),
        v4.new_code_cell("show(image)", id="cell-03", execution_count=4, outputs=[
            v4.new_output("display_data", data={
                "image/png": base64.b64encode(_png()).decode(), "text/plain": "<Figure>"})]),
        v4.new_code_cell('plots.save_figure(fig, paths.FIGURES / "a" / "curve.png")',
                         id="cell-04", execution_count=5),
        v4.new_markdown_cell("## Afterwards\n\nNothing else.", id="cell-05"),
        v4.new_code_cell("x = 1", id="cell-06", execution_count=6),
    ]
    if figure is None:
        del cells[5]
    nb = v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "calib", "display_name": "Python (calib)", "language": "python"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3",
                          "version": f"3.11.{run}"},
        "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {f"{run:032x}": {}}}},
    }
    if source:
        nb.metadata["papermill"] = {"input_path": source, "parameters": parameters,
                                    "start_time": f"2026-01-0{run + 1}T10:00:00",
                                    "duration": 12.5 + run}
    return nb


def make_repo(root: Path, run: int = 0) -> Path:
    """A repository root with executed notebooks, their figures and the claims table."""
    notebooks = root / "reports/notebooks"
    notebooks.mkdir(parents=True, exist_ok=True)
    specs = {
        "00_data": ("00 · Data", None, {}, None),
        "10_train_a": ("10 · Training a *clean* model", "notebooks/10_train.ipynb",
                       {"model_name": "a", "epochs": 2}, "figures/a/curve.png"),
        "10_train_b": ("10 · Training a *clean* model", "notebooks/10_train.ipynb",
                       {"model_name": "b", "epochs": 2}, None),
        "50_claims": ("50 · The claims", "notebooks/50_claims.ipynb", {"setting": "x"}, None),
    }
    for name, (title, source, params, figure) in specs.items():
        nb = executed_notebook(title, source=source, parameters=params, figure=figure, run=run)
        nbformat.write(nb, notebooks / f"{name}.ipynb")
    for fig, colour in (("figures/a/curve.png", (30, 90, 200)),
                        ("figures/resnet/fig1_reliability.png", (20, 160, 60))):
        (root / fig).parent.mkdir(parents=True, exist_ok=True)
        (root / fig).write_bytes(_png(colour, (40, 30)))
    (root / site.CLAIMS_TABLE).parent.mkdir(parents=True, exist_ok=True)
    (root / site.CLAIMS_TABLE).write_text(CLAIMS, encoding="utf-8")
    return notebooks


def build(root: Path, out: Path | None = None) -> site.Site:
    return build_site(root / "reports/notebooks", out or root / "reports/site", root=root,
                      figures={"10_train_a": ["figures/a/curve.png"]}, profile="smoke")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> site.Site:
    root = tmp_path_factory.mktemp("repo")
    make_repo(root)
    return build(root)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Cleaning


@pytest.mark.parametrize("text,expected", [
    (TQDM, ""),
    ("12it [00:01, 9.50it/s]\n", ""),
    ("epoch 1:  50%|#####     | 1/2 [00:03<00:03, 3.10s/it]\nloss 0.3\n", "loss 0.3\n"),
    ("UserWarning: worth reading\n", "UserWarning: worth reading\n"),
    ("no newline at the end", "no newline at the end\n"),
])
def test_strip_progress(text, expected):
    assert strip_progress(text) == expected


def test_clean_notebook_drops_what_readers_do_not_want():
    nb = executed_notebook("10 · T", source="notebooks/10_train.ipynb",
                           parameters={"model_name": "a"}, figure=None, run=3)
    clean = clean_notebook(nb)
    sources = [c.source for c in clean.cells]
    assert 'model_name = "default"' not in sources  # papermill's injected cell follows it
    assert any("model_name = 'a'" in s for s in sources)
    outputs = next(c for c in clean.cells if c.get("id") == "cell-02").outputs
    assert [(o.output_type, o.get("name")) for o in outputs] == [
        ("stream", "stdout"), ("stream", "stderr")]
    assert outputs[0].text == "hello\ndone\n" and outputs[1].text == "UserWarning: worth reading\n"
    assert clean.metadata == {"language_info": {"name": "python", "pygments_lexer": "ipython3"}}
    for cell in clean.cells:
        assert set(cell.metadata) <= {"tags"}
    assert "papermill" in nb.metadata and len(nb.cells[3].outputs) == 5  # input untouched


# --------------------------------------------------------------------------------------------
# Rendering


def test_site_has_index_and_a_page_per_notebook(tiny_site):
    out = tiny_site.index.parent
    names = ["00_data", "10_train_a", "10_train_b", "50_claims"]
    assert [p.name for p in tiny_site.pages] == [f"{n}.html" for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["figures", "index.html", "style.css", *(f"{n}.html" for n in names)])
    assert (out / "figures/a/curve.png").read_bytes()[:4] == b"\x89PNG"
    index = tiny_site.index.read_text(encoding="utf-8")
    for anchor in ('id="data"', 'id="training"', 'id="claims"', 'id="key-figures"',
                   'id="claims-checklist"', "profile <code>smoke</code>"):
        assert anchor in index, anchor
    assert 'id="attacks"' not in index  # no page, no section
    # One card for the two runs of notebooks/10_train.ipynb, a link per run.
    assert index.count("Training a <em>clean</em> model") == 1
    assert '<a href="10_train_a.html">a</a>' in index and '<a href="10_train_b.html">b</a>' in index
    # Key figures: the one that exists, linked to the page showing it; missing ones skipped.
    assert 'src="figures/resnet/fig1_reliability.png"' in index
    assert "fig2_sweeps" not in index and "size_comparison" not in index
    assert 'class="verdict verdict-holds"' in index and 'class="verdict verdict-partly"' in index
    assert "http://" not in index and "https://" not in index


def test_page_content(tiny_site):
    page = (tiny_site.index.parent / "10_train_a.html").read_text(encoding="utf-8")
    assert '<html lang="en" class="code-hidden">' in page
    assert '<link rel="stylesheet" href="style.css">' in page
    assert 'href="index.html"' in page
    assert 'href="00_data.html" rel="prev"' in page and 'href="10_train_b.html" rel="next"' in page
    assert "<title>10 · Training a clean model · " in page
    assert "hello\ndone" in page and "UserWarning: worth reading" in page
    assert "it/s" not in page and "widget" not in page and "papermill" not in page
    assert '"default"' not in page and "2026-01" not in page
    assert page.count('src="data:image/png;base64,') == 1  # the notebook's own image output
    # The saved figure sits right after the cell that names it, before the next section.
    fig = page.index('src="figures/a/curve.png"')
    assert page.index('"curve.png"') < fig < page.index("Afterwards")
    assert 'id="figure-figures-a-curve"' in page
    assert "celltag_site-no-output" in page  # "x = 1": hidden entirely along with the code
    for forbidden in ("http://", "https://", "require.js", "MathJax", "<link rel=\"preconnect"):
        assert forbidden not in page, forbidden
    first = (tiny_site.index.parent / "00_data.html").read_text(encoding="utf-8")
    assert 'rel="prev"' not in first and 'href="10_train_a.html" rel="next"' in first


def test_same_notebooks_give_identical_bytes(tmp_path):
    """Reruns differ in times, durations, widget and injected-cell ids: the site does not."""
    first, second = tmp_path / "one", tmp_path / "two"
    make_repo(first, run=0)
    make_repo(second, run=1)
    assert (first / "reports/notebooks/10_train_a.ipynb").read_bytes() != (
        second / "reports/notebooks/10_train_a.ipynb").read_bytes()
    build(first)
    build(second)
    build(first, tmp_path / "again")
    one = _tree(first / "reports/site")
    assert one == _tree(second / "reports/site") == _tree(tmp_path / "again")


# --------------------------------------------------------------------------------------------
# Failures and atomicity


def test_missing_or_empty_notebooks_folder_is_named(tmp_path):
    with pytest.raises(SiteError, match=re.escape(str(tmp_path / "nowhere"))):
        build_site(tmp_path / "nowhere", tmp_path / "site")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/.10_train_a.partial.ipynb").write_text("{}")  # a stage in progress
    with pytest.raises(SiteError, match=re.escape(f"{tmp_path / 'empty'} holds no executed")):
        build_site(tmp_path / "empty", tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_a_failed_build_leaves_the_previous_site(tmp_path):
    notebooks = make_repo(tmp_path)
    site_dir = tmp_path / "reports/site"
    build(tmp_path)
    before = _tree(site_dir)
    (notebooks / "20_attack_a.ipynb").write_text("{ not json", encoding="utf-8")
    with pytest.raises(SiteError, match=r"20_attack_a\.ipynb: not a readable notebook"):
        build(tmp_path)
    assert _tree(site_dir) == before
    assert sorted(p.name for p in site_dir.parent.iterdir()) == ["notebooks", "site"]
    (notebooks / "20_attack_a.ipynb").unlink()
    (tmp_path / "figures/a/curve.png").unlink()
    with pytest.raises(SiteError, match=r"figures/a/curve\.png is missing"):
        build(tmp_path)
    assert _tree(site_dir) == before


def test_a_rebuild_replaces_the_site_whole(tmp_path):
    notebooks = make_repo(tmp_path)
    build(tmp_path)
    (notebooks / "10_train_b.ipynb").unlink()
    (tmp_path / "reports/site/stray.txt").write_text("left by hand")
    build(tmp_path)
    names = {p.name for p in (tmp_path / "reports/site").iterdir()}
    assert "10_train_b.html" not in names and "stray.txt" not in names
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["notebooks", "site"]


def test_only_selected_notebooks_are_rendered(tmp_path):
    make_repo(tmp_path)
    result = build_site(tmp_path / "reports/notebooks", tmp_path / "site", root=tmp_path,
                        select={"00_data", "10_train_a"})
    assert [p.name for p in result.pages] == ["00_data.html", "10_train_a.html"]
    assert result.skipped == ("10_train_b.ipynb", "50_claims.ipynb")
    with pytest.raises(SiteError, match="none of the notebooks"):
        build_site(tmp_path / "reports/notebooks", tmp_path / "site", select={"99_x"})


def test_cli_names_the_missing_folder(tmp_path, capsys):
    assert site.main(["--notebooks", str(tmp_path / "absent"), "--out", str(tmp_path / "s"),
                      "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: notebooks folder {tmp_path / 'absent'} does not exist" in err


def test_cli_without_pipeline(tmp_path, capsys):
    make_repo(tmp_path)
    assert site.main(["--notebooks", str(tmp_path / "reports/notebooks"), "--out",
                      str(tmp_path / "s"), "--root", str(tmp_path), "--no-pipeline"]) == 0
    assert "4 pages" in capsys.readouterr().out
    assert (tmp_path / "s/index.html").is_file()


# --------------------------------------------------------------------------------------------
# The DVC stage: figures read from the pipeline's outputs, and the stage inside `dvc repro`

DVC_YAML = """\
stages:
  train:
    foreach: [a, b]
    do:
      cmd: cp src/10_train_${item}.ipynb reports/notebooks/ && mkdir -p figures/${item}
        && cp src/curve.png figures/${item}/curve.png
      deps: [src]
      outs:
        - reports/notebooks/10_train_${item}.ipynb
        - figures/${item}/curve.png:
            cache: false
  report:
    cmd: python -m calib.site --notebooks reports/notebooks --out reports/site
    deps: [reports/notebooks, figures]
    outs:
      - reports/site:
          cache: false
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)  # this checkout's calib, not an installed one
    return env


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dvc's use of pyparsing
def test_report_stage_runs_under_dvc(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        nb = executed_notebook(f"10 · Train {name}", source="notebooks/10_train.ipynb",
                               parameters={"model_name": name}, figure="figures/x/curve.png")
        nbformat.write(nb, src / f"10_train_{name}.ipynb")
    (src / "curve.png").write_bytes(_png())
    (tmp_path / "reports/notebooks").mkdir(parents=True)
    (tmp_path / "reports/notebooks/.10_train_c.partial.ipynb").write_text("{}")
    (tmp_path / "reports/notebooks/20_attack_old.ipynb").write_text("stale, no stage")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    analytics = false\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    plan = site.pipeline_figures(tmp_path, tmp_path / "reports/notebooks")
    assert plan == {"10_train_a": ["figures/a/curve.png"], "10_train_b": ["figures/b/curve.png"]}

    dvc = [sys.executable, "-m", "dvc"]
    run = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped 1 notebooks no stage of dvc.yaml writes (stale?): 20_attack_old" in run.stderr
    out = tmp_path / "reports/site"
    assert sorted(p.name for p in out.glob("*.html")) == [
        "10_train_a.html", "10_train_b.html", "index.html"]
    assert 'src="figures/b/curve.png"' in (out / "10_train_b.html").read_text(encoding="utf-8")
    status = subprocess.run([*dvc, "status"], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert "up to date" in status.stdout, status.stdout + status.stderr


# --------------------------------------------------------------------------------------------
# In a real browser (headless Chromium). Skipped without one; on CI (CI set) they fail instead.


def test_browser_tests_skip_without_a_browser_but_fail_on_ci(monkeypatch):
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium not found"):
        require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required on CI: Chromium not found"):
        require_browser()


def test_tiny_site_renders_cleanly_in_a_browser(tiny_site):
    chromium = require_browser()
    assert check_site(tiny_site.index, chromium=chromium) == []


def test_code_is_hidden_until_the_reader_shows_it(tiny_site):
    chromium = require_browser()
    from playwright.sync_api import sync_playwright

    page_url = (tiny_site.index.parent / "10_train_a.html").as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.goto(page_url)
            code = page.locator(".input_area").first
            button = page.locator("#code-toggle")
            assert not code.is_visible() and button.inner_text() == "Show code"
            assert page.locator(".output_stdout").first.is_visible()  # outputs stay
            button.click()
            assert code.is_visible() and button.inner_text() == "Hide code"
            page.goto((tiny_site.index.parent / "10_train_b.html").as_uri())  # choice is kept
            assert page.locator(".input_area").first.is_visible()
        finally:
            browser.close()


def test_check_site_reports_a_broken_page(tmp_path):
    """The check itself: each kind of breakage it promises to catch is caught."""
    chromium = require_browser()
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><head><title>i</title></head><body>'
        '<a href="page.html#intro">fine</a> <a href="page.html#nowhere">bad anchor</a>'
        '<a href="missing.html">dead</a> <a href="https://example.org/">external: not followed</a>'
        '<img src="ok.png"></body></html>')
    (tmp_path / "page.html").write_text(
        '<!DOCTYPE html><html><head><title>p</title></head><body><h1 id="intro">p</h1>'
        '<img src="figures/gone.png"><img src="https://cdn.example.org/lib.png">'
        '<script>console.error("boom")</script><script>throw new Error("uncaught")</script>'
        '</body></html>')
    problems = check_site(tmp_path / "index.html", chromium=chromium)
    text = "\n".join(problems)
    expected = [
        "index.html: dead link: missing.html",
        "index.html: missing anchor #nowhere in page.html",
        "page.html: image not rendered: figures/gone.png",
        "page.html: console error: boom",
        "page.html: page error: uncaught",
        "page.html: network request to https://cdn.example.org/lib.png (blocked)",
    ]
    for line in expected:
        assert line in text, f"not reported: {line}\n{text}"
    assert "#intro" not in text and "ok.png" not in text and "example.org/" not in "".join(
        p for p in problems if "index.html" in p)


def test_committed_site_renders_cleanly_in_a_browser():
    index = ROOT / "reports/site/index.html"
    assert index.is_file(), f"{index} is missing: it is committed (dvc repro -s report rebuilds it)"
    chromium = require_browser()
    assert check_site(index, chromium=chromium) == []


def test_committed_site_holds_every_page_the_index_lists():
    out = ROOT / "reports/site"
    pages = sorted(p.name for p in out.glob("*.html"))
    assert "index.html" in pages and len(pages) > 1
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in pages:
        if page != "index.html":
            assert f'href="{page}"' in index, page
