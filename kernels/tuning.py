"""Kernel tile configurations: data, not code. Tuned entries live in
`configs/<gpu>.json` (written by `scripts/bench_kernels.py --tune`) and are loaded
explicitly for the GPU in use; shapes without an entry use the defaults below."""

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
GEMV_MAX_ROWS = 16  # decode regime: the tile's M is 16 (the smallest tl.dot), rows beyond use GEMM


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1      # 0: choose from the shape so the GPU gets enough programs
    group_m: int = 8      # programs sharing a row band, for L2 reuse of x
    num_warps: int = 4
    num_stages: int = 3


# Untuned starting points (no GPU measurement yet): decode tiles are thin in M and deep in K
# with split-K; prefill tiles are square-ish.
DEFAULTS = {
    "gemv": ("fused", TileConfig(16, 64, 128, split_k=0, num_warps=4, num_stages=3)),
    "gemm": ("fused", TileConfig(64, 128, 64, split_k=1, num_warps=4, num_stages=3)),
}
DEQUANT_TILE = TileConfig(1, 128, 64, num_warps=4, num_stages=1)


@dataclass(frozen=True)
class CodebookTile:
    """Codebook kernels: BLOCK_N output rows x BLOCK_J code groups per program step, and
    for the tensor-core kernel BLOCK_M activation rows; SPLIT_J slices of the code groups
    (0: enough slices to fill the GPU)."""

    block_n: int
    block_j: int
    num_warps: int = 4
    block_m: int = 16
    split_j: int = 1


# Untuned (no GPU measurement yet), by implementation. One activation row: the reduction
# GEMV, split so that a 4096-row layer still gives every SM work. A few rows: the
# tensor-core kernel, which gathers each codeword once for all rows. Many rows: dequantize
# once, then cuBLAS.
CODEBOOK_DEFAULTS = {
    "gemv": CodebookTile(64, 16, split_j=0),
    "fused": CodebookTile(64, 16, split_j=0),
    "dequant": CodebookTile(32, 16),
}
CODEBOOK_FUSED_MAX_ROWS = 64


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def regime(rows: int) -> str:
    return "gemv" if rows <= GEMV_MAX_ROWS else "gemm"


def rows_bucket(rows: int) -> int:
    for bucket in (1, 2, 4, 8, 16, 32, 64, 128):
        if rows <= bucket:
            return bucket
    return 256


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def load_tuned(path: Path) -> dict:
    """A tuned-config file as {"int": {(bits, n, k, rows bucket): (implementation,
    TileConfig)}, "codebook": {(codebook shape "MxBgG", n, groups, rows bucket):
    (implementation, CodebookTile)}}."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "int": {(e["bits"], e["n"], e["k"], e["rows"]): (e["impl"], TileConfig(**e["config"]))
                for e in data.get("entries", [])},
        "codebook": {(e["codebooks"], e["n"], e["groups"], e["rows"]):
                     (e["impl"], CodebookTile(**e["config"]))
                     for e in data.get("codebook_entries", [])},
    }


@functools.cache
def _tuned(device_index: int) -> dict:
    return load_tuned(CONFIG_DIR / f"{gpu_slug(torch.cuda.get_device_name(device_index))}.json")


def choose(device: torch.device, bits: int, n: int, k: int, group_size: int,
           rows: int) -> tuple[str, TileConfig]:
    """(implementation, tile config) for `rows` rows against an N x K weight."""
    if device.type == "cuda":
        found = _tuned(device.index or 0)["int"].get((bits, n, k, rows_bucket(rows)))
        if found:
            return found
        impl, config = DEFAULTS[regime(rows)]
    else:  # the CPU interpreter costs per program step: one wide tile per row band
        impl, config = "fused", TileConfig(16 if rows <= 16 else 64,
                                           min(2048, triton_next_pow2(n)), 64)
    return impl, fit_block_k(config, group_size)


def codebook_impl(rows: int) -> str:
    """The default codebook implementation for `rows` activation rows."""
    if rows == 1:
        return "gemv"
    return "fused" if rows <= CODEBOOK_FUSED_MAX_ROWS else "dequant"


def codebook_tile(impl: str, device: torch.device, n: int, groups: int,
                  rows: int) -> CodebookTile:
    """The default tile of codebook implementation `impl` for `rows` rows against a weight
    of N rows and `groups` code groups per row."""
    tile = CODEBOOK_DEFAULTS[impl]
    if device.type != "cuda":  # the interpreter: few, wide program steps
        tile = CodebookTile(min(256, triton_next_pow2(n)), min(64, triton_next_pow2(groups)))
    return dataclasses.replace(tile, block_m=16 if rows <= 16 else 64)


def codebook_shape(num_codebooks: int, nbits: int, in_group: int) -> str:
    """The name of a codebook configuration in tuned files and benchmarks: '1x16g8'."""
    return f"{num_codebooks}x{nbits}g{in_group}"


def choose_codebook(device: torch.device, shape: str, n: int, groups: int,
                    rows: int) -> tuple[str, CodebookTile]:
    """(implementation, tile) for `rows` rows against a codebook weight of configuration
    `shape`, N rows and `groups` code groups per row."""
    if device.type == "cuda":
        found = _tuned(device.index or 0)["codebook"].get((shape, n, groups, rows_bucket(rows)))
        if found:
            return found
    impl = codebook_impl(rows)
    return impl, codebook_tile(impl, device, n, groups, rows)


def fit_block_k(config: TileConfig, group_size: int) -> TileConfig:
    """Shrink BLOCK_K to divide the group size, so each K-step reads one row of scales."""
    block_k = config.block_k
    while group_size > 0 and group_size % block_k and block_k > 16:
        block_k //= 2
    return dataclasses.replace(config, block_k=block_k)


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


def resolve_split_k(config: TileConfig, m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """Fill in split_k=0 (see `split_count`)."""
    if config.split_k:
        return config
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    return dataclasses.replace(
        config, split_k=split_count(tiles, -(-k // config.block_k), device))


def resolve_split_j(tile: CodebookTile, m_tiles: int, n: int, groups: int,
                    device: torch.device) -> CodebookTile:
    """Fill in split_j=0 for `m_tiles` row tiles (activation rows, or row blocks)."""
    if tile.split_j:
        return tile
    tiles = m_tiles * -(-n // tile.block_n)
    return dataclasses.replace(
        tile, split_j=split_count(tiles, -(-groups // tile.block_j), device))
