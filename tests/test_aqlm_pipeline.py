import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quant
from quant.data import CalibConfig
from quant.export import export
from quant.layers import QuantLinear
from quant.pipeline import QuantizeJob, quantize
from tests.test_cli import assert_user_error, run

CALIB = CalibConfig("wiki-demo", nsamples=8, seqlen=64)
# fine-tuning (tests/test_finetune.py, tests/test_distill.py) would change the norms the fp
# reference uses
OPTIONS = {"codebooks": "2x6", "in_group": 4, "bits": 3, "max_epochs": 2, "finetune_steps": 0,
           "distill_steps": 0}


@pytest.fixture(scope="module")
def aqlm_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("aqlm") / "q"
    return quantize(QuantizeJob("aqlm", OPTIONS, str(tiny_dir), CALIB, out, progress=False))


def dense_reference(src, checkpoint_dir):
    """The fp model with each quantized weight replaced by an independent dequantization
    of the stored codebook tensors (sum of codewords times the row scale)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = load_file(str(checkpoint_dir / "model.safetensors"))
    for name, module in model.named_modules():
        if f"{name}.codes" not in tensors:
            continue
        codes = tensors[f"{name}.codes"].long() & 0xFF
        books = tensors[f"{name}.codebooks"].float()[:, :, 0, :]
        scales = tensors[f"{name}.scales"].float().view(-1, 1)
        groups = books[0][codes[:, :, 0]] + books[1][codes[:, :, 1]]
        module.weight.data = groups.reshape(module.weight.shape) * scales
    return model


def test_aqlm_checkpoint_loads_in_transformers_with_the_stored_weights(aqlm_dir, tiny_dir):
    model = quant.load(aqlm_dir)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.config["format"] == "codebook" for m in layers)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        expected = dense_reference(tiny_dir, aqlm_dir)(input_ids=ids).logits
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4)
    report = json.loads((aqlm_dir / "quant_report.json").read_text())
    layer = report["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["scheme"] == "2x6 g4" and layer["shape_choice"] == "given"
    assert 0 < layer["aqlm_rel_loss"] < 1 and layer["epochs"] >= 1


def test_aqlm_export_round_trip_gives_identical_logits(aqlm_dir, tmp_path):
    out = export(aqlm_dir, "aqlm", tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "aqlm", "in_group_size": 4, "out_group_size": 1,
                      "num_codebooks": 2, "nbits_per_codebook": 6,
                      "linear_weights_not_to_quantize": ["lm_head.weight"]}
    from transformers.utils.quantization_config import AqlmConfig

    AqlmConfig.from_dict(config)  # the fields are the ones the pinned transformers reads
    tensors = load_file(str(out / "model.safetensors"))
    q = "model.layers.1.mlp.down_proj"
    assert tensors[f"{q}.codes"].dtype == torch.int8
    assert tensors[f"{q}.codebooks"].shape[1:3] == (64, 1)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = quant.load(aqlm_dir)(input_ids=ids).logits
        b = quant.load(out)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_int_checkpoints_do_not_export_to_aqlm(tmp_path, tiny_dir):
    # mixed codebook shapes: tests/test_plan.py
    rtn = quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir), CALIB,
                               tmp_path / "rtn", progress=False))
    assert_user_error(run("export", str(rtn), str(tmp_path / "y"), "--format", "aqlm"),
                      "codebook")
    assert not (tmp_path / "y").exists()


def test_aqlm_cli_reports_the_chosen_shapes(tmp_path, tiny_dir):
    proc = run("quantize", str(tiny_dir), "--method", "aqlm", "--max-epochs", "1",
               "--nsamples", "4", "--seqlen", "64", "--no-eval", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "layer formats:" in proc.stdout and "bits/weight" in proc.stdout
    assert "distillation: KL to the fp model" in proc.stdout  # on by default
    info = run("info", str(tmp_path / "c"))
    report = json.loads((tmp_path / "c" / "quant_report.json").read_text())
    for name, entry in report["layers"].items():  # the shape the method chose, per layer
        assert re.search(rf"{re.escape(name)}\s+{entry['scheme']}\s", info.stdout), name
    assert "before distillation" in info.stdout
    assert_user_error(run("quantize", str(tiny_dir), "--method", "aqlm", "--codebooks", "1x16",
                          "--no-eval", "--out", str(tmp_path / "d")), "larger than the")


def test_triton_codebook_kernels_generate_the_same_tokens(tmp_path, tiny_dir):
    """Greedy decoding on the Triton kernels (the interpreter on a CPU) must match the
    torch reference token for token."""
    from quant.layers import set_kernel_preference

    src = quantize(QuantizeJob("aqlm", {"codebooks": "2x6", "in_group": 4, "bits": 3,
                                        "max_epochs": 1}, str(tiny_dir), CALIB,
                               tmp_path / "k", progress=False))
    model = quant.load(src)
    ids = torch.tensor([[1, 42, 7, 300, 9]])
    outputs = {}
    for preference in ("torch", "triton"):
        set_kernel_preference(model, preference)
        with torch.no_grad():
            outputs[preference] = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(outputs["torch"], outputs["triton"])
