"""Where an attack stage spends its time: each (setting, kind) run of the grid, timed on its own.

The attack stage (``notebooks/20_attack.ipynb``) runs ``calib.attacks.grid.run_grid`` over
every setting and kind of ``params.yaml``'s ``attack`` section on the attack split. This script
runs the same grid one (setting, kind) at a time, with the same seed, images and budget, through
a wrapper that times the model's forward, and prints per run: its wall time and share of the
whole grid, the seconds inside the model's forward and the share outside it (for white-box PGD
the backward pass counts as outside), the images forwarded and their mean batch per call, and
the attack's success rate. It answers which runs a faster forward or a smaller budget would
shorten, and whether anything but the model is worth optimising.

    # a trained pipeline model (after `dvc repro -s train@vit`), the params file's attack grid
    PYTHONPATH=. .venv/bin/python benchmarks/bench_attack_stage.py --model vit
    # random weights and random images, any calib/timm architecture (no pipeline needed)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_attack_stage.py --arch resnet18 --images 64 \\
        --square-iterations 50 --pgd-iterations 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from gpu_check import TimedModel  # noqa: E402  (benchmarks/gpu_check.py)
from precision_check import grid_from_params, load_attack_split  # noqa: E402


def load_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor,
                                                    str]:
    """The model, images (N, C, H, W) in [0, 1] and labels (N,) to attack, and a description."""
    from calib import models, paths

    torch.manual_seed(args.seed)
    if args.model:
        folder = ROOT / paths.model_dir(args.model)
        if not (folder / "model.json").is_file():
            raise SystemExit(f"error: no trained model in {folder} (run `dvc repro -s "
                             f"train@{args.model}` first, or pass --arch for random weights)")
        model, images, labels = load_attack_split(args.model, args.images or None,
                                                  Path(args.data_root))
        return model.eval(), images, labels, f"trained model {folder}"
    model = models.create_model(args.arch, num_classes=10, in_chans=1, img_size=28,
                                mean=[0.2860], std=[0.3530]).eval()
    gen = torch.Generator().manual_seed(args.seed)
    n = args.images or 64
    images = torch.rand(n, 1, 28, 28, generator=gen)
    labels = model(images).argmax(1).detach()  # the model's own labels: every image "correct"
    return model, images, labels, f"{args.arch} with random weights, random images"


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` or ``--arch`` (what :func:`load_inputs` loads), ``--params``, ``--data-root``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a trained pipeline model under models/ (e.g. vit)")
    source.add_argument("--arch", help="an architecture with random weights (e.g. resnet18)")
    parser.add_argument("--params", default="params.yaml", help="whose attack section to run")
    parser.add_argument("--data-root", default="data/raw")


def run(args: argparse.Namespace) -> list[dict[str, float | int | str]]:
    """Time every (setting, kind) run of the grid; one row per run, in the grid's order."""
    from calib.attacks.grid import run_grid
    from calib.config import load_params

    attack = load_params(args.params)["attack"]
    for key in ("square_iterations", "pgd_iterations", "settings", "kinds"):
        if getattr(args, key) is not None:
            attack[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    model, images, labels, what = load_inputs(args)
    timed = TimedModel(model, sync=False)
    full = replace(grid_from_params(attack), precision=attack["precision"])
    print(f"{what}: {images.shape[0]} images, {args.threads} threads, Square "
          f"{full.square_iterations} queries, PGD {full.pgd_iterations} steps, "
          f"precision {full.precision}", flush=True)
    rows: list[dict[str, float | int | str]] = []
    for setting in full.settings:
        for kind in full.kinds:
            timed.reset()
            start = time.perf_counter()
            grid_run = run_grid(timed, images, labels, replace(full, settings=setting, kinds=kind),
                           seed=args.seed)
            seconds = time.perf_counter() - start
            rows.append({
                "setting": setting, "kind": kind, "seconds": seconds,
                "forward_seconds": timed.seconds,
                "outside_share": 1.0 - timed.seconds / seconds,
                "images_forwarded": timed.images,
                "images_per_call": timed.images / max(timed.calls, 1),
                "success_rate": float(grid_run.results[setting, kind].success.float().mean()),
            })
            print(f"  {setting} {kind}: {seconds:.1f} s", flush=True)
    total = sum(float(r["seconds"]) for r in rows)
    for r in rows:
        r["share_of_grid"] = float(r["seconds"]) / total
    return rows


def table(rows: list[dict[str, float | int | str]]) -> str:
    """The rows as a Markdown table, with the grid's total last."""
    lines = ["| setting | kind | seconds | share of grid | in forward s | outside forward "
             "| images forwarded | images / call | success |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {str(r['kind']).upper()} | {float(r['seconds']):.1f} "
                     f"| {float(r['share_of_grid']):.1%} | {float(r['forward_seconds']):.1f} "
                     f"| {float(r['outside_share']):.1%} | {int(r['images_forwarded']):,} "
                     f"| {float(r['images_per_call']):.0f} | {float(r['success_rate']):.1%} |")
    total = sum(float(r["seconds"]) for r in rows)
    inside = sum(float(r["forward_seconds"]) for r in rows)
    lines.append(f"| all | | {total:.1f} | 100% | {inside:.1f} | {1 - inside / total:.1%} "
                 f"| {sum(int(r['images_forwarded']) for r in rows):,} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, float | int | str]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--images", type=int, default=0,
                        help="attack the first N images (0: the whole attack split; 64 with "
                             "--arch)")
    parser.add_argument("--settings", help="override attack.settings (e.g. square-l2)")
    parser.add_argument("--kinds", help="override attack.kinds (e.g. uca,mma)")
    parser.add_argument("--square-iterations", type=int)
    parser.add_argument("--pgd-iterations", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"--images must be >= 0, got {args.images}")
    rows = run(args)
    print()
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
