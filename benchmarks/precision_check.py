"""May the pipeline query its models in bf16 (or TF32)? The check behind ``attack.precision``.

For each trained pipeline model (``models/<name>`` from ``dvc repro train``) it runs the
profile's attack grid (``params.yaml``'s ``attack`` section: settings, kinds, eps, budgets,
the attack split) twice on the same images and seed, once with fp32 queries and once with the
reduced precision, and prints :func:`calib.analysis.precision.compare_precisions`'s verdict:
clean predictions must agree 100% and every Table 1 number (success, accuracy, confidence,
ECE, KS after) must stay inside the fp32 run's 95% bootstrap interval. Both runs' reported
numbers are re-read in fp32, so the check measures what the reduced queries do to the attack.

``--query-graph frozen`` checks fp32 queries on a frozen TorchScript graph of the model
(:mod:`calib.query_graph`) against the eager model instead: the black-box settings query the
graph, white-box PGD (which needs gradients) runs on the model in both runs.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/precision_check.py --models resnet vit \
        [--precision bf16] [--n 500] [--out precision_check.json]
    PYTHONPATH=. .venv/bin/python benchmarks/precision_check.py --models resnet \
        --query-graph frozen

A model runs the settings its attack stage runs (``models.<name>.attack_settings`` where set).
``--settings``, ``--kinds``, ``--eps`` and ``--square-iterations`` replace the grid's own, to
check the other grids that query a model (an eps sweep point, a Fig. 2 budget, the seed copies'
headline attack); a name may be a folder under ``models/`` (``resnet_seeds/seed_1``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib import data, models, paths  # noqa: E402
from calib.analysis.precision import PrecisionCheck, compare_precisions  # noqa: E402
from calib.attacks.grid import AttackGrid  # noqa: E402
from calib.io import read_json  # noqa: E402


def grid_from_params(attack: dict) -> AttackGrid:
    """The attack stage's grid from ``params.yaml``'s ``attack`` section."""
    return AttackGrid(settings=attack["settings"], kinds=attack["kinds"], eps_linf=attack["eps"],
                      eps_l2=attack["eps_l2"], square_iterations=attack["square_iterations"],
                      square_p_init=attack["square_p_init"],
                      pgd_iterations=attack["pgd_iterations"], pgd_alpha=attack["pgd_alpha"])


def load_attack_split(name: str, n: int | None = None, data_root: Path = ROOT / "data/raw"
                      ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Trained pipeline model ``name`` and the first ``n`` attack-split images (N, C, H, W)
    in [0, 1] with their labels (N,); all of the split when ``n`` is None."""
    meta = read_json(ROOT / paths.DATASET_FILE)
    spec = read_json(ROOT / paths.model_dir(name) / "model.json")
    splits = data.load_splits(ROOT / paths.SPLITS_FILE)
    index = splits["attack"] if n is None else splits["attack"][:n]
    test = data.load_split(meta["dataset"], data_root, "test", img_size=spec["img_size"],
                           in_chans=spec["in_chans"])
    images, labels = test.tensors(index)
    return models.load_trained(ROOT / paths.model_dir(name)), images, labels


def grid_for_model(name: str, params: dict, **overrides: object) -> AttackGrid:
    """The grid the attack stage runs on model ``name`` (its ``attack_settings`` where set),
    with ``overrides`` (AttackGrid fields; None values ignored) applied."""
    grid = grid_from_params(params["attack"])
    own = params["models"].get(name, {}).get("attack_settings")
    changes = {"settings": own} if own else {}
    changes.update({key: value for key, value in overrides.items() if value is not None})
    return replace(grid, **changes)


def check_model(name: str, grid: AttackGrid, *, precision: str, n: int | None, seed: int,
                query_graph: str = "eager", device: str = "cpu") -> dict:
    model, images, labels = load_attack_split(name, n)
    model, images = model.to(device), images.to(device)
    check = compare_precisions(model, images, labels, grid, precision=precision, seed=seed,
                               query_graph=query_graph, show_progress=True)
    print(f"\n{name}: {', '.join(grid.settings)} x {', '.join(grid.kinds)}, eps "
          f"{grid.eps_linf} (L-inf) / {grid.eps_l2} (L2), {grid.square_iterations} Square "
          f"queries, {grid.pgd_iterations} PGD steps")
    return {**report(name, len(labels), check.candidate, check), "grid": grid.config()}


def report(name: str, n: int, precision: str, check: PrecisionCheck) -> dict:
    """Print ``check``'s table and verdict; the JSON-ready record of it."""
    table = check.table()
    with_width = table.assign(width=table.fp32_hi - table.fp32_lo)
    print(f"\n== {name}: {n} images, {precision} ==")
    print(with_width.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"seconds: {check.seconds}")
    print(check.verdict())
    return {"model": name, "n": n, "precision": precision,
            "used": check.precision.used, "reason": check.precision.reason,
            "agreement": check.agreement, "passed": check.passed,
            "seconds": check.seconds, "verdict": check.verdict(),
            "largest_move_in_interval_widths": float(
                (table.difference.abs() / (table.fp32_hi - table.fp32_lo).clip(lower=1e-12))
                .max()),
            "rows": check.rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"])
    parser.add_argument("--precision", default=None, choices=["bf16", "tf32", "fp32"],
                        help="the candidate's precision (default: bf16; fp32 with "
                             "--query-graph frozen, the only precision it runs in)")
    parser.add_argument("--query-graph", default="eager", choices=["eager", "frozen"])
    parser.add_argument("--n", type=int, default=None,
                        help="first N images of the attack split (default: all of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default=None, help="replace the grid's settings")
    parser.add_argument("--kinds", default=None, help="replace the grid's kinds")
    parser.add_argument("--eps", type=float, default=None, help="replace the L-inf radius")
    parser.add_argument("--square-iterations", type=int, default=None,
                        help="replace Square's query budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (e.g. to check tf32 on an Ampere-or-newer GPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    precision = args.precision or ("fp32" if args.query_graph == "frozen" else "bf16")
    if precision == "fp32" and args.query_graph == "eager":
        parser.error("fp32 with an eager graph is the reference itself; check bf16, tf32 or "
                     "--query-graph frozen")
    overrides = {"settings": args.settings, "kinds": args.kinds, "eps_linf": args.eps,
                 "square_iterations": args.square_iterations}
    results = [check_model(name, grid_for_model(name, params, **overrides), precision=precision,
                           n=args.n, seed=args.seed,
                           query_graph=args.query_graph, device=args.device)
               for name in args.models]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
