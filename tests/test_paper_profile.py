"""End to end: the paper profile's whole path on tiny fake data, on a CPU, without a network.

The paper profile (CIFAR-100, Caltech-101 or GTSRB; timm's ResNet-50 and ViT-B/16 plus
ResNet-18, ViT-S/16 and a long-tailed ResNet-50, all at 224 px) is rendered as it is, and
only its scale is shrunk for a CPU (one dict, :data:`CPU_SCALE`): no pretrained weights
(``pretrained: false``, so nothing is downloaded), a handful of images, one epoch, one or two
attack iterations. Everything else runs as the paper profile has it: the loaders read fake raw
files written in each dataset's native format (CIFAR pickles, GTSRB PPM folders and CSV,
Caltech-101 JPEG folders), copied in by the data stage from a mirror folder (``data.mirror``)
and checked against the fake files' MD5s (``data.checksums``); images are resized to 224x224x3;
the architectures are built through timm with the paper's names; and ``dvc repro`` runs every
stage for CIFAR-100 and the data, training and attack stages of ResNet-50, ViT-B/16 and the
long-tailed ResNet-50 for Caltech-101 and GTSRB. Only the downloads themselves (data and
pretrained weights) are left untested.

The CIFAR-100 pipeline and the two others run side by side (one torch thread each), so the
file takes about as long as the CIFAR-100 pipeline alone.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from fake_data import write_caltech101, write_checksums_json, write_cifar100, write_gtsrb
from pipeline_repo import ROOT, env, make_repo, run, stage_seconds, write_params

from calib import data
from calib.io import read_metrics
from calib.profiles import deep_merge, render_profile

# The paper profile's 26 stages at CPU scale take about 13 minutes on 2 cores: `make test-all`.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

MODELS = ("resnet", "vit", "resnet_small", "vit_small", "resnet_lt")

# The only departures from profiles/paper.yaml: scale, for a 2-core CPU without a network.
# Architectures, img_size 224, datasets, normalisation and the set of stages stay as they are.
CPU_SCALE: dict = {
    "device": "cpu",
    "data": {"attack_size": 2, "subset_train": 4},
    "models": {name: {"pretrained": False,                    # no weight downloads
                      "train": {"epochs": 1, "batch_size": 4}}
               for name in MODELS},
    "attack": {"square_iterations": 2, "pgd_iterations": 1},
    "defend": {"models": ["resnet"],
               "defences": ["none", "cs", "caat"],             # reference, post-hoc, training
               "n_images": 2, "square_iterations": 1, "pgd_iterations": 1,
               "mdts_val_size": 2,
               "finetune": {"epochs": 1, "subset": 2, "batch_size": 2},
               "options": {"aaa": {"steps": 2}, "pgd_at": {"steps": 1},
                           "caat": {"iterations": 1}}},
    "sweep": {"eps": [0.05], "n_images": 1, "square_iterations": 1, "budgets": [1, 2],
              "pgd_iterations": 1},
    "train": {"seeds": 2},
    "analysis": {"representations": {"n_fit": 10, "n_arrows": 2},
                 "saliency": {"n_examples": 1},
                 "detection": {"n_fit": 10, "lid_k": 2},
                 "claims": {"bound_images": 2, "bound_iterations": 1}},
}

#: Per dataset: the models whose train and attack stages run (CIFAR-100: the whole pipeline).
TARGETS: dict[str, tuple[str, ...]] = {
    "cifar100": (),
    "caltech101": ("resnet", "vit", "resnet_lt"),
    "gtsrb": ("resnet", "vit", "resnet_lt"),
}
NUM_CLASSES = {"cifar100": 100, "caltech101": 101, "gtsrb": 43}

#: Fake CIFAR-100: a few classes spread over 0..99 with 6 training images each (the 10%
#: validation split then holds one per class) and 4 test images.
CIFAR_CLASSES = (0, 1, 50, 99)
CIFAR_TRAIN = [c for c in CIFAR_CLASSES for _ in range(6)]
CIFAR_TEST = [99, 0, 50, 1]


def write_fake_mirror(mirror: Path) -> dict[str, Path]:
    """Fake raw files of the three datasets under ``mirror/<name>/``; their MD5 tables."""
    fakes = {
        "cifar100": write_cifar100(mirror, train_labels=CIFAR_TRAIN, test_labels=CIFAR_TEST),
        "caltech101": write_caltech101(mirror, classes=("Faces", "accordion", "yin_yang"),
                                       per_class=10),
        "gtsrb": write_gtsrb(mirror, train={0: [(31, 30)] * 6, 14: [(45, 40)] * 6,
                                            42: [(28, 33)] * 6},
                             test_labels=[14, 0, 42]),
    }
    return {name: write_checksums_json(mirror.parent / "checksums" / f"{name}.json",
                                       fake["checksums"]) for name, fake in fakes.items()}


def paper_params(dataset: str, mirror: Path, checksums: Path) -> dict:
    """The paper profile at CPU scale, reading ``dataset`` from the fake mirror."""
    params = deep_merge(render_profile("paper", ROOT / "profiles"), CPU_SCALE)
    params["data"].update(dataset=dataset, mirror=str(mirror), checksums=str(checksums))
    return params


def _repro_command(dataset: str) -> list[str]:
    targets = [f"{stage}@{model}" for model in TARGETS[dataset] for stage in ("train", "attack")]
    return ["dvc", "repro", *targets]


@pytest.fixture(scope="module")
def paper_repos(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("paper")
    mirror = base / "mirror"
    tables = write_fake_mirror(mirror)
    repos = {}
    for dataset in TARGETS:
        repo = make_repo(base / dataset)
        write_params(repo, paper_params(dataset, mirror, tables[dataset]))
        repos[dataset] = repo
    # One torch thread per lane, and no network: any download attempt (dataset files through
    # torchvision, pretrained weights through the Hugging Face hub) fails instead of fetching.
    stage_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                 "DVC_NO_ANALYTICS": "1", "NO_PROXY": "", "no_proxy": "",
                 **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY",
                                                      "http_proxy", "https_proxy")}}
    start = time.monotonic()
    # CIFAR-100's whole pipeline in the background, the other two datasets meanwhile.
    cifar = subprocess.Popen(_repro_command("cifar100"), cwd=repos["cifar100"],
                             env=env(stage_env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    wall: dict[str, float] = {}
    try:
        for dataset in ("caltech101", "gtsrb"):
            run(_repro_command(dataset), repos[dataset], timeout=1800, extra_env=stage_env)
            wall[dataset] = round(time.monotonic() - start, 1)
        out, _ = cifar.communicate(timeout=1800)
        wall["cifar100"] = round(time.monotonic() - start, 1)
    finally:
        if cifar.poll() is None:
            cifar.kill()
            cifar.wait()
    assert cifar.returncode == 0, f"dvc repro (cifar100) failed:\n{out[-6000:]}"
    # Papermill's time per executed notebook, and when each lane finished (for the README).
    timings = {"finished_after_s": wall,
               **{name: stage_seconds(repo) for name, repo in repos.items()}}
    (base / "stage_seconds.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings, indent=2))
    return repos


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _attacked_models(dataset: str) -> tuple[str, ...]:
    return MODELS if dataset == "cifar100" else TARGETS[dataset]


@pytest.mark.parametrize("dataset", sorted(TARGETS))
def test_data_stage_reads_the_native_files_from_the_mirror(paper_repos, dataset):
    repo = paper_repos[dataset]
    info = _json(repo / "data/prepared/dataset.json")
    assert info["dataset"] == dataset and info["num_classes"] == NUM_CLASSES[dataset]
    assert info["in_chans"] == 3
    assert (tuple(info["mean"]), tuple(info["std"])) == data.get_info(dataset).stats()
    assert len(info["class_names"]) == NUM_CLASSES[dataset]
    assert info["splits"]["val"] >= 1 and info["splits"]["attack"] == 2
    raw = repo / "data/raw" / dataset
    for rel in data.get_info(dataset).raw_files:
        assert (raw / rel).exists(), rel
    for fig in ("examples.png", "class_balance.png"):
        assert (repo / "figures/data" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dataset", sorted(TARGETS))
def test_models_are_the_paper_architectures_at_224_px(paper_repos, dataset):
    from calib.io import load_tensors

    repo = paper_repos[dataset]
    paper = render_profile("paper", ROOT / "profiles")["models"]
    splits = data.load_splits(repo / "data/prepared/splits.safetensors")
    for model in _attacked_models(dataset):
        spec = _json(repo / f"models/{model}/model.json")
        assert spec["arch"] == paper[model]["arch"]
        assert spec["img_size"] == 224 and spec["in_chans"] == 3
        assert spec["num_classes"] == NUM_CLASSES[dataset]
        assert (tuple(spec["mean"]), tuple(spec["std"])) == data.get_info(dataset).stats()
        logits = load_tensors(repo / f"models/{model}/logits.safetensors")
        assert logits["test_logits"].shape == (splits["test"].numel(), NUM_CLASSES[dataset])
        assert logits["val_logits"].shape == (splits["val"].numel(), NUM_CLASSES[dataset])
        clean = read_metrics(repo / f"results/{model}/clean_metrics.json")
        assert clean["n"] == int(splits["test"].numel())
        assert len(clean["train_class_counts"]) == NUM_CLASSES[dataset]
        assert clean["environment"]["device"] == "cpu"


@pytest.mark.parametrize("dataset", sorted(TARGETS))
def test_attacks_keep_labels_on_224_px_inputs(paper_repos, dataset):
    from calib.io import load_tensors

    repo = paper_repos[dataset]
    eps = render_profile("paper", ROOT / "profiles")["attack"]["eps"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for model in _attacked_models(dataset):
        metrics = read_metrics(repo / f"results/{model}/attack_metrics.json")
        # A model the comparison alone reads runs only its own attack_settings.
        settings = (params["models"][model].get("attack_settings")
                    or params["attack"]["settings"]).split(",")
        kinds = params["attack"]["kinds"].split(",")
        assert metrics["n"] == 2 and len(metrics["attacks"]) == len(settings) * len(kinds)
        for name, s in metrics["attacks"].items():
            assert s["label_preserved"] == 1.0, (model, name)
            assert s["accuracy_after"] == s["accuracy_before"], (model, name)
            if s["norm"] == "linf":
                assert s["linf_max"] <= eps + 1e-6, (model, name)
        adversarial = load_tensors(repo / f"results/{model}/records/adversarial.safetensors")
        assert all(x.shape == (2, 3, 224, 224) for x in adversarial.values())
        assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for x in adversarial.values())


@pytest.mark.parametrize("dataset", sorted(TARGETS))
def test_long_tailed_model_trains_on_a_long_tailed_subset(paper_repos, dataset):
    results = paper_repos[dataset] / "results"
    counts = torch.tensor(
        read_metrics(results / "resnet_lt/clean_metrics.json")["train_class_counts"])
    balanced = torch.tensor(
        read_metrics(results / "resnet/clean_metrics.json")["train_class_counts"])
    assert counts.numel() == NUM_CLASSES[dataset] and int(counts.sum()) >= 1
    assert bool((counts <= balanced).all())
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(balanced)
                                                                .flatten().tolist())


def test_every_cifar100_stage_ran_and_the_pipeline_is_up_to_date(paper_repos):
    import pandas as pd
    import yaml

    repo = paper_repos["cifar100"]
    out = run(["dvc", "status"], repo).stdout
    assert "up to date" in out, out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    defend = params["defend"]
    for model in defend["models"]:
        table = pd.read_csv(repo / f"results/{model}/table4.csv")
        assert len(table) == len(defend["defences"]) * 2 * 4
        assert (table["acc_before"] == table["acc_after"]).all()
    for model in params["sweep"]["models"]:
        tidy = pd.read_csv(repo / f"results/{model}/fig2_eps.csv")
        assert (tidy["label_preserved"] == 1).all()
    table2 = pd.read_csv(repo / f"results/{params['analysis']['detection']['model']}/table2.csv")
    assert set(table2["detector"]) == {"mahalanobis", "lid", "spectral"}
    for model in params["analysis"]["models"]:
        for name in ("representations.csv", "saliency.csv"):
            assert len(pd.read_csv(repo / f"results/{model}/{name}")) > 0, (model, name)
    models = pd.read_csv(repo / "results/comparison/models.csv")
    assert set(models["model"]) == set(MODELS)
    claims = pd.read_csv(repo / "results/claims/claims.csv")
    assert len(claims) == 6
    bounds = pd.read_csv(repo / "results/claims/mma_bound.csv")
    assert (bounds["ece_after"] <= bounds["bound"] + 1e-9).all()
    every_stage = set(run(["dvc", "stage", "list", "--name-only"], repo).stdout.split())
    locked = set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])
    assert locked == every_stage, sorted(every_stage ^ locked)
