import json

import pytest
import torch
from safetensors.torch import load_file

import quant
from quant.data import CalibConfig
from quant.errors import CheckpointError
from quant.export import export
from quant.layers import QuantLinear
from quant.pipeline import QuantizeJob, quantize
from tests.test_cli import assert_user_error, run

CALIB = CalibConfig("wiki-demo", nsamples=4, seqlen=64)


def unpack_column_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Independent unpacker: each column of int32 words is one little-endian bitstream."""
    columns = []
    for column in words.t().tolist():
        stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(column))
        columns.append([(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(count)])
    return torch.tensor(columns).t()  # [count, columns]


@pytest.mark.parametrize("options", [{"bits": 4, "group_size": 32, "sym": True, "act_order": False},
                                     {"bits": 3, "group_size": 32, "sym": True, "act_order": True}])
def test_gptq_export_unpacks_to_our_weights(tmp_path, tiny_dir, options):
    src = quantize(QuantizeJob("gptq", options, str(tiny_dir), CALIB, tmp_path / "q",
                               progress=False))
    out = export(src, "gptq", tmp_path / "gptq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "gptq", "checkpoint_format": "gptq",
                      "bits": options["bits"], "group_size": 32, "sym": True,
                      "desc_act": options.get("act_order", False)}
    tensors = load_file(str(out / "model.safetensors"))
    model = quant.load(src)
    bits = options["bits"]
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        n, k = module.out_features, module.in_features
        q = unpack_column_stream(tensors[f"{name}.qweight"], bits, k)            # [k, n]
        zeros = unpack_column_stream(tensors[f"{name}.qzeros"].t(), bits, n).t() + 1  # [g, n]
        g_idx = tensors[f"{name}.g_idx"].long()
        scales = tensors[f"{name}.scales"].float()
        w = ((q - zeros[g_idx]) * scales[g_idx]).t()
        assert torch.equal(w, module.quantized_weight().dequantize()), name
    assert (out / "tokenizer.json").exists() and (out / "quantize_config.json").exists()
    assert not (out / "quant_report.json").exists()


def test_gptq_export_refusals(tmp_path, tiny_dir, demo_tokenizer):
    from safetensors.torch import save_file
    from tests.conftest import make_tiny_model

    src = make_tiny_model(tmp_path / "positive", demo_tokenizer)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].abs()  # all-positive groups: zero point 0 under min/max
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    asym = quantize(QuantizeJob("rtn", {"bits": 2, "group_size": 32}, str(src), CALIB,
                                tmp_path / "asym", progress=False))
    with pytest.raises(CheckpointError, match="zero point of 0"):
        export(asym, "gptq", tmp_path / "x")
    five = quantize(QuantizeJob("rtn", {"bits": 5, "group_size": 32, "sym": True},
                                str(tiny_dir), CALIB, tmp_path / "five", progress=False))
    assert_user_error(run("export", str(five), str(tmp_path / "y"), "--format", "gptq"),
                      "GPTQ runtimes read")
    assert_user_error(run("export", str(five), str(tmp_path / "y"), "--format", "exl2"),
                      "unknown export format")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
