"""generate() through the Triton kernels matches the torch path (interpreter on CPU)."""

import pytest
import torch

import quant
from quant.data import CalibConfig
from quant.layers import set_kernel_preference
from quant.pipeline import QuantizeJob, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("gen") / "tiny-w3"
    return quantize(QuantizeJob("rtn", {"bits": 3, "group_size": 32}, str(tiny_dir),
                                CalibConfig(nsamples=2, seqlen=64), out, progress=False))


def test_generate_triton_matches_torch(tiny_ckpt, demo_tokenizer):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    model = quant.load(tiny_ckpt, device=DEVICE, dtype=dtype)
    ids = demo_tokenizer("Weights in three bits", return_tensors="pt").input_ids.to(DEVICE)
    outputs = {}
    for preference in ("torch", "triton"):
        set_kernel_preference(model, preference)
        outputs[preference] = model.generate(ids, max_new_tokens=8, do_sample=False,
                                             output_logits=True, return_dict_in_generate=True)
    assert torch.equal(outputs["torch"].sequences, outputs["triton"].sequences)
    tol = 2e-2 if DEVICE == "cuda" else 1e-4
    for a, b in zip(outputs["torch"].logits, outputs["triton"].logits):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
