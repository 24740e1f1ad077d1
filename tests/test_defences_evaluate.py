"""calib.defences.evaluate: every defence builds, keeps labels under every attack, and Table 4,
its findings and its figure are assembled from the evaluations."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from calib import reporting
from calib.attacks import KINDS
from calib.attacks.grid import AttackGrid
from calib.checks import parameters_snapshot, parameters_unchanged
from calib.data import LabeledImages
from calib.defences import POSTHOC, TRAINING_DEFENCES
from calib.defences.evaluate import (
    DEFENCES,
    POSTHOC_DEFENCES,
    TRAINING_TIME_DEFENCES,
    FineTune,
    attacked_domains,
    build_defence,
    check_options,
    defence_family,
    evaluate_defence,
    findings,
)
from calib.runtime import predict_logits

N_CLASSES = 4
EPS = 0.1
#: Tiny budgets; the training-time defences' own attacks are shortened too.
GRID = AttackGrid(settings=("square-linf", "pgd-linf"), kinds=KINDS, eps_linf=EPS,
                  square_iterations=4, pgd_iterations=2, pgd_alpha=0.05)
OPTIONS = {"aaa": {"steps": 10, "bpda": True}, "pgd_at": {"steps": 2},
           "caat": {"iterations": 2}}


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four-class images (N, 1, 8, 8) in [0, 1]: class c brightens quadrant c a little, under
    enough noise that a small model is right about 80% of the time and unsure."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES
    images = torch.full((n, 1, 8, 8), 0.2)
    for c in range(N_CLASSES):
        r, q = divmod(c, 2)
        images[labels == c, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] = 0.3
    images = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, labels


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(64, N_CLASSES))
    x, y = _images(128, seed=5)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(30):  # a briefly trained model: neither random nor perfect
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    model = _net()
    val_x, val_y = _images(64, seed=1)
    test_x, test_y = _images(12, seed=2)
    train_x, train_y = _images(32, seed=3)
    with torch.no_grad():
        val_logits = model(val_x)
    return {
        "model": model, "val_x": val_x, "val_y": val_y, "val_logits": val_logits,
        "test_x": test_x, "test_y": test_y,
        "train": LabeledImages(train_y, images=train_x), "val": LabeledImages(val_y, images=val_x),
    }


def _build(name: str, s: dict, **kwargs: object):
    domains = None
    if name == "mdts":
        domains = attacked_domains(s["model"], s["val_x"][:24], s["val_y"][:24], eps=EPS,
                                   iterations=2, alpha=0.05, seed=0)
    return build_defence(name, s["model"], options=OPTIONS.get(name, {}),
                         val_logits=s["val_logits"], val_labels=s["val_y"], domains=domains,
                         train_data=s["train"], val_data=s["val"],
                         finetune=FineTune(epochs=1, batch_size=16, lr=0.01), seed=0, **kwargs)


@pytest.fixture(scope="module")
def evaluations(setup) -> dict[str, object]:
    out = {}
    for name in DEFENCES:
        snapshot = parameters_snapshot(setup["model"])
        defended = _build(name, setup)
        assert parameters_unchanged(setup["model"], snapshot), f"{name} changed the model"
        out[name] = (defended, evaluate_defence(defended, setup["test_x"], setup["test_y"],
                                                grid=GRID, model_name="tiny", seed=0))
    return out


# ---- names and options ----------------------------------------------------------------------

def test_defence_names_cover_the_package():
    assert set(POSTHOC_DEFENCES) == set(POSTHOC)
    assert {"label_smoothing", "dca", "sam", "pgd_at", "caat"} <= set(TRAINING_TIME_DEFENCES)
    assert set(TRAINING_DEFENCES) - {"none"} <= set(TRAINING_TIME_DEFENCES)
    assert DEFENCES[0] == "none" and len(set(DEFENCES)) == len(DEFENCES)
    families = {name: defence_family(name) for name in DEFENCES}
    assert families["none"] == "none" and families["cs"] == "posthoc"
    assert families["finetune"] == families["caat"] == "training"
    with pytest.raises(ValueError, match="defence must be one of"):
        defence_family("dropout")


@pytest.mark.parametrize("name,options,pattern", [
    ("aaa", {"tau": -1.0}, "tau must be positive"),
    ("caat", {"iterations": 0}, "iterations must be a positive integer"),
    ("sam", {"radius": 0.1}, "unknown option"),
    ("spline", {"knots": 6}, "bad options"),
    ("none", {"beta": 1.0}, "takes no options"),
    ("finetune", {"smoothing": 0.1}, "'finetune' takes no options"),
])
def test_check_options_rejects(name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_options(name, options)


def test_missing_inputs_fail_fast(setup):
    model = setup["model"]
    with pytest.raises(ValueError, match="domains"):
        build_defence("mdts", model)
    with pytest.raises(ValueError, match="val_logits"):
        build_defence("temperature", model)
    with pytest.raises(ValueError, match="train_data"):
        build_defence("dca", model, val_data=setup["val"])
    with pytest.raises(ValueError, match="epochs must be"):
        FineTune(epochs=0)


# ---- building ---------------------------------------------------------------------------------

def test_attacked_domains(setup):
    domains = attacked_domains(setup["model"], setup["val_x"][:16], setup["val_y"][:16],
                               eps=EPS, iterations=3, alpha=0.05, seed=0)
    assert list(domains) == ["clean", "uca", "oca"]
    conf = {k: z.softmax(-1).max(-1).values.mean() for k, (z, _) in domains.items()}
    assert conf["uca"] <= conf["clean"] + 1e-6 <= conf["oca"] + 2e-6
    pred = domains["clean"][0].argmax(-1)
    assert all(torch.equal(z.argmax(-1), pred) for z, _ in domains.values())


def test_posthoc_and_none_keep_the_clean_predictions(setup, evaluations):
    x = setup["test_x"]
    base = predict_logits(setup["model"], x).argmax(-1)
    for name in ("none", *POSTHOC_DEFENCES):
        defended = evaluations[name][0]
        assert torch.equal(predict_logits(defended.model, x).argmax(-1), base), name
        assert defended.family == defence_family(name)


def test_white_box_labels(setup, evaluations):
    assert evaluations["aaa"][0].white_box == "bpda"
    assert evaluations["cs"][0].white_box == "T held constant"
    assert evaluations["temperature"][0].white_box == "exact"
    assert evaluations["caat"][0].white_box == "exact"
    masked = build_defence("aaa", setup["model"], options={"steps": 5, "bpda": False})
    assert masked.white_box == "masked"


def test_training_time_defences_fine_tune_a_copy(setup, evaluations):
    for name in TRAINING_TIME_DEFENCES:
        defended = evaluations[name][0]
        assert defended.family == "training" and len(defended.history) == 1
        assert defended.params["train_size"] == 32
        assert not defended.model.training
        changed = any(not torch.equal(a, b) for a, b in zip(
            defended.model.parameters(), setup["model"].parameters(), strict=True))
        assert changed, f"{name} did not update its copy of the weights"


def test_test_logits(setup, evaluations):
    base = torch.randn(12, N_CLASSES)
    assert evaluations["none"][0].test_logits(base) is base
    ts = evaluations["temperature"][0]
    torch.testing.assert_close(ts.test_logits(base), ts.recalibrator(base))
    dca = evaluations["dca"][0]
    with pytest.raises(ValueError, match="test data"):
        dca.test_logits(base)
    out = dca.test_logits(base, setup["test_x"])
    assert out.shape == (12, N_CLASSES) and out.device.type == "cpu"


# ---- evaluating -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEFENCES)
def test_every_defence_is_attacked_without_changing_a_label(evaluations, name):
    defended, ev = evaluations[name]
    assert len(ev.summaries) == len(GRID.settings) * len(KINDS)
    for s in ev.summaries:
        assert s["defence"] == name and s["model"] == "tiny" and s["n"] == 12
        assert s["label_preserved"] == 1.0
        assert s["accuracy_after"] == s["accuracy_before"]
        assert s["linf_max"] <= EPS + 1e-6
        assert 0.0 <= s["ece_after"] <= 1.0 and 0.0 <= s["ks_after"] <= 1.0
        expected = defended.white_box if s["setting"].startswith("pgd") else None
        assert s["white_box"] == expected
    records = ev.run.records(torch.arange(100, 112))
    assert len(records) == 12 * len(ev.run.results)
    assert records["index"].min() == 100 and set(records["kind"]) == set(KINDS)


def test_evaluation_is_deterministic(setup, evaluations):
    defended, ev = evaluations["cs"]
    again = evaluate_defence(defended, setup["test_x"], setup["test_y"], grid=GRID,
                             model_name="tiny", seed=0)
    assert again.summaries == ev.summaries


def test_cs_confidences_stay_above_its_floor(evaluations):
    _, ev = evaluations["cs"]
    for result in ev.run.results.values():
        assert float(result.final_confidence.min()) >= 0.8 - 1e-6


# ---- Table 4, findings, figure ----------------------------------------------------------------

@pytest.fixture(scope="module")
def table(evaluations) -> pd.DataFrame:
    summaries = [s for name in reversed(DEFENCES) for s in evaluations[name][1].summaries]
    return reporting.table4(summaries, defence_order=DEFENCES)


def test_table4_rows_and_order(table):
    assert len(table) == len(DEFENCES) * len(GRID.settings) * len(KINDS)
    assert list(dict.fromkeys(table["defence"])) == list(DEFENCES)
    first = table[(table["defence"] == "none") & (table["setting"] == "pgd-linf")]
    assert list(first["attack"]) == ["UCA", "OCA", "MMA", "RCA"]
    assert (table["acc_before"] == table["acc_after"]).all()
    assert table.loc[table["setting"] == "square-linf", "white_box"].isna().all()
    assert set(table.loc[table["defence"] == "aaa", "white_box"].dropna()) == {"bpda"}
    for column in ("ece_before", "ece_after", "ks_before", "ks_after", "success_rate"):
        assert column in table


def test_table4_default_order_and_empty():
    rows = [{"model": "m", "defence": d, "setting": "pgd-linf", "kind": "uca",
             "confidence_before": 0.9, "confidence_after": 0.5, "success_rate": 1.0,
             "queries_mean": 2.0} for d in ("cs", "none")]
    assert list(reporting.table4(rows)["defence"]) == ["cs", "none"]
    assert reporting.table4([]).empty


def test_findings_come_from_the_table(table):
    lines = findings(table)
    assert any(line.startswith("**pgd-linf**: the lowest post-attack ECE") for line in lines)
    pgd = table[table["setting"] == "pgd-linf"]
    best = pgd.groupby("defence", sort=False)["ece_after"].mean().idxmin()
    assert f"**{best}**" in lines[0]
    assert any(line.startswith("**CS**") for line in lines)
    assert any(line.startswith("**AAA**") and "bpda" in line for line in lines)
    assert findings(table[table["defence"] != "none"])  # works without the reference too
    assert findings(table.iloc[0:0]) == ["No defence was evaluated."]
    with pytest.raises(ValueError, match="one model"):
        findings(pd.concat([table, table.assign(model="other")]))


def test_heatmap_figure(table, tmp_path):
    from calib import plots

    fig = plots.defence_ece_heatmap(table, title="tiny")
    assert len(fig.axes) == len(GRID.settings) + 1  # one panel per setting + colour bar
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["clean", "UCA", "OCA", "MMA", "RCA"]
    plots.save_figure(fig, tmp_path / "t4.png")
    assert (tmp_path / "t4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one model"):
        plots.defence_ece_heatmap(pd.concat([table, table.assign(model="other")]))
