"""Triton codebook (AQLM) kernels, under the interpreter on CPU, against a float64
dequantization written here and against the torch reference."""

import pytest
import torch

from quant.formats import CodebookWeight
from quant.kernels import ops, tuning
from quant.kernels.codebook_matmul import (codebook_dequant, codebook_dequant_matmul,
                                           codebook_gemv)
from quant.kernels.reference import matmul_reference
from tests.kernels.numerics import DEVICE, UNIT_ROUNDOFF

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def random_weight(out_f, in_f, m, nbits, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << nbits, (out_f, in_f // g, m), generator=gen)
    books = torch.randn(m, 1 << nbits, g, generator=gen) * 0.1
    scales = torch.rand(out_f, generator=gen) + 0.5
    return CodebookWeight.from_parts(codes, books, scales).to(DEVICE)


def dense64(weight) -> torch.Tensor:
    """W [N, K] in float64 by an explicit loop over codebooks (independent of dequantize)."""
    codes = weight.codes.cpu().long() % (1 << weight.nbits)
    books = weight.codebooks.cpu().double()[:, :, 0, :]
    w = torch.zeros(codes.shape[0], codes.shape[1], books.shape[2], dtype=torch.float64)
    for m in range(codes.shape[2]):
        w += books[m][codes[:, :, m]]
    return w.reshape(codes.shape[0], -1) * weight.scales.cpu().double().view(-1, 1)


SHAPES = [  # (N, K, M, B, g): N and groups not multiples of the tiles
    (100, 96, 2, 8, 8), (72, 160, 1, 8, 4), (40, 128, 1, 16, 8), (24, 64, 3, 6, 16),
    (33, 48, 1, 10, 2), (50, 96, 2, 8, 6), (30, 45, 1, 8, 3),  # g6, g3: masked lanes
]


@pytest.mark.parametrize("n,k,m,nbits,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gemv_and_dequant_matmul_match_float64(n, k, m, nbits, g, dtype):
    weight = random_weight(n, k, m, nbits, g)
    w = dense64(weight)
    for rows, kernel in ((3, codebook_gemv), (20, codebook_dequant_matmul)):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        _, tile = tuning.choose_codebook(DEVICE, n, k // g, rows)
        y = kernel(x.to(DEVICE), weight, tile)
        assert y.dtype == dtype and y.shape == (rows, n)
        ref = x.double() @ w.t()
        bound = x.double().abs() @ w.abs().t() + ref.abs()
        err = (y.double().cpu() - ref).abs()
        slack = 1 if dtype == torch.float32 else 2  # W rounded to x's dtype on the gemm path
        assert (err <= slack * 2 * UNIT_ROUNDOFF[dtype] * bound + 1e-6).all(), kernel.__name__


@pytest.mark.parametrize("g", [8, 6])
def test_dequant_kernel_equals_the_format_reference_exactly_in_fp32(g):
    weight = random_weight(100, 96, 2, 8, g)
    _, tile = tuning.choose_codebook(DEVICE, 100, 96 // g, 64)
    dense = codebook_dequant(weight, torch.float32, tile)
    assert torch.allclose(dense.cpu(), weight.dequantize(torch.float32).cpu(), rtol=1e-6, atol=1e-7)


def test_dispatch_routes_codebook_layers(monkeypatch):
    weight = random_weight(40, 64, 2, 8, 8)
    x = torch.randn(2, 64).to(DEVICE)
    assert ops.select(weight, x, "torch")[0] == "torch"
    assert ops.select(weight, x, "triton")[1] is codebook_gemv
    big = torch.randn(32, 64).to(DEVICE)
    assert ops.select(weight, big, "triton")[1] is codebook_dequant_matmul
    y = ops.linear(x, weight, preference="triton")
    assert torch.allclose(y, matmul_reference(x, weight), atol=1e-5, rtol=1e-4)
    odd = random_weight(40, 60, 2, 8, 6).to(DEVICE)  # in-group 6 (aqlm's wide layers)
    assert ops.select(odd, x[:, :60], "triton")[1] is codebook_gemv
    y = ops.linear(x[:, :60], odd, preference="triton")
    assert torch.allclose(y, matmul_reference(x[:, :60], odd), atol=1e-5, rtol=1e-4)
