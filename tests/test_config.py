"""Bad configuration fails fast, naming the key and the allowed values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from calib.config import ConfigError, check_params
from calib.profiles import deep_merge, render_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return render_profile("default", ROOT / "profiles")


@pytest.mark.parametrize("path,value,pattern", [
    (("data", "dataset"), "mnist", r"data\.dataset.*fashion_mnist"),
    (("data", "val_fraction"), 0.0, r"data\.val_fraction.*\(0, 1\)"),
    (("data", "val_fraction"), 1.5, r"data\.val_fraction"),
    (("data", "attack_size"), 0, r"data\.attack_size must be >= 1"),
    (("data", "mirror"), None, r"data\.mirror must be a folder path string"),
    (("data", "mirror"), "/no/such/mirror", r"data\.mirror = '/no/such/mirror' is not a folder"),
    (("data", "checksums"), False, r"data\.checksums must be a path string"),
    (("data", "checksums"), "/no/such.json", r"data\.checksums: checksums file .* not exist"),
    (("models", "resnet", "train", "epochs"), 0, r"models\.resnet\.train\.epochs must be >= 1"),
    (("models", "vit", "train", "optimizer"), "adam",
     r"models\.vit\.train\.optimizer.*'sgd', 'adamw'"),
    (("models", "resnet", "train", "lr"), -1.0, r"models\.resnet\.train\.lr"),
    (("models", "vit", "arch"), "densenet121", r"models\.vit\.arch.*unknown model arch"),
    (("models", "resnet", "arch"), "resnet_does_not_exist", r"models\.resnet\.arch"),
    (("device",), "tpu", r"device.*'auto'"),
    (("attack", "kinds"), "uca,xca", r"attack\.kinds item = 'xca'.*'rca'"),
    (("attack", "settings"), "square-l1", r"attack\.settings item.*'square-linf'"),
    (("attack", "eps"), 0.0, r"attack\.eps.*\(0, 1\]"),
    (("attack", "eps"), 2.0, r"attack\.eps"),
    (("attack", "square_iterations"), 0, r"attack\.square_iterations must be >= 1"),
    (("attack", "square_p_init"), 0.0, r"attack\.square_p_init.*\(0, 1\]"),
    (("attack", "square_p_init"), 1.5, r"attack\.square_p_init"),
    (("seed",), -1, r"seed must be >= 0"),
    (("models", "resnet_lt", "train", "imbalance_ratio"), 0.5,
     r"models\.resnet_lt\.train\.imbalance_ratio.*\[1, inf\)"),
    (("analysis", "compare", "long_tailed"), "resnet_xl", r"analysis\.compare\.long_tailed"),
    (("sweep", "eps"), [0.05, 1.5], r"sweep\.eps"),
    (("sweep", "models"), ["resnet", "densenet"], r"sweep\.models item 'densenet'"),
    (("analysis", "models"), ["convnext"], r"analysis\.models.*convnext"),
    (("analysis", "setting"), "pgd-l2", r"analysis\.setting.*'square-linf'"),
    (("analysis", "representations", "n_fit"), 0, r"analysis\.representations\.n_fit"),
    (("analysis", "saliency", "top_fraction"), 1.5, r"analysis\.saliency\.top_fraction"),
    (("analysis", "claims", "defence_model"), "vit", r"analysis\.claims\.defence_model"),
])
def test_bad_values_name_the_key(params, path, value, pattern):
    bad = copy.deepcopy(params)
    node = bad
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=pattern):
        check_params(bad)


def test_missing_keys_are_named(params):
    bad = copy.deepcopy(params)
    del bad["models"]["vit"]["train"]
    with pytest.raises(ConfigError, match=r"models\.vit\.train"):
        check_params(bad)
    bad = copy.deepcopy(params)
    del bad["data"]["attack_size"]
    with pytest.raises(ConfigError, match=r"data\.attack_size"):
        check_params(bad)


def test_mirror_and_checksums_point_at_existing_files(params, tmp_path):
    good = copy.deepcopy(params)
    assert good["data"]["mirror"] == "" and good["data"]["checksums"] == ""
    (tmp_path / "mirror").mkdir()
    table = tmp_path / "md5.json"
    table.write_text('{"cifar-100-python/train": "' + "a" * 32 + '"}')
    good["data"].update(mirror=str(tmp_path / "mirror"), checksums=str(table))
    check_params(good)
    table.write_text('{"cifar-100-python/train": "xyz"}')
    with pytest.raises(ConfigError, match=r"data\.checksums: .*32 hexadecimal digits"):
        check_params(good)
    del good["data"]["mirror"]
    with pytest.raises(ConfigError, match=r"missing parameter data\.mirror"):
        check_params(good)


def test_deep_merge_overlays_and_removes():
    base = {"a": {"x": 1, "y": 2}, "b": 3}
    assert deep_merge(base, {"a": {"y": 5}, "b": None}) == {"a": {"x": 1, "y": 5}}
    assert base == {"a": {"x": 1, "y": 2}, "b": 3}


def test_unknown_profile():
    with pytest.raises(ConfigError, match="smoke"):
        render_profile("huge", ROOT / "profiles")


def test_cli_reports_bad_file(tmp_path, capsys, params):
    import yaml

    from calib.config import main

    bad = copy.deepcopy(params)
    bad["models"]["resnet"]["train"]["epochs"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main([str(path)]) == 2
    assert "models.resnet.train.epochs" in capsys.readouterr().err


@pytest.mark.parametrize("path,value,pattern", [
    (("defend", "defences"), ["none", "dropout"], r"defend\.defences item = 'dropout'.*'caat'"),
    (("defend", "defences"), [], r"defend\.defences must be a non-empty list"),
    (("defend", "defences"), ["cs", "cs"], r"defend\.defences lists \['cs'\] more than once"),
    (("defend", "models"), ["densenet"], r"defend\.models item = 'densenet'.*'resnet', 'vit'"),
    (("defend", "settings"), "square-l1", r"defend\.settings item.*'pgd-linf'"),
    (("defend", "kinds"), "uca,xca", r"defend\.kinds item = 'xca'"),
    (("defend", "n_images"), 501, r"defend\.n_images = 501 exceeds data\.attack_size"),
    (("defend", "square_iterations"), 0, r"defend\.square_iterations must be >= 1"),
    (("defend", "mdts_val_size"), 1.5, r"defend\.mdts_val_size must be an integer"),
    (("defend", "finetune", "epochs"), 0, r"defend\.finetune\.epochs must be >= 1"),
    (("defend", "finetune", "subset"), -1, r"defend\.finetune\.subset must be >= 0"),
    (("defend", "finetune", "lr"), 0.0, r"defend\.finetune\.lr.*\(0, inf\)"),
    (("defend", "options", "aaa", "steps"), 2.5, r"defend\.options\.aaa: steps must be"),
    (("defend", "options", "aaa", "bpda"), "yes", r"defend\.options\.aaa\.bpda must be true"),
    (("defend", "options", "pgd_at", "eps"), 2.0, r"defend\.options\.pgd_at: eps must be"),
    (("defend", "options", "caat", "iterations"), 0, r"defend\.options\.caat: iterations"),
    (("defend", "options", "label_smoothing", "smoothing"), 1.0,
     r"defend\.options\.label_smoothing: smoothing must be in \[0, 1\)"),
    (("defend", "options", "sam", "radius"), 0.1,
     r"defend\.options\.sam has unknown option\(s\) \['radius'\]; allowed: \['rho'\]"),
    (("defend", "options", "dropout"), {"p": 0.1}, r"defend\.options has unknown defence"),
])
def test_bad_defend_values_name_the_key(params, path, value, pattern):
    bad = copy.deepcopy(params)
    node = bad
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=pattern):
        check_params(bad)


def test_missing_defend_keys_are_named(params):
    bad = copy.deepcopy(params)
    del bad["defend"]["options"]["caat"]["alpha"]
    with pytest.raises(ConfigError, match=r"missing parameter defend\.options\.caat\.alpha"):
        check_params(bad)
    bad = copy.deepcopy(params)
    del bad["defend"]
    with pytest.raises(ConfigError, match="missing section 'defend'"):
        check_params(bad)
