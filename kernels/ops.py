"""Dispatch of quantized linear layers to an implementation (DESIGN.md §4).

For now the torch reference is the only implementation: dequantize, then a dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for any quantized weight format `weight`."""
    w = weight.dequantize(torch.float32).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
