"""Reductions split over several programs (the int kernel's split-K, the codebook kernels'
split-J), finished inside the kernel instead of by extra launches.

Each of a tile's SPLIT programs stores its fp32 partial sum in its slice of `partials`,
then counts itself in the tile's counter; the program that brings the count to SPLIT adds
every slice in slice order (so the result does not depend on which program finished
last), stores the tile in the output dtype and puts the counter back to zero. At decode
sizes the two launches this saves (a sum and a cast, a few µs each) are a large part of a
~15 µs layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from quant.kernels import buffers


@triton.jit
def store_tile(acc, out_ptr, offsets, mask, partials_ptr, counters_ptr, tile, split_id,
               slice_stride, SPLIT: tl.constexpr):
    """Store the fp32 tile `acc` at out_ptr + offsets, or with SPLIT > 1 its partial sum,
    and if it is the tile's last slice to finish, the sum of all slices."""
    if SPLIT == 1:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partials_ptr + split_id * slice_stride + offsets, acc, mask=mask)
        tl.debug_barrier()  # all of this program's partial is written before it is counted
        finished = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if finished == SPLIT - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT):  # .cg: read the other SMs' slices from L2
                total += tl.load(partials_ptr + s * slice_stride + offsets, mask=mask,
                                 other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters_ptr + tile, 0)  # ready for the next launch


class SplitBuffers(NamedTuple):
    """A split kernel's output arguments, in its argument order. At SPLIT 1 the kernel uses
    only `out`, and `partials` and `counters` are `out` too (nothing else is allocated)."""

    out: torch.Tensor        # [M, N] in the kernel's store dtype
    partials: torch.Tensor   # [SPLIT, M, N] fp32
    counters: torch.Tensor   # int32 zeros, one per output tile


def split_buffers(split: int, m: int, n: int, tiles: int, dtype: torch.dtype,
                  device) -> SplitBuffers:
    """Buffers for a kernel computing an [M, N] result in `tiles` output tiles, its
    reduction in `split` slices."""
    out = buffers.alloc((m, n), buffers.store_dtype(dtype), device)
    if split == 1:
        return SplitBuffers(out, out, out)
    partials = buffers.alloc((split, m, n), torch.float32, device)
    return SplitBuffers(out, partials, tile_counters(tiles, device))


_COUNTERS: dict = {}


def tile_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """`tiles` int32 zeros. The kernels leave their counters at zero, so on a GPU one buffer
    per stream serves every launch without a memset (one per stream, so that kernels
    running concurrently on two streams never share a counter)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # a graph replays the capture's memset; a buffer zeroed inside a capture would
        # not be zero outside it, so it is not kept
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        counters = _COUNTERS[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32,
                                                device=device)
    return counters


def finish(buffers_: SplitBuffers, dtype: torch.dtype) -> torch.Tensor:
    """The [M, N] result in `dtype` (the store dtype differs only for bf16 under the
    interpreter)."""
    return buffers_.out.to(dtype)

