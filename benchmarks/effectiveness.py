"""Effectiveness of the calibration attacks on the trained pipeline models (issue targets).

Prints, per model (``models/<name>`` from the training stage):

* the samples an ordinary (misclassification) L-inf PGD attack at the same eps can flip, and
  the white-box UCA success rate on them (target >= 90%): these are the samples whose decision
  boundary is within reach, so an underconfidence attack must be able to get close to it;
* the average confidence after white-box OCA (target >= 0.97);
* the black-box L-inf UCA success rate of ``calib.attacks`` against the plain per-sample port of
  the paper's loop (``paper_loop_baseline.py``) at the same eps and query budget, both at the
  pipeline's ``p_init`` and, for the baseline, at the paper's ``p_init = 0.05``; averaged over
  ``--seeds``.

Usage::

    python benchmarks/effectiveness.py --models resnet vit --eps 0.1 --budget 500 \
        --p-init 0.3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from paper_loop_baseline import calibration_attack_linf  # noqa: E402

from calib import data, models, paths  # noqa: E402
from calib.attacks import run_attack  # noqa: E402
from calib.attacks.pgd import pgd_linf  # noqa: E402
from calib.io import read_json  # noqa: E402
from calib.runtime import predict_logits  # noqa: E402

#: The paper's (and Square Attack's ImageNet) initial window fraction.
PAPER_P_INIT = 0.05


def margin_of(model: torch.nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        p = model(x).softmax(-1)
    top = p.topk(2, dim=-1).values
    assert bool((p.argmax(-1) == k).all()), "label changed"
    return top[:, 0] - top[:, 1]


def evaluate(name: str, *, eps: float, budget: int, pgd_steps: int, alpha: float, n: int,
             seeds: list[int], p_init: float) -> dict[str, float]:
    meta = read_json(ROOT / paths.DATASET_FILE)
    spec = read_json(ROOT / paths.model_dir(name) / "model.json")
    splits = data.load_splits(ROOT / paths.SPLITS_FILE)
    test = data.load_split(meta["dataset"], ROOT / "data/raw", "test", img_size=spec["img_size"],
                           in_chans=spec["in_chans"])
    images, labels = test.tensors(splits["attack"][:n])
    model = models.load_trained(ROOT / paths.model_dir(name))
    k = predict_logits(model, images, batch_size=256).argmax(-1)

    gen = torch.Generator().manual_seed(seeds[0])
    x_pgd = pgd_linf(model, images, k, eps=eps, alpha=eps / 4, steps=50, random_start=True,
                     generator=gen)
    flippable = predict_logits(model, x_pgd, batch_size=256).argmax(-1) != k

    t0 = time.perf_counter()
    uca_wb = run_attack(model, images, kind="uca", method="pgd", eps=eps, iterations=pgd_steps,
                        alpha=alpha, labels=labels, seed=seeds[0])
    oca_wb = run_attack(model, images, kind="oca", method="pgd", eps=eps, iterations=pgd_steps,
                        alpha=alpha, labels=labels, seed=seeds[0])
    t_wb = time.perf_counter() - t0
    out = {
        "n": float(len(k)),
        "pgd_flippable": float(flippable.double().mean()),
        "uca_whitebox_success_on_flippable": float(uca_wb.success[flippable].double().mean()),
        "uca_whitebox_success_all": float(uca_wb.success.double().mean()),
        "oca_whitebox_confidence_after": float(oca_wb.final_confidence.double().mean()),
        "oca_whitebox_confidence_before": float(oca_wb.clean_confidence.double().mean()),
        "seconds_whitebox": t_wb,
    }

    # Black-box UCA: ours and the paper's loop on the same images, eps and budget, per seed.
    runs: dict[str, list[float]] = {}
    baseline_p = {f"paper_loop_p{p_init:g}": p_init, f"paper_loop_p{PAPER_P_INIT:g}": PAPER_P_INIT}
    for seed in seeds:
        t0 = time.perf_counter()
        uca_bb = run_attack(model, images, kind="uca", method="square", eps=eps,
                            iterations=budget, labels=labels, seed=seed, p_init=p_init)
        runs.setdefault(f"seconds_calib_p{p_init:g}", []).append(time.perf_counter() - t0)
        runs.setdefault(f"uca_square_success_calib_p{p_init:g}", []).append(
            float(uca_bb.success.double().mean()))
        for label, p in baseline_p.items():
            t0 = time.perf_counter()
            x_base, _ = calibration_attack_linf(model, images.numpy(), eps, budget + 1, seed=seed,
                                                p_init=p)
            runs.setdefault(f"seconds_{label}", []).append(time.perf_counter() - t0)
            base_margin = margin_of(model, torch.as_tensor(x_base, dtype=images.dtype), k)
            runs.setdefault(f"uca_square_success_{label}", []).append(
                float((base_margin <= 0.1).double().mean()))
    for key, values in runs.items():
        out[key] = sum(values) / len(values)
        if key.startswith("uca_square") and len(values) > 1:
            print(f"  [{name}] {key} per seed: " + ", ".join(f"{v:.3f}" for v in values))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--budget", type=int, default=500, help="square queries per image")
    parser.add_argument("--pgd-steps", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.04)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--p-init", type=float, default=0.3,
                        help="initial Square window fraction (attack.square_p_init)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        res = evaluate(name, eps=args.eps, budget=args.budget, pgd_steps=args.pgd_steps,
                       alpha=args.alpha, n=args.n, seeds=args.seeds,
                       p_init=args.p_init)
        print(f"== {name} (eps {args.eps}, square budget {args.budget}, p_init {args.p_init}, "
              f"seeds {args.seeds}, PGD {args.pgd_steps} steps, alpha {args.alpha}) ==")
        for key, value in res.items():
            print(f"  {key:36s} {value:.4f}")


if __name__ == "__main__":
    main()
