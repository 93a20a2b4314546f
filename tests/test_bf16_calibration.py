"""Calibrating with bf16 matmuls on a CPU (torch autocast): statistics and the methods'
own math stay fp32, the choice follows --matmul-dtype and the method, and it is recorded."""

import json

import pytest
import torch

from quant import pipeline
from quant.data import CalibConfig, calibration_windows
from quant.errors import ConfigError
from quant.methods import make_method
from quant.models import load_fp
from quant.pipeline import QuantizeJob, calibration_matmuls, quantize, quantize_linears
from quant.stats import collect_hessians
from quant.traverse import BlockRun, capture_block_inputs, find_blocks

CALIB = CalibConfig("wiki-demo", nsamples=8, seqlen=64, seed=0)
AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def test_hessians_accumulate_in_fp32_from_bf16_activations(tiny_dir, demo_tokenizer):
    model = load_fp(tiny_dir, torch.float32)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_windows(CALIB, demo_tokenizer), 4)
    seen = []
    o_proj = blocks[0].self_attn.o_proj  # its input comes out of bf16 matmuls
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.autocast(**AUTOCAST):
            run = BlockRun(blocks[0], inputs, 0, torch.device("cpu"))
            H = collect_hessians(run, [["self_attn.o_proj"]], torch.float32)["self_attn.o_proj"]
    finally:
        handle.remove()
    assert seen[0].dtype == torch.bfloat16
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    expected = 2 * x.t() @ x / x.shape[0]
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-7 * float(expected.max()))


def test_the_methods_math_ignores_the_autocast():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(32, 16, bias=False)
    linear.weight.data = torch.randn(16, 32, generator=gen)
    X = torch.randn(32, 200, generator=gen)
    H = 2 * X @ X.t() / 200
    method = make_method("aqlm", codebooks="1x6", in_group=4, bits=2, max_epochs=2)
    layer = {"w": (linear, method.plan_layer("x.w", 16, 32))}
    plain = quantize_linears("x", layer, method, H)["w"]
    with torch.autocast(**AUTOCAST):
        cast = quantize_linears("x", layer, method, H)["w"]
    assert torch.equal(plain[1], cast[1])
    assert plain[2]["rel_output_mse"] == cast[2]["rel_output_mse"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_for_methods_that_allow_it_on_a_native_bf16_cpu(monkeypatch,
                                                                              native):
    monkeypatch.setattr(pipeline, "native_bf16_cpu", lambda: native)
    cpu = torch.device("cpu")
    aqlm, rtn = make_method("aqlm"), make_method("rtn")
    assert calibration_matmuls("auto", cpu, aqlm) == (torch.bfloat16 if native else torch.float32)
    assert calibration_matmuls("auto", cpu, rtn) == torch.float32
    assert calibration_matmuls("float32", cpu, aqlm) == torch.float32
    assert calibration_matmuls("bfloat16", cpu, rtn) == torch.bfloat16
    with pytest.raises(ConfigError, match="CPU runs"):
        calibration_matmuls("bfloat16", torch.device("cuda"), aqlm)


def test_a_bf16_calibrated_run_records_it_and_loses_little(tiny_dir, tmp_path):
    options = {"codebooks": "2x6", "in_group": 4, "bits": 3, "max_epochs": 2,
               "finetune_steps": 0, "distill_steps": 0}
    errors = {}
    for dtype in ("float32", "bfloat16"):
        out = quantize(QuantizeJob("aqlm", options, str(tiny_dir), CALIB, tmp_path / dtype,
                                   matmul_dtype=dtype, progress=False))
        report = json.loads((out / "quant_report.json").read_text())
        assert report["matmul_dtype"] == dtype
        layers = report["layers"].values()
        errors[dtype] = sum(entry["rel_output_mse"] for entry in layers) / len(layers)
    assert errors["bfloat16"] == pytest.approx(errors["float32"], rel=0.1)
