"""Split reductions finished inside the kernel (kernels/splits.py): the last program of each
tile adds the slices and puts the tile's counter back to zero, so one counter buffer serves
every launch."""

import pytest
import torch

from quant.kernels import splits, tuning
from quant.kernels.codebook_matmul import codebook_gemv, codebook_matmul
from quant.kernels.int_matmul import int_matmul
from quant.kernels.reference import matmul_reference
from tests.kernels import test_codebook_kernels, test_int_kernels
from tests.kernels.numerics import DEVICE

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

SPLIT_CASES = {  # name: (weight, kernel, tile): 5 rows, every kernel split 3 ways
    "int_matmul": (lambda: test_int_kernels.random_weight(40, 192, 4, 32), int_matmul,
                   tuning.Tile(16, 16, 32, split=3)),
    "codebook_gemv": (lambda: test_codebook_kernels.random_weight(36, 48, 2, 8, 4),
                      codebook_gemv, tuning.Tile(block_n=16, block_k=2, split=3)),
    "codebook_matmul": (lambda: test_codebook_kernels.random_weight(36, 48, 1, 16, 4),
                        codebook_matmul, tuning.Tile(block_n=16, block_k=2, split=3)),
}


@pytest.mark.parametrize("name", SPLIT_CASES)
def test_one_counter_buffer_serves_repeated_split_launches(name, monkeypatch):
    make_weight, kernel, tile = SPLIT_CASES[name]
    weight = make_weight()
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(splits, "tile_counters", lambda tiles, device: counters[:tiles])
    x = torch.randn(5, weight.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE)
    first = kernel(x, weight, tile)
    assert not counters.any()  # every tile's last program reset its counter
    assert torch.allclose(first, matmul_reference(x, weight), rtol=1e-4, atol=1e-5)
    # a counter left non-zero would leave NaN tiles; on a GPU, where programs race, a
    # missing fence would show as a tile summed before every slice was written
    for _ in range(50 if DEVICE.type == "cuda" else 1):
        assert torch.equal(kernel(x, weight, tile), first)  # slices added in slice order
    assert not counters.any()


def test_counters_are_one_zeroed_buffer_per_stream():
    device = DEVICE
    first = splits.tile_counters(10, device)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    if device.type == "cuda":  # kept and reused: the kernels leave it at zero
        assert splits.tile_counters(10, device).data_ptr() == first.data_ptr()
        assert splits.tile_counters(first.numel() + 1, device).numel() > first.numel()
