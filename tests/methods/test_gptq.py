import pytest
import torch

from quant.errors import ConfigError, ModelError
from quant.methods import make_method
from quant.methods.gptq import gptq
from tests.conftest import quantize_one


def grid64(w: torch.Tensor, bits: int, sym: bool):
    """GPTQ's min/max grid in float64 per row of w, with the scale rounded to fp16."""
    maxq = 2 ** bits - 1
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    scale = ((hi - lo) / maxq).half().double()
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
    return scale, zero


def reference_gptq(W, H, bits, group, sym=False, act_order=False, static=False, percdamp=0.01):
    """Textbook GPTQ in float64: one column at a time, no lazy blocks; returns W_hat."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    grids = [grid64(W[:, g:g + group], bits, sym) for g in range(0, n, group)] if static else None
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W_hat = torch.zeros_like(W)
    for i in range(n):
        if static:
            scale, zero = grids[int(perm[i]) // group]
        elif i % group == 0:
            scale, zero = grid64(W[:, i:i + group], bits, sym)
        q = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, 2 ** bits - 1)
        W_hat[:, i] = scale * (q - zero)
        err = (W[:, i] - W_hat[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
    return W_hat[:, torch.argsort(perm)]


def layer(out_f=24, in_f=128, samples=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, in_f, generator=gen) * (torch.rand(in_f, generator=gen) * 2 + 0.1)
    X[:, 5] += 3 * X[:, 9]  # correlated inputs: where GPTQ beats rounding
    return torch.randn(out_f, in_f, generator=gen) * 0.05, 2 * X.t() @ X / samples


@pytest.mark.parametrize("bits,group,sym,act_order,static", [
    (4, 32, False, False, False), (3, 32, True, False, False), (4, 32, False, True, False),
    (3, 64, False, True, True), (2, 128, False, False, False), (8, 32, False, True, False)])
def test_matches_float64_reference(bits, group, sym, act_order, static):
    W, H = layer()
    ours = gptq(W.double(), H.double(), bits=bits, group_size=group, sym=sym,
                act_order=act_order, static_groups=static, blocksize=48 if group == 32 else 64)
    size = group
    fmt = quantize_one(make_method("gptq", bits=bits, group_size=group, sym=sym,
                                   act_order=act_order, static_groups=static,
                                   hessian_dtype="float64"), W, H)[0]
    ref = reference_gptq(W, H, bits, size, sym, act_order, static)
    assert (fmt.dequantize(torch.float64) - ref).norm() / ref.norm() < 1e-5
    assert (fmt.g_idx is not None) == (act_order and not static)
    assert ours.dead_columns == 0 and ours.damp == pytest.approx(0.01)


def test_beats_round_to_nearest_on_the_hessian_norm():
    W, H = layer(out_f=64, in_f=256, seed=1)
    err = {}
    for method in ("rtn", "gptq"):
        w_hat = quantize_one(make_method(method, bits=3, group_size=64), W, H)[0].dequantize()
        delta = w_hat - W
        err[method] = float(((delta @ H) * delta).sum())
    assert err["gptq"] < 0.8 * err["rtn"]


def test_group_of_layers_equals_each_alone():
    W, H = layer(out_f=40, in_f=128, seed=2)
    method = make_method("gptq", bits=4, group_size=32, act_order=True)
    specs = [method.plan_layer("part", *W[:16].shape), method.plan_layer("part", *W[16:].shape)]
    together = method.quantize_group([W[:16], W[16:]], H, specs)
    for part, (fmt, info) in zip((W[:16], W[16:]), together):
        alone, alone_info = quantize_one(method, part, H)
        assert torch.equal(fmt.ints()[0], alone.ints()[0]) and torch.equal(fmt.scales, alone.scales)
        assert info["gptq_loss"] == pytest.approx(alone_info["gptq_loss"], rel=1e-5)


def test_dead_columns_are_rounded_without_nans():
    W, H = layer(seed=3)
    H[:, :10] = 0
    H[:10, :] = 0
    result = gptq(W, H, bits=4, group_size=32, sym=False)
    assert result.dead_columns == 10 and torch.isfinite(result.scales).all()
    all_dead = quantize_one(make_method("gptq", bits=4, group_size=32), W, torch.zeros(128, 128))
    rtn = quantize_one(make_method("rtn", bits=4, group_size=32), W)[0]
    assert torch.equal(all_dead[0].dequantize(), rtn.dequantize())  # documented fallback
    assert all_dead[1]["dead_columns"] == 128


def test_damping_grows_until_cholesky_succeeds():
    W, H = layer(seed=4)
    H -= 0.05 * torch.diag(H).mean() * torch.eye(128)  # indefinite until damp > 5%
    result = gptq(W, H, bits=4, group_size=32, sym=False)
    assert result.damp == pytest.approx(0.1)
    with pytest.raises(ModelError, match="not positive definite"):
        gptq(W, -torch.eye(128) * 1e6 + torch.diag(torch.full((128,), 1.0)), bits=4,
             group_size=32, sym=False, percdamp=1e-9)


@pytest.mark.parametrize("options,message", [
    ({"static_groups": True, "act_order": False}, "--static-groups"), ({"percdamp": -0.1}, "--percdamp"),
    ({"hessian_dtype": "float16"}, "--hessian-dtype"), ({"bits": 7}, "--bits 7"),
    ({"blocksize": 0}, "--blocksize")])
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        make_method("gptq", **options)
