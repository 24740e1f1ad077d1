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
import pandas as pd
import pytest
from browser import check_site, require_browser

from calib import reporting, site
from calib.site import SiteError, build_site
from calib.site.clean import CODE_ROOT, WIDGET_MIME, clean_notebook, relative_paths, strip_progress

ROOT = Path(__file__).resolve().parents[1]
TQDM = ("\r  0%|          | 0/3 [00:00<?, ?it/s]\r 67%|######6   | 2/3 [00:00<00:00, 9.1it/s]"
        "\r100%|##########| 3/3 [00:00<00:00, 9.4it/s]\n")
#: A report table with more columns than the text column holds: it must scroll in its own box.
WIDE = pd.DataFrame({f"metric_{i}_after": [0.1234 + i, 0.5] for i in range(24)}
                    | {"model": ["resnet", "vit"]})
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
                "image/png": base64.b64encode(_png()).decode(), "text/plain": "<Figure>"},
                metadata={"caption": "A red rectangle shown by the notebook itself.",
                          "width": 12})]),
        v4.new_code_cell('plots.save_figure(fig, paths.FIGURES / "a" / "training_curves.png")',
                         id="cell-04", execution_count=5),
        v4.new_markdown_cell("## Afterwards\n\nNothing else, but a table written by hand:\n\n"
                             "| | before | after |\n|---|---|---|\n| ECE | 0.02 | 0.4 |",
                             id="cell-05"),
        v4.new_code_cell("x = 1", id="cell-06", execution_count=6),
        v4.new_code_cell("reporting.show_table(wide)", id="cell-07", execution_count=7, outputs=[
            v4.new_output("execute_result", execution_count=7, data={
                "text/html": reporting.html_table(WIDE, caption="A table wider than the page."),
                "text/plain": "<Table>"})]),
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
                       {"model_name": "a", "epochs": 2}, "figures/a/training_curves.png"),
        "10_train_b": ("10 · Training a *clean* model", "notebooks/10_train.ipynb",
                       {"model_name": "b", "epochs": 2}, None),
        "50_claims": ("50 · The claims", "notebooks/50_claims.ipynb", {"setting": "x"}, None),
    }
    for name, (title, source, params, figure) in specs.items():
        nb = executed_notebook(title, source=source, parameters=params, figure=figure, run=run)
        nbformat.write(nb, notebooks / f"{name}.ipynb")
    for fig, colour in (("figures/a/training_curves.png", (30, 90, 200)),
                        ("figures/resnet/fig1_reliability.png", (20, 160, 60))):
        (root / fig).parent.mkdir(parents=True, exist_ok=True)
        (root / fig).write_bytes(_png(colour, (40, 30)))
    (root / site.CLAIMS_TABLE).parent.mkdir(parents=True, exist_ok=True)
    (root / site.CLAIMS_TABLE).write_text(CLAIMS, encoding="utf-8")
    return notebooks


def build(root: Path, out: Path | None = None) -> site.Site:
    return build_site(root / "reports/notebooks", out or root / "reports/site", root=root,
                      figures={"10_train_a": ["figures/a/training_curves.png"]}, profile="smoke")


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


def test_printed_paths_lose_the_checkouts_location():
    warning = f"{CODE_ROOT}calib/attacks/__init__.py:97: GradientMaskingWarning: ...\n"
    assert relative_paths(warning) == "calib/attacks/__init__.py:97: GradientMaskingWarning: ...\n"
    assert relative_paths("/elsewhere/x.py:1: W\n") == "/elsewhere/x.py:1: W\n"
    assert (ROOT / "calib").is_dir() and CODE_ROOT == str(ROOT.resolve()) + "/"


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
    assert (out / "figures/a/training_curves.png").read_bytes()[:4] == b"\x89PNG"
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
    fig = page.index('src="figures/a/training_curves.png"')
    assert page.index('"training_curves.png"') < fig < page.index("Afterwards")
    assert 'id="figure-figures-a-training_curves"' in page
    assert "celltag_site-no-output" in page  # "x = 1": hidden entirely along with the code
    for forbidden in ("http://", "https://", "require.js", "MathJax", "<link rel=\"preconnect"):
        assert forbidden not in page, forbidden
    first = (tiny_site.index.parent / "00_data.html").read_text(encoding="utf-8")
    assert 'rel="prev"' not in first and 'href="10_train_a.html" rel="next"' in first


def test_figures_are_numbered_and_captioned(tiny_site):
    page = (tiny_site.index.parent / "10_train_a.html").read_text(encoding="utf-8")
    first = page.index('<span class="figure-number">Figure 1.</span> A red rectangle shown')
    second = page.index('<span class="figure-number">Figure 2.</span> Training of a: ')
    assert first < second < page.index("Afterwards")
    assert "<code>figures/a/training_curves.png</code>" not in page
    assert tiny_site.uncaptioned == ()
    other = (tiny_site.index.parent / "10_train_b.html").read_text(encoding="utf-8")
    assert "Figure 1.</span> A red rectangle" in other and "Figure 2." not in other


def test_a_figure_without_a_caption_shows_its_path_and_is_reported(tmp_path, capsys):
    make_repo(tmp_path)
    (tmp_path / "figures/a/new_plot.png").write_bytes(_png())
    result = build_site(tmp_path / "reports/notebooks", tmp_path / "site", root=tmp_path,
                        figures={"10_train_a": ["figures/a/new_plot.png"]})
    assert result.uncaptioned == ("figures/a/new_plot.png",)
    page = (tmp_path / "site/10_train_a.html").read_text(encoding="utf-8")
    assert "Figure 2.</span> <code>figures/a/new_plot.png</code>" in page


def test_every_pipeline_figure_has_a_caption():
    """Each figure a notebook saves (its file name in a save_figure call) has a caption in
    calib/site/captions.py: add one with a new figure."""
    from calib.site.captions import CAPTIONS

    names = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(nb, as_version=4).cells:
            if cell.cell_type == "code" and "save_figure" in cell.source:
                names |= set(re.findall(r'"([\w.-]+\.(?:png|svg|pdf))"', cell.source))
    assert len(names) >= 15, names
    assert sorted(names - set(CAPTIONS)) == []
    for name, caption in CAPTIONS.items():
        assert caption.endswith(".") and caption[0].isupper() and len(caption.split()) >= 6, name


def test_pages_sort_numerically():
    """eps 0.02 < 0.05 < 0.1 < 0.2, not the string order 0.02, 0.05, 0.1, 0.2 ... 0.1, 0.2."""
    names = ["40_sweep_resnet-0.2", "40_sweep_resnet-0.1", "40_sweep_resnet-0.05",
             "40_sweep_vit-0.02", "40_sweep_resnet-0.02", "10_train_resnet", "9_x", "100_y"]
    assert sorted(names, key=site._natural_key) == [
        "9_x", "10_train_resnet", "40_sweep_resnet-0.02", "40_sweep_resnet-0.05",
        "40_sweep_resnet-0.1", "40_sweep_resnet-0.2", "40_sweep_vit-0.02", "100_y"]


def test_sweep_pages_are_listed_in_eps_order(tmp_path):
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    for eps in ("0.1", "0.2", "0.02", "0.05"):
        nb = executed_notebook("40 · Sweep", source="notebooks/40_sweep.ipynb",
                               parameters={"eps": float(eps)}, figure=None)
        nbformat.write(nb, notebooks / f"40_sweep_resnet-{eps}.ipynb")
    result = build_site(notebooks, tmp_path / "site")
    assert [p.stem for p in result.pages] == [f"40_sweep_resnet-{e}"
                                              for e in ("0.02", "0.05", "0.1", "0.2")]
    index = result.index.read_text(encoding="utf-8")
    assert [index.index(f">resnet-{e}<") for e in ("0.02", "0.05", "0.1", "0.2")] == sorted(
        index.index(f">resnet-{e}<") for e in ("0.02", "0.05", "0.1", "0.2"))


@pytest.mark.parametrize("paragraph,expected", [
    ("This stage makes the dataset available offline and writes the seeded splits every "
     "later stage uses:", "This stage makes the dataset available offline and writes the "
     "seeded splits every later stage uses."),
    ("One run per model (`foreach` in `dvc.yaml`). Each of the paper's four attacks keeps the "
     "predicted label of every input and moves only its confidence:",
     "One run per model (`foreach` in `dvc.yaml`). Each of the paper's four attacks keeps the "
     "predicted label of every input and moves only its confidence."),
    ("A first sentence that is long enough to stand alone as the summary of this page, "
     "because it goes on and on about the stage, what it reads and what it does in detail. "
     "A second one.",
     "A first sentence that is long enough to stand alone as the summary of this page, "
     "because it goes on and on about the stage, what it reads and what it does in detail."),
    ("The paper's Fig. 2 shows it (see e.g. the curves). It ends here", "The paper's Fig. 2 "
     "shows it (see e.g. the curves). It ends here."),
])
def test_card_summaries_are_whole_sentences(paragraph, expected):
    assert site._first_sentences(paragraph) == expected


def test_index_summaries_end_with_a_sentence(tiny_site):
    index = tiny_site.index.read_text(encoding="utf-8")
    summaries = re.findall(r'<div class="summary">(.*?)</div>', index, re.S)
    assert summaries
    for summary in summaries:
        assert re.search(r"[.!?]</p>$", summary.strip()), summary


# --------------------------------------------------------------------------------------------
# Tables as the report shows them (calib.reporting.html_table)


def test_html_table_reads_like_a_paper():
    df = pd.DataFrame({
        "model": ["resnet"] * 100, "attack": ["UCA"] * 100, "kind": ["uca"] * 100,
        "ece_after": [0.43512] * 100, "success_rate": [0.9751] * 100,
        "queries_success_mean": [12.345] * 100, "n_pairs": [7] * 100,
        "interval": ["0.435 [0.412, 0.459]"] * 100, "defence": ["pgd_at"] * 100,
    }, index=[2 * i + 100 for i in range(100)])  # a filtered frame's leftover positions
    out = reporting.html_table(df, caption="Table 1: a caption.")
    assert out.startswith('<div class="table-wrap"><table class="report-table">')
    assert "<caption>Table 1: a caption.</caption>" in out
    assert out.count("<tr>") == 101  # every row: nothing truncated, no "rows × columns"
    assert "rows ×" not in out and "<th>100</th>" not in out and ">100<" not in out
    body = out[out.index("<tbody>"):]
    assert "<th" not in body  # no row headers: no index column
    heads = re.findall(r'<th class="(\w+)"[^>]*>([^<]*)</th>', out)
    assert heads == [("text", "Model"), ("text", "Attack"), ("text", "Attack"),
                     ("num", "ECE after"), ("num", "Success rate"),
                     ("num", "Queries to success (mean)"), ("num", "Pairs"),
                     ("num", "Interval"), ("text", "Defence")]
    row = re.findall(r'<td class="([\w ]+)">([^<]*)</td>', body)[:9]
    assert row == [("text short", "resnet"), ("text short", "UCA"), ("text short", "UCA"),
                   ("num", "0.435"), ("num", "97.5%"), ("num", "12.3"), ("num", "7"),
                   ("num", "0.435 [0.412, 0.459]"), ("text short", "PGD-AT")]
    prose = reporting.html_table(pd.DataFrame({"claim": ["A claim long enough to wrap "
                                                         "over several lines of its cell."]}))
    assert '<td class="text">A claim' in prose  # prose wraps; labels stay on one line


def test_html_table_keeps_a_named_index_as_a_column_and_groups_headers():
    wide = pd.DataFrame([[0.1, 0.2, 0.3]], index=pd.Index([0.05], name="eps"),
                        columns=pd.MultiIndex.from_tuples([("square-linf", "clean"),
                                                           ("square-linf", "uca"),
                                                           ("pgd-linf", "uca")]))
    out = reporting.html_table(wide)
    assert '<th class="num" rowspan="2" scope="col">ε</th>' in out
    assert '<th class="group" colspan="2" scope="colgroup">square-linf</th>' in out
    assert '<th class="group" scope="colgroup">pgd-linf</th>' in out
    assert ">Clean</th>" in out and ">UCA</th>" in out
    assert '<td class="num">0.05</td><td class="num">0.100</td>' in out
    assert "<th" not in out[out.index("<tbody>"):]
    shown = reporting.show_table(wide, caption="c")
    assert shown._repr_html_() == reporting.html_table(wide, caption="c")
    assert repr(shown).startswith("c\n")


def test_table4_pivot_shows_every_defence_whole():
    rows = [{"model": "m", "defence": d, "setting": st, "attack": a.upper(),
             "white_box": "exact" if st == "pgd-linf" else None, "ece_before": 0.03,
             "ece_after": 0.1 * i, "success_rate": 0.5}
            for i, d in enumerate(("sam", "none", "cs", "temperature"))
            for st in ("pgd-linf", "square-linf") for a in ("rca", "uca", "oca", "mma")]
    t4 = pd.DataFrame(rows)
    ece = reporting.table4_pivot(t4, "ece", white_box=True)
    assert list(ece[("defence", "")]) == ["none", "temperature", "cs", "sam"]
    assert list(ece.columns)[:4] == [("defence", ""), ("white_box", ""),
                                     ("square-linf", "clean"), ("square-linf", "UCA")]
    assert list(ece["pgd-linf"].columns) == ["clean", "UCA", "OCA", "MMA", "RCA"]
    assert ece.shape == (4, 12)
    success = reporting.table4_pivot(t4, "success_rate")
    assert list(success["square-linf"].columns) == ["UCA", "OCA", "MMA", "RCA"]
    assert '<td class="num">50.0%</td>' in reporting.html_table(success)  # a rate: percent
    worst = reporting.table4_pivot(t4, "ece", worst=True)
    assert list(worst["pgd-linf"].columns) == ["clean", "worst attack"]
    out = reporting.html_table(ece)
    assert ">Undefended<" in out and ">Temperature scaling<" in out and ">SAM<" in out
    assert "rows ×" not in out


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
    (tmp_path / "figures/a/training_curves.png").unlink()
    with pytest.raises(SiteError, match=r"figures/a/training_curves\.png is missing"):
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
        && cp src/training_curves.png figures/${item}/training_curves.png
      deps: [src]
      outs:
        - reports/notebooks/10_train_${item}.ipynb
        - figures/${item}/training_curves.png:
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
                               parameters={"model_name": name},
                               figure="figures/x/training_curves.png")
        nbformat.write(nb, src / f"10_train_{name}.ipynb")
    (src / "training_curves.png").write_bytes(_png())
    (tmp_path / "reports/notebooks").mkdir(parents=True)
    (tmp_path / "reports/notebooks/.10_train_c.partial.ipynb").write_text("{}")
    (tmp_path / "reports/notebooks/20_attack_old.ipynb").write_text("stale, no stage")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    analytics = false\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    plan = site.pipeline_figures(tmp_path, tmp_path / "reports/notebooks")
    assert plan == {"10_train_a": ["figures/a/training_curves.png"],
                    "10_train_b": ["figures/b/training_curves.png"]}

    dvc = [sys.executable, "-m", "dvc"]
    run = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped 1 notebooks no stage of dvc.yaml writes (stale?): 20_attack_old" in run.stderr
    out = tmp_path / "reports/site"
    assert sorted(p.name for p in out.glob("*.html")) == [
        "10_train_a.html", "10_train_b.html", "index.html"]
    page_b = (out / "10_train_b.html").read_text(encoding="utf-8")
    assert 'src="figures/b/training_curves.png"' in page_b
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
    """Freshly built, the site passes the strict checks too: every table fits its column or
    scrolls in its own box, no index column or truncation, every figure numbered and captioned.
    """
    chromium = require_browser()
    assert check_site(tiny_site.index, chromium=chromium, strict=True) == []


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


_PAGE = ('<!DOCTYPE html><html><head><title>{title}</title><style>'
         'main {{ max-width: 40rem; margin: 0 auto; padding: 0 1rem; }}'
         '.table-wrap {{ overflow-x: auto; }} td, th {{ padding: 0.3rem 1rem; }}'
         '</style></head><body><main><article>{body}</article></main></body></html>')
_WIDE_ROW = "".join(f"<td>value number {i}</td>" for i in range(20))
_WIDE_HEAD = "".join(f"<th>column_{i}</th>" for i in range(20))


def test_check_site_strict_reports_what_reads_badly(tmp_path):
    """The strict checks, each on a tiny bad page, with the good forms beside them."""
    chromium = require_browser()
    (tmp_path / "ok.png").write_bytes(_png())
    pages = {
        "index": '<a href="wide.html">w</a> <a href="pandas.html">p</a> '
                 '<a href="figures.html">f</a> <a href="good.html">g</a>',
        "wide": f"<table><tr>{_WIDE_HEAD}</tr><tr>{_WIDE_ROW}</tr></table>",
        "pandas": '<div class="output_area"><table border="1" class="dataframe"><thead>'
                  "<tr><th></th><th>ece_after</th></tr></thead><tbody>"
                  "<tr><th>0</th><td>0.43</td></tr><tr><th>1</th><td>0.12</td></tr></tbody>"
                  "</table><p>96 rows × 15 columns</p></div>"
                  '<table class="dataframe"><thead><tr><th></th><th>UCA</th></tr></thead>'
                  "<tbody><tr><td>resnet</td><td>0.4</td></tr></tbody></table>",
        "figures": '<img src="ok.png">'
                   '<figure><img src="ok.png"><figcaption>figures/resnet/fig1.png'
                   "</figcaption></figure>"
                   '<figure><img src="ok.png"><figcaption>Reliability of the clean model on '
                   "the test set.</figcaption></figure>",
        "good": f'<div class="table-wrap"><table><tr>{_WIDE_HEAD}</tr><tr>{_WIDE_ROW}</tr>'
                "</table></div>"
                '<div class="text_cell_render"><table><thead><tr><th></th><th>before</th>'
                "</tr></thead><tbody><tr><td>ECE</td><td>0.02</td></tr></tbody></table></div>"
                '<figure><img src="ok.png" alt=""><figcaption>Figure 1. Reliability of the '
                "clean model on the test set.</figcaption></figure>",
    }
    for name, body in pages.items():
        (tmp_path / f"{name}.html").write_text(_PAGE.format(title=name, body=body),
                                               encoding="utf-8")
    problems = check_site(tmp_path / "index.html", chromium=chromium, strict=True)
    text = "\n".join(problems)
    expected = [
        'wide.html: table "column_0" wider than its column',
        'pandas.html: table "" has an index column (2 row headers <th> in its body)',
        'pandas.html: table "" has an index column (blank top-left header)',
        'pandas.html: truncated DataFrame ("96 rows × 15 columns")',
        "figures.html: figure without a caption: ok.png",
        "figures.html: figure caption is only its number or file name: ok.png",
        "figures.html: figure without a number",
    ]
    for line in expected:
        assert line in text, f"not reported: {line}\n{text}"
    assert {p.split(":")[0] for p in problems} == {"wide.html", "pandas.html", "figures.html"}
    # Without strict, only what breaks a page is checked: none of these pages is broken.
    assert check_site(tmp_path / "index.html", chromium=chromium) == []


def test_committed_site_renders_cleanly_in_a_browser():
    index = ROOT / "reports/site/index.html"
    assert index.is_file(), f"{index} is missing: it is committed (dvc repro -s report rebuilds it)"
    chromium = require_browser()
    # The committed site comes from the full default pipeline (dvc repro), so it gets the
    # same strict checks as a fresh build: tables fit, no index column, no truncated frame,
    # every figure captioned.
    assert check_site(index, chromium=chromium, strict=True) == []


def test_committed_site_holds_every_page_the_index_lists():
    out = ROOT / "reports/site"
    pages = sorted(p.name for p in out.glob("*.html"))
    assert "index.html" in pages and len(pages) > 1
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in pages:
        if page != "index.html":
            assert f'href="{page}"' in index, page
