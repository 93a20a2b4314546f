import json

import pytest
import torch
from safetensors.torch import save_file

from quant.errors import CheckpointError, ConfigError
from quant.formats import IntWeight
from quant.formats.int_weight import check_int_config


def random_int_weight(out_f, in_f, bits, group_size, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ngroups = 1 if group_size == -1 else in_f // group_size
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    zeros = torch.randint(0, 1 << bits, (ngroups, out_f), generator=gen)
    scales = (torch.rand(ngroups, out_f, generator=gen) * 0.1 + 1e-3).half()
    g_idx = None
    if act_order:
        size = in_f if group_size == -1 else group_size
        g_idx = (torch.randperm(in_f, generator=gen) // size).to(torch.int32)
    fmt = IntWeight.from_ints(q, zeros, scales, bits=bits, group_size=group_size, sym=False,
                              g_idx=g_idx)
    return fmt, q, zeros, scales, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("out_f,in_f,group_size", [(13, 96, 32), (40, 64, -1), (7, 160, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_float64_formula(bits, out_f, in_f, group_size, act_order):
    fmt, q, zeros, scales, g_idx = random_int_weight(out_f, in_f, bits, group_size, act_order)
    size = in_f if group_size == -1 else group_size
    group = g_idx.long() if act_order else torch.arange(in_f) // size
    expected = (q.double() - zeros.double()[group].t()) * scales.double()[group].t()
    assert torch.equal(fmt.dequantize(torch.float32).double(), expected)
    q2, z2 = fmt.ints()
    assert torch.equal(q2, q.int()) and torch.equal(z2, zeros.int())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("out_f", [24, 32])
def test_bits_per_weight_matches_safetensors_bytes(tmp_path, bits, act_order, out_f):
    in_f = 192
    fmt = random_int_weight(out_f, in_f, bits, 64, act_order)[0]
    path = tmp_path / "w.safetensors"
    save_file(fmt.state_dict(), str(path))
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    data_bytes = len(raw) - 8 - header_len
    assert fmt.bits_per_weight * out_f * in_f == pytest.approx(8 * data_bytes, abs=1e-6)
    # and the published GPTQ count where zeros pack without padding: b + (16 + b) / group
    if out_f * bits % 32 == 0 and not act_order:
        assert fmt.bits_per_weight == pytest.approx(bits + (16 + bits) / 64)


def test_state_dict_round_trip_and_validation():
    fmt = random_int_weight(16, 64, 3, 32, act_order=True)[0]
    again = IntWeight.from_state_dict(fmt.state_dict(), fmt.config, 16, 64)
    assert torch.equal(again.dequantize(), fmt.dequantize())
    bad = dict(fmt.state_dict(), scales=fmt.scales.float())
    with pytest.raises(CheckpointError, match="scales"):
        IntWeight.from_state_dict(bad, fmt.config, 16, 64)
    missing = {k: v for k, v in fmt.state_dict().items() if k != "g_idx"}
    with pytest.raises(CheckpointError, match="g_idx"):
        IntWeight.from_state_dict(missing, fmt.config, 16, 64)
    json.dumps(fmt.config)  # configs go into config.json


@pytest.mark.parametrize("bits", [1, 7, 9, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ConfigError, match="--bits"):
        check_int_config(bits, 64)


def test_group_size_must_divide_and_fit():
    with pytest.raises(ConfigError, match="does not divide"):
        check_int_config(4, 128, in_features=576)
    with pytest.raises(ConfigError, match="larger than"):
        check_int_config(4, 1024, in_features=576)
    with pytest.raises(ConfigError):
        check_int_config(4, 0)
    check_int_config(4, -1, in_features=576)
