"""Output buffers of every kernel launcher, in one place so tests can poison them all
(call through the module: `buffers.alloc(...)`)."""

from __future__ import annotations

import torch

from quant.kernels.tuning import interpreting


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores a `dtype` result in: fp32 for bf16 under the interpreter,
    whose fp32 -> bf16 cast truncates instead of rounding (the launcher casts after)."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype

