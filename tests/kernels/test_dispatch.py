import json

import pytest
import torch

import quant
from quant.errors import ConfigError
from quant.kernels import buffers
from quant.kernels import int_matmul as int_matmul_module
from quant.kernels import ops, tuning
from quant.layers import QuantLinear, set_kernel_preference
from tests.kernels.test_int_kernels import random_weight


def test_select_by_preference_and_regime():
    weight = random_weight(64, 128, 4, 64)
    assert ops.select(weight, torch.randn(1, 128))[0] == "torch"  # auto on CPU
    name, impl, config = ops.select(weight, torch.randn(4, 128), "triton")
    assert name == "fused" and impl is int_matmul_module.int_matmul and config.block_m == 16
    _, _, config = ops.select(weight, torch.randn(2, 20, 128), "triton")  # 40 rows: GEMM
    assert config.block_m == 64
    assert tuning.regime("int", 16) == "gemv" and tuning.regime("int", 17) == "gemm"
    assert [tuning.regime("codebook", rows) for rows in (1, 2, 64, 65)] == \
        ["gemv", "batch", "batch", "gemm"]
    with pytest.raises(ConfigError, match="kernel preference"):
        ops.check_preference("cuda")


def test_linear_keeps_leading_dims_and_adds_bias():
    weight = random_weight(48, 64, 3, 32)
    x, bias = torch.randn(2, 3, 64), torch.randn(48)
    for preference in ("torch", "triton"):
        y = ops.linear(x, weight, bias, preference)
        expected = x @ weight.dequantize().t() + bias
        assert y.shape == (2, 3, 48) and torch.allclose(y, expected, atol=1e-4)


def test_tuned_configs_are_data(tmp_path):
    entry = {"format": "int", "scheme": "int4", "n": 4096, "k": 4096, "rows": 16,
             "impl": "dequant", "config": {"block_m": 16, "block_n": 128, "block_k": 128,
                                           "split": 4}}
    codebook = {"format": "codebook", "scheme": "1x16g8", "n": 11008, "k": 512, "rows": 1,
                "impl": "fused", "config": {"block_n": 32, "block_k": 32, "num_warps": 8,
                                            "split": 2}}
    path = tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "entries": [entry, codebook]}))
    assert tuning.load_tuned(path) == {
        ("int", "int4", 4096, 4096, 16): ("dequant", tuning.Tile(16, 128, 128, 4)),
        ("codebook", "1x16g8", 11008, 512, 1): (
            "fused", tuning.Tile(block_n=32, block_k=32, num_warps=8, split=2))}
    assert tuning.gpu_slug("NVIDIA H100 80GB HBM3") == path.stem
    assert tuning.load_tuned(tmp_path / "missing.json") == {}


@pytest.mark.demo
def test_demo_checkpoint_triton_path_matches_torch_path(demo_rtn_dir, demo_tokenizer, monkeypatch):
    model = quant.load(demo_rtn_dir)
    ids = demo_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch_logits = model(ids).logits
        launches = []
        real_alloc = buffers.alloc
        monkeypatch.setattr(buffers, "alloc",
                            lambda *a: launches.append(a) or real_alloc(*a))
        set_kernel_preference(model, "triton")
        triton_logits = model(ids).logits
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert len(launches) == layers == 210  # every quantized layer ran the Triton kernel
    assert torch.allclose(triton_logits, torch_logits, atol=2e-4, rtol=1e-4)
    assert triton_logits.argmax(-1).equal(torch_logits.argmax(-1))
    with pytest.raises(ConfigError):
        quant.load(demo_rtn_dir, kernels="fast")


def test_gradient_through_a_quantized_layer_dequantizes_again():
    """grad_x = grad_y @ W from a fresh dequantization; autograd keeps no dense copy of W
    (LoRA on a quantized model would otherwise hold it in full precision)."""
    weight = random_weight(48, 64, 4, 32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = ops.linear(x, weight)
    assert y.grad_fn.name() == "QuantizedMatmulBackward"
    saved = [t for t in (getattr(y.grad_fn, a) for a in dir(y.grad_fn) if a.startswith("_saved"))
             if isinstance(t, torch.Tensor)]
    assert not saved
    upstream = torch.randn(3, 5, 48)
    (grad,) = torch.autograd.grad(y, x, upstream)
    expected = upstream.double() @ weight.dequantize(torch.float64)
    assert torch.allclose(grad.double(), expected, atol=1e-5)
    with torch.no_grad():
        assert ops.linear(x, weight).grad_fn is None
