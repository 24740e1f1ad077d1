"""Attack and training throughput at the paper profile's shapes, per precision, on one GPU.

What it measures (fake random data; timm ``resnet50`` and ``vit_base_patch16_224`` with random
weights, built through :func:`calib.models.create_model` with 100 classes, 3 channels,
224 x 224 images and ImageNet's mean/std), for each precision fp32 / tf32 / bf16 as
:func:`calib.precision.resolve_precision` resolves it on the device (the precision actually
used after a fallback is recorded in ``precision_used``):

1. ``square``: L-inf Square UCA (``run_attack(method="square")``, eps = 0.05, p_init = 0.05)
   with a success threshold nobody reaches (``uca_margin=0``), so every image is queried in
   every iteration; queries per second at 64, 256 and 500 images (one chunk each);
2. ``outside_forward_share`` of those runs: the share of the attack's wall time spent outside
   the model's forward. A wrapper times every forward, with ``torch.cuda.synchronize()``
   before and after it on CUDA, so the forward's own GPU time is charged to the forward
   (target: under 10%);
3. ``pgd``: white-box PGD UCA (``run_attack(method="pgd")``) at 64 images, in images x steps
   per second (the model is queried through :func:`calib.precision.with_precision` as the
   pipeline does, so only the forward runs in the chosen precision (fp32 with TF32 off); the
   backward runs in PyTorch's default, which lets cuDNN's convolutions use TF32);
4. ``train``: training images per second of :func:`calib.train.cross_entropy_step` with SGD
   (lr 0.01, momentum 0.9, weight decay 5e-4), batch 128, the model in train mode; bf16 by
   autocast around the forward, tf32 with TF32 allowed and fp32 with TF32 off for the whole
   step (PyTorch's default would run cuDNN's convolutions in TF32 even in "fp32").

Every measurement is preceded by an untimed warm-up (one attack iteration, two training
steps). A time guard skips the measurements still to come once ``--time-limit`` seconds
(default 420 = 7 minutes) have passed and says so in the table (value NaN, note "skipped").

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json]
        [--device cuda] [--models resnet50 vit_base_patch16_224] [--sizes 64 256 500]
        [--iterations 20] [--precisions fp32 tf32 bf16]
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu   # CPU scale

``--tiny``: resnet18 and vit_tiny_patch16_224 at 32 px, 2 and 4 images, 2 iterations (tens of
seconds on one CPU thread; tests/test_gpu_check.py runs it).

Expected runtime on one H100/H200: about 2-3 minutes, bounded by the time guard at 7. The
estimate, conservatively: per model and precision the Square runs cost (64 + 256 + 500) x
(20 + 2) + warm-up ~ 19k forwards, PGD 64 x 13 forward+backward passes (~2.5k forward
equivalents), training 12 steps of 128 (~4.6k forward equivalents), so ~26k forward
equivalents per (model, precision). ViT-B/16 is the slow one: ~800 images/s in fp32
(35 GFLOP each at ~40% of the H100's 67 fp32 TFLOP/s) -> ~33 s in fp32, less in tf32/bf16;
ResNet-50 (~2,500 images/s in fp32) ~10 s. With model construction and CUDA start-up
(~30 s) the whole run is about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.attacks import run_attack
from calib.models import create_model
from calib.precision import PRECISIONS, Precision, resolve_precision, tf32_allowed, with_precision
from calib.train import cross_entropy_step

EPS = 0.05
P_INIT = 0.05
NUM_CLASSES = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Settings of the full (GPU) run and of ``--tiny`` (CPU scale); command-line flags override.
FULL = {"models": ["resnet50", "vit_base_patch16_224"], "img_size": 224,
        "sizes": [64, 256, 500], "iterations": 20, "pgd_n": 64, "pgd_steps": 10,
        "train_batch": 128, "train_steps": 10}
TINY = {"models": ["resnet18", "vit_tiny_patch16_224"], "img_size": 32,
        "sizes": [2, 4], "iterations": 2, "pgd_n": 4, "pgd_steps": 2,
        "train_batch": 4, "train_steps": 2}


class TimedModel(nn.Module):
    """Wraps a model; counts images forwarded and the seconds spent in its forward.

    On CUDA it synchronises before and after each forward, so the time is the forward's own
    (kernels queued by the attack before it are not charged to it, its kernels are).
    """

    def __init__(self, net: nn.Module, sync: bool) -> None:
        super().__init__()
        self.net = net
        self.sync = sync
        self.images = 0
        self.calls = 0
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.net(x)
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += x.shape[0]
        self.calls += 1
        return out

    def reset(self) -> None:
        self.images, self.calls, self.seconds = 0, 0, 0.0


@dataclass
class Row:
    model: str
    measurement: str
    n_images: int
    precision_requested: str
    precision_used: str
    value: float
    unit: str
    outside_forward_share: float = math.nan
    seconds: float = math.nan
    note: str = ""


class Clock:
    """Wall time since the start, synchronised on CUDA, and the global time guard."""

    def __init__(self, device: torch.device, limit_s: float) -> None:
        self.sync = device.type == "cuda"
        self.limit_s = limit_s
        self.start = time.perf_counter()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.elapsed() > self.limit_s


def square_rate(model: TimedModel, images: torch.Tensor, iterations: int, clock: Clock
                ) -> tuple[float, float, float]:
    """(queries/s, share of time outside the forward, seconds) of one Square UCA run."""
    options = {"kind": "uca", "method": "square", "norm": "linf", "eps": EPS,
               "p_init": P_INIT, "uca_margin": 0.0, "batch_size": images.shape[0]}
    run_attack(model, images, iterations=1, **options)  # warm-up
    model.reset()
    start = clock.now()
    run_attack(model, images, iterations=iterations, **options)
    seconds = clock.now() - start
    return model.images / seconds, 1.0 - model.seconds / seconds, seconds


def pgd_rate(model: TimedModel, images: torch.Tensor, steps: int, clock: Clock
             ) -> tuple[float, float]:
    """(images x steps per second, seconds) of white-box PGD UCA; every image steps."""
    options = {"kind": "uca", "method": "pgd", "norm": "linf", "eps": EPS,
               "uca_margin": 0.0, "batch_size": images.shape[0]}
    run_attack(model, images, iterations=1, **options)  # warm-up
    model.reset()
    start = clock.now()
    result = run_attack(model, images, iterations=steps, **options)
    seconds = clock.now() - start
    # Gradient steps actually taken (queries minus the clean one), all images together.
    stepped = float((result.queries - 1).clamp_min(0).sum())
    return stepped / seconds, seconds


def train_rate(net: nn.Module, precision: Precision, *, batch: int, img_size: int, steps: int,
               device: torch.device, clock: Clock) -> tuple[float, float]:
    """(training images per second, seconds) of ``steps`` SGD steps at batch ``batch``."""
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, img_size, img_size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    model = with_precision(net, precision)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net.train()

    def step() -> None:
        if precision.used in ("tf32", "fp32") and device.type == "cuda":
            # The backward and the update too, not only the forward: TF32 on for tf32, off for
            # fp32 (PyTorch's default would run cuDNN's convolutions in TF32 even then).
            with tf32_allowed(precision.used == "tf32"):
                cross_entropy_step(model, images, labels, optimizer)
        else:
            cross_entropy_step(model, images, labels, optimizer)

    for _ in range(2):  # warm-up (the first step also allocates the momentum buffers)
        step()
    start = clock.now()
    for _ in range(steps):
        step()
    seconds = clock.now() - start
    net.eval()
    return batch * steps / seconds, seconds


def build_model(arch: str, img_size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=NUM_CLASSES, in_chans=3, img_size=img_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, pretrained=False)
    return net.to(device).eval()


def measure_model(arch: str, settings: dict, precisions: list[str], device: torch.device,
                  clock: Clock, log: Callable[[str], None]) -> list[Row]:
    """Every measurement of one architecture, each precision; skipped ones once time is up."""
    rows: list[Row] = []
    img = settings["img_size"]
    gen = torch.Generator().manual_seed(0)
    largest = max([*settings["sizes"], settings["pgd_n"]])
    pool = torch.rand(largest, 3, img, img, generator=gen).to(device)
    chosen = {p: resolve_precision(p, device, warn=False) for p in precisions}
    plan: list[tuple[str, int, str]] = [("square", n, p) for p in precisions
                                        for n in settings["sizes"]]
    plan += [("pgd", settings["pgd_n"], p) for p in precisions]
    plan += [("train", settings["train_batch"], p) for p in precisions]
    net = None if clock.expired() else build_model(arch, img, device)
    units = {"square": "queries/s", "pgd": "image-steps/s", "train": "images/s"}
    for measurement, n, p in plan:
        precision = chosen[p]
        note = "" if not precision.fell_back else "fallback: not native here"
        row = Row(arch, measurement, n, p, precision.used, math.nan, units[measurement],
                  note=note)
        rows.append(row)
        if net is None or clock.expired():
            row.note = f"skipped: time guard ({clock.limit_s:.0f} s) passed"
            continue
        if measurement == "train":
            row.value, row.seconds = train_rate(net, precision, batch=n, img_size=img,
                                                steps=settings["train_steps"], device=device,
                                                clock=clock)
        else:
            timed = TimedModel(with_precision(net, precision), sync=device.type == "cuda")
            images = pool[:n].contiguous()
            if measurement == "square":
                row.value, row.outside_forward_share, row.seconds = square_rate(
                    timed, images, settings["iterations"], clock)
            else:
                row.value, row.seconds = pgd_rate(timed, images, settings["pgd_steps"], clock)
        log(f"[{clock.elapsed():6.1f} s] {arch} {measurement} n={n} {p}->{precision.used}: "
            f"{row.value:,.1f} {row.unit}")
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]):
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU-scale settings (tests)")
    parser.add_argument("--models", nargs="+", help="timm ResNet/ViT names")
    parser.add_argument("--sizes", nargs="+", type=int, help="images per Square run")
    parser.add_argument("--iterations", type=int, help="Square iterations (timed)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"],
                        choices=PRECISIONS)
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="skip the remaining measurements after this many seconds")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the rows and the setup as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    settings = dict(TINY if args.tiny else FULL)
    for key in ("models", "sizes", "iterations"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(device, args.time_limit)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    setup = {"device": str(device), "torch": torch.__version__, "tiny": args.tiny,
             "settings": settings, "precisions": args.precisions,
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "reasons": {p: resolve_precision(p, device, warn=False).reason
                         for p in args.precisions}}
    log(f"gpu_check: {json.dumps(setup)}")
    rows: list[Row] = []
    for arch in settings["models"]:
        rows += measure_model(arch, settings, args.precisions, device, clock, log)
    setup["elapsed_s"] = clock.elapsed()

    frame = table(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    square = frame[(frame.measurement == "square") & frame.outside_forward_share.notna()]
    if len(square):
        worst = square.outside_forward_share.max()
        print(f"\nSquare: time outside the forward {square.outside_forward_share.min():.1%} to "
              f"{worst:.1%} of the attack (target < 10%: {'met' if worst < 0.1 else 'NOT met'})")
    skipped = int(frame.note.str.startswith("skipped").sum())
    if skipped:
        print(f"{skipped} measurement(s) skipped by the time guard")
    print(f"total {setup['elapsed_s']:.1f} s on {device}"
          + (f" ({setup['gpu']})" if setup["gpu"] else ""))
    if args.out:
        records = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in asdict(r).items()} for r in rows]
        args.out.write_text(json.dumps({"setup": setup, "rows": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
