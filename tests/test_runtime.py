"""calib.runtime: device choice, seeding, eval mode and batched prediction."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from calib import runtime


class _Fails(nn.Module):
    """A forward pass that raises on its second batch (after eval mode was entered)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.dropout = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert not self.training and not self.dropout.training
        if self.calls == 2:
            raise RuntimeError("forward failed")
        return self.dropout(self.fc(x.flatten(1)))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    runtime.seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    runtime.seed_everything(3)
    second = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_resolve_device() -> None:
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime.resolve_device("cuda:0")


def test_model_device() -> None:
    assert runtime.model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert runtime.model_device(nn.Flatten()) == torch.device("cpu")


def test_eval_mode_restores_mixed_flags() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    before = runtime.training_flags(model)
    with runtime.eval_mode(model):
        assert not any(runtime.training_flags(model))
    assert runtime.training_flags(model) == before


def test_eval_mode_restores_after_error() -> None:
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), runtime.eval_mode(model):
        raise RuntimeError("boom")
    assert model.training


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_predict_logits_matches_forward_in_any_batch_size(batch_size: int) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5)).train()
    x = _images(7)
    logits = runtime.predict_logits(model, x, batch_size=batch_size)
    assert model.training and model[2].training
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x))


def test_predict_logits_reads_a_dataset_in_order_without_touching_the_global_rng() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = _images(10).double()
    data = TensorDataset(x, torch.zeros(10, dtype=torch.int64))
    torch.manual_seed(0)
    logits = runtime.predict_logits(model, data, batch_size=4)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
    assert logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x).float())


def test_predict_logits_restores_the_modes_when_the_forward_raises() -> None:
    model = _Fails().train()
    model.dropout.eval()
    with pytest.raises(RuntimeError, match="forward failed"):
        runtime.predict_logits(model, _images(4), batch_size=2)
    assert model.calls == 2
    assert model.training and not model.dropout.training
    assert torch.is_grad_enabled()
