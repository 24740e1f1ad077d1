"""A faster fp32 forward for black-box queries on a CPU: the model frozen into one graph.

Square Attack spends about 99% of its time in the model's forward pass
(``benchmarks/bench_square.py``), so an attack answers queries faster only if the forward
gets faster. In fp32 on a CPU the fastest forward we measured for the default profile's
ResNets is the model frozen by TorchScript: ``torch.jit.script`` then
``torch.jit.optimize_for_inference``, which folds each BatchNorm into its convolution, freezes
the weights and runs the convolutions through oneDNN with its blocked layouts from layer to
layer. On a 2-core AMD EPYC (torch 2.14.1) the trained default ResNet-18 runs 1.24-1.57x the
eager model's images per second at 100 to 500 images (1 or 2 threads, two runs); the logits
move by at most 4.3e-6 and no predicted label changes (``benchmarks/bench_forward.py``). ViTs
gain nothing (no BatchNorm to fold, matmuls already in oneDNN), so they stay eager.

**Small maps as matrix products.** Given the input shape (``input_shape``), the graph is also
specialised to it: every convolution whose input map has at most :data:`DENSE_MAX_PIXELS`
pixels (a ResNet's last two stages on 28 x 28 images: 2 x 2 and 1 x 1 maps) becomes one dense
matrix product (:class:`DenseConv2d`). A 3 x 3 convolution on a 1 x 1 map multiplies eight of
its nine taps by zero padding, and on a 2 x 2 map 20 of 36; the matrix holds only the taps that
touch the image, and one large GEMM beats oneDNN's convolution on such maps. Same linear map,
another summation order: the logits move by float32 rounding (< 1e-6 on the default ResNet-18)
and the frozen ResNet-18 answers 1.2-1.3x more queries per second (``bench_forward.py``).

What a frozen graph cannot do, and how this module keeps that safe:

* **No gradients.** It is for black-box queries only; :class:`FrozenQueries` raises if asked
  for a forward that needs a gradient (white-box PGD must use the model itself).
* **Its own rounding.** Decisions made on its logits can differ from eager fp32 ones at exact
  ties. Whatever is *reported* is re-read on the eager model (``calib.attacks.base.reevaluate``),
  and ``benchmarks/precision_check.py --query-graph frozen`` checks on the attacked set that
  the attacks' Table 1 numbers stay inside fp32's intervals before a profile uses it.
* **A snapshot.** The weights are copied when it is built; rebuild it after changing the model.
  Built for an ``input_shape``, it accepts only that shape (it says so otherwise).
* **CPU only, and TorchScript.** On CUDA, or where scripting fails (a model TorchScript cannot
  compile), :func:`freeze_for_queries` returns the model itself and says why. TorchScript is
  deprecated in PyTorch 2.x (``torch.compile`` with ``freezing`` reached 1.0-1.4x here).

Example:
    >>> queries, graph = freeze_for_queries(model, input_shape=images.shape[1:])
    >>> result = run_attack(queries, images, kind="uca", method="square", eps=0.1)
    >>> result = reevaluate(result, model)             # report what the eager model says
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from calib.checks import check_choice

__all__ = ["DENSE_MAX_PIXELS", "QUERY_GRAPHS", "DenseConv2d", "FrozenQueries", "QueryGraph",
           "dense_small_maps", "freeze_for_queries"]

#: How black-box queries run the model: as it is, or frozen into one TorchScript graph.
QUERY_GRAPHS: tuple[str, ...] = ("eager", "frozen")

#: A convolution whose input map has at most this many pixels runs as one dense matrix product
#: in a frozen graph built for a known input shape. 4 was fastest on the default ResNet-18
#: (2 x 2 and 1 x 1 maps: 1.2-1.3x the frozen graph's images/s); with the 4 x 4 maps too (16)
#: it ran 0.6-0.8x, the dense matrices then doing more work than the convolution's valid taps.
DENSE_MAX_PIXELS = 4


@dataclass(frozen=True)
class QueryGraph:
    """A query-graph request and what it resolved to.

    Attributes:
        requested: one of :data:`QUERY_GRAPHS`.
        used: what the queries run on ("eager" after a fallback).
        reason: one sentence saying why (recorded with results).
    """

    requested: str
    used: str
    reason: str

    @property
    def fell_back(self) -> bool:
        return self.used != self.requested


class DenseConv2d(nn.Module):
    """A 2-D convolution on one fixed input map size, as a single dense matrix product.

    The convolution is a linear map from the (C_in, H, W) input to the (C_out, H', W')
    output; its matrix (C_in*H*W, C_out*H'*W') is read off by convolving the standard basis,
    so zero padding, stride, dilation and groups are all in it. Worth it only for tiny maps
    (:data:`DENSE_MAX_PIXELS`), where most of a kernel's taps fall on the padding.

    Shapes: x (N, C_in, H, W) -> (N, C_out, H', W'), for the (H, W) it was built for.
    """

    def __init__(self, conv: nn.Conv2d, input_size: tuple[int, int]) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"DenseConv2d needs zero padding, not {conv.padding_mode!r}")
        height, width = input_size
        weight = conv.weight.detach()
        basis = torch.eye(conv.in_channels * height * width, dtype=weight.dtype,
                          device=weight.device).reshape(-1, conv.in_channels, height, width)
        with torch.no_grad():
            columns = nn.functional.conv2d(basis, weight, None, conv.stride, conv.padding,
                                           conv.dilation, conv.groups)
        self.channels, self.height, self.width = (int(d) for d in columns.shape[1:])
        self.register_buffer("matrix", columns.reshape(columns.shape[0], -1).contiguous())
        bias = (conv.bias.detach() if conv.bias is not None
                else weight.new_zeros(conv.out_channels))
        self.register_buffer("bias", bias.repeat_interleave(self.height * self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.flatten(1), self.matrix)
        return out.view(x.shape[0], self.channels, self.height, self.width)


def dense_small_maps(model: nn.Module, input_shape: tuple[int, int, int],
                     max_pixels: int = DENSE_MAX_PIXELS) -> tuple[nn.Module, int]:
    """``model`` with BatchNorm folded and its convolutions on small maps made dense.

    Args:
        model: an fp32 classifier in eval mode, images (N, *input_shape) -> logits (N, K);
            it is not modified (``torch.fx`` traces a copy).
        input_shape: (C, H, W) of the images the result will be given.
        max_pixels: a convolution whose input map has at most this many pixels (H_l * W_l)
            becomes a :class:`DenseConv2d`.

    Returns:
        (module, count): a ``torch.fx.GraphModule`` computing the same function (up to float
        rounding) and the number of convolutions made dense.

    Raises:
        Whatever ``torch.fx`` raises for a model it cannot trace symbolically.
    """
    from torch.fx.experimental.optimization import fuse

    traced = fuse(model, inplace=False)  # each BatchNorm folded into its convolution first
    for node in traced.graph.nodes:
        # fx writes postponed annotations (``from __future__ import annotations``) as type
        # names TorchScript cannot resolve; tensors are its default type anyway.
        node.type = None
    traced.recompile()
    sizes: dict[str, list[tuple[int, int]]] = {}
    hooks = [module.register_forward_hook(
                 lambda _m, inputs, _o, name=name: sizes.setdefault(name, []).append(
                     (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))))
             for name, module in traced.named_modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            traced(torch.zeros(1, *input_shape, device=next(traced.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    count = 0
    for name, calls in sizes.items():
        conv = traced.get_submodule(name)
        if len(calls) != 1:  # a convolution applied twice may see two map sizes
            continue
        height, width = calls[0]
        if height * width > max_pixels or conv.padding_mode != "zeros":
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, leaf,
                DenseConv2d(conv, (height, width)))
        count += 1
    return traced, count


class FrozenQueries(nn.Module):
    """A frozen TorchScript graph of a model, for gradient-free queries.

    Shapes: images (N, C, H, W) -> logits (N, K), float32, any N; (C, H, W) must be
    ``input_shape`` when the graph was specialised to one (not None).
    """

    def __init__(self, frozen: torch.jit.ScriptModule,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        # Held outside nn.Module's registry: a frozen graph has no train mode (its BatchNorm
        # is folded) and no parameters to move, so .eval(), .modules() and friends stop here.
        object.__setattr__(self, "frozen", frozen)
        self.input_shape = input_shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and images.requires_grad:
            raise RuntimeError("a frozen query graph has no gradients: white-box attacks must "
                               "differentiate through the model itself")
        if self.input_shape is not None and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"this frozen query graph was built for images of shape "
                             f"(N, {', '.join(map(str, self.input_shape))}), got "
                             f"{tuple(images.shape)}; freeze the model again for this shape")
        with torch.no_grad():
            return self.frozen(images)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def freeze_for_queries(model: nn.Module, query_graph: str = "frozen",
                       input_shape: Sequence[int] | None = None
                       ) -> tuple[nn.Module, QueryGraph]:
    """The module black-box queries should run, and what it is.

    Args:
        model: an fp32 classifier, images (N, C, H, W) -> logits (N, K), on the CPU. Its
            BatchNorm layers use their running statistics (it is copied and put in eval mode;
            ``model`` itself is left as it is).
        query_graph: "frozen" (a :class:`FrozenQueries`) or "eager" (``model`` itself).
        input_shape: (C, H, W) of the images to be queried, or None. Given, the frozen graph
            is specialised to it (:func:`dense_small_maps`) and accepts only that shape; where
            ``torch.fx`` cannot trace the model it is frozen unspecialised (the reason says so).

    Returns:
        (module, resolved): ``model`` itself with ``resolved.used == "eager"`` when asked for
        eager, on CUDA, for a model without BatchNorm (nothing to fold: not faster; the only
        fallback without a warning, since it is what a ViT should get) or when TorchScript
        cannot compile it; else the frozen graph.

    Raises:
        ValueError: ``query_graph`` not one of :data:`QUERY_GRAPHS`, or ``input_shape`` not
            three positive sizes.
    """
    check_choice("query_graph", query_graph, QUERY_GRAPHS)
    shape = None
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got "
                             f"{tuple(input_shape)}")
    if query_graph == "eager":
        return model, QueryGraph("eager", "eager", "eager requested")
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    if device.type != "cpu":
        reason = f"a frozen query graph is a CPU option (model on {device.type}); eager queries"
    elif any(p.dtype != torch.float32 for p in parameters):
        reason = "a frozen query graph needs fp32 weights; eager queries"
    elif not _has_batchnorm(model):
        # Expected for ViTs, not a failure: recorded, not warned about.
        return model, QueryGraph("frozen", "eager", (
            "no BatchNorm to fold into a convolution: a frozen graph is not faster "
            "(benchmarks/bench_forward.py); eager queries"))
    else:
        source: nn.Module = copy.deepcopy(model).eval()
        dense = "no input shape given, so no convolution made dense"
        if shape is not None:
            try:
                source, count = dense_small_maps(source, shape)
            except Exception as error:  # torch.fx cannot trace every model
                dense = (f"torch.fx could not trace the model ({type(error).__name__}), so "
                         f"no convolution made dense")
                shape = None
            else:
                dense = (f"{count} convolutions on maps of <= {DENSE_MAX_PIXELS} pixels as "
                         f"dense matrix products for {shape}")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # TorchScript's deprecation, and its notes on the fx module's attributes
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                frozen = torch.jit.optimize_for_inference(torch.jit.script(source))
        except Exception as error:  # TorchScript cannot compile every model
            reason = (f"TorchScript could not freeze the model ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]}); eager queries")
        else:
            return FrozenQueries(frozen, shape), QueryGraph(
                "frozen", "frozen", f"frozen TorchScript graph: BatchNorm folded, oneDNN "
                f"convolutions, {dense}, fp32")
    warnings.warn(reason, UserWarning, stacklevel=2)
    return model, QueryGraph("frozen", "eager", reason)
