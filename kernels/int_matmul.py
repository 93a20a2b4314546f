"""y = x @ W^T for an `IntWeight` W, dequantizing tiles in registers (fused).

One kernel serves both regimes: decode (a few rows; thin BLOCK_M = 16 tiles, deep
BLOCK_K, split-K so enough programs stream the weight) and prefill (square tiles on
tensor cores). Accumulation is fp32; tl.dot runs in the activation dtype (fp32 for
bf16 under the interpreter, whose bf16 arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import splits
from quant.kernels.int_tiles import dequant_tile
from quant.kernels.tuning import Tile, fit_block_k, interpreting, resolve_split

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _int_matmul_kernel(
    # tensors
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    # split-K (see splits.py)
    partials_ptr, counters_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om, stride_split,
    # format
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    # -- which output tile and K-slice: grouped ordering keeps a band of x rows in L2
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_m
    pid_n = (pid % (GROUP_M * tiles_n)) // band_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                           # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                           # [BN]

    # -- this program's K-slice, in whole BLOCK_K steps
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        rk = k_start + tl.arange(0, BLOCK_K)                               # [BK]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # [BM, BK]
        w = dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k_start, rn, N, K,
                         BLOCK_K, BITS, GROUP_SIZE, HAS_G_IDX)             # [BK, BN] fp32
        if DOT_DTYPE == tl.float32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE))

    splits.store_tile(acc, out_ptr, rm[:, None] * stride_om + rn[None, :],
                      (rm[:, None] < M) & (rn[None, :] < N), partials_ptr, counters_ptr, pid,
                      pid_k, stride_split, SPLIT_K)


def dot_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def int_matmul(x: torch.Tensor, weight, config: Tile) -> torch.Tensor:
    """[M, K] activations (fp16/bf16/fp32) times the IntWeight's W^T -> [M, N] in x.dtype."""
    # 1. check
    M, K = x.shape
    N = weight.out_features
    if K != weight.in_features:
        raise ValueError(f"x has {K} columns, the weight expects {weight.in_features}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    group_size = K if weight.group_size == -1 else weight.group_size
    config = fit_block_k(config, group_size)  # each K-step reads one row of scales
    config = resolve_split(config, triton.cdiv(M, config.block_m), N, K, x.device)
    g_idx = weight.g_idx if weight.g_idx is not None else weight.qweight  # unused pointer
    # 2. allocate: fp32 partial sums for split-K
    split = config.split
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    out = splits.split_buffers(split, M, N, tiles, x.dtype, x.device)
    # 3. launch
    _int_matmul_kernel[(tiles, split)](
        x, weight.qweight, weight.qzeros, weight.scales, g_idx, *out, M, N, K, x.stride(0), N,
        M * N,
        BITS=weight.bits, GROUP_SIZE=group_size, HAS_G_IDX=weight.g_idx is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, GROUP_M=config.group_m, DOT_DTYPE=dot_dtype(x.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return splits.finish(out, x.dtype)
