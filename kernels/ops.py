"""Dispatch of quantized linear layers (DESIGN.md §4): an explicit preference
(`auto | torch | triton`) and a table format -> implementations; `tuning.choose` picks
one per call from the format's regime for the number of rows (and tuned data where there
is some).

`auto` runs Triton on CUDA tensors and the torch reference elsewhere; `triton` on CPU
runs the kernels under the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""

from __future__ import annotations

import functools

import torch

from quant.errors import ConfigError
from quant.kernels import reference, tuning

PREFERENCES = ("auto", "torch", "triton")


@functools.cache
def _triton_table() -> dict:
    """{format: {implementation name: callable(x2d, weight, config)}}."""
    from quant.kernels.codebook_matmul import (codebook_dequant_matmul, codebook_gemv,
                                               codebook_matmul)
    from quant.kernels.int_dequant import dequant_matmul
    from quant.kernels.int_matmul import int_matmul

    return {
        "int": {"fused": int_matmul, "dequant": dequant_matmul},
        "codebook": {"gemv": codebook_gemv, "fused": codebook_matmul,
                     "dequant": codebook_dequant_matmul},
    }


def implementations(fmt: str) -> dict:
    """{name: callable(x2d, weight, config)}: the Triton implementations of a format."""
    return _triton_table()[fmt]


def _has_kernels(weight) -> bool:
    return weight.format_name in _triton_table()


def check_preference(preference: str) -> str:
    if preference not in PREFERENCES:
        raise ConfigError(f"kernel preference must be one of {', '.join(PREFERENCES)} "
                          f"(got {preference!r})")
    return preference


def _triton_runnable(x: torch.Tensor) -> bool:
    return x.is_cuda or tuning.interpreting()


def select(weight, x: torch.Tensor, preference: str = "auto"):
    """(name, callable(x2d, weight, config), config) that computes x2d @ W^T."""
    fmt, rows = weight.format_name, x.numel() // x.shape[-1]
    if preference == "torch" or (preference == "auto" and not x.is_cuda):
        return "torch", reference.matmul_reference, None
    if not _has_kernels(weight):
        if preference == "auto":
            return "torch", reference.matmul_reference, None
        raise ConfigError(f"no Triton kernel runs this {fmt!r} layer ({weight.name}); use "
                          "the torch kernels (kernels='torch' or 'auto')")
    if not _triton_runnable(x):
        raise ConfigError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set "
                          "before importing quant to run them on the CPU")
    scheme, steps = weight.tuning_key()
    name, tile = tuning.choose(x.device, fmt, scheme, weight.out_features, steps, rows)
    return name, _triton_table()[fmt][name], tile


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           preference: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias for any quantized weight format `weight`; differentiable in x
    (the quantized tensors are frozen)."""
    if torch.is_grad_enabled() and x.requires_grad:
        y = QuantizedMatmul.apply(x, weight, preference)
    else:
        y = _matmul(x, weight, preference)
    return add_bias(y, bias)


def _matmul(x: torch.Tensor, weight, preference: str) -> torch.Tensor:
    _, impl, config = select(weight, x, preference)
    y = impl(x.reshape(-1, x.shape[-1]), weight, config)
    return y.reshape(*x.shape[:-1], weight.out_features)


class QuantizedMatmul(torch.autograd.Function):
    """x @ W^T whose backward dequantizes W again for grad_x = grad_y @ W, instead of
    autograd keeping a dense copy of every quantized weight for the whole backward (LoRA on
    a quantized model would otherwise hold the model in full precision)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, preference: str) -> torch.Tensor:
        ctx.weight = weight
        return _matmul(x, weight, preference)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dense = ctx.weight.dequantize(torch.float32)
        return reference.dense_matmul(grad, dense.t()), None, None


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)
