"""Speed of the L-inf Square calibration attack against two references.

Runs on the same model, images and iteration budget:

(a) ``calib.attacks.square_attack`` (UCA, vectorised, this project);
(b) ``torchattacks.Square`` (misclassification objective, ``n_queries`` = budget,
    ``n_restarts=1``, same ``p_init``);
(c) ``paper_loop_baseline.calibration_attack_linf``: a port of the paper's released loop
    (numpy state, a Python loop over images to place windows, batched predict).

A wrapper around the model counts every image it is given and times every forward pass,
so each implementation is charged exactly for its own queries, and the time outside the
forward (the attack's bookkeeping) is measured directly. (a) and (c) are run with a success
threshold that no sample reaches, so every sample is queried in every iteration; (b) stops
samples that become misclassified, which is why the comparison is per query.

Precisions (``--precisions``, default fp32): (a) and (b) also run on the model wrapped by
``calib.precision.with_precision(model, resolve_precision(p, device))``, i.e. with its
forward under bf16 autocast or TF32 where the device has them natively and in fp32 after a
fallback (the precision used is reported); the counting wrapper sits outside the precision
wrapper, so the casts are charged to the forward. fp32 is always measured, since the
speed-ups are quoted against fp32; (c) runs in fp32 only.

Query graphs (``--graphs``, default eager): with ``frozen`` (a) and (b) also run, in fp32, on
the model frozen by ``calib.query_graph.freeze_for_queries`` (BatchNorm folded, oneDNN
convolutions; ``precision_check.py --query-graph frozen`` validates it on the trained
ResNet-18). A model the graph cannot speed up (no BatchNorm: the tiny configurations) falls
back to eager and gets no frozen rows. The script then also prints calib on the frozen graph
over torchattacks on the eager model (the comparison of each as it runs by default) and over
torchattacks on the same frozen graph (the attacks alone).

Configurations:
  tiny28   a 1-layer conv + linear model on 28x28x1 images (bookkeeping dominates);
  tiny224  the same model on 224x224x3 images;
  resnet18 timm resnet18 (in_chans=1, num_classes=10, random weights) on 28x28x1 images,
           like the default profile's models.

Usage:
  PYTHONPATH=. python benchmarks/bench_square.py [--configs tiny28 tiny224 resnet18]
      [--n 500] [--n224 100] [--iterations 100] [--threads 2] [--repeat 1]
      [--precisions fp32 bf16 tf32] [--graphs eager frozen] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_loop_baseline import calibration_attack_linf

from calib.attacks import square_attack
from calib.precision import PRECISIONS, resolve_precision, with_precision
from calib.query_graph import QUERY_GRAPHS, freeze_for_queries

EPS = 0.05
P_INIT = 0.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CountingModel(nn.Module):
    """Wraps a model; counts images forwarded and the seconds spent in its forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.images = 0
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _sync(x.device)  # on a GPU, charge the forward its own kernels, not queued ones
        start = time.perf_counter()
        out = self.net(x)
        _sync(x.device)
        self.seconds += time.perf_counter() - start
        self.images += x.shape[0]
        return out

    def reset(self) -> None:
        self.images, self.seconds = 0, 0.0


def tiny_model(channels: int, seed: int) -> nn.Module:
    """One strided conv, global pooling to 4x4 and a linear layer: as cheap as a CNN gets."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, kernel_size=4, stride=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10))


def resnet18_model(seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)


@dataclass
class Timing:
    config: str
    implementation: str
    iterations: int
    queries: int
    seconds: float
    forward_seconds: float
    precision: str = "fp32"
    precision_used: str = "fp32"
    graph: str = "eager"

    @property
    def per_iteration_ms(self) -> float:
        return 1e3 * self.seconds / self.iterations

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.seconds

    @property
    def outside_share(self) -> float:
        return 1.0 - self.forward_seconds / self.seconds

    @property
    def outside_per_query_us(self) -> float:
        return 1e6 * (self.seconds - self.forward_seconds) / self.queries

    def row(self) -> dict[str, float | str | int]:
        out = asdict(self)
        out.update(per_iteration_ms=self.per_iteration_ms,
                   queries_per_second=self.queries_per_second,
                   outside_share=self.outside_share,
                   outside_per_query_us=self.outside_per_query_us)
        return out


def _timed(config: str, name: str, model: CountingModel, iterations: int, run,
           precision: str, used: str, graph: str, device: torch.device) -> Timing:
    model.reset()
    start = time.perf_counter()
    run()
    _sync(device)
    seconds = time.perf_counter() - start
    return Timing(config, name, iterations, model.images, seconds, model.seconds,
                  precision=precision, precision_used=used, graph=graph)


def bench_config(config: str, net: nn.Module, images: torch.Tensor, iterations: int,
                 repeat: int, skip_baseline: bool, precisions: tuple[str, ...] = ("fp32",),
                 graphs: tuple[str, ...] = ("eager",)) -> list[Timing]:
    """Time the implementations ``repeat`` times, interleaved; keep each one's fastest run
    (the least disturbed by other processes on a shared machine).

    ``calib`` and ``torchattacks`` run once per precision, on ``with_precision(net, ...)``
    inside the counting wrapper; ``paper_loop`` in fp32 only. The labels torchattacks
    attacks are the fp32 predictions in every precision. With "frozen" in ``graphs`` both
    also run in fp32 on ``freeze_for_queries(net)`` (unless it falls back to eager).
    """
    import torchattacks

    net = net.eval()
    with torch.no_grad():
        labels = net(images).argmax(1)
    x = images.cpu().numpy().astype(np.float64)
    runs: dict[tuple[str, str, str], tuple[CountingModel, str, object]] = {}
    candidates = [(p, "eager") for p in precisions]
    if "frozen" in graphs:
        frozen, graph = freeze_for_queries(net, "frozen", input_shape=images.shape[1:])
        if graph.used == "frozen":
            candidates.append(("fp32", "frozen"))
        else:
            print(f"{config}: no frozen rows ({graph.reason})")
    for requested, graph_name in candidates:
        chosen = resolve_precision(requested, images.device, warn=False)
        queried = frozen if graph_name == "frozen" else with_precision(net, chosen)
        model = CountingModel(queried).eval()
        attack = torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=iterations,
                                     n_restarts=1, p_init=P_INIT, loss="margin", seed=0)
        runs["calib", requested, graph_name] = (model, chosen.used, functools.partial(
            square_attack, model, images, kind="uca", eps=EPS, iterations=iterations,
            p_init=P_INIT, uca_margin=0.0, batch_size=images.shape[0]))
        runs["torchattacks", requested, graph_name] = (
            model, chosen.used, functools.partial(attack, images, labels))
        if (requested, graph_name) == ("fp32", "eager") and not skip_baseline \
                and images.device.type == "cpu":  # the paper's loop keeps numpy state
            # The released loop runs n_iters - 1 iterations.
            runs["paper_loop", requested, graph_name] = (model, "fp32", functools.partial(
                calibration_attack_linf, model, x, EPS, iterations + 1, p_init=P_INIT,
                uca_margin=-1.0, batch_size=images.shape[0]))
    best: dict[tuple[str, str, str], Timing] = {}
    for _ in range(repeat):
        for key, (model, used, run) in runs.items():
            t = _timed(config, key[0], model, iterations, run, key[1], used, key[2],
                       images.device)
            if key not in best or t.seconds < best[key].seconds:
                best[key] = t
    return list(best.values())


def precision_ratios(timings: list[Timing], config: str) -> str | None:
    """calib at its fastest precision (of those not fallen back) and at fp32, in queries per
    second, over torchattacks at fp32 (None when either fp32 row is missing)."""
    rows = [t for t in timings if t.config == config and t.graph == "eager"]
    # A precision that fell back is fp32 measured again, not a candidate for "fastest".
    ours = [t for t in rows if t.implementation == "calib" and t.precision == t.precision_used]
    base = {t.implementation: t for t in rows if t.precision == "fp32"}
    if "calib" not in base or "torchattacks" not in base:
        return None
    ref = base["torchattacks"].queries_per_second
    fastest = max(ours, key=lambda t: t.queries_per_second)
    return (f"calib({_label(fastest)}) / torchattacks(fp32) = "
            f"{fastest.queries_per_second / ref:.2f}x, calib(fp32) / torchattacks(fp32) = "
            f"{base['calib'].queries_per_second / ref:.2f}x")


def graph_ratios(timings: list[Timing], config: str) -> str | None:
    """calib in fp32 on the frozen graph over torchattacks in fp32 on the eager model and on
    the same frozen graph, in queries per second (None without frozen rows)."""
    rows = {(t.implementation, t.graph): t for t in timings
            if t.config == config and t.precision == "fp32"}
    needed = [("calib", "frozen"), ("torchattacks", "eager"), ("torchattacks", "frozen")]
    if any(key not in rows for key in needed):
        return None
    ours = rows["calib", "frozen"].queries_per_second
    return (f"calib(fp32, frozen) / torchattacks(fp32, eager) = "
            f"{ours / rows['torchattacks', 'eager'].queries_per_second:.2f}x, "
            f"calib(fp32, frozen) / torchattacks(fp32, frozen) = "
            f"{ours / rows['torchattacks', 'frozen'].queries_per_second:.2f}x")


def _label(t: Timing) -> str:
    """The precision as requested, with the fallback and the graph shown: "bf16",
    "tf32->fp32", "fp32 frozen"."""
    label = t.precision if t.precision == t.precision_used \
        else f"{t.precision}->{t.precision_used}"
    return f"{label} frozen" if t.graph == "frozen" else label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny28", "tiny224", "resnet18"],
                        choices=["tiny28", "tiny224", "resnet18"])
    parser.add_argument("--n", type=int, default=500, help="images at 28 px (paper: 500)")
    parser.add_argument("--n224", type=int, default=100, help="images at 224 px")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per implementation; the fastest is reported")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=PRECISIONS,
                        help="query precisions of calib and torchattacks (fp32 is always "
                             "measured; paper_loop runs in fp32 only)")
    parser.add_argument("--graphs", nargs="+", default=["eager"], choices=QUERY_GRAPHS,
                        help="query graphs of calib and torchattacks (eager is always "
                             "measured; frozen runs in fp32)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda to time calib and torchattacks on a GPU (each forward "
                             "synchronised; the paper's loop is CPU-only and skipped there)")
    parser.add_argument("--out", type=Path, help="write the timings as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = tuple(dict.fromkeys(["fp32", *args.precisions]))
    graphs = tuple(dict.fromkeys(["eager", *args.graphs]))

    gen = torch.Generator().manual_seed(0)
    timings: list[Timing] = []
    for config in args.configs:
        if config == "tiny28":
            net, images = tiny_model(1, 0), torch.rand(args.n, 1, 28, 28, generator=gen)
        elif config == "tiny224":
            net, images = tiny_model(3, 0), torch.rand(args.n224, 3, 224, 224, generator=gen)
        else:
            net, images = resnet18_model(0), torch.rand(args.n, 1, 28, 28, generator=gen)
        timings += bench_config(config, net.to(device), images.to(device), args.iterations,
                                args.repeat, args.skip_baseline, precisions, graphs)

    header = (f"{'config':9s} {'implementation':13s} {'precision':12s} {'ms/iter':>9s} "
              f"{'queries/s':>10s} {'outside fwd':>11s} {'us/query outside':>17s}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={where} threads={args.threads} iterations={args.iterations} "
          f"repeat={args.repeat} "
          f"n={args.n} n224={args.n224} precisions={','.join(precisions)} "
          f"graphs={','.join(graphs)} "
          f"torch={torch.__version__}")
    print(header)
    for t in timings:
        print(f"{t.config:9s} {t.implementation:13s} {_label(t):12s} "
              f"{t.per_iteration_ms:9.2f} {t.queries_per_second:10.0f} "
              f"{t.outside_share:11.1%} {t.outside_per_query_us:17.1f}")
    print("\nspeed-up of calib (fp32): queries per second (time outside the forward per query)")
    for config in args.configs:
        rows = {t.implementation: t for t in timings
                if t.config == config and t.precision == "fp32" and t.graph == "eager"}
        ours = rows["calib"]
        ratios = ", ".join(
            f"{ours.queries_per_second / t.queries_per_second:.1f}x "
            f"({t.outside_per_query_us / ours.outside_per_query_us:.1f}x) vs {name}"
            for name, t in rows.items() if name != "calib")
        print(f"  {config}: {ratios}")
    shown = [c for c in args.configs if len(precisions) > 1 or c == "resnet18"]
    if shown:
        print("\nprecision: calib at its fastest precision and at fp32 vs torchattacks at fp32")
    for config in shown:
        print(f"  {config}: {precision_ratios(timings, config)}")
    frozen_lines = [(c, graph_ratios(timings, c)) for c in args.configs]
    if any(line for _, line in frozen_lines):
        print("\nquery graph: calib on the frozen graph vs torchattacks on the eager model and "
              "on the frozen graph")
    for config, line in frozen_lines:
        if line:
            print(f"  {config}: {line}")
    if args.out:
        args.out.write_text(json.dumps([t.row() for t in timings], indent=2) + "\n")


if __name__ == "__main__":
    main()
