"""End to end: the whole pipeline at smoke scale in a temporary copy of the repository.

Runs `python -m calib.profiles smoke` and `dvc repro` there, interrupts one run midway to show
that a rerun completes (the rerun is `make reproduce`'s runner, `python -m calib.parallel`, two
stages at once), checks the outputs exist and make sense, and retrains one model to show that
the same seed (and thread count) gives identical clean metrics on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_repo import env, make_repo, run

from calib.io import read_metrics

pytestmark = pytest.mark.slow

#: Every run of this module uses one thread per stage, as `make reproduce` does on two cores:
#: trained weights depend on the thread count (weight-gradient reductions), attacks do not.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("smoke") / "repo")
    run([sys.executable, "-m", "calib.profiles", "smoke"], repo)

    # Interrupt a first run once training has started; the rerun must complete regardless.
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env(ONE_THREAD),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (repo / "data/prepared/splits.safetensors").exists() and list(
                (repo / "reports/notebooks").glob(".10_train_*.partial.ipynb")):
            break
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    start = time.monotonic()
    out = run([sys.executable, "-m", "calib.parallel", "--jobs", "2"], repo,
              extra_env=ONE_THREAD).stdout
    assert "2 at once, 1 thread(s) each" in out and "stages done in" in out, out
    (repo / "smoke_seconds.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    return repo


def _metrics(repo: Path, model: str) -> dict:
    return read_metrics(repo / f"results/{model}/clean_metrics.json")


def test_outputs_exist_and_make_sense(smoke_repo):
    repo = smoke_repo
    assert (repo / "data/prepared/splits.safetensors").exists()
    info = json.loads((repo / "data/prepared/dataset.json").read_text())
    assert info["dataset"] == "fashion_mnist" and info["num_classes"] == 10
    assert info["splits"]["attack"] == 32 and info["splits"]["train"] == 2048
    for fig in ["figures/data/examples.png", "figures/data/class_balance.png"]:
        assert (repo / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in ("resnet", "vit"):
        m = _metrics(repo, model)
        assert m["n"] == 10000
        assert 0.3 < m["accuracy"] <= 1.0, m  # far above chance (0.1) after a short training
        assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["ks"] <= 1.0
        assert m["environment"]["seed"] == 0 and "torch" in m["environment"]
        for fig in ("training_curves.png", "clean_calibration.png"):
            assert (repo / f"figures/{model}/{fig}").stat().st_size > 1000
        assert (repo / f"models/{model}/model.safetensors").exists()
        assert (repo / f"reports/notebooks/10_train_{model}.ipynb").exists()
        attacks = read_metrics(repo / f"results/{model}/attack_metrics.json")
        assert attacks["n"] == 32 and len(attacks["attacks"]) == 12
        for name, summary in attacks["attacks"].items():
            assert summary["label_preserved"] == 1.0, name
            assert summary["accuracy_after"] == summary["accuracy_before"], name
            bound = 0.1 if summary["norm"] == "linf" else 1.0
            assert summary[f"{summary['norm']}_max"] <= bound + 1e-6, name
        uca = attacks["attacks"]["pgd-linf/uca"]
        assert uca["confidence_after"] < uca["confidence_before"]
        for name in ("table1.md", "table3.md", "attack_curves.csv"):
            assert (repo / f"results/{model}/{name}").stat().st_size > 100
        for fig in ("fig1_reliability.png", "attack_confidence_hist.png", "attack_curves.png"):
            assert (repo / f"figures/{model}/{fig}").stat().st_size > 1000
    leftovers = [p for p in repo.rglob("*.partial*") if ".dvc" not in p.parts]
    assert leftovers == [] or all("reports" in p.parts for p in leftovers), leftovers
    _check_defence_outputs(repo)


def _check_defence_outputs(repo: Path) -> None:
    """Table 4 and its inputs: a row per defence x setting x attack, labels kept."""
    import pandas as pd
    import yaml

    from calib.attacks.grid import RECORDS_FILE
    from calib.defences.evaluate import DEFENCES

    params = yaml.safe_load((repo / "params.yaml").read_text())
    defend = params["defend"]
    settings = defend["settings"].split(",")
    kinds = defend["kinds"].split(",")
    for model in defend["models"]:
        table = pd.read_csv(repo / f"results/{model}/table4.csv")
        assert len(table) == len(defend["defences"]) * len(settings) * len(kinds)
        assert list(dict.fromkeys(table["defence"])) == sorted(defend["defences"],
                                                               key=DEFENCES.index)
        for defence in defend["defences"]:
            part = table[table["defence"] == defence]
            assert sorted(part["setting"].unique()) == sorted(settings), defence
            assert sorted(part["attack"].unique()) == sorted(k.upper() for k in kinds), defence
            summary = json.loads(
                (repo / f"results/{model}/defences/{defence}/summary.json").read_text())
            assert summary["n_images"] == defend["n_images"]
            for s in summary["attacks"]:
                assert s["label_preserved"] == 1.0, (defence, s["setting"], s["kind"])
                assert s["linf_max"] <= params["attack"]["eps"] + 1e-6
            assert (repo / f"results/{model}/defences/{defence}/{RECORDS_FILE}").exists()
            assert (repo / f"reports/notebooks/30_defend_{model}-{defence}.ipynb").exists()
        assert (table["acc_before"] == table["acc_after"]).all()
        assert table[["ece_before", "ece_after", "ks_before", "ks_after"]].le(1).all().all()
        assert table.loc[table["setting"].str.startswith("square"), "white_box"].isna().all()
        if "cs" in defend["defences"]:
            assert (table.loc[table["defence"] == "cs", "conf_after"] >= 0.8 - 1e-4).all()
        if "aaa" in defend["defences"]:
            white = table[(table["defence"] == "aaa") & table["setting"].str.startswith("pgd")]
            assert set(white["white_box"]) <= {"masked", "bpda", "transfer"}
            assert not (white["white_box"] == "exact").any()
        assert (repo / f"results/{model}/table4.md").stat().st_size > 100
        assert (repo / f"figures/{model}/table4_ece.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        metrics = read_metrics(repo / f"results/{model}/defence_metrics.json")
        assert set(metrics["defences"]) == set(defend["defences"])
        assert (repo / f"reports/notebooks/31_defence_table_{model}.ipynb").exists()


def test_analysis_outputs_exist_and_make_sense(smoke_repo):
    import pandas as pd
    import yaml

    repo = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    sweep = params["sweep"]
    for model in sweep["models"]:
        tidy = pd.read_csv(repo / f"results/{model}/fig2_eps.csv")
        assert sorted(tidy["eps"].unique()) == sorted(sweep["eps"])
        assert tidy["ece"].between(0, 1).all() and (tidy["label_preserved"] == 1).all()
        for name in ("ece_vs_eps_square-linf.csv", "ece_vs_queries_square-linf.csv",
                     "ece_vs_budget_square-linf.csv"):
            wide = pd.read_csv(repo / f"results/{model}/fig2/{name}")
            assert {"uca", "oca", "mma", "rca"} <= set(wide.columns)
        dedicated = pd.read_csv(repo / f"results/{model}/fig2/ece_vs_budget_square-linf.csv")
        # One run per budget; the sweep's own budget is its run at attack.eps (no second run).
        expected = set(sweep["budgets"])
        if params["attack"]["eps"] in sweep["eps"]:
            expected.add(sweep["square_iterations"])
        assert sorted(dedicated["budget"]) == sorted(expected)
        assert not (repo / f"results/{model}/budget/queries_{sweep['square_iterations']}.json"
                    ).exists()
        assert (repo / f"figures/{model}/fig2_sweeps.png").stat().st_size > 1000
    det_model = params["analysis"]["detection"]["model"]
    table2 = pd.read_csv(repo / f"results/{det_model}/table2.csv")
    assert set(table2["detector"]) == {"mahalanobis", "lid", "spectral"}
    assert table2["attack"].str.endswith("ordinary").any()
    scored = table2.dropna(subset=["auroc"])
    assert scored["auroc"].between(0, 1).all() and scored["accuracy"].between(0, 1).all()
    for model in params["analysis"]["models"]:
        for name in ("representations.csv", "saliency.csv"):
            assert len(pd.read_csv(repo / f"results/{model}/{name}")) > 0, (model, name)
        for fig in ("representations.png", "representation_shift.png",
                    "saliency_examples.png", "saliency_similarity.png"):
            assert (repo / f"figures/{model}/{fig}").stat().st_size > 1000, (model, fig)
    claims = pd.read_csv(repo / "results/claims/claims.csv")
    assert len(claims) == 6
    assert set(claims["verdict"]) <= {"holds", "partly", "does not hold", "not measured"}
    bounds = pd.read_csv(repo / "results/claims/mma_bound.csv")
    assert (bounds["ece_after"] <= bounds["bound"] + 1e-9).all()


def test_training_seed_copies_are_trained_and_attacked(smoke_repo):
    import pandas as pd
    import yaml

    repo = smoke_repo
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    seed = yaml.safe_load((repo / "params.yaml").read_text())["seed"]
    for model in train["models"]:
        per_model = pd.read_csv(repo / f"results/{model}/seeds_per_model.csv")
        assert sorted(per_model["seed"].unique()) == list(range(seed, seed + train["seeds"]))
        assert (per_model["ece_after_lo"] <= per_model["ece_after_hi"]).all()
        for s in range(seed + 1, seed + train["seeds"]):
            assert (repo / f"models/{model}_seeds/seed_{s}/model.safetensors").exists()
        spread = pd.read_csv(repo / f"results/{model}/seeds.csv")
        assert set(spread["metric"]) >= {"ece_after", "clean_ece"}
        metrics = read_metrics(repo / f"results/{model}/seeds_metrics.json")
        assert metrics["seeds"] == train["seeds"]
        assert (repo / f"figures/{model}/seeds.png").stat().st_size > 1000


def test_pipeline_is_up_to_date_after_repro(smoke_repo):
    out = run(["dvc", "status"], smoke_repo).stdout
    assert "up to date" in out, out


def test_noop_repro_is_fast(smoke_repo):
    start = time.monotonic()
    out = run(["dvc", "repro"], smoke_repo).stdout
    elapsed = time.monotonic() - start
    assert not _stagesrun(out), out
    assert elapsed < 5.0, f"no-op dvc repro took {elapsed:.1f} s"


def test_same_seed_same_clean_metrics(smoke_repo):
    before = _metrics(smoke_repo, "resnet")
    run(["dvc", "repro", "--force", "--single-item", "train@resnet"], smoke_repo,
        extra_env=ONE_THREAD)
    after = _metrics(smoke_repo, "resnet")
    assert after == before


def _figure_hashes(repo: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((repo / "figures").rglob("*.png"))}


def _stagesrun(output: str) -> set[str]:
    """Stage names from DVC's "Running stage 'name':" lines."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


def test_figures_are_byte_identical_when_rerun(smoke_repo):
    """Forced reruns with unchanged inputs rewrite every figure of these stages identically."""
    before = _figure_hashes(smoke_repo)
    # One stage per kind of figure code: reliability grids and curves, heat maps, sweep lines,
    # representation scatter plots, saliency maps, the comparison's bars.
    stages = ["attack@resnet", "defence_table@resnet", "sweep_plot@resnet",
              "representations@resnet", "saliency@vit", "compare"]
    out = run(["dvc", "repro", "--force", "--single-item", *stages], smoke_repo,
              extra_env=ONE_THREAD).stdout
    assert _stagesrun(out) == set(stages), out
    after = _figure_hashes(smoke_repo)
    changed = [name for name in before if after.get(name) != before[name]]
    assert not changed, f"figures changed on an identical rerun: {changed}"
    # Only the executed notebooks changed (papermill records times), so only the report reruns.
    assert _stagesrun(run(["dvc", "repro"], smoke_repo).stdout) <= {"report"}


def test_report_site_renders_in_a_browser(smoke_repo):
    """The report stage's site: a page per executed notebook, clean in headless Chromium,
    strict checks included (tables fit or scroll, no index column or truncation, every figure
    numbered and captioned), since this site is built fresh from the current code."""
    from browser import check_site, require_browser

    chromium = require_browser()
    site = smoke_repo / "reports/site"
    notebooks = sorted(p.stem for p in (smoke_repo / "reports/notebooks").glob("*.ipynb")
                       if not p.name.startswith("."))
    assert sorted(p.stem for p in site.glob("*.html")) == sorted([*notebooks, "index"])
    assert check_site(site / "index.html", chromium=chromium, strict=True) == []


def test_metrics_files_hold_numbers_only(smoke_repo):
    """What `dvc metrics show` and `dvc exp show` read: scalars; the rest is in *_info.json."""
    files = sorted(smoke_repo.glob("results/**/*_metrics.json"))
    assert len(files) >= 10, files
    for path in files:
        stack = [json.loads(path.read_text())]
        while stack:
            node = stack.pop()
            for value in node.values():
                if isinstance(value, dict):
                    stack.append(value)
                else:
                    assert isinstance(value, bool | int | float), (path, value)
        assert (path.parent / path.name.replace("_metrics.json", "_info.json")).is_file(), path


def test_push_to_a_remote_and_pull_into_a_fresh_clone(smoke_repo, tmp_path):
    """A lab pushes its run to a folder remote; a reader's clone pulls it and reruns nothing."""
    repo = smoke_repo
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["dvc", "remote", "add", "-d", "lab", str(tmp_path / "remote")], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-q", "-m", "smoke run and the lab's remote"], repo)
    run([sys.executable, "-m", "calib.remote", "push"], repo)

    clone = tmp_path / "reader"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models").exists()
    out = run([sys.executable, "-m", "calib.remote", "pull"], clone).stdout
    assert "`dvc repro` has nothing to rerun" in out, out
    for name in ("models/resnet/model.safetensors", "results/resnet/records/attack_records.csv",
                 "data/prepared/splits.safetensors", "reports/notebooks/20_attack_resnet.ipynb"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    assert not _stagesrun(run(["dvc", "repro"], clone).stdout)
    assert "up to date" in run(["dvc", "status"], clone).stdout


def test_exp_run_eps_reruns_only_attacks_and_dependents(smoke_repo):
    """`dvc exp run -S attack.eps=0.03`: attack stages and their dependents, nothing upstream.

    The experiment runs one attack stage for real (its results must respect the new eps);
    `dvc repro --dry` then lists, without running them, the other stages whose own parameters
    or dependencies the change touches (the whole experiment takes minutes; stages downstream
    of those follow through DVC's output hashes). Runs last in this module: it leaves the
    workspace at the experiment's parameters.
    """
    import yaml

    repo = smoke_repo
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-q", "--allow-empty", "-m", "smoke baseline"], repo)
    out = run(["dvc", "exp", "run", "-S", "attack.eps=0.03", "attack@resnet"], repo).stdout
    assert _stagesrun(out) == {"attack@resnet"}, out
    dry = run(["dvc", "repro", "--dry"], repo).stdout
    ran = _stagesrun(out) | _stagesrun(dry)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["attack"]["eps"] == 0.03
    models = list(params["models"])
    assert {f"attack@{m}" for m in models} <= ran, dry
    upstream = ({"data"} | {f"train@{m}" for m in models}
                | {f"train_seeds@{m}" for m in params["train"]["models"]})
    assert not ran & upstream, f"upstream stages reran: {sorted(ran & upstream)}"
    assert not {s for s in ran if s.startswith("sweep@")}, "the eps sweep has its own grid"
    downstream = ("attack@", "defend@", "defence_table@", "sweep_plot@", "detection",
                  "representations@", "saliency@", "compare", "claims", "report",
                  "budget@", "seeds@")  # the budget runs and the seeds' attack are at attack.eps
    assert all(s.startswith(downstream) for s in ran), sorted(ran)
    for model in ["resnet"]:  # the stage the experiment ran
        attacks = read_metrics(repo / f"results/{model}/attack_metrics.json")
        for name, summary in attacks["attacks"].items():
            if summary["norm"] == "linf":
                assert summary["linf_max"] <= 0.03 + 1e-6, (model, name)

