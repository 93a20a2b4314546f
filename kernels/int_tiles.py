"""Triton device functions that dequantize a tile of an `IntWeight` in registers.

Shared by the fused matmul and the dequantize kernel, so the bit layout (DESIGN.md: one
little-endian bitstream per column along K for `qweight`, per group row along N for
`qzeros`) is read in exactly one place on the GPU.
"""

import triton
import triton.language as tl


@triton.jit
def unpack_stream(ptr, index, row_offset, row_stride, mask, BITS: tl.constexpr):
    """Values `index` (any shape) of bitstreams laid along the rows of an int32 array:
    value i of the stream starting at `row_offset` sits in words i*BITS//32 (and the next
    one when it straddles), `row_stride` elements apart."""
    bit = index * BITS
    word = bit // 32
    offset = (bit % 32).to(tl.uint32)
    low = tl.load(ptr + row_offset + word * row_stride, mask=mask, other=0)
    straddles = mask & ((bit % 32) + BITS > 32)
    high = tl.load(ptr + row_offset + (word + 1) * row_stride, mask=straddles, other=0)
    low = low.to(tl.uint32, bitcast=True) >> offset
    # `high` is 0 unless the value straddles, where 0 < 32 - offset < BITS.
    high = high.to(tl.uint32, bitcast=True) << ((32 - offset) % 32)
    return ((low | high) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def unpack_aligned_rows(ptr, k_start, rn, N, K, n_mask, BLOCK_K: tl.constexpr,
                        BITS: tl.constexpr):
    """[BLOCK_K, BLOCK_N] values of `qweight` rows k_start.. for widths dividing 32: each
    word is loaded once and split by shifts (k_start is a multiple of 32 // BITS)."""
    PER_WORD: tl.constexpr = 32 // BITS
    words_k = k_start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)      # [BK/PW]
    in_k = words_k < (K + PER_WORD - 1) // PER_WORD
    words = tl.load(ptr + words_k[:, None] * N + rn[None, :],
                    mask=in_k[:, None] & n_mask[None, :], other=0)
    shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)                 # [PW]
    values = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None])
    values = values & ((1 << BITS) - 1)                                    # [BK/PW, PW, BN]
    return tl.reshape(values, [BLOCK_K, values.shape[2]]).to(tl.int32)    # [BK, BN]


@triton.jit
def dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k_start, rn, N, K,
                 BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 HAS_G_IDX: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of W^T (rows k_start.. of K, columns rn of N);
    rows past K and columns past N come out as 0."""
    rk = k_start + tl.arange(0, BLOCK_K)                                   # [BK]
    k_mask, n_mask = rk < K, rn < N
    tile_mask = k_mask[:, None] & n_mask[None, :]
    ZERO_WORDS = (N * BITS + 31) // 32                                     # qzeros row length

    # -- integers q [BK, BN]
    if 32 % BITS == 0:
        q = unpack_aligned_rows(qweight_ptr, k_start, rn, N, K, n_mask, BLOCK_K, BITS)
    else:
        q = unpack_stream(qweight_ptr, rk[:, None], rn[None, :], N, tile_mask, BITS)

    # -- group of each row, then its scale and zero point
    if HAS_G_IDX:
        group = tl.load(g_idx_ptr + rk, mask=k_mask, other=0)              # [BK]
    else:
        group = rk // GROUP_SIZE
    if (not HAS_G_IDX) and (GROUP_SIZE % BLOCK_K == 0):
        # the whole tile lies in one group: one [1, BN] row of scales and zeros
        g = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + rn, mask=n_mask, other=0.0)[None, :]
        zero = unpack_stream(qzeros_ptr, rn, g * ZERO_WORDS, 1, n_mask, BITS)[None, :]
    else:
        scale = tl.load(scales_ptr + group[:, None] * N + rn[None, :], mask=tile_mask, other=0.0)
        zero = unpack_stream(qzeros_ptr, rn[None, :], group[:, None] * ZERO_WORDS, 1,
                             tile_mask, BITS)
    w = (q - zero).to(tl.float32) * scale.to(tl.float32)
    return tl.where(tile_mask, w, 0.0)
