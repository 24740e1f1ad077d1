"""Bad configuration fails fast, naming the full dotted key, what is wrong and what is allowed."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_repo import env

from calib.config import PROFILES, SCHEMA_FILE, ConfigError, check_params, main, schema_text
from calib.profiles import PARAMS_HEADER, PROFILE_HEADER, deep_merge, profile_text, render_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default():
    return render_profile("default", ROOT / "profiles")


@pytest.fixture
def params(default):
    return copy.deepcopy(default)


def _set(params: dict, path: tuple[str, ...], value) -> dict:
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return params


def _errors(params: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_params(params)
    return str(err.value).splitlines()


# --- unknown and misspelt keys ------------------------------------------------------------------

#: (where, the misspelt key's value, the message)
MISSPELT = [
    (("attack", "square_iteration"), 100,
     "attack.square_iteration: unknown key; did you mean 'square_iterations'? allowed in attack: "
     "settings, kinds, eps, eps_l2, square_iterations, square_p_init, pgd_iterations, "
     "pgd_alpha, precision, query_graph"),
    (("atack",), {"eps": 0.1},
     "atack: unknown key; did you mean 'attack'? allowed at the top level: profile, seed, "
     "device, data, models, train, attack, defend, sweep, analysis"),
    (("models", "resnet", "train", "epoch"), 9,
     "models.resnet.train.epoch: unknown key; did you mean 'epochs'? allowed in "
     "models.resnet.train: epochs, batch_size, optimizer, lr, weight_decay, warmup_epochs, "
     "augment_pad, augment_flip, imbalance_ratio"),
]


@pytest.mark.parametrize("path,value,message", MISSPELT, ids=[m[2].split(":")[0] for m in MISSPELT])
def test_misspelt_keys_are_refused_with_a_suggestion(params, path, value, message):
    assert _errors(_set(params, path, value)) == [message]


@pytest.mark.parametrize("path,value,message", MISSPELT, ids=[m[2].split(":")[0] for m in MISSPELT])
def test_cli_reports_misspelt_keys(params, tmp_path, capsys, path, value, message):
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(_set(params, path, value), sort_keys=False))
    assert main([str(file)]) == 2
    assert capsys.readouterr().err == f"invalid configuration in {file}:\n  {message}\n"


def test_a_key_far_from_any_allowed_one_gets_no_suggestion(params):
    params["defend"]["options"]["sam"]["radius"] = 0.1
    assert _errors(params) == ["defend.options.sam.radius: unknown key; allowed in "
                               "defend.options.sam: rho"]


def test_an_unknown_defence_in_the_options_is_refused(params):
    params["defend"]["options"]["dropout"] = {"p": 0.1}
    [line] = _errors(params)
    assert line.startswith("defend.options.dropout: unknown key; allowed in defend.options: "
                           "spline, aaa, mdts, label_smoothing, dca, sam, pgd_at, caat")


# --- types, ranges, choices, missing keys --------------------------------------------------------

@pytest.mark.parametrize("path,value,message", [
    # strict types: a string is not a number, an integer is not a bool, a bool not an integer
    (("attack", "eps"), "0.1", "attack.eps: must be a number in (0, 1], got '0.1'"),
    (("data", "download"), 1, "data.download: must be true or false, got 1"),
    (("seed",), True, "seed: must be an integer >= 0, got True"),
    (("defend", "mdts_val_size"), 1.5, "defend.mdts_val_size: must be an integer >= 1, got 1.5"),
    (("data", "mirror"), None, "data.mirror: must be a string, got None"),
    (("data", "checksums"), False, "data.checksums: must be a string, got False"),
    (("models", "resnet", "pretrained"), "yes",
     "models.resnet.pretrained: must be true or false, got 'yes'"),
    (("defend", "options", "aaa", "steps"), 2.5,
     "defend.options.aaa.steps: must be an integer >= 0, got 2.5"),
    (("defend", "finetune"), 3, "defend.finetune: must be a mapping, got 3"),
    # ranges
    (("attack", "eps"), 0, "attack.eps: 0 is out of range; must be in (0, 1]"),
    (("attack", "eps"), 2.0, "attack.eps: 2.0 is out of range; must be in (0, 1]"),
    (("attack", "square_iterations"), 0,
     "attack.square_iterations: 0 is out of range; must be >= 1"),
    (("attack", "square_p_init"), 0.0, "attack.square_p_init: 0.0 is out of range; must be in "
                                       "(0, 1]"),
    (("data", "val_fraction"), 1.5, "data.val_fraction: 1.5 is out of range; must be in (0, 1)"),
    (("data", "attack_size"), 0, "data.attack_size: 0 is out of range; must be >= 1"),
    (("seed",), -1, "seed: -1 is out of range; must be >= 0"),
    (("models", "resnet", "train", "epochs"), 0,
     "models.resnet.train.epochs: 0 is out of range; must be >= 1"),
    (("models", "resnet", "train", "lr"), -1.0,
     "models.resnet.train.lr: -1.0 is out of range; must be > 0"),
    (("models", "resnet_lt", "train", "imbalance_ratio"), 0.5,
     "models.resnet_lt.train.imbalance_ratio: 0.5 is out of range; must be >= 1"),
    (("defend", "square_iterations"), 0, "defend.square_iterations: 0 is out of range; "
                                          "must be >= 1"),
    (("defend", "finetune", "epochs"), 0, "defend.finetune.epochs: 0 is out of range; "
                                          "must be >= 1"),
    (("defend", "finetune", "subset"), -1, "defend.finetune.subset: -1 is out of range; "
                                           "must be >= 0"),
    (("defend", "finetune", "lr"), 0.0, "defend.finetune.lr: 0.0 is out of range; must be > 0"),
    (("analysis", "representations", "n_fit"), 0,
     "analysis.representations.n_fit: 0 is out of range; must be >= 10"),
    (("analysis", "saliency", "top_fraction"), 1.5,
     "analysis.saliency.top_fraction: 1.5 is out of range; must be in (0, 1]"),
    (("sweep", "pgd_alpha_fraction"), 0.0,
     "sweep.pgd_alpha_fraction: 0.0 is out of range; must be in (0, 2]"),
    (("attack", "eps"), float("inf"), "attack.eps: must be a finite number in (0, 1], got inf"),
    # choices
    (("data", "dataset"), "mnist", "data.dataset: 'mnist' is not allowed; choose one of "
                                   "['fashion_mnist', 'cifar10', 'cifar100', 'gtsrb', "
                                   "'caltech101', 'svhn']"),
    (("models", "vit", "train", "optimizer"), "adam",
     "models.vit.train.optimizer: 'adam' is not allowed; choose one of ['sgd', 'adamw']"),
    (("device",), "tpu", "device: 'tpu' is not allowed; choose 'auto', 'cpu' or 'cuda[:N]'"),
    (("profile",), "huge", "profile: 'huge' is not allowed; choose one of 'smoke', 'default' or "
                           "'paper'"),
    (("attack", "kinds"), "uca,xca",
     "attack.kinds: kinds must be one of ['uca', 'oca', 'mma', 'rca'], got 'xca'"),
    (("attack", "settings"), "square-l1", "attack.settings: settings must be one of "
                                          "['square-linf', 'square-l2', 'pgd-linf'], got "
                                          "'square-l1'"),
    (("attack", "settings"), "", "attack.settings: settings is empty; choose from "
                                 "['square-linf', 'square-l2', 'pgd-linf']"),
    (("defend", "settings"), "square-l1", "defend.settings: settings must be one of "
                                          "['square-linf', 'square-l2', 'pgd-linf'], got "
                                          "'square-l1'"),
    (("defend", "kinds"), "uca,uca", "defend.kinds: kinds lists a name more than once: "
                                     "['uca', 'uca']"),
    (("defend", "defences"), ["none", "dropout"],
     "defend.defences[1]: 'dropout' is not allowed; choose one of ['none', 'temperature', "
     "'spline', 'cs', 'aaa', 'mdts', 'finetune', 'label_smoothing', 'dca', 'sam', 'pgd_at', "
     "'caat', 'robustbench']"),
    (("defend", "defences"), [], "defend.defences: must not be empty"),
    (("defend", "defences"), ["cs", "cs"], "defend.defences: lists ['cs'] more than once"),
    (("analysis", "models"), [], "analysis.models: must not be empty"),
    (("defend", "finetune", "overrides"), {"temperature": {"epochs": 2}},
     "defend.finetune.overrides.temperature: 'temperature' is not allowed; choose one of "
     "['finetune', 'label_smoothing', 'dca', 'sam', 'pgd_at', 'caat']"),
])
def test_bad_values_name_the_key_and_what_is_allowed(params, path, value, message):
    assert _errors(_set(params, path, value)) == [message]


@pytest.mark.parametrize("path,pattern", [
    (("models", "vit", "arch"), r"models\.vit\.arch: unknown model arch 'densenet121'"),
    (("models", "resnet", "arch"), r"models\.resnet\.arch: unknown timm architecture"),
])
def test_architectures_are_checked_against_the_model_zoo(params, path, pattern):
    arch = "densenet121" if path[1] == "vit" else "resnet_does_not_exist"
    with pytest.raises(ConfigError, match=pattern):
        check_params(_set(params, path, arch))


@pytest.mark.parametrize("path,message", [
    (("data", "attack_size"), "data.attack_size: missing key. The first N test images are "
                              "attacked (paper: 500)."),
    (("models", "vit", "train"), "models.vit.train: missing key. Training hyper-parameters."),
    (("defend", "options", "caat", "alpha"),
     "defend.options.caat.alpha: missing key. PGD step size (released code: 2/255)."),
    (("defend",), "defend: missing key. The defence stage."),
    (("data", "mirror"), "data.mirror: missing key. Local folder holding <dataset>/ raw files "
                         "(e.g. a lab's copy), copied in before any download; \"\" = none."),
])
def test_missing_keys_are_named(params, path, message):
    node = params
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    assert _errors(params) == [message]


def test_several_errors_are_reported_together_one_line_each(params):
    params["attack"]["eps"] = "0.1"
    params["attack"]["square_iteration"] = 100
    params["data"]["download"] = 1
    params["data"]["dataset"] = "mnist"
    del params["models"]["vit"]["train"]["lr"]
    params["sweep"]["eps"] = [0.05, 1]
    lines = _errors(params)
    assert [line.split(":")[0] for line in lines] == [
        "data.dataset", "data.download", "models.vit.train.lr", "attack.eps",
        "attack.square_iteration", "sweep.eps[1]"]


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    file = tmp_path / "params.yaml"
    file.write_text("- just\n- a list\n")
    assert main([str(file)]) == 2
    assert "(top level): must be a mapping, got ['just', 'a list']" in capsys.readouterr().err
    file.write_text("attack: [unclosed\n")
    assert main([str(file)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main([str(tmp_path / "none.yaml")]) == 2
    assert "no parameters file at" in capsys.readouterr().err


def test_cli_accepts_the_committed_params(capsys):
    assert main([str(ROOT / "params.yaml")]) == 0
    assert capsys.readouterr().out == f"{ROOT / 'params.yaml'}: ok\n"


# --- data paths ---------------------------------------------------------------------------------

def test_mirror_and_checksums_point_at_existing_files(params, tmp_path):
    assert params["data"]["mirror"] == "" and params["data"]["checksums"] == ""
    (tmp_path / "mirror").mkdir()
    table = tmp_path / "md5.json"
    table.write_text('{"cifar-100-python/train": "' + "a" * 32 + '"}')
    params["data"].update(mirror=str(tmp_path / "mirror"), checksums=str(table))
    check_params(params)
    table.write_text('{"cifar-100-python/train": "xyz"}')
    [line] = _errors(params)
    assert line.startswith("data.checksums: ") and "32 hexadecimal digits" in line
    params["data"].update(mirror="/no/such/mirror", checksums="/no/such.json")
    mirror, checksums = _errors(params)
    assert mirror.startswith("data.mirror: '/no/such/mirror' is not a folder")
    assert checksums.startswith("data.checksums: ") and "not exist" in checksums


# --- rules across sections ----------------------------------------------------------------------

NAMES = "['resnet', 'vit', 'resnet_small', 'vit_small', 'resnet_lt']"


@pytest.mark.parametrize("path,value,message", [
    (("defend", "models"), ["resnet", "densenet"],
     f"defend.models[1]: 'densenet' is not a key of models; choose one of {NAMES}"),
    (("sweep", "models"), ["resnet", "densenet"],
     f"sweep.models[1]: 'densenet' is not a key of models; choose one of {NAMES}"),
    (("analysis", "models"), ["convnext"],
     f"analysis.models[0]: 'convnext' is not a key of models; choose one of {NAMES}"),
    (("analysis", "detection", "model"), "vgg",
     f"analysis.detection.model: 'vgg' is not a key of models; choose one of {NAMES}"),
    (("analysis", "compare", "models"), "resnet,resnet_xl",
     f"analysis.compare.models: models must be one of {NAMES}, got 'resnet_xl' (the keys of "
     f"models)"),
    (("analysis", "compare", "balanced"), "resnet_xl",
     f"analysis.compare.balanced: 'resnet_xl' is not a key of models; choose one of {NAMES}"),
    (("analysis", "compare", "long_tailed"), "resnet_xl",
     f"analysis.compare.long_tailed: 'resnet_xl' is not a key of models; choose one of {NAMES}"),
    (("analysis", "claims", "defence_model"), "vit",
     "analysis.claims.defence_model: 'vit' is not defended; choose one of defend.models "
     "['resnet']"),
    (("analysis", "compare", "setting"), "pgd-l2",
     "analysis.compare.setting: 'pgd-l2' is not allowed; choose one of ['square-linf', "
     "'square-l2', 'pgd-linf']"),
    (("defend", "n_images"), 201, "defend.n_images: 201 exceeds data.attack_size = 200 (images "
                                  "come from the attack split)"),
    (("sweep", "n_images"), 201, "sweep.n_images: 201 exceeds data.attack_size = 200 (images "
                                 "come from the attack split)"),
    (("analysis", "detection", "lid_k"), 5000,
     "analysis.detection.lid_k: 5000 must be below analysis.detection.n_fit = 5000"),
])
def test_cross_section_rules_name_the_key(params, path, value, message):
    assert _errors(_set(params, path, value)) == [message]


def test_a_frozen_query_graph_needs_fp32_queries(params):
    params["attack"]["precision"] = "bf16"
    params["attack"]["query_graph"] = "frozen"
    assert _errors(params) == [
        "attack.query_graph: a frozen query graph runs in fp32; attack.precision is 'bf16' (set "
        "attack.precision to fp32 or attack.query_graph to eager)"]
    params["attack"]["query_graph"] = "eager"
    check_params(params)  # bf16 with eager queries is allowed
    params["attack"]["query_graph"] = "compiled"
    assert "attack.query_graph" in _errors(params)[0]


def test_settings_analysed_must_be_attacked(params):
    params["attack"]["settings"] = "square-linf,pgd-linf"
    params["analysis"]["claims"]["setting"] = "square-l2"
    assert _errors(params) == [
        "analysis.claims.setting: 'square-l2' is not attacked; choose one of attack.settings "
        "['square-linf', 'pgd-linf']"]


@pytest.mark.parametrize("model,value,message", [
    ("resnet", "square-linf", "models.resnet.attack_settings: 'resnet' is read by the analyses "
     "(analysis.models, analysis.detection.model or analysis.claims.main_models), which need "
     "every setting of attack.settings; remove the key"),
    ("resnet_small", "pgd-linf", "models.resnet_small.attack_settings: must include "
     "'square-linf' (read by the analyses of 'resnet_small')"),
    ("vit_small", "square-linf,square-l1", "models.vit_small.attack_settings: attack_settings "
     "must be one of ['square-linf', 'square-l2', 'pgd-linf'], got 'square-l1'"),
])
def test_a_model_attacks_fewer_settings_only_where_nothing_reads_them(params, model, value,
                                                                      message):
    params["models"][model]["attack_settings"] = value
    assert _errors(params) == [message]


def test_restricted_settings_must_be_attacked(params):
    params["attack"]["settings"] = "square-linf,square-l2"
    params["models"]["resnet_lt"]["attack_settings"] = "square-linf,pgd-linf"
    assert _errors(params) == [
        "models.resnet_lt.attack_settings: 'pgd-linf' is not attacked; choose from "
        "attack.settings ['square-linf', 'square-l2']"]


def test_the_default_profile_attacks_the_extra_models_only_in_the_compared_setting(default):
    setting = default["analysis"]["compare"]["setting"]
    extra = {"resnet_small", "vit_small", "resnet_lt"}
    assert {m: default["models"][m].get("attack_settings") for m in extra} == dict.fromkeys(
        extra, setting)
    assert all("attack_settings" not in default["models"][m] for m in ("resnet", "vit"))


def test_model_lists_name_models(params):
    params["analysis"]["claims"]["main_models"] = "resnet,resnet"
    assert _errors(params) == [
        "analysis.claims.main_models: main_models lists a name more than once: "
        "['resnet', 'resnet'] (the keys of models)"]


# --- the sweep ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ([0.05, 1], "sweep.eps[1]: write 1 as a float, 1.0: sweep files are named after the float "
                "(calib.analysis.sweeps.format_eps)"),
    ([], "sweep.eps: must not be empty"),
    ([0.05, 0.05], "sweep.eps: lists [0.05] more than once"),
    ([1.5], "sweep.eps[0]: 1.5 is out of range; must be in (0, 1]"),
    ([0.0], "sweep.eps[0]: 0.0 is out of range; must be in (0, 1]"),
    (["0.05"], "sweep.eps[0]: must be a number in (0, 1], got '0.05'"),
    (0.05, "sweep.eps: must be a list, got 0.05"),
])
def test_sweep_eps_are_distinct_floats_in_the_unit_interval(params, value, message):
    assert _errors(_set(params, ("sweep", "eps"), value)) == [message]


def test_sweep_settings_are_linf_only(params):
    assert _errors(_set(params, ("sweep", "settings"), "square-l2")) == [
        "sweep.settings: settings must be one of ['square-linf', 'pgd-linf'], got 'square-l2'"]


# --- defences: the schema's options are the constructors' -----------------------------------------

@pytest.mark.parametrize("defence,option,value", [
    ("spline", "n_knots", 2), ("aaa", "tau", 0.0), ("aaa", "lr", 0.0), ("aaa", "steps", -1),
    ("aaa", "calib_weight", -0.1), ("mdts", "ridge", -0.1),
    ("label_smoothing", "smoothing", 1.0), ("dca", "beta", -0.1), ("sam", "rho", 0.0),
    ("pgd_at", "alpha", 0.0), ("pgd_at", "steps", -1),
    ("caat", "iterations", 0), ("caat", "alpha", 0.0),
])
def test_defence_option_ranges_match_the_constructors(params, defence, option, value):
    from calib.defences.evaluate import check_options

    options = params["defend"]["options"][defence]
    check_options(defence, options)  # the profile's options build
    with pytest.raises(ValueError, match=option):
        check_options(defence, {**options, option: value})
    [line] = _errors(_set(params, ("defend", "options", defence, option), value))
    assert line.startswith(f"defend.options.{defence}.{option}: {value!r} is out of range")


def test_every_defence_with_options_has_a_typed_model(params):
    from calib.config import DefenceOptions
    from calib.defences.evaluate import DEFENCES

    assert set(DefenceOptions.model_fields) <= set(DEFENCES)
    assert list(params["defend"]["options"]) == list(DefenceOptions.model_fields)


# --- profiles and the JSON Schema ---------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    params = render_profile(profile, ROOT / "profiles")
    assert params["profile"] == profile
    text = profile_text(profile, ROOT / "profiles")
    assert text.startswith(PARAMS_HEADER)
    assert yaml.safe_load(text) == params


def test_default_profile_is_params_yaml_but_for_the_schema_line():
    source = (ROOT / "profiles" / "default.yaml").read_text()
    assert source.startswith(PROFILE_HEADER)
    assert profile_text("default", ROOT / "profiles") == PARAMS_HEADER + source.removeprefix(
        PROFILE_HEADER)
    assert (ROOT / "params.yaml").read_text() == profile_text("default", ROOT / "profiles")
    assert (ROOT / SCHEMA_FILE).is_file()


def test_deep_merge_overlays_and_removes():
    base = {"a": {"x": 1, "y": 2}, "b": 3}
    assert deep_merge(base, {"a": {"y": 5}, "b": None}) == {"a": {"x": 1, "y": 5}}
    assert base == {"a": {"x": 1, "y": 2}, "b": 3}


def test_unknown_profile():
    with pytest.raises(ConfigError, match="smoke"):
        render_profile("huge", ROOT / "profiles")


def test_committed_schema_is_up_to_date():
    committed = (ROOT / SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == schema_text(), (
        f"{SCHEMA_FILE} is stale: regenerate it with `python -m calib.config --schema`")


def test_schema_describes_every_key():
    import json

    schema = json.loads(schema_text())
    for name, definition in [("Params", schema), *schema["$defs"].items()]:
        assert definition.get("additionalProperties") is False, name
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"
            assert "\n" not in prop["description"]
    assert schema["$defs"]["Data"]["properties"]["dataset"]["enum"][0] == "fashion_mnist"


def test_editors_json_schema_agrees_with_the_check(params):
    """What an editor checks against params.schema.json: the profiles pass, a typo does not."""
    import json

    import jsonschema  # nbformat's own dependency

    validator = jsonschema.Draft202012Validator(json.loads(schema_text()))
    for profile in PROFILES:
        assert not list(validator.iter_errors(yaml.safe_load(profile_text(profile))))
    for path, value, _ in MISSPELT:
        [error] = validator.iter_errors(_set(copy.deepcopy(params), path, value))
        assert repr(path[-1]) in error.message


def test_importing_the_schema_does_not_import_torch():
    """The pipeline imports calib.config before deciding whether to validate at all."""
    code = "import sys, calib.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- DVC experiments ----------------------------------------------------------------------------

def test_dvc_exp_run_refuses_an_unknown_key(tmp_path):
    """``dvc exp run -S`` cannot smuggle a misspelt key into params.yaml.

    DVC itself refuses to set a key that is not in params.yaml; one added on purpose with
    ``-S +key=value`` reaches the stage, whose check refuses it.
    """
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    assert dvc, "dvc is not installed beside this interpreter"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    stage = {"stages": {"check": {"cmd": f"{sys.executable} -m calib.config params.yaml",
                                  "params": ["attack"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stage))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    extra = {"DVC_NO_ANALYTICS": "1"}

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=tmp_path, env=env(extra), capture_output=True,
                              text=True, timeout=300)

    for args in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                 [*git, "commit", "-qm", "params"]):
        assert call(*args).returncode == 0, args
    refused = call(dvc, "exp", "run", "-S", "attack.square_iteration=100")
    assert refused.returncode != 0
    assert "attack.square_iteration" in refused.stdout + refused.stderr
    forced = call(dvc, "exp", "run", "-S", "+attack.square_iteration=100")
    out = forced.stdout + forced.stderr
    assert forced.returncode != 0, out
    assert "attack.square_iteration: unknown key; did you mean 'square_iterations'?" in out
