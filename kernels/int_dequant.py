"""W^T [K, N] of an `IntWeight` in the activation dtype, for a dense matmul (cuBLAS)
where that measures faster than the fused kernel (large batches)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import buffers
from quant.kernels.int_tiles import dequant_tile
from quant.kernels.tuning import DEQUANT_TILE, Tile


@triton.jit
def _int_dequant_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    k_start = tl.program_id(0) * BLOCK_K
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN]
    rk = k_start + tl.arange(0, BLOCK_K)                                  # [BK]
    w = dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k_start, rn, N, K,
                     BLOCK_K, BITS, GROUP_SIZE, HAS_G_IDX)                # [BK, BN]
    tl.store(out_ptr + rk[:, None] * N + rn[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rk[:, None] < K) & (rn[None, :] < N))


def int_dequant(weight, dtype: torch.dtype, config: Tile = DEQUANT_TILE) -> torch.Tensor:
    """W^T as a dense [K, N] tensor of `dtype`."""
    K, N = weight.in_features, weight.out_features
    out = buffers.alloc((K, N), buffers.store_dtype(dtype), weight.qweight.device)
    g_idx = weight.g_idx if weight.g_idx is not None else weight.qweight
    grid = (triton.cdiv(K, config.block_k), triton.cdiv(N, config.block_n))
    _int_dequant_kernel[grid](
        weight.qweight, weight.qzeros, weight.scales, g_idx, out, N, K,
        BITS=weight.bits, GROUP_SIZE=K if weight.group_size == -1 else weight.group_size,
        HAS_G_IDX=weight.g_idx is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out.to(dtype)


def dequant_matmul(x: torch.Tensor, weight, config: Tile | None = None) -> torch.Tensor:
    """Dequantize with the kernel, then a dense matmul (cuBLAS on a GPU)."""
    return x @ int_dequant(weight, x.dtype)
