"""Kernel tile configurations: data, not code. One table, keyed by (format, regime), holds
the untuned starting points; tuned entries live in `configs/<gpu>.json` (written by
`scripts/bench_kernels.py --tune`) and are loaded explicitly for the GPU in use.

Every quantized matmul is a reduction over the weight's input dimension, in the format's
own steps: input columns for integer weights, code groups for codebook weights. A `Tile`
says how one program walks it; `choose` picks the implementation and tile for a call."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Tile:
    """BLOCK_M activation rows (tensor-core kernels) x BLOCK_N output rows per program,
    stepping BLOCK_K reduction steps at a time; SPLIT slices of the reduction (0: enough to
    fill the GPU), GROUP_M programs sharing a row band (L2 reuse of x)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The regimes of each format by activation rows, as (most rows, regime): decode (one row
# or a few), small batches and prefill.
REGIMES = {
    "int": ((16, "gemv"), (None, "gemm")),
    "codebook": ((1, "gemv"), (64, "batch"), (None, "gemm")),
}
# Untuned starting points (no GPU measurement yet), by (format, regime): (implementation,
# tile). Decode tiles are thin in M and deep in the reduction, split so that a layer with
# few output rows still gives every SM work; the codebook tensor-core kernel gathers each
# codeword once for all rows of a small batch; prefill dequantizes once (or uses square
# tiles) and runs a dense matmul.
DEFAULTS = {
    ("int", "gemv"): ("fused", Tile(16, 64, 128, split=0)),
    ("int", "gemm"): ("fused", Tile(64, 128, 64)),
    ("codebook", "gemv"): ("gemv", Tile(16, 64, 16, split=0)),
    ("codebook", "batch"): ("fused", Tile(16, 64, 16, split=0)),
    ("codebook", "gemm"): ("dequant", Tile(16, 32, 16)),
}
DEQUANT_TILE = Tile(1, 128, 64, num_stages=1)  # the int dequantize kernel's own tile
# The CPU interpreter costs per program step: few, wide tiles, up to these (BLOCK_N, BLOCK_K)
INTERPRETER_CAPS = {"int": (2048, 64), "codebook": (256, 64)}


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def regime(fmt: str, rows: int) -> str:
    for most, name in REGIMES[fmt]:
        if most is None or rows <= most:
            return name
    raise AssertionError("the last regime of every format takes any number of rows")


def rows_bucket(rows: int) -> int:
    for bucket in (1, 2, 4, 8, 16, 32, 64, 128):
        if rows <= bucket:
            return bucket
    return 256


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def load_tuned(path: Path) -> dict:
    """A tuned-config file as {(format, scheme, n, k, rows bucket): (implementation, Tile)},
    k in the format's reduction steps (see `choose`)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {(e["format"], e["scheme"], e["n"], e["k"], e["rows"]): (e["impl"], Tile(**e["config"]))
            for e in data.get("entries", [])}


@functools.cache
def _tuned(device_index: int) -> dict:
    return load_tuned(CONFIG_DIR / f"{gpu_slug(torch.cuda.get_device_name(device_index))}.json")


def tile_for(fmt: str, regime_name: str, device: torch.device, n: int, k: int,
             rows: int) -> tuple[str, Tile]:
    """The untuned (implementation, tile) of a regime for `rows` rows against a weight of
    N output rows and k reduction steps."""
    impl, tile = DEFAULTS[(fmt, regime_name)]
    if device.type != "cuda":
        cap_n, cap_k = INTERPRETER_CAPS[fmt]
        tile = Tile(block_n=min(cap_n, triton_next_pow2(n)),
                    block_k=min(cap_k, triton_next_pow2(k)))
    return impl, dataclasses.replace(tile, block_m=16 if rows <= 16 else 64)


def choose(device: torch.device, fmt: str, scheme: str, n: int, k: int,
           rows: int) -> tuple[str, Tile]:
    """(implementation, tile) for `rows` activation rows against a weight of format `fmt`
    (scheme: its tuning name, e.g. "b4" or "1x16g8"), N output rows and k reduction steps."""
    if device.type == "cuda":
        found = _tuned(device.index or 0).get((fmt, scheme, n, k, rows_bucket(rows)))
        if found:
            return found
    return tile_for(fmt, regime(fmt, rows), device, n, k, rows)


def fit_block_k(tile: Tile, group_size: int) -> Tile:
    """Shrink BLOCK_K to divide the group size, so each K-step reads one row of scales."""
    block_k = tile.block_k
    while group_size > 0 and group_size % block_k and block_k > 16:
        block_k //= 2
    return dataclasses.replace(tile, block_k=block_k)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(tiles: int, blocks: int, device: torch.device) -> int:
    """Slices of a reduction of `blocks` steps so that `tiles` output tiles x slices cover
    ~2 waves of SMs, keeping at least two steps per slice."""
    programs = 2 * (sm_count(device.index or 0) if device.type == "cuda" else 64)
    split = 1
    while tiles * split < programs and split * 2 <= blocks // 2:
        split *= 2
    return split


def resolve_split(tile: Tile, m_tiles: int, n: int, k: int, device: torch.device) -> Tile:
    """Fill in split=0 for `m_tiles` row tiles against N output rows and k reduction
    steps (see `split_count`)."""
    if tile.split:
        return tile
    tiles = m_tiles * -(-n // tile.block_n)
    return dataclasses.replace(tile, split=split_count(tiles, -(-k // tile.block_k), device))
