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
    DEFENCES as ALL_DEFENCES,
)
from calib.defences.evaluate import (
    POSTHOC_DEFENCES,
    ROBUST_MODELS,
    TRAINING_TIME_DEFENCES,
    FineTune,
    StraightThrough,
    adaptive_reason,
    attacked_domains,
    build_defence,
    check_options,
    defence_family,
    evaluate_defence,
    findings,
    finetune_recipe,
    white_box_attacks,
)
from calib.runtime import predict_logits

N_CLASSES = 4
EPS = 0.1
#: Tiny budgets; the training-time defences' own attacks are shortened too.
GRID = AttackGrid(settings=("square-linf", "pgd-linf"), kinds=KINDS, eps_linf=EPS,
                  square_iterations=4, pgd_iterations=2, pgd_alpha=0.05)
OPTIONS = {"aaa": {"steps": 10}, "pgd_at": {"steps": 2},
           "caat": {"iterations": 2}}
#: The defences of a checkpoint; a robust model brings its own (tests/test_robustbench.py).
DEFENCES = tuple(d for d in ALL_DEFENCES if d not in ROBUST_MODELS)


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


def test_finetune_recipe_applies_a_defences_own_override():
    shared = {"epochs": 4, "subset": 5000, "batch_size": 128, "lr": 0.01,
              "overrides": {"dca": {"epochs": 6, "lr": 0.002}, "sam": {"lr": 0.005}}}
    assert finetune_recipe("dca", shared) == FineTune(epochs=6, batch_size=128, lr=0.002)
    assert finetune_recipe("sam", shared) == FineTune(epochs=4, batch_size=128, lr=0.005)
    assert finetune_recipe("pgd_at", shared) == FineTune(epochs=4, batch_size=128, lr=0.01)
    assert finetune_recipe("caat", {k: v for k, v in shared.items() if k != "overrides"}) \
        == FineTune(epochs=4, batch_size=128, lr=0.01)


@pytest.mark.parametrize("overrides,pattern", [
    ({"spline": {"epochs": 2}}, r"'spline' is not a training-time defence"),
    ({"dca": {"momentum": 0.5}}, r"overrides\.dca: unknown keys \['momentum'\]"),
    ({"dca": {"epochs": 0}}, r"epochs must be"),
])
def test_finetune_recipe_refuses_bad_overrides(overrides, pattern):
    shared = {"epochs": 4, "batch_size": 128, "lr": 0.01, "overrides": overrides}
    with pytest.raises(ValueError, match=pattern):
        finetune_recipe("dca", shared)


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
    assert evaluations["aaa"][0].white_box == "masked"
    assert evaluations["cs"][0].white_box == "T held constant"
    assert evaluations["spline"][0].white_box == "exact, clamped"
    assert evaluations["temperature"][0].white_box == "exact"
    assert evaluations["caat"][0].white_box == "exact"
    bpda = build_defence("aaa", setup["model"], options={"steps": 5, "bpda": True},
                         val_logits=setup["val_logits"], val_labels=setup["val_y"])
    assert bpda.white_box == "bpda"


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
        if not s["setting"].startswith("pgd"):
            assert s["white_box"] is None
            continue
        # The strongest of the defence's white-box attacks, each scored on the defended model.
        attacks = white_box_attacks(defended)
        assert s["white_box"] in {defended.white_box, *attacks[1:]}
        tried = {a: s[f"ece_after_{a}"] for a in attacks}
        assert s["ece_after"] == max(tried.values())
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
    assert set(table.loc[table["defence"] == "aaa", "white_box"].dropna()) <= {
        "masked", "bpda", "transfer"}
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
    assert any(line.startswith("**AAA**") and "winning:" in line for line in lines)
    assert findings(table[table["defence"] != "none"])  # works without the reference too
    assert findings(table.iloc[0:0]) == ["No defence was evaluated."]
    with pytest.raises(ValueError, match="one model"):
        findings(pd.concat([table, table.assign(model="other")]))


def test_findings_judge_differences_paired_only(table):
    """Above/below the undefended model is said only from the paired table, with "within
    noise" a possible outcome; without it no sentence claims a difference."""
    assert not any("lower:" in line or "higher:" in line for line in findings(table))
    defences = [d for d in table["defence"].unique() if d != "none"]
    outcomes = ["lower", "higher", "within noise"]
    paired = pd.DataFrame([{
        "setting": s, "defence": d, "diff": -0.1, "diff_lo": -0.2, "diff_hi": -0.05,
        "outcome": outcomes[i % 3], "clean_diff": 0.01, "clean_diff_lo": -0.01,
        "clean_diff_hi": 0.03, "clean_outcome": "within noise"}
        for s in table["setting"].unique() for i, d in enumerate(defences)])
    lines = findings(table, paired=paired)
    judged = [line for line in lines if "paired 95% interval" in line]
    assert len(judged) == table["setting"].nunique()
    assert f"lower: {defences[0]} (-0.100 [-0.200, -0.050])" in judged[0]
    assert f"within noise: {defences[2]}" in judged[0]
    clean = [line for line in lines if "clean ECE on the same images" in line]
    assert all("lower: none; higher: none; within noise:" in line for line in clean)
    cs = [line for line in lines if line.startswith("**CS, ")]
    assert cs and all("paired difference +0.010 [-0.010, +0.030]: within noise" in line
                      for line in cs)
    with pytest.raises(ValueError, match="clean_outcome"):
        findings(table, paired=paired.drop(columns="clean_outcome"))


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


# ---- adaptive white-box attacks --------------------------------------------------------------

def test_white_box_attacks_per_defence(evaluations):
    assert white_box_attacks(evaluations["none"][0]) == ("exact",)
    assert white_box_attacks(evaluations["temperature"][0]) == ("exact",)
    assert white_box_attacks(evaluations["caat"][0]) == ("exact",)
    assert white_box_attacks(evaluations["spline"][0]) == ("exact", "bpda")
    assert white_box_attacks(evaluations["cs"][0]) == ("exact", "bpda")
    assert white_box_attacks(evaluations["aaa"][0]) == ("exact", "bpda", "transfer")
    for name in DEFENCES:
        assert adaptive_reason(evaluations[name][0]).endswith(".")


def test_straight_through_keeps_the_value_and_takes_the_base_gradient(setup, evaluations):
    defended = evaluations["aaa"][0]
    base, recal = defended.model.model, defended.recalibrator
    x = setup["test_x"][:4].clone().requires_grad_(True)
    surrogate = StraightThrough(base, recal)
    out = surrogate(x)
    torch.testing.assert_close(out.detach(), defended.model(x).detach())
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    (want,) = torch.autograd.grad(base(x)[:, 0].sum(), x)
    torch.testing.assert_close(grad, want)
    (masked,) = torch.autograd.grad(defended.model(x)[:, 0].sum(), x, allow_unused=True)
    assert masked is None or float(masked.abs().max()) == 0.0  # what exact PGD sees


def test_the_exact_attack_on_aaa_is_named_masked_not_exact(evaluations):
    _, ev = evaluations["aaa"]
    white = [s for s in ev.summaries if s["setting"].startswith("pgd")]
    assert white and all(s["white_box"] != "exact" for s in white)
    assert all(s["zero_gradient_fraction"] == 1.0 or s["white_box"] != "masked"
               for s in white)


def test_robust_accuracy_under_ordinary_pgd(setup):
    from calib.defences.evaluate import robust_accuracy

    x, y = setup["test_x"], setup["test_y"]
    model = setup["model"]
    clean = predict_logits(model, x).argmax(1) == y
    robust = robust_accuracy(model, x, y, eps=0.3, steps=10)
    assert robust.dtype == torch.bool and robust.shape == y.shape
    assert not (robust & ~clean).any()  # PGD starts near the clean image: no new right answers
    assert robust.float().mean() < clean.float().mean()  # a big eps breaks some
    none = robust_accuracy(model, x, y, eps=1e-6, steps=2)
    assert torch.equal(none, clean)
    assert torch.equal(robust_accuracy(model, x, y, eps=0.3, steps=10), robust)  # seeded


def test_adversarial_training_trains_at_the_evaluation_eps():
    from calib.defences.evaluate import options_at

    assert options_at("pgd_at", {"alpha": 0.01, "steps": 3}, eps=0.07)["eps"] == 0.07
    assert options_at("caat", {}, eps=0.1) == {"eps": 0.1}
    assert options_at("cs", {}, eps=0.1) == {}
    with pytest.raises(ValueError, match="trains at the evaluation's eps"):
        options_at("pgd_at", {"eps": 0.03}, eps=0.1)
    with pytest.raises(ValueError, match="unknown"):
        options_at("pgd_at", {"epz": 0.03}, eps=0.1)


def test_mdts_rows_say_whether_their_attack_made_the_domains(evaluations):
    _, ev = evaluations["mdts"]
    seen = {s["setting"]: s["attack_seen_in_fit"] for s in ev.summaries}
    assert seen == {"square-linf": False, "pgd-linf": True}
    assert all(s["attack_seen_in_fit"] is None for s in evaluations["cs"][1].summaries)


def test_training_evidence_says_whether_adversarial_training_worked():
    from calib.defences.evaluate import training_evidence

    n = 200
    base = [1] * 40 + [0] * (n - 40)                   # 20% robust undefended
    strong = [1] * 120 + [0] * (n - 120)               # 60%: clearly above
    same = list(base)                                  # no gain: within noise
    runs = {"none": {"family": "none", "robust": {"eps": 0.1, "steps": 20, "correct": base},
                     "levelled_off": None},
            "pgd_at": {"family": "training", "levelled_off": {"val_loss": True,
                                                               "val_accuracy": True},
                       "params": {"epochs": 4, "lr": 0.01, "train_size": 5000,
                                  "batch_size": 128},
                       "robust": {"eps": 0.1, "steps": 20, "correct": strong}},
            "caat": {"family": "training", "levelled_off": {"val_loss": False,
                                                             "val_accuracy": True},
                     "robust": {"eps": 0.1, "steps": 20, "correct": same}},
            "cs": {"family": "posthoc", "robust": None, "levelled_off": None}}
    table = training_evidence(runs, n_resamples=300).set_index("defence")
    assert list(table.index) == ["none", "pgd_at", "caat"]
    assert table.loc["pgd_at", "verdict"] == "worked" and table.loc["pgd_at", "outcome"] == "higher"
    assert table.loc["caat", "verdict"] == "failed"
    assert table.loc["none", "outcome"] == "reference"
    assert table.loc["none", "verdict"] == "not adversarial training"
    assert not table[["outcome", "verdict"]].isna().any().any(), "no NaN text cells"
    assert table.loc["caat", "outcome"] == "within noise"
    assert table.loc["caat", "levelled_off"] == "val_accuracy"
    assert table.loc["pgd_at", "fine_tuning"] == "4 epochs x 40 steps (batch 128), lr 0.01"
    assert table.loc["none", "fine_tuning"] == ""
    assert table.loc["pgd_at", "levelled_off"] == "val loss and accuracy"
    assert table.loc["pgd_at", "robust_accuracy"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="reference"):
        training_evidence({"pgd_at": runs["pgd_at"]})
    odd = {**runs, "dca": {"family": "training", "levelled_off": None,
                           "robust": {"eps": 0.05, "steps": 20, "correct": base}}}
    with pytest.raises(ValueError, match="eps or images differ"):
        training_evidence(odd)
