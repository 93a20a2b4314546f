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


def split_outputs(split: int, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [split, M, N] output of a kernel whose reduction runs in `split` slices: fp32
    partial sums when the slices are added afterwards (`add_splits`)."""
    return alloc((split, m, n), torch.float32 if split > 1 else store_dtype(dtype), device)


def add_splits(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [M, N] result in `dtype` from a `split_outputs` buffer the kernel has filled."""
    return (out[0] if out.shape[0] == 1 else out.sum(0)).to(dtype)
