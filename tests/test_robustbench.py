"""The RobustBench row of Table 4 (calib.defences.robust), offline.

The paper profile attacks a robust CIFAR-100 model of RobustBench next to the defences. Its
weights download at run time, which cannot happen here, so these tests write checkpoints of the
same architectures with random weights where ``robustbench.utils.load_model`` reads them
(``<model_dir>/cifar100/Linf/<model_name>.pt``, a ``{"state_dict": {"module.<key>": tensor}}``
dict, the layout of RobustBench's own files), block the network, and load them through the
defence stage's code path. The attacks run on :data:`SMALL`, the PreAct ResNet-18 of
RobustBench's CIFAR-100 L-inf zoo (the smallest architecture there, and the same code family as
the paper profile's WideResNet-28-10, which is loaded and run forward once).
"""

from __future__ import annotations

import re
import socket
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from calib import reporting
from calib.attacks.grid import AttackGrid
from calib.config import ConfigError, check_params
from calib.defences import robust
from calib.defences.evaluate import (
    DEFENCES,
    ROBUST_MODELS,
    adaptive_reason,
    build_defence,
    check_options,
    defence_family,
    evaluate_defence,
    input_shape,
    options_at,
    white_box_attacks,
)
from calib.profiles import deep_merge, render_profile

ROOT = Path(__file__).resolve().parents[1]
#: PreAct ResNet-18 with Swish (Rebuffi et al. 2021, 12.6 M parameters): the small stand-in.
SMALL = "Rebuffi2021Fixing_R18_ddpm"
EPS = 8 / 255
GRID = AttackGrid(settings=("square-linf", "pgd-linf"), kinds=("uca", "oca"), eps_linf=EPS,
                  square_iterations=2, pgd_iterations=1, pgd_alpha=2 / 255)


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network access blocked by tests/test_robustbench.py")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    """No name lookups, no connections: a download attempt fails at once."""
    mp.setattr(socket, "getaddrinfo", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setattr(socket.socket, "connect", _refuse)


def _no_download(mp: pytest.MonkeyPatch) -> None:
    """A download attempt is a test failure (the checkpoint is there)."""
    utils = robust._robustbench()

    def download(gdrive_id: str, fname_save: object) -> None:
        raise AssertionError(f"robustbench tried to download {fname_save}")

    mp.setattr(utils, "download_gdrive_new", download)


def write_checkpoint(model_dir: Path, name: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint of model ``name``'s architecture where RobustBench reads it."""
    torch.manual_seed(seed)
    state = robust._zoo()[name]["model"]().state_dict()
    path = robust.checkpoint_path(name, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[object, dict[str, torch.Tensor], Path]:
    """SMALL built as the defence stage builds it, from a generated checkpoint, offline."""
    model_dir = tmp_path_factory.mktemp("robustbench")
    state = write_checkpoint(model_dir, SMALL)
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        _no_download(mp)
        options = options_at("robustbench", {"model_name": SMALL, "threat_model": "Linf",
                                             "model_dir": str(model_dir)}, eps=EPS)
        defended = build_defence("robustbench", torch.nn.Identity(), options=options)
    return defended, state, model_dir


# ---- names, options and the registry ---------------------------------------------------------

def test_robustbench_is_a_robust_model_not_a_defence_of_the_checkpoint():
    assert ROBUST_MODELS == ("robustbench",) and DEFENCES[-1] == "robustbench"
    assert defence_family("robustbench") == "robust"
    assert reporting.DEFENCE_NAMES["robustbench"] == "RobustBench model (own weights)"
    spec = {"img_size": 224, "in_chans": 3}
    assert input_shape("robustbench", spec) == {"img_size": 32, "in_chans": 3}
    assert input_shape("cs", spec) == spec and input_shape("none", spec) == spec


def test_the_registry_is_read_from_the_package():
    allowed = robust.robustbench_models()
    assert robust.DEFAULT_MODEL in allowed and SMALL in allowed
    assert len(allowed) >= 20
    assert "Debenedetti2022Light_XCiT-S12" not in allowed  # hub weights, not model_dir
    assert "Bai2024MixedNUTS" not in allowed                # several files


def test_options_are_completed_with_the_defaults():
    assert check_options("robustbench", {"model_name": SMALL}) == {
        "model_name": SMALL, "threat_model": "Linf", "model_dir": "models/robustbench"}
    assert robust.checkpoint_path(SMALL) == Path(f"models/robustbench/cifar100/Linf/{SMALL}.pt")


@pytest.mark.parametrize("options,pattern", [
    ({"model_name": "Nobody2099Robust"},
     r"model_name 'Nobody2099Robust' is not a CIFAR-100 Linf model of RobustBench's zoo "
     r"\(robustbench 1\.1\.1\); allowed: \['Gowal2020Uncovering'"),
    ({"model_name": "Debenedetti2022Light_XCiT-S12"},
     r"is in RobustBench's zoo but its weights come from the Hugging Face hub"),
    ({"model_name": SMALL, "threat_model": "L2"},
     r"threat_model must be one of \['Linf'\], got 'L2'"),
    ({"model_name": SMALL, "model_dir": ""}, r"model_dir must be a folder path"),
    ({"model": SMALL}, r"bad options for 'robustbench'.*allowed: \['model_name', "
                       r"'threat_model', 'model_dir'\]"),
])
def test_bad_options_fail_before_any_work(options, pattern, tmp_path, monkeypatch):
    _block_network(monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        check_options("robustbench", options)
    with pytest.raises(ValueError, match=pattern):
        build_defence("robustbench", torch.nn.Identity(),
                      options={**options, "model_dir": options.get("model_dir", str(tmp_path))})
    assert list(tmp_path.iterdir()) == []  # nothing was read, made or downloaded


# ---- loading, offline --------------------------------------------------------------------------

def test_a_generated_checkpoint_loads_offline_with_its_weights(small):
    defended, state, model_dir = small
    assert defended.name == "robustbench" and defended.family == "robust"
    assert not defended.model.training
    loaded = defended.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    params = defended.params
    assert params["checkpoint"] == str(model_dir / "cifar100" / "Linf" / f"{SMALL}.pt")
    assert params["options"] == {"model_name": SMALL, "threat_model": "Linf",
                                 "model_dir": str(model_dir)}
    assert params["img_size"] == 32 and params["source"] == "RobustBench 1.1.1"
    assert params["parameters"] == sum(v.numel() for k, v in state.items()
                                       if not k.endswith(("running_mean", "running_var",
                                                          "num_batches_tracked")))


def test_logits_of_32px_images_in_0_1(small):
    defended, _, _ = small
    net = defended.model
    # RobustBench's DM models normalise inside: they take [0, 1] images, as ours do.
    torch.testing.assert_close(net.mean.flatten(), torch.tensor((0.5071, 0.4865, 0.4409)))
    torch.testing.assert_close(net.std.flatten(), torch.tensor((0.2673, 0.2564, 0.2762)))
    x = _images(3)
    with torch.no_grad():
        z = net(x)
        assert z.shape == (3, 100) and torch.isfinite(z).all()
        torch.testing.assert_close(defended.test_logits(torch.zeros(3, 100), x), z)


def test_the_paper_profiles_model_loads_offline(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    _no_download(monkeypatch)
    state = write_checkpoint(tmp_path, robust.DEFAULT_MODEL, seed=1)
    net = robust.load_robust_model(robust.DEFAULT_MODEL, model_dir=tmp_path)
    assert type(net).__name__ == "DMWideResNet"
    assert torch.equal(net.state_dict()["logits.weight"], state["logits.weight"])
    with torch.no_grad():
        assert net(_images(2)).shape == (2, 100)


def test_a_missing_checkpoint_offline_says_where_to_put_it(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    where = tmp_path / "cifar100" / "Linf" / f"{SMALL}.pt"
    with pytest.raises(FileNotFoundError) as err:
        build_defence("robustbench", torch.nn.Identity(),
                      options={"model_name": SMALL, "threat_model": "Linf",
                               "model_dir": str(tmp_path)})
    message = str(err.value)
    assert f"no RobustBench checkpoint at {where}, and downloading it failed" in message
    assert "Without internet, put the file there" in message
    assert not where.exists()


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    _no_download(monkeypatch)
    state = robust._zoo()["Addepalli2022Efficient_RN18"]["model"]().state_dict()
    path = robust.checkpoint_path(SMALL, tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=re.escape(f"RobustBench checkpoint {path} does not "
                                                     f"load into '{SMALL}'")):
        robust.load_robust_model(SMALL, model_dir=tmp_path)


# ---- attacked like a defence -------------------------------------------------------------------

def test_the_robust_row_runs_through_evaluate_defence(small):
    defended, _, _ = small
    assert white_box_attacks(defended) == ("exact",)
    assert "RobustBench" in adaptive_reason(defended)
    images = _images(2, seed=1)  # a PreAct ResNet-18 pass takes a while on a busy 2-core CPU
    labels = torch.tensor([17, 99])
    ev = evaluate_defence(defended, images, labels, grid=GRID, model_name="resnet", seed=0)
    assert len(ev.summaries) == len(GRID.settings) * len(GRID.kinds)
    for s in ev.summaries:
        assert s["defence"] == "robustbench" and s["family"] == "robust"
        assert s["model"] == "resnet" and s["n"] == 2
        assert s["label_preserved"] == 1.0
        assert s["linf_max"] <= EPS + 1e-6
        assert s["white_box"] == ("exact" if s["setting"] == "pgd-linf" else None)
    table = reporting.table4(ev.summaries, defence_order=DEFENCES)
    assert set(table["defence"]) == {"robustbench"} and len(table) == 4
    pivot = reporting.table4_pivot(table, "ece", white_box=True)
    assert list(pivot[("defence", "")]) == ["robustbench"]


# ---- profiles and configuration ----------------------------------------------------------------

def test_only_the_paper_profile_lists_it():
    paper = render_profile("paper", ROOT / "profiles")
    assert "robustbench" in paper["defend"]["defences"]
    assert paper["data"]["dataset"] == "cifar100"
    assert paper["defend"]["options"]["robustbench"] == {
        "model_name": robust.DEFAULT_MODEL, "threat_model": "Linf",
        "model_dir": robust.DEFAULT_MODEL_DIR}
    for name in ("default", "smoke"):  # no internet there: PGD-AT stands in
        params = render_profile(name, ROOT / "profiles")
        assert "robustbench" not in params["defend"]["defences"], name
    assert "pgd_at" in render_profile("default", ROOT / "profiles")["defend"]["defences"]


def _config_errors(params: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_params(params)
    return str(err.value).splitlines()


def test_bad_configuration_names_the_key():
    paper = render_profile("paper", ROOT / "profiles")
    index = paper["defend"]["defences"].index("robustbench")
    [line] = _config_errors(deep_merge(paper, {"defend": {"options": {"robustbench": {
        "model_name": "Nobody2099Robust"}}}}))
    assert line.startswith("defend.options.robustbench.model_name: 'Nobody2099Robust' is not "
                           "a CIFAR-100 Linf model of RobustBench's zoo")
    assert f"'{robust.DEFAULT_MODEL}'" in line  # the allowed ones are listed
    [line] = _config_errors(deep_merge(paper, {"defend": {"options": {"robustbench": {
        "threat_model": "L2"}}}}))
    assert line == ("defend.options.robustbench.threat_model: 'L2' is not allowed; choose one "
                    "of 'Linf'")
    [line] = _config_errors(deep_merge(paper, {"data": {"dataset": "gtsrb"}}))
    assert line.startswith(f"defend.defences[{index}]: 'robustbench' loads a CIFAR-100 model of "
                           "RobustBench; it needs data.dataset cifar100, not 'gtsrb'")
    default = render_profile("default", ROOT / "profiles")
    listed = deep_merge(default, {"defend": {"defences": ["none", "robustbench"]}})
    [line] = _config_errors(listed)
    assert line.startswith("defend.defences[1]: 'robustbench' loads a CIFAR-100 model")


# ---- installation ------------------------------------------------------------------------------

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[name.lower()] = pinned
    return pins


def test_robustbench_is_pinned_and_installed_without_its_timm_pin():
    nodeps = _pins(ROOT / "requirements-nodeps.txt")
    assert nodeps == {"robustbench": "1.1.1"}
    assert version("robustbench") == nodeps["robustbench"]
    pins = _pins(ROOT / "requirements.txt")
    for name in ("gdown", "geotorch", "torchdiffeq"):  # what its loader and zoo import
        assert version(name) == pins[name], name
    # --no-deps kept our torch and timm (robustbench 1.1.1 asks for timm==1.0.9).
    assert version("timm") == pins["timm"]
    assert torch.__version__.split("+")[0] == pins["torch"]
