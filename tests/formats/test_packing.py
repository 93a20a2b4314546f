import pytest
import torch

from quant.formats.packing import pack, packed_length, unpack

BITS = (2, 3, 4, 5, 6, 8)


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Independent bitstream packer: one Python big integer, cut into 32-bit words."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    words = []
    for w in range(-(-len(values) * bits // 32)):
        word = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return words


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 95, 96, 100, 577])
def test_pack_matches_independent_bitstream(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 1 << bits, (3, n), generator=gen)
    packed = pack(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_length(n, bits))
    for row in range(3):
        assert packed[row].tolist() == reference_pack(values[row].tolist(), bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 13), (17, 64), (3, 200), (2, 3, 45)])
def test_round_trip_every_value(bits, shape):
    # Every representable value appears, at every position modulo 32 where shapes allow.
    n = shape[-1]
    count = torch.Size(shape).numel()
    values = (torch.arange(count) * 7919 % (1 << bits)).reshape(shape)
    assert torch.equal(unpack(pack(values, bits), bits, n), values.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_exhaustive_pairs(bits):
    # All (a, b) pairs of adjacent values, so every straddle boundary sees every bit pattern.
    grid = torch.cartesian_prod(torch.arange(1 << bits), torch.arange(1 << bits))
    stream = grid.flatten()[None, :]
    for shift in range(0, 33, 11):  # move the pairs across word boundaries
        padded = torch.cat([torch.zeros(1, shift, dtype=torch.long), stream], dim=1)
        n = padded.shape[1]
        assert torch.equal(unpack(pack(padded, bits), bits, n), padded.to(torch.int32))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 2, dtype=torch.int32), 4, 17)
