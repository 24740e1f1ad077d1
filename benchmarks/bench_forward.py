"""How fast can an fp32 attack query be on this CPU? Forward-pass variants of one model.

Square Attack on the default profile's ResNet-18 spends about 99% of its time in the model's
forward (``bench_square.py``), so the attack can only answer queries faster than
``torchattacks.Square`` if the *forward* gets faster. bf16 autocast doubles it but fails the
precision check (``precision_check.py``). This script measures what is left in fp32, the
precision the pipeline uses: the same trained or random model run seven ways, each on the same
images, in images per second, with its largest logit difference from eager fp32 and the share
of images whose predicted label differs.

- ``eager``: the model as the pipeline runs it (``torch.inference_mode``);
- ``channels_last``: weights and input in NHWC memory format;
- ``bn_folded``: BatchNorm folded into the preceding convolutions (``torch.fx`` fuse);
- ``onednn``: folded, then convolutions and linears converted to oneDNN modules, with oneDNN
  (blocked-layout) tensors from the first convolution to the logits (``torch.utils.mkldnn``);
- ``torchscript_frozen``: ``torch.jit.optimize_for_inference(torch.jit.script(model))``
  (folded, oneDNN convolutions, frozen weights; TorchScript is deprecated in PyTorch 2.x);
- ``query_graph``: what the pipeline's Square queries run, ``calib.query_graph.freeze_for_queries``
  for the images' shape: the frozen graph with every convolution on a map of at most 4 pixels
  turned into one dense matrix product;
- ``compile_frozen``: ``torch.compile`` (inductor) with ``freezing`` on (compile time printed);
- ``bf16_autocast``: for reference only, not a validated precision here.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_forward.py                       # random
    PYTHONPATH=. .venv/bin/python benchmarks/bench_forward.py --trained models/resnet models/vit
    PYTHONPATH=. .venv/bin/python benchmarks/bench_forward.py --tiny                 # seconds

Defaults: the default profile's ResNet-18 and 6-block ViT with random weights (28 x 28 x 1,
10 classes), batches of 100, 200 and 500 images (the defence, attack and paper-size batches),
1 and 2 threads, fastest of ``--repeat`` 7 timed calls after 2 untimed ones.

The last lines print, per model and thread count, the best fp32 variant's speed-up over eager
at the largest batch: the ceiling on how much faster than ``torchattacks.Square`` (which runs
the eager model) an fp32 Square can answer queries on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from calib.constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from calib.models import create_model, load_trained
from calib.query_graph import dense_small_maps, freeze_for_queries

Forward = Callable[[torch.Tensor], torch.Tensor]

#: The variants in the order they are timed (the reference first).
VARIANTS: tuple[str, ...] = ("eager", "channels_last", "bn_folded", "onednn",
                             "torchscript_frozen", "query_graph", "compile_frozen",
                             "bf16_autocast")
#: Variants that compute in fp32 (the candidates for the pipeline's queries).
FP32_VARIANTS: tuple[str, ...] = VARIANTS[:-1]


@dataclass
class Row:
    model: str
    variant: str
    threads: int
    batch: int
    images_per_s: float
    speedup: float
    max_abs_logit_diff: float
    labels_differ: float
    note: str = ""


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(normalisation, network) of an :class:`calib.models.ImageClassifier`."""
    children = list(model.children())
    if len(children) != 2:
        raise ValueError(f"expected an ImageClassifier (normalise, net), got {type(model)}")
    return children[0], children[1]


def build_variant(name: str, model: nn.Module, example: torch.Tensor,
                  dense_max_pixels: int | None = None) -> tuple[Forward, str]:
    """A forward function ``(N, C, H, W) -> (N, K)`` float32 logits, and a note.

    ``dense_max_pixels`` (``query_graph`` only): build the frozen graph with another size limit
    for the maps whose convolutions become dense matrix products (None: the pipeline's,
    ``calib.query_graph.DENSE_MAX_PIXELS``).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    model = copy.deepcopy(model).eval()
    if name == "eager":
        return model, ""
    if name == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        return (lambda x: model(x.contiguous(memory_format=torch.channels_last))), ""
    if name == "bf16_autocast":
        def bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x).float()
        return bf16, "reference only: fails precision_check.py"
    from torch.fx.experimental import optimization as fx_optimization

    normalise, net = _split(model)
    if name in ("bn_folded", "onednn"):
        folded = fx_optimization.fuse(net)
        if name == "bn_folded":
            return (lambda x: folded(normalise(x))), ""
        with warnings.catch_warnings():  # torch.utils.mkldnn is built on TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            from torch.utils import mkldnn

            onednn = mkldnn.to_mkldnn(folded)
        return (lambda x: onednn(normalise(x).to_mkldnn()).to_dense()), ""
    if name == "torchscript_frozen":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            frozen = torch.jit.optimize_for_inference(torch.jit.script(model))
        return frozen, "TorchScript: deprecated"
    if name == "query_graph":
        if dense_max_pixels is not None:
            dense, count = dense_small_maps(model, tuple(example.shape[1:]), dense_max_pixels)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                frozen = torch.jit.optimize_for_inference(torch.jit.script(dense))
            return frozen, f"{count} convolutions dense (maps <= {dense_max_pixels} pixels)"
        queries, graph = freeze_for_queries(model, "frozen", input_shape=example.shape[1:])
        return queries, graph.reason if graph.fell_back else ""
    if name == "compile_frozen":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        # A fresh compiler state per model: past its recompile limit dynamo silently runs eager.
        torch._dynamo.reset()
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(example)
        return compiled, f"compile {time.perf_counter() - start:.0f} s"
    raise AssertionError(name)  # every name of VARIANTS is handled above


def images_per_second(forward: Forward, images: torch.Tensor, repeat: int) -> tuple[float,
                                                                                       torch.Tensor]:
    """Fastest of ``repeat`` timed calls after two untimed ones; and the logits."""
    with torch.inference_mode():
        for _ in range(2):
            logits = forward(images)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            logits = forward(images)
            best = min(best, time.perf_counter() - start)
    return images.shape[0] / best, logits.float()


def bench_model(label: str, model: nn.Module, images: torch.Tensor, *, batches: list[int],
                threads: list[int], variants: list[str], repeat: int,
                dense_max_pixels: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        built: dict[str, tuple[Forward, str]] = {}
        for name in variants:
            try:
                built[name] = build_variant(name, model, images[: batches[0]],
                                            dense_max_pixels)
                with torch.inference_mode():
                    built[name][0](images[:2])
            except Exception as error:  # a variant this model or build cannot run
                built.pop(name, None)
                print(f"{label}: {name} unavailable: {type(error).__name__}: "
                      f"{str(error).splitlines()[0]}"[:200])
        for batch in batches:
            x = images[:batch]
            reference = None
            for name, (forward, note) in built.items():
                try:
                    speed, logits = images_per_second(forward, x, repeat)
                except Exception as error:
                    print(f"{label}: {name} failed at batch {batch}: {error}"[:300])
                    continue
                if reference is None:
                    reference = (speed, logits)
                rows.append(Row(label, name, n_threads, batch, speed, speed / reference[0],
                                float((logits - reference[1]).abs().max()),
                                float((logits.argmax(1) != reference[1].argmax(1))
                                      .float().mean()), note))
                print(f"{label:>10} {n_threads} thr  batch {batch:>4}  {name:<19} "
                      f"{speed:>8.0f} img/s  x{speed / reference[0]:.2f}", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | threads | batch | variant | images / s | vs eager | max abs logit diff "
             "| labels differ | note |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r.model} | {r.threads} | {r.batch} | {r.variant} | {r.images_per_s:,.0f} | "
              f"{r.speedup:.2f}x | {r.max_abs_logit_diff:.1e} | {r.labels_differ:.1%} | "
              f"{r.note} |" for r in rows]
    return "\n".join(lines)


def ceilings(rows: list[Row]) -> list[str]:
    """Per model and thread count: the fastest fp32 variant at the largest batch."""
    out = []
    for key in dict.fromkeys((r.model, r.threads) for r in rows):
        mine = [r for r in rows if (r.model, r.threads) == key]
        largest = max(r.batch for r in mine)
        fp32 = [r for r in mine if r.batch == largest and r.variant in FP32_VARIANTS]
        best = max(fp32, key=lambda r: r.speedup)
        out.append(f"{key[0]}, {key[1]} thread(s), batch {largest}: fastest fp32 forward "
                   f"{best.variant} at {best.speedup:.2f}x eager")
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="*", default=["resnet18", "vit_fmnist_d6"],
                        help="models built with random weights (28 x 28 x 1, 10 classes)")
    parser.add_argument("--trained", nargs="*", default=[],
                        help="trained model folders (calib.models.save_trained), e.g. "
                             "models/resnet")
    parser.add_argument("--batches", nargs="+", type=int, default=[100, 200, 500])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dense-max-pixels", type=int, default=None,
                        help="query_graph with another limit on the maps made dense (e.g. 1 "
                             "or 16; default: the pipeline's 4)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tiny", action="store_true",
                        help="resnet18 only, batches 4 and 8, 1 thread, 2 repeats, no compile")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.archs, args.trained, args.batches, args.threads, args.repeat = (
            ["resnet18"], [], [4, 8], [1], 2)
        args.variants = [v for v in args.variants if v != "compile_frozen"]
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")
    torch.manual_seed(0)
    images = torch.rand(max(args.batches), 1, 28, 28)
    models: list[tuple[str, nn.Module]] = []
    for arch in args.archs:
        torch.manual_seed(0)
        models.append((arch, create_model(arch, num_classes=10, in_chans=1, img_size=28,
                                          mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)))
    for folder in args.trained:
        models.append((f"{Path(folder).name} (trained)", load_trained(folder)))
    threads_before = torch.get_num_threads()
    rows: list[Row] = []
    try:
        for label, model in models:
            rows += bench_model(label, model.eval(), images, batches=args.batches,
                                threads=args.threads, variants=args.variants,
                                dense_max_pixels=args.dense_max_pixels,
                                repeat=args.repeat)
    finally:
        torch.set_num_threads(threads_before)
    print()
    print(table(rows))
    print()
    for line in ceilings(rows):
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
