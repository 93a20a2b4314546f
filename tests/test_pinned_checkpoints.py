"""Checkpoints pinned before the per-layer Plan refactor: the same job on the same model
must keep writing the same tensors.

The source model's weights come from an integer generator (the same on every machine).
RTN's tensors depend on nothing else, so its digest holds everywhere. GPTQ's and AQLM's
also depend on the float arithmetic of the calibration forwards, which differs in the last
bits between CPU families; their digests are asserted where a canary of that arithmetic
matches the machine they were pinned on, and everywhere their quantization error energy
(a few flipped roundings move it by ~1e-5, any change of behaviour by far more) is.
"""

import hashlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quant
from quant.data import CalibConfig, calibration_windows
from quant.layers import QuantLinear
from quant.pipeline import QuantizeJob, quantize
from tests.conftest import make_tiny_model

CALIB = CalibConfig("wiki-demo", nsamples=8, seqlen=64, seed=0)
JOBS = {  # name: (method, options)
    "rtn": ("rtn", {"bits": 4, "group_size": 32}),
    "gptq": ("gptq", {"bits": 3, "group_size": 32}),  # act-order (the default)
    "gptq-static": ("gptq", {"bits": 4, "group_size": 32, "static_groups": True}),
    "aqlm": ("aqlm", {"codebooks": "2x6", "in_group": 4, "bits": 3, "max_epochs": 2,
                      "distill_steps": 0}),
}
# sha256 of the checkpoint's tensors; sum over layers of ||W_q - W||^2 and ||W_q||^2
PINNED = {
    "rtn": ("a4814ce128fa8819e94970e3a955f0c9ab2e1de52549b4e80da8398f08b71d93",
            1.3061853584367782, 320.1660053229425),
    "gptq": ("7018231a149ea884f0f0ee3cd8cfb1c504166854bcbb24fb334cd61a074a13a0",
             9.303064298816025, 321.05373241659254),
    "gptq-static": ("f826eb23fac7ed6cafc6b5a093f45e351ee9608b798f17f3b1b32a8a74817485",
                    1.9710787411313504, 319.4026754552033),
    "aqlm": ("d719ea497f24aa58346e35fb9a884517e0125b8d1594d8887697de38ce5d6744",
             7.936734722013461, 315.69602970194404),
}
# pinned on a 2-core AMD EPYC (AVX-512), torch 2.13.0+cpu, 2 threads
PINNED_CANARY = "d5dddccb31b70885aa7549ee39df447b2ed4175ecc11614992b2c01fa47bcb5c"


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory, demo_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("exact") / "fp", demo_tokenizer, exact=True)


def tensor_digest(directory) -> str:
    digest = hashlib.sha256()
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name} {t.dtype} {list(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def error_energy(directory, src) -> tuple[float, float]:
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    error = energy = 0.0
    for name, module in quant.load(directory).named_modules():
        if isinstance(module, QuantLinear):
            w_q = module.quantized_weight().dequantize(torch.float64)
            error += float((w_q - fp.get_submodule(name).weight.detach()).pow(2).sum())
            energy += float(w_q.pow(2).sum())
    return error, energy


def float_canary(src, tokenizer) -> str:
    """A digest of the float arithmetic the calibration runs on: the fp model's logits on
    the calibration windows and a Cholesky factor."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        logits = model(calibration_windows(CALIB, tokenizer)[:4]).logits
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64).sin()
    factor = torch.linalg.cholesky(x @ x.t() + torch.eye(64))
    return hashlib.sha256(logits.numpy().tobytes() + factor.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("job", list(JOBS))
def test_checkpoint_tensors_are_the_pinned_ones(job, exact_dir, demo_tokenizer, tmp_path):
    method, options = JOBS[job]
    out = quantize(QuantizeJob(method, options, str(exact_dir), CALIB, tmp_path / job,
                               matmul_dtype="float32", progress=False))
    digest, error, energy = PINNED[job]
    got_error, got_energy = error_energy(out, exact_dir)
    assert got_error == pytest.approx(error, rel=2e-3)
    assert got_energy == pytest.approx(energy, rel=1e-4)
    if job == "rtn" or float_canary(exact_dir, demo_tokenizer) == PINNED_CANARY:
        assert tensor_digest(out) == digest
