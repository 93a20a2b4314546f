"""y = x @ W^T for a `CodebookWeight` W (AQLM), three ways:

- `codebook_gemv` (one activation row): each program owns BLOCK_N output rows of one
  activation row and walks its slice of the input in BLOCK_J code groups, gathering each
  code's codeword straight from the codebook (Kx8 codebooks stay in L1/shared memory, a
  1x16 codebook's 1 MiB in L2) and reducing it against the matching slice of x: the
  weight is never materialised.
- `codebook_matmul` (a few rows): the same gather builds a [BLOCK_N, BLOCK_J * g] tile
  of W in registers once, and a tensor-core `tl.dot` applies it to BLOCK_M rows, so a
  batch of 16 costs about one row's codebook reads instead of 16.
- `codebook_dequant_matmul` (prefill): a kernel writes the dense W in the activation
  dtype, then one dense matmul (cuBLAS on a GPU).
Accumulation is fp32. The two gathering kernels can split the code groups into SPLIT_J
slices (fp32 partial sums, added by each tile's last program: splits.py) so that small
layers fill the GPU. A group's M codes are read with one load where they fill a word (2x8:
one int16). An in-group size g that is not a power of two (1x8 g3) runs in lanes of the
next power of two, the extra ones masked.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quant.formats.codebook_weight import code_dtype
from quant.kernels import buffers, splits
from quant.kernels.int_matmul import dot_dtype
from quant.kernels.tuning import Tile, resolve_split


@triton.jit
def _codewords(books_ptr, code, m, NBITS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr):
    """[BN, BJ, G_PAD] fp32 codewords of codebook m for the codes [BN, BJ] in the low NBITS
    bits of `code` (lanes from G on are 0)."""
    rg = tl.arange(0, G_PAD)
    row = (m << NBITS) + (code & ((1 << NBITS) - 1))     # stored signed: keep the low bits
    return tl.load(books_ptr + row[:, :, None] * G + rg[None, None, :],
                   mask=rg[None, None, :] < G, other=0.0).to(tl.float32)


@triton.jit
def _weight_tile(codes_ptr, books_ptr, rn, rj, N, J, NUM_CODEBOOKS: tl.constexpr,
                 NBITS: tl.constexpr, CODE_BITS: tl.constexpr, CODE_WORDS: tl.constexpr,
                 G: tl.constexpr, G_PAD: tl.constexpr):
    """[BN, BJ, G_PAD] fp32 tile of W / scale for output rows rn and code groups rj: the sum
    of every codebook's codewords."""
    mask = (rn[:, None] < N) & (rj[None, :] < J)
    groups = rn[:, None] * J + rj[None, :]
    if CODE_WORDS:  # one load brings a group's M codes, CODE_BITS each (see code_layout)
        word = tl.load(codes_ptr + groups, mask=mask, other=0)
        if NUM_CODEBOOKS * CODE_BITS > 32:
            word = word.to(tl.int64)
        else:
            word = word.to(tl.int32)
    w = tl.zeros([rn.shape[0], rj.shape[0], G_PAD], dtype=tl.float32)
    for m in tl.static_range(NUM_CODEBOOKS):
        if CODE_WORDS:
            code = word >> (m * CODE_BITS)
        else:
            code = tl.load(codes_ptr + groups * NUM_CODEBOOKS + m, mask=mask,
                           other=0).to(tl.int32)
        w += _codewords(books_ptr, code, m, NBITS, G, G_PAD)
    return w


@triton.jit
def _split_range(J, BLOCK_J: tl.constexpr, SPLIT_J: tl.constexpr):
    """[begin, end) of this program's code groups (axis 2), in whole BLOCK_J steps."""
    per_split = tl.cdiv(tl.cdiv(J, BLOCK_J), SPLIT_J) * BLOCK_J
    begin = tl.program_id(2) * per_split
    return begin, min(begin + per_split, J)


@triton.jit
def _tile_id():
    """This program's output tile (axes 0 and 1 of the grid; axis 2 is the split)."""
    return tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def _codebook_gemv_kernel(
    x_ptr, codes_ptr, books_ptr, scales_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, J, stride_xm, stride_om, stride_split,
    NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, CODE_BITS: tl.constexpr,
    CODE_WORDS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_J: tl.constexpr,
):
    pid_n, row = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                            # [BN]
    rg = tl.arange(0, G_PAD)
    j_begin, j_end = _split_range(J, BLOCK_J, SPLIT_J)
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for j_start in range(j_begin, j_end, BLOCK_J):
        rj = j_start + tl.arange(0, BLOCK_J)                                # [BJ]
        x = tl.load(x_ptr + row * stride_xm + rj[:, None] * G + rg[None, :],
                    mask=(rj[:, None] < J) & (rg[None, :] < G),
                    other=0.0).to(tl.float32)                               # [BJ, G_PAD]
        w = _weight_tile(codes_ptr, books_ptr, rn, rj, N, J, NUM_CODEBOOKS, NBITS, CODE_BITS,
                         CODE_WORDS, G, G_PAD)
        acc += tl.sum(w * x[None, :, :], axis=2)
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    splits.store_tile(tl.sum(acc, axis=1) * scale, out_ptr, row * stride_om + rn, rn < N,
                      partials_ptr, counters_ptr, _tile_id(), tl.program_id(2), stride_split,
                      SPLIT_J)


@triton.jit
def _codebook_matmul_kernel(
    x_ptr, codes_ptr, books_ptr, scales_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, J, stride_xm, stride_om, stride_split,
    NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, CODE_BITS: tl.constexpr,
    CODE_WORDS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    SPLIT_J: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                # [BN]
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)                # [BM]
    lanes = tl.arange(0, BLOCK_J * G_PAD)             # the tile's input columns, G_PAD per group
    j_begin, j_end = _split_range(J, BLOCK_J, SPLIT_J)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j_start in range(j_begin, j_end, BLOCK_J):
        rj = j_start + tl.arange(0, BLOCK_J)                                # [BJ]
        lane_j, lane_g = j_start + lanes // G_PAD, lanes % G_PAD
        if G == G_PAD:  # contiguous columns: lets the compiler vectorise the load
            cols = j_start * G + lanes
        else:
            cols = lane_j * G + lane_g
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                    mask=(rm[:, None] < M) & (lane_j[None, :] < J) & (lane_g[None, :] < G),
                    other=0.0)                                              # [BM, BJ*G_PAD]
        w = _weight_tile(codes_ptr, books_ptr, rn, rj, N, J, NUM_CODEBOOKS, NBITS, CODE_BITS,
                         CODE_WORDS, G, G_PAD)
        w = tl.reshape(w, [BLOCK_N, BLOCK_J * G_PAD])
        if DOT_DTYPE == tl.float32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)))
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    splits.store_tile(acc * scale[None, :], out_ptr, rm[:, None] * stride_om + rn[None, :],
                      (rm[:, None] < M) & (rn[None, :] < N), partials_ptr, counters_ptr,
                      _tile_id(), tl.program_id(2), stride_split, SPLIT_J)


@triton.jit
def _codebook_dequant_kernel(
    codes_ptr, books_ptr, scales_ptr, out_ptr, N, J,
    NUM_CODEBOOKS: tl.constexpr, NBITS: tl.constexpr, CODE_BITS: tl.constexpr,
    CODE_WORDS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    rg = tl.arange(0, G_PAD)
    w = _weight_tile(codes_ptr, books_ptr, rn, rj, N, J, NUM_CODEBOOKS, NBITS, CODE_BITS,
                     CODE_WORDS, G, G_PAD)
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    w = w * scale[:, None, None]
    offsets = rn[:, None, None] * (J * G) + rj[None, :, None] * G + rg[None, None, :]
    mask = (rn[:, None, None] < N) & (rj[None, :, None] < J) & (rg[None, None, :] < G)
    tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=mask)


WORD_DTYPES = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


@functools.cache  # called on every launch
def code_layout(num_codebooks: int, nbits: int) -> tuple[int, int | None]:
    """(bits a code is stored in, bits of the word holding a group's M codes, or None).
    Where the M codes fill an 8/16/32/64-bit word (1x16, 2x8, 4x8, 2x16), the kernels load
    that word once instead of M narrow loads, and shift each code out of it."""
    code_bits = torch.iinfo(code_dtype(nbits)).bits
    word_bits = num_codebooks * code_bits
    return code_bits, word_bits if word_bits in WORD_DTYPES else None


def kernel_codes(weight) -> torch.Tensor:
    """The codes as the kernels read them: one word per (row, group) where code_layout
    allows it (a view, no copy), else as stored."""
    _, word_bits = code_layout(weight.num_codebooks, weight.nbits)
    codes = weight.codes.contiguous()
    return codes if word_bits is None else codes.view(WORD_DTYPES[word_bits])


@functools.cache  # called on every launch; callers unpack it into their own dict
def shape_constexprs(num_codebooks: int, nbits: int, in_group: int) -> dict:
    """The kernels' compile-time codebook shape; a group runs in G_PAD lanes."""
    code_bits, word_bits = code_layout(num_codebooks, nbits)
    return {"NUM_CODEBOOKS": num_codebooks, "NBITS": nbits, "CODE_BITS": code_bits,
            "CODE_WORDS": word_bits is not None, "G": in_group,
            "G_PAD": triton.next_power_of_2(in_group)}


def _check(x: torch.Tensor, weight) -> torch.Tensor:
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} columns, the weight expects {weight.in_features}")
    return x if x.stride(1) == 1 else x.contiguous()


def _launch_gathering(kernel, x: torch.Tensor, weight, config: Tile, block_m: int,
                      **constexprs) -> torch.Tensor:
    """Run a gathering kernel over a grid of (BLOCK_N rows of W, `block_m` rows of x, code
    group slices) and add up its slices."""
    x = _check(x, weight)
    M, N = x.shape[0], weight.out_features
    J = weight.in_features // weight.in_group_size
    config = resolve_split(config, triton.cdiv(M, block_m), N, J, x.device)
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(M, block_m), config.split)
    out = splits.split_buffers(config.split, M, N, grid[0] * grid[1], x.dtype, x.device)
    kernel[grid](
        x, kernel_codes(weight), weight.codebooks, weight.scales, *out, M, N, J, x.stride(0),
        N, M * N,
        **shape_constexprs(weight.num_codebooks, weight.nbits, weight.in_group_size),
        BLOCK_N=config.block_n, BLOCK_J=config.block_k, SPLIT_J=config.split,
        num_warps=config.num_warps, **constexprs)
    return splits.finish(out, x.dtype)


def codebook_gemv(x: torch.Tensor, weight, config: Tile) -> torch.Tensor:
    """[M, K] activations (M small, best 1) times the CodebookWeight's W^T -> [M, N] in
    x.dtype; each activation row gathers the codewords again."""
    return _launch_gathering(_codebook_gemv_kernel, x, weight, config, 1)


def codebook_matmul(x: torch.Tensor, weight, config: Tile) -> torch.Tensor:
    """[M, K] activations (a few rows) times the CodebookWeight's W^T -> [M, N] in x.dtype,
    on tensor cores, gathering each codeword once per BLOCK_M rows."""
    return _launch_gathering(_codebook_matmul_kernel, x, weight, config, config.block_m,
                             BLOCK_M=config.block_m, DOT_DTYPE=dot_dtype(x.dtype))


def codebook_dequant(weight, dtype: torch.dtype, config: Tile) -> torch.Tensor:
    """The dense W [N, K] in `dtype`."""
    N, K = weight.out_features, weight.in_features
    J = K // weight.in_group_size
    out = buffers.alloc((N, K), buffers.store_dtype(dtype), weight.codes.device)
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(J, config.block_k))
    _codebook_dequant_kernel[grid](
        kernel_codes(weight), weight.codebooks, weight.scales, out, N, J,
        **shape_constexprs(weight.num_codebooks, weight.nbits, weight.in_group_size),
        BLOCK_N=config.block_n, BLOCK_J=config.block_k, num_warps=config.num_warps)
    return out.to(dtype)


def codebook_dequant_matmul(x: torch.Tensor, weight, config: Tile) -> torch.Tensor:
    x = _check(x, weight)
    return x @ codebook_dequant(weight, x.dtype, config).t()
