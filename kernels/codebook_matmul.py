"""y = x @ W^T for a `CodebookWeight` W (AQLM), two ways:

- `codebook_gemv` (decode, a few rows): each program owns BLOCK_N output rows of one
  activation row and walks the input in BLOCK_J code groups, gathering each code's
  codeword straight from the codebook (Kx8 codebooks stay in L1/shared memory, a 1x16
  codebook's 1 MiB in L2) and reducing it against the matching slice of x: the weight
  is never materialised.
- `codebook_dequant_matmul` (prefill): a kernel writes the dense W in the activation
  dtype, then one dense matmul (cuBLAS on a GPU).
Accumulation is fp32. An in-group size g that is not a power of two (1x8 g3) runs in
lanes of the next power of two, the extra ones masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import buffers
from quant.kernels.tuning import CodebookTile


@triton.jit
def _codebook_vectors(codes_ptr, books_ptr, rn, rj, N, J, m,
                      NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, G: tl.constexpr,
                      G_PAD: tl.constexpr):
    """[BN, BJ, G_PAD] fp32 codewords of codebook m for output rows rn and code groups rj
    (lanes from G on are 0)."""
    mask = (rn[:, None] < N) & (rj[None, :] < J)
    code = tl.load(codes_ptr + (rn[:, None] * J + rj[None, :]) * NUM_CODEBOOKS + m,
                   mask=mask, other=0).to(tl.int32) & ((1 << NBITS) - 1)   # signed on disk
    rg = tl.arange(0, G_PAD)
    row = (m << NBITS) + code
    return tl.load(books_ptr + row[:, :, None] * G + rg[None, None, :],
                   mask=rg[None, None, :] < G, other=0.0).to(tl.float32)


@triton.jit
def _codebook_gemv_kernel(
    x_ptr, codes_ptr, books_ptr, scales_ptr, out_ptr,
    M, N, J, stride_xm, stride_om,
    NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_n, row = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                            # [BN]
    rg = tl.arange(0, G_PAD)
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for j_start in range(0, J, BLOCK_J):
        rj = j_start + tl.arange(0, BLOCK_J)                                # [BJ]
        x = tl.load(x_ptr + row * stride_xm + rj[:, None] * G + rg[None, :],
                    mask=(rj[:, None] < J) & (rg[None, :] < G),
                    other=0.0).to(tl.float32)                               # [BJ, G_PAD]
        for m in tl.static_range(NUM_CODEBOOKS):
            vectors = _codebook_vectors(codes_ptr, books_ptr, rn, rj, N, J, m,
                                        NUM_CODEBOOKS, NBITS, G, G_PAD)
            acc += tl.sum(vectors * x[None, :, :], axis=2)
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + row * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _codebook_dequant_kernel(
    codes_ptr, books_ptr, scales_ptr, out_ptr, N, J,
    NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    rg = tl.arange(0, G_PAD)
    w = tl.zeros([BLOCK_N, BLOCK_J, G_PAD], dtype=tl.float32)
    for m in tl.static_range(NUM_CODEBOOKS):
        w += _codebook_vectors(codes_ptr, books_ptr, rn, rj, N, J, m, NUM_CODEBOOKS, NBITS, G,
                               G_PAD)
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    w = w * scale[:, None, None]
    offsets = rn[:, None, None] * (J * G) + rj[None, :, None] * G + rg[None, None, :]
    mask = (rn[:, None, None] < N) & (rj[None, :, None] < J) & (rg[None, None, :] < G)
    tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=mask)


def shape_constexprs(num_codebooks: int, nbits: int, in_group: int) -> dict:
    """The kernels' compile-time codebook shape; a group runs in G_PAD lanes."""
    return {"NUM_CODEBOOKS": num_codebooks, "NBITS": nbits, "G": in_group,
            "G_PAD": triton.next_power_of_2(in_group)}


def _check(x: torch.Tensor, weight) -> torch.Tensor:
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} columns, the weight expects {weight.in_features}")
    return x if x.stride(1) == 1 else x.contiguous()


def codebook_gemv(x: torch.Tensor, weight, config: CodebookTile) -> torch.Tensor:
    """[M, K] activations (M small) times the CodebookWeight's W^T -> [M, N] in x.dtype."""
    x = _check(x, weight)
    M, N = x.shape[0], weight.out_features
    J = weight.in_features // weight.in_group_size
    out = buffers.alloc((M, N), buffers.store_dtype(x.dtype), x.device)
    grid = (triton.cdiv(N, config.block_n), M)
    _codebook_gemv_kernel[grid](
        x, weight.codes, weight.codebooks, weight.scales, out, M, N, J, x.stride(0), N,
        **shape_constexprs(weight.num_codebooks, weight.nbits, weight.in_group_size),
        BLOCK_N=config.block_n, BLOCK_J=config.block_j, num_warps=config.num_warps)
    return out.to(x.dtype)


def codebook_dequant(weight, dtype: torch.dtype, config: CodebookTile) -> torch.Tensor:
    """The dense W [N, K] in `dtype`."""
    N, K = weight.out_features, weight.in_features
    J = K // weight.in_group_size
    out = buffers.alloc((N, K), buffers.store_dtype(dtype), weight.codes.device)
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(J, config.block_j))
    _codebook_dequant_kernel[grid](
        weight.codes, weight.codebooks, weight.scales, out, N, J,
        **shape_constexprs(weight.num_codebooks, weight.nbits, weight.in_group_size),
        BLOCK_N=config.block_n, BLOCK_J=config.block_j, num_warps=config.num_warps)
    return out.to(dtype)


def codebook_dequant_matmul(x: torch.Tensor, weight, config: CodebookTile) -> torch.Tensor:
    x = _check(x, weight)
    return x @ codebook_dequant(weight, x.dtype, config).t()
