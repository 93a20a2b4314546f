"""Measured memory (quant.eval.memory) and the calculator's prediction of it: the exact
parts equal hand counts, the predicted peak is within max(5%, 25 MB) of the measured one on
models whose measurements were not used to fit the calculator's constants."""

import json

import pytest
import torch

import quant
from quant.data import CalibConfig
from quant.eval import fits
from quant.eval.memory import MemoryJob, measure
from quant.models import load_fp
from quant.pipeline import QuantizeJob, quantize
from tests.test_cli import assert_user_error, run

CPU = torch.device("cpu")
MB = 10**6


def within_bar(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= max(0.05 * measured, 25 * MB)


def predict(model_dir, job: MemoryJob, quant=None) -> dict:
    return fits.estimate(job.fits_job("cpu"), fits.load_model(str(model_dir)), quant)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_dir):
    return quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir),
                                CalibConfig(nsamples=2, seqlen=64),
                                tmp_path_factory.mktemp("mem") / "rtn4", progress=False))


@pytest.mark.parametrize("workload,batch,context", [("generate", 1, 256), ("generate", 3, 128),
                                                    ("forward", 2, 128)])
def test_inference_parts_by_hand_and_prediction(tiny_dir, workload, batch, context):
    """The tiny model (hidden 64, 2 layers, 2 of 4 heads for keys and values, head 16):
    fp32 weights are 4 bytes a parameter, the KV cache 2 x layers x 32 x tokens floats."""
    model = load_fp(tiny_dir, torch.float32)
    job = MemoryJob(context=context, batch=batch, new_tokens=2, workload=workload)
    measured = measure(model, job, CPU)
    parts = measured["breakdown"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables
    assert parts["weights"] == 4 * sum(p.numel() for p in model.parameters()) + buffers
    if workload == "generate":
        assert measured["kv_cache_prefill_bytes"] == 2 * 2 * 32 * batch * context * 4
        assert measured["kv_cache_end_bytes"] == 2 * 2 * 32 * batch * (context + 2) * 4
    predicted = predict(tiny_dir, job, "fp32")
    assert predicted["breakdown"]["kv_cache"] == parts["kv_cache"]
    assert predicted["total_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.01)


def test_eager_attention_adds_its_scores(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    job = MemoryJob(context=256, batch=2, new_tokens=2)
    measured = measure(model, job, CPU)
    fits_job = fits.FitsJob(context=256, batch=2, new_tokens=2, device="cpu",
                            attention="eager")
    predicted = fits.estimate(fits_job, fits.load_model(str(tiny_dir)), "fp32")
    sdpa = predict(tiny_dir, job, "fp32")
    assert predicted["total_bytes"] > sdpa["total_bytes"]
    assert predicted["total_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.03)


@pytest.mark.parametrize("train,checkpointing", [("lora", False), ("lora", True),
                                                 ("full", False)])
def test_training_step_measured_and_predicted(tiny_dir, train, checkpointing):
    model = load_fp(tiny_dir, torch.float32)
    job = MemoryJob(context=128, batch=2, train=train, gradient_checkpointing=checkpointing)
    measured = measure(model, job, CPU)
    trainable = measured["trainable_parameters"]
    if train == "lora":  # rank 8 on q and v: 8 x (64 + 64) and 8 x (64 + 32) per block
        assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
        tensors = 2 * 2 * 2  # A and B of q and v in 2 blocks
    else:
        params = list(load_fp(tiny_dir, torch.float32).parameters())
        assert trainable == sum(p.numel() for p in params)
        tensors = len(params)
    # AdamW's two moments (fp32) and a step counter per tensor
    assert measured["optimizer_bytes"] == 2 * 4 * trainable + 4 * tensors
    predicted = predict(tiny_dir, job, "fp32")
    assert within_bar(predicted["total_bytes"], measured["peak_bytes"]), (
        predicted["breakdown"], measured["breakdown"])


def test_qlora_trains_only_the_adapters_of_a_quantized_model(tiny_checkpoint):
    from quant.layers import QuantLinear

    model = quant.load(tiny_checkpoint)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = [{n: t.clone() for n, t in m.state_dict().items()} for m in layers]
    job = MemoryJob(context=64, batch=2, train="qlora")
    measured = measure(model, job, CPU)  # peft wraps the layers of `model` in place
    assert measured["trainable_parameters"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    for layer, before in zip(layers, stored):  # the quantized tensors stay as they were
        assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    lora_b = [t for n, t in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(t.abs().sum() > 0 for t in lora_b)  # one step moved B
    predicted = predict(tiny_checkpoint, job)
    assert within_bar(predicted["total_bytes"], measured["peak_bytes"])


def test_quant_eval_memory_records_measurement_and_prediction(tiny_checkpoint, tmp_path):
    proc = run("eval", str(tiny_checkpoint), "--memory", "--context", "96", "--batch", "2",
               "--new-tokens", "3", "--device", "cpu", "--output", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metric"] == "memory" and result["job"]["context"] == 96
    assert result["peak_phase"] == "prefill"  # when the cache held the prompt's keys and values
    assert result["breakdown"]["kv_cache"] == 2 * 2 * 32 * 2 * 96 * 4
    assert result["kv_cache_end_bytes"] == 2 * 2 * 32 * 2 * (96 + 3) * 4
    assert result["rss_peak_bytes"] > result["peak_bytes"]
    assert within_bar(result["predicted"]["peak_bytes"], result["peak_bytes"])
    recorded = json.loads((tiny_checkpoint / "eval.json").read_text())
    assert recorded[-1] == result
    assert_user_error(run("eval", str(tiny_checkpoint), "--memory", "--batch", "0"),
                      "--context, --batch")


# ---- the demo model: the cases -----------------------------------------------

# The grid but for 8192 x 4, whose two runs (fp32, 4-bit) take 6 of the CI's 30
# minutes: scripts/fits_compare.py measures all of it (benchmarks/fits-compare.json).
DEMO_INFERENCE = [(512, 1), (512, 4), (2048, 1), (2048, 4), (8192, 1)]


@pytest.mark.demo
@pytest.mark.parametrize("context,batch", DEMO_INFERENCE)
def test_demo_fp32_inference_prediction(demo_dir, context, batch):
    job = MemoryJob(context=context, batch=batch, new_tokens=2)
    measured = measure(load_fp(demo_dir, torch.float32), job, CPU)
    predicted = predict(demo_dir, job, "fp32")
    assert within_bar(predicted["total_bytes"], measured["peak_bytes"])


@pytest.mark.demo
@pytest.mark.parametrize("context,batch", DEMO_INFERENCE)
def test_demo_4bit_inference_prediction(demo_rtn_dir, context, batch):
    job = MemoryJob(context=context, batch=batch, new_tokens=2)
    measured = measure(quant.load(demo_rtn_dir), job, CPU)
    predicted = predict(demo_rtn_dir, job)
    assert within_bar(predicted["total_bytes"], measured["peak_bytes"])


@pytest.mark.demo
@pytest.mark.parametrize("batch", [1, 4])
def test_demo_lora_training_prediction(demo_dir, batch):
    job = MemoryJob(context=512, batch=batch, train="lora")
    measured = measure(load_fp(demo_dir, torch.float32), job, CPU)
    predicted = predict(demo_dir, job, "fp32")
    assert within_bar(predicted["total_bytes"], measured["peak_bytes"])
