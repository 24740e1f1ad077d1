"""Numeric precision of attack queries: fp32, bf16 autocast, TF32 (SPEC §7, speed).

A calibration attack spends nearly all its time in the model's forward pass (the black-box
Square Attack queries the model once per image per iteration). On hardware with native bf16
(CPUs with AVX-512 BF16 or AMX, CUDA GPUs from Ampere on) a forward under bf16 autocast runs
about twice as fast; TF32 matmuls do the same for fp32 models on Ampere+ GPUs. Neither is
free: the logits move by ~1e-2, which can flip a decision that sits on a threshold.

The pipeline therefore uses a reduced precision only for the attack's *queries*: every
decision that is reported (clean and final prediction, confidence, success, labels kept) is
re-read in fp32 by :func:`calib.attacks.base.reevaluate` on the bare model, and
``benchmarks/precision_check.py`` shows on the attacked set that clean predictions agree with
fp32 and that Table 1 moves less than its 95% intervals before a profile turns it on.

"fp32" means fp32 on a GPU too: PyTorch lets cuDNN run convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``), which on an Ampere-or-newer GPU would make an "fp32"
ResNet's forward a TF32 one. On CUDA :func:`with_precision` therefore turns TF32 off around
fp32 forwards; on a CPU it returns the model untouched.

Where the requested precision is not native (bf16 on an AVX2-only CPU runs ~20x *slower* in
emulation; TF32 off CUDA does not exist) :func:`resolve_precision` falls back to fp32 and
says why, so a profile that asks for bf16 still runs everywhere.

Example:
    >>> chosen = resolve_precision("bf16", torch.device("cpu"))
    >>> chosen.used, chosen.reason            # ("bf16", "...") or ("fp32", "... not native ...")
    >>> fast = with_precision(model, chosen)   # queries in chosen.used, float32 logits out
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from calib.checks import check_choice

__all__ = ["PRECISIONS", "Precision", "PrecisionModel", "bf16_native", "resolve_precision",
           "tf32_allowed", "tf32_matmuls", "with_precision"]

#: What attack queries may run in: full fp32, bf16 autocast, or TF32 matmuls (CUDA only).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "tf32")


@dataclass(frozen=True)
class Precision:
    """A precision request and what it resolved to on a device.

    Attributes:
        requested: the name asked for (one of :data:`PRECISIONS`).
        used: what queries actually run in ("fp32" after a fallback).
        device_type: "cpu" or "cuda".
        reason: one sentence saying why ``used`` was chosen (recorded with the results).
    """

    requested: str
    used: str
    device_type: str
    reason: str

    @property
    def fell_back(self) -> bool:
        return self.used != self.requested


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (not in a slow emulation).

    CPU: AVX-512 BF16 or AMX tiles (oneDNN's bf16 kernels); CUDA: compute capability 8.0+.
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device | str, *, warn: bool = True
                      ) -> Precision:
    """What ``precision`` becomes on ``device``: itself where native, else fp32 (with a reason).

    Args:
        precision: one of :data:`PRECISIONS`.
        device: where the model runs.
        warn: emit a ``UserWarning`` when falling back.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS` (before any work).
    """
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision == "fp32":
        if device.type == "cuda":
            return Precision("fp32", "fp32", "cuda", "fp32 requested (TF32 off in matmuls and "
                             "cuDNN convolutions)")
        return Precision("fp32", "fp32", device.type, "fp32 requested")
    if precision == "bf16":
        if bf16_native(device):
            return Precision("bf16", "bf16", device.type,
                             f"bf16 autocast: native bf16 on this {device.type}")
        reason = (f"bf16 requested but this {device.type} has no native bf16 (CPU: AVX-512 BF16 "
                  "or AMX; GPU: compute capability 8.0+); emulated bf16 is slower than fp32, "
                  "so queries run in fp32")
    else:  # tf32
        if device.type == "cuda" and bf16_native(device):
            return Precision("tf32", "tf32", "cuda", "TF32 matmuls and convolutions on this GPU")
        reason = f"tf32 requested but TF32 exists only on CUDA GPUs of compute capability 8.0+ " \
                 f"(device: {device.type}); queries run in fp32"
    if warn:
        warnings.warn(reason, UserWarning, stacklevel=2)
    return Precision(precision, "fp32", device.type, reason)


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions for the block; restore after.

    PyTorch's defaults differ between the two (matmuls off, cuDNN convolutions on), so both
    flags are set explicitly.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tf32_matmuls() -> contextlib.AbstractContextManager[None]:
    """Allow TF32 in CUDA matmuls and cuDNN convolutions for the block; restore after."""
    return tf32_allowed(True)


class PrecisionModel(nn.Module):
    """``model`` whose forward runs in a chosen precision and returns float32 logits.

    bf16 (autocast), TF32, or strict fp32 on CUDA (TF32 off, against cuDNN's default).
    Gradients flow through it (autocast records the casts), so white-box attacks can use it
    too; only the forward runs under the setting, the backward in PyTorch's default.
    Shapes: images (N, C, H, W) -> logits (N, K), float32.
    """

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        super().__init__()
        if precision.used == "fp32" and precision.device_type != "cuda":
            raise ValueError("PrecisionModel wraps a reduced precision (or fp32 on CUDA); use "
                             "the model itself for fp32 on a CPU")
        self.model = model
        self.precision = precision

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.precision.used == "bf16":
            with torch.autocast(self.precision.device_type, dtype=torch.bfloat16):
                return self.model(images).float()
        with tf32_allowed(self.precision.used == "tf32"):
            return self.model(images).float()


def with_precision(model: nn.Module, precision: Precision) -> nn.Module:
    """``model`` itself for fp32 off CUDA, else a :class:`PrecisionModel` around it."""
    if precision.used == "fp32" and precision.device_type != "cuda":
        return model
    return PrecisionModel(model, precision)
