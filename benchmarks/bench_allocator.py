"""The memory allocator's effect on the pipeline's CPU work: system malloc against tcmalloc.

Each workload runs in a fresh subprocess per allocator (LD_PRELOAD is read when a process
starts), interleaved over ``--repeat`` rounds; the fastest run of each is kept. Workloads, on
the default profile's models (28x28x1, 10 classes, random weights, seed 0):

* ``train_<model>``: SGD training steps, batch 128 (images/s);
* ``square_<model>``: a Square L-inf UCA through ``calib.attacks.run_attack`` on 500 images,
  eps 0.1, a success threshold nobody reaches (``uca_margin=0``: every image is queried in
  every iteration), ``--iterations`` iterations (seconds);
* ``pgd_<model>``: a white-box PGD L-inf UCA through ``run_attack`` on 500 images, eps 0.1,
  ``--iterations`` steps, the same unreachable threshold (seconds).

Each subprocess also prints a checksum of its result (the attack's adversarial images, the
trained weights): the allocator must not change a single bit, and the script exits 1 if it does.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_allocator.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_allocator.py --workloads square_vit --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calib.allocator import Allocator, choose_allocator, kernel_environment  # noqa: E402

MODELS = {"resnet": "resnet18", "vit": "vit_fmnist_d6"}
WORKLOADS = [f"{kind}_{model}" for kind in ("train", "square", "pgd")
             for model in MODELS]


def run_workload(name: str, iterations: int, threads: int) -> dict[str, float | str]:
    """Run one workload in this process; returns its timing and a checksum of its result."""
    import hashlib

    import torch

    from calib.attacks import run_attack
    from calib.models import create_model
    from calib.train import cross_entropy_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kind, model_key = name.rsplit("_", 1)
    model = create_model(MODELS[model_key], num_classes=10, in_chans=1, img_size=28,
                         mean=[0.2860], std=[0.3530])
    gen = torch.Generator().manual_seed(0)
    if kind == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.rand(128, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        for _ in range(2):  # warm-up
            cross_entropy_step(model, x, y, opt)
        start = time.perf_counter()
        for _ in range(iterations):
            cross_entropy_step(model, x, y, opt)
        seconds = time.perf_counter() - start
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                         for p in model.parameters())).hexdigest()
        return {"seconds": seconds, "rate": iterations * 128 / seconds, "unit": "img/s",
                "checksum": digest[:16]}
    model.eval()
    x = torch.rand(500, 1, 28, 28, generator=gen)
    run_attack(model, x[:8], kind="uca", method=kind, eps=0.1, iterations=2, seed=0)
    start = time.perf_counter()
    result = run_attack(model, x, kind="uca", method=kind, eps=0.1, iterations=iterations,
                        seed=0, uca_margin=0.0)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(result.x_adv.numpy().tobytes()).hexdigest()
    return {"seconds": seconds, "rate": iterations / seconds, "unit": "iterations/s",
            "checksum": digest[:16]}


def measure(name: str, allocator: Allocator, iterations: int, threads: int
            ) -> dict[str, float | str]:
    """One workload in a fresh subprocess whose environment preloads ``allocator``."""
    env = kernel_environment(allocator)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__, "--child", name, "--iterations",
                          str(iterations), "--threads", str(threads)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} under {allocator.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--iterations", type=int, default=None,
                        help="training steps (default 30) or attack iterations (default 60)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        default = 30 if args.child.startswith("train") else 60
        row = run_workload(args.child, args.iterations or default, args.threads)
        print(json.dumps(row))
        return 0

    tcmalloc = choose_allocator({"CALIB_ALLOCATOR": "tcmalloc"})
    if tcmalloc.library is None:
        print(f"error: {tcmalloc.reason}", file=sys.stderr)
        return 2
    allocators = [Allocator("system", None, "glibc malloc"), tcmalloc]
    print(f"tcmalloc: {tcmalloc.library}; {args.threads} threads, best of {args.repeat}")
    best: dict[tuple[str, str], dict[str, float | str]] = {}
    for _ in range(args.repeat):
        for name in args.workloads:
            iterations = args.iterations or (30 if name.startswith("train") else 60)
            for allocator in allocators:
                row = measure(name, allocator, iterations, args.threads)
                key = (name, allocator.name)
                if key not in best or float(row["seconds"]) < float(best[key]["seconds"]):
                    best[key] = row
    rows, mismatched = [], []
    print("\n| workload | system s | tcmalloc s | speed-up | unit rate (system -> tcmalloc) "
          "| same result |\n|---|---:|---:|---:|---|---|")
    for name in args.workloads:
        sys_row, tc_row = best[(name, "system")], best[(name, "tcmalloc")]
        same = sys_row["checksum"] == tc_row["checksum"]
        if not same:
            mismatched.append(name)
        speedup = float(sys_row["seconds"]) / float(tc_row["seconds"])
        print(f"| {name} | {float(sys_row['seconds']):.2f} | {float(tc_row['seconds']):.2f} "
              f"| {speedup:.2f}x | {float(sys_row['rate']):,.1f} -> {float(tc_row['rate']):,.1f} "
              f"{sys_row['unit']} | {'yes' if same else 'NO'} |")
        rows.append({"workload": name, "system": sys_row, "tcmalloc": tc_row,
                     "speedup": speedup, "same_result": same})
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat,
                                        "tcmalloc": str(tcmalloc.library), "rows": rows},
                                       indent=2) + "\n", encoding="utf-8")
    if mismatched:
        print(f"error: the allocator changed the result of {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
