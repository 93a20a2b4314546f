import pytest
import torch

from quant.kernels import buffers


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element a kernel fails to write fails."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(buffers, "alloc", alloc)
