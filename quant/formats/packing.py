"""Bit packing of unsigned b-bit integers into int32 words, for every b in 1..16.

Values along the last dimension form one little-endian bitstream: value i occupies stream
bits [i*b, (i+1)*b), and stream bit k is bit k % 32 of word k // 32. For b that does not
divide 32 a value may straddle two words. This is the GPTQ layout for 2/4/8 bits and its
natural extension (the one GPTQ uses for 3 bits) to 3, 5 and 6.
"""

from __future__ import annotations

import functools

import torch

WORD_BITS = 32


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding n values of `bits` bits."""
    return -(-n * bits // WORD_BITS)


@functools.lru_cache(maxsize=64)
def _layout(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(word index, bit offset) of each of n values in the stream."""
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim: [..., n] -> int32 [..., ceil(n*b/32)]."""
    n = values.shape[-1]
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack into {bits} bits")
    word, offset = _layout(n, bits, v.device)
    words = torch.zeros(*v.shape[:-1], packed_length(n, bits) + 1, dtype=torch.int64,
                        device=v.device)
    # Low part goes into `word`, the spill (zero unless straddling) into `word + 1`.
    # Fields never overlap, so adding is OR.
    words.index_add_(-1, word, (v << offset) & 0xFFFFFFFF)
    words.index_add_(-1, word + 1, v >> (WORD_BITS - offset))
    words = words[..., :-1]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 [..., ceil(n*b/32)] -> int32 [..., n] in [0, 2**bits)."""
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{packed.shape[-1]} words cannot hold exactly {n} values of {bits} bits")
    if WORD_BITS % bits == 0:  # no value straddles: shift each word per slot
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
        values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return values.reshape(*packed.shape[:-1], -1)[..., :n]
    # Every 32 values fill exactly `bits` words: view the stream as such periods, pad the
    # tail period, and read each value from the (word, next word) pair it starts in.
    periods = -(-n // WORD_BITS)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, periods * bits - words.shape[-1] + 1))
    pairs = (words[..., :-1] | (words[..., 1:] << WORD_BITS)).reshape(
        *words.shape[:-1], periods, bits)
    word, offset = _layout(WORD_BITS, bits, packed.device)
    values = torch.gather(pairs, -1, word.expand(*pairs.shape[:-1], WORD_BITS)) >> offset
    values = (values & ((1 << bits) - 1)).to(torch.int32)
    return values.reshape(*values.shape[:-2], periods * WORD_BITS)[..., :n]
