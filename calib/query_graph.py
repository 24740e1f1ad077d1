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

What a frozen graph cannot do, and how this module keeps that safe:

* **No gradients.** It is for black-box queries only; :class:`FrozenQueries` raises if asked
  for a forward that needs a gradient (white-box PGD must use the model itself).
* **Its own rounding.** Decisions made on its logits can differ from eager fp32 ones at exact
  ties. Whatever is *reported* is re-read on the eager model (``calib.attacks.base.reevaluate``),
  and ``benchmarks/precision_check.py --query-graph frozen`` checks on the attacked set that
  the attacks' Table 1 numbers stay inside fp32's intervals before a profile uses it.
* **A snapshot.** The weights are copied when it is built; rebuild it after changing the model.
* **CPU only, and TorchScript.** On CUDA, or where scripting fails (a model TorchScript cannot
  compile), :func:`freeze_for_queries` returns the model itself and says why. TorchScript is
  deprecated in PyTorch 2.x (``torch.compile`` with ``freezing`` reached 1.0-1.4x here).

Example:
    >>> queries, graph = freeze_for_queries(model)     # graph.used: "frozen" or "eager"
    >>> result = run_attack(queries, images, kind="uca", method="square", eps=0.1)
    >>> result = reevaluate(result, model)             # report what the eager model says
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from calib.checks import check_choice

__all__ = ["QUERY_GRAPHS", "FrozenQueries", "QueryGraph", "freeze_for_queries"]

#: How black-box queries run the model: as it is, or frozen into one TorchScript graph.
QUERY_GRAPHS: tuple[str, ...] = ("eager", "frozen")


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


class FrozenQueries(nn.Module):
    """A frozen TorchScript graph of a model, for gradient-free queries.

    Shapes: images (N, C, H, W) -> logits (N, K), float32, any N.
    """

    def __init__(self, frozen: torch.jit.ScriptModule) -> None:
        super().__init__()
        # Held outside nn.Module's registry: a frozen graph has no train mode (its BatchNorm
        # is folded) and no parameters to move, so .eval(), .modules() and friends stop here.
        object.__setattr__(self, "frozen", frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and images.requires_grad:
            raise RuntimeError("a frozen query graph has no gradients: white-box attacks must "
                               "differentiate through the model itself")
        with torch.no_grad():
            return self.frozen(images)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def freeze_for_queries(model: nn.Module, query_graph: str = "frozen"
                       ) -> tuple[nn.Module, QueryGraph]:
    """The module black-box queries should run, and what it is.

    Args:
        model: an fp32 classifier, images (N, C, H, W) -> logits (N, K), on the CPU. Its
            BatchNorm layers use their running statistics (it is copied and put in eval mode;
            ``model`` itself is left as it is).
        query_graph: "frozen" (a :class:`FrozenQueries`) or "eager" (``model`` itself).

    Returns:
        (module, resolved): ``model`` itself with ``resolved.used == "eager"`` when asked for
        eager, on CUDA, for a model without BatchNorm (nothing to fold: not faster; the only
        fallback without a warning, since it is what a ViT should get) or when TorchScript
        cannot compile it; else the frozen graph.

    Raises:
        ValueError: ``query_graph`` not one of :data:`QUERY_GRAPHS`.
    """
    check_choice("query_graph", query_graph, QUERY_GRAPHS)
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
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
                frozen = torch.jit.optimize_for_inference(
                    torch.jit.script(copy.deepcopy(model).eval()))
        except Exception as error:  # TorchScript cannot compile every model
            reason = (f"TorchScript could not freeze the model ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]}); eager queries")
        else:
            return FrozenQueries(frozen), QueryGraph(
                "frozen", "frozen", "frozen TorchScript graph: BatchNorm folded, oneDNN "
                "convolutions, fp32")
    warnings.warn(reason, UserWarning, stacklevel=2)
    return model, QueryGraph("frozen", "eager", reason)
