"""Torch references of the kernels, with the kernels' signatures: the CPU path and the
test oracle. Importing this module needs no Triton."""

from __future__ import annotations

import torch


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w^T for a dense fp32 w [N, K]: an fp32 matmul, result in x.dtype."""
    return (x.float() @ w.t()).to(x.dtype)


def matmul_reference(x: torch.Tensor, weight, config=None) -> torch.Tensor:
    """x [M, K] @ W^T of any weight format: fp32 dequantize and fp32 matmul, result in x.dtype."""
    return dense_matmul(x, weight.dequantize(torch.float32))


def dequant_reference(weight, dtype: torch.dtype, config=None) -> torch.Tensor:
    """W^T [K, N] of any weight format in `dtype`."""
    return weight.dequantize(torch.float32).t().to(dtype)
