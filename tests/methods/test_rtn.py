import pytest
import torch

from quant.errors import ConfigError
from quant.methods import METHODS, get_method, make_method, register_method
from tests.conftest import quantize_one


def reference_rtn(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """GPTQ's quantizer in float64: range extended to 0, integer zero, fp16-stored scale."""
    maxq = 2 ** bits - 1
    g = w.double().reshape(-1, w.shape[1] if group == -1 else group)
    lo, hi = g.min(1).values.clamp(max=0), g.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    scale = ((hi - lo) / maxq).half().double()[:, None]
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo[:, None] / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(w.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,sym", [(32, False), (64, True), (-1, False), (-1, True)])
def test_rtn_matches_reference(bits, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 192) * 0.05
    fmt, _ = quantize_one(make_method("rtn", bits=bits, group_size=group, sym=sym), w)
    ours = fmt.dequantize(torch.float64)
    ref = reference_rtn(w, bits, group, sym)
    mismatch = (ours - ref).abs() > 1e-6
    assert mismatch.float().mean() < 1e-3  # only exact .5 ties may round differently
    assert fmt.config == {"format": "int", "bits": bits, "group_size": group, "sym": sym,
                          "act_order": False}


def test_rtn_error_bounded_by_half_step():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    fmt, _ = quantize_one(make_method("rtn", bits=4, group_size=32), w)
    step = fmt.scales.float().t().repeat_interleave(32, dim=1)  # [out, in]
    assert ((fmt.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_default_group_size_follows_input_dim():
    rtn = make_method("rtn", bits=4)
    group = {k: rtn.plan_layer("x", 8, k).config["group_size"] for k in (4096, 576, 1536, 100)}
    assert group == {4096: 128, 576: 64, 1536: 128, 100: -1}
    with pytest.raises(ConfigError, match="does not divide"):
        make_method("rtn", bits=4, group_size=128).plan_layer("x", 8, 576)


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ConfigError, match="--act-order does not apply"):
        make_method("rtn", act_order=True)
    with pytest.raises(ConfigError, match="--bits 7"):
        make_method("rtn", bits=7)
    rtn = get_method("rtn")
    with pytest.raises(ValueError, match="already registered"):
        register_method("rtn")(type("Other", (rtn,), {}))


def test_the_method_contract_is_checked_at_registration():
    """A method (ours or an entry point's) that misses part of the contract is refused,
    naming what is missing."""
    from quant.methods import Method
    from quant.methods.base import check_method_class

    class Half(Method):
        Config = get_method("rtn").Config

        def calibration(self):
            return None

    with pytest.raises(ConfigError, match="does not implement plan_layer, quantize"):
        check_method_class(Half, "entry point 'half'")
    with pytest.raises(ConfigError, match="not a lowbit Method subclass"):
        register_method("plain")(type("Plain", (), {}))
    with pytest.raises(ConfigError, match="Config must be a dataclass"):
        check_method_class(type("NoConfig", (get_method("rtn"),), {"Config": dict}), "x")
    assert "plain" not in METHODS and "half" not in METHODS
