"""Triton codebook (AQLM) kernels, under the interpreter on CPU, against a float64
dequantization written here and against the torch reference."""

import dataclasses

import pytest
import torch

from quant.formats import CodebookWeight
from quant.kernels import ops, tuning
from quant.kernels.codebook_matmul import (code_layout, codebook_dequant,
                                           codebook_dequant_matmul, codebook_gemv,
                                           codebook_matmul, kernel_codes)
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
    (20, 32, 2, 16, 8), (12, 32, 4, 12, 4),  # codes read as 32- and 64-bit words
]


def test_codes_are_read_as_words_where_they_fill_one():
    """(code storage bits, word bits): the M codes of a group in one 8/16/32/64-bit load
    (3x6 has no such word and is read code by code; SHAPES covers both ways)."""
    assert [code_layout(m, b) for m, b in [(1, 8), (2, 8), (1, 16), (4, 8), (4, 12), (3, 6)]] \
        == [(8, 8), (8, 16), (16, 16), (8, 32), (16, 64), (8, None)]
    weight = random_weight(4, 16, 2, 8, 8)
    words = kernel_codes(weight)
    assert words.dtype == torch.int16 and words.data_ptr() == weight.codes.data_ptr()


def assert_matches_float64(y, x, w, dtype, name):
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[0]), name
    ref = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t() + ref.abs()
    err = (y.double().cpu() - ref).abs()
    slack = 1 if dtype == torch.float32 else 2  # W rounded to x's dtype before the dot
    assert (err <= slack * 2 * UNIT_ROUNDOFF[dtype] * bound + 1e-6).all(), name


# (rows, kernel): each kernel at the row counts dispatch gives it, and a tile's worth more
KERNEL_ROWS = [(1, codebook_gemv), (3, codebook_gemv), (3, codebook_matmul),
               (20, codebook_matmul), (20, codebook_dequant_matmul)]


@pytest.mark.parametrize("n,k,m,nbits,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_kernel_matches_float64(n, k, m, nbits, g, dtype):
    weight = random_weight(n, k, m, nbits, g)
    w = dense64(weight)
    for rows, kernel in KERNEL_ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        _, tile = tuning.choose(DEVICE, "codebook", f"{m}x{nbits}g{g}", n, k // g, rows)
        y = kernel(x.to(DEVICE), weight, tile)
        assert_matches_float64(y, x, w, dtype, f"{kernel.__name__} rows {rows}")


@pytest.mark.parametrize("kernel", [codebook_gemv, codebook_matmul])
@pytest.mark.parametrize("split", [2, 3, 4])
def test_split_code_groups_add_up(kernel, split):
    """10 code groups in 5 steps of 2: slices of 3 + 2, 2 + 2 + 1, and 2 + 2 + 1 + 0 steps
    (the last slice empty) each still count every group once."""
    weight = random_weight(36, 40, 2, 8, 4)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    tile = tuning.Tile(block_m=16, block_n=16, block_k=2, split=split)
    y = kernel(x.to(DEVICE), weight, tile)
    assert_matches_float64(y, x, dense64(weight), torch.float32, f"split {split}")


def test_split_fills_the_gpu_with_two_steps_per_slice_at_least():
    cpu = torch.device("cpu")
    tile = tuning.Tile(block_n=64, block_k=16, split=0)  # 2 x 64 programs on the CPU
    assert tuning.resolve_split(tile, 1, 4096, 512, cpu).split == 2   # 64 row blocks
    assert tuning.resolve_split(tile, 1, 11008, 512, cpu).split == 1  # 172 already
    assert tuning.resolve_split(tile, 1, 256, 1376, cpu).split == 32
    assert tuning.resolve_split(tile, 1, 256, 32, cpu).split == 1     # 2 steps in all
    fixed = dataclasses.replace(tile, split=3)
    assert tuning.resolve_split(fixed, 1, 64, 512, cpu) == fixed


@pytest.mark.parametrize("g", [8, 6])
def test_dequant_kernel_equals_the_format_reference_exactly_in_fp32(g):
    weight = random_weight(100, 96, 2, 8, g)
    _, tile = tuning.choose(DEVICE, "codebook", f"2x8g{g}", 100, 96 // g, 64)
    dense = codebook_dequant(weight, torch.float32, tile)
    assert torch.allclose(dense.cpu(), weight.dequantize(torch.float32).cpu(), rtol=1e-6, atol=1e-7)


def test_dispatch_routes_codebook_layers(monkeypatch):
    weight = random_weight(40, 64, 2, 8, 8)
    x = torch.randn(2, 64).to(DEVICE)
    assert ops.select(weight, x, "torch")[0] == "torch"
    for rows, kernel in ((1, codebook_gemv), (2, codebook_matmul), (64, codebook_matmul),
                         (65, codebook_dequant_matmul)):
        assert ops.select(weight, torch.randn(rows, 64).to(DEVICE), "triton")[1] is kernel
    y = ops.linear(x, weight, preference="triton")
    assert torch.allclose(y, matmul_reference(x, weight), atol=1e-5, rtol=1e-4)
    odd = random_weight(40, 60, 2, 8, 6).to(DEVICE)  # in-group 6 (aqlm's wide layers)
    assert ops.select(odd, x[:1, :60], "triton")[1] is codebook_gemv
    y = ops.linear(x[:, :60], odd, preference="triton")
    assert torch.allclose(y, matmul_reference(x[:, :60], odd), atol=1e-5, rtol=1e-4)
