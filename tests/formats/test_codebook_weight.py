import pytest
import torch

from quant.errors import CheckpointError, ConfigError
from quant.formats import CodebookWeight


def random_parts(out=6, groups=5, m=2, nbits=8, g=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << nbits, (out, groups, m), generator=gen)
    books = torch.randn(m, 1 << nbits, g, generator=gen).half().float()
    scales = (torch.rand(out, generator=gen) + 0.5).half().float()
    return codes, books, scales


@pytest.mark.parametrize("m,nbits,g", [(2, 8, 4), (1, 16, 8), (1, 6, 2), (3, 8, 8)])
def test_dequantize_matches_an_independent_sum_of_codewords(m, nbits, g):
    codes, books, scales = random_parts(m=m, nbits=nbits, g=g)
    fmt = CodebookWeight.from_parts(codes, books, scales)
    expected = torch.zeros(codes.shape[0], codes.shape[1] * g, dtype=torch.float64)
    for r in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            vec = sum(books[i, codes[r, j, i]].double() for i in range(m))
            expected[r, j * g:(j + 1) * g] = scales[r].double() * vec
    assert torch.allclose(fmt.dequantize(torch.float64), expected, rtol=1e-6, atol=1e-6)


def test_layout_is_the_aqlm_packages():
    codes, books, scales = random_parts(m=1, nbits=16, g=8)
    fmt = CodebookWeight.from_parts(codes, books, scales)
    state = fmt.state_dict()
    assert state["codes"].dtype == torch.int16 and tuple(state["codes"].shape) == (6, 5, 1)
    assert tuple(state["codebooks"].shape) == (1, 65536, 1, 8)
    assert state["codebooks"].dtype == torch.float16
    assert tuple(state["scales"].shape) == (6, 1, 1, 1) and state["scales"].dtype == torch.float16
    # codes above 2^15 are stored as negative int16 and read back with & 0xFFFF
    assert (codes >= 1 << 15).any() and (state["codes"] < 0).any()
    assert torch.equal(fmt.code_indices(), codes)
    assert fmt.config == {"format": "codebook", "num_codebooks": 1, "nbits_per_codebook": 16,
                          "in_group_size": 8, "out_group_size": 1}


def test_state_dict_round_trip_and_bits_per_weight():
    codes, books, scales = random_parts(m=2, nbits=8, g=4)
    fmt = CodebookWeight.from_parts(codes, books, scales)
    again = CodebookWeight.from_state_dict(fmt.state_dict(), fmt.config, 6, 20)
    assert torch.equal(again.dequantize(), fmt.dequantize())
    # codes 2 x 8 bits per 4 weights, codebooks 2 x 256 x 4 fp16, one fp16 scale per row
    expected = (6 * 5 * 2 * 8 + 2 * 256 * 4 * 16 + 6 * 16) / (6 * 20)
    assert fmt.bits_per_weight == pytest.approx(expected)


def test_bad_tensors_and_configs_are_refused():
    codes, books, scales = random_parts()
    fmt = CodebookWeight.from_parts(codes, books, scales)
    broken = {**fmt.state_dict(), "codes": fmt.codes.to(torch.int32)}
    with pytest.raises(CheckpointError, match="codes"):
        CodebookWeight.from_state_dict(broken, fmt.config, 6, 20)
    with pytest.raises(ConfigError, match="does not divide"):
        CodebookWeight.tensor_specs(6, 22, fmt.config)
    with pytest.raises(ConfigError, match="bits"):
        CodebookWeight.tensor_specs(6, 20, {**fmt.config, "nbits_per_codebook": 17})
