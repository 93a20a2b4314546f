import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import quant
from quant.data import CalibConfig
from quant.errors import CheckpointError
from quant.layers import QuantLinear
from quant.pipeline import QuantizeJob, quantize
from tests.conftest import make_tiny_model

CALIB = CalibConfig("wiki-demo", nsamples=2, seqlen=64, seed=1)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory, demo_tokenizer):
    """(fp directory, lowbit checkpoint) for a tiny model; qwen2 has q/k/v biases."""
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_model(root / "fp", demo_tokenizer, arch=request.param)
    out = root / "q"
    quantize(QuantizeJob("rtn", {"bits": 3, "group_size": 32, "sym": True}, str(src), CALIB,
                         out, progress=False))
    return src, out


def test_from_pretrained_builds_quantized_layers(pair):
    _, out = pair
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    assert not isinstance(model.lm_head, QuantLinear)


def test_logits_equal_dequantized_fp_model(pair, demo_tokenizer):
    src, out = pair
    qmodel = quant.load(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear):
            linear = reference.get_submodule(name)
            linear.weight.data = module.quantized_weight().dequantize(torch.float32)
            if linear.bias is not None:  # biases are stored in the source dtype (fp16)
                assert torch.equal(linear.bias.data, module.bias.data)
    ids = demo_tokenizer("Quantized weights, exact logits.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(qmodel(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_generate(pair, demo_tokenizer):
    _, out = pair
    model = quant.load(out)
    ids = demo_tokenizer("Once upon a time", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 6)
    assert isinstance(demo_tokenizer.decode(generated[0]), str)


def test_dtype_changes_keep_stored_tensors(pair):
    _, out = pair
    model = quant.load(out, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    scales = layer.scales.clone()
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    model.to(torch.float32)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32


def test_load_checks_our_quantizer_ran(pair, monkeypatch):
    from transformers.quantizers import auto

    _, out = pair
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "lowbit")
    with pytest.raises(CheckpointError, match="did not build the quantized layers"):
        quant.load(out)


def test_truncated_and_corrupt_files_refused(pair, tmp_path):
    _, out = pair
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        quant.load(broken)
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        quant.load(broken)
    weights.unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        quant.load(broken)
