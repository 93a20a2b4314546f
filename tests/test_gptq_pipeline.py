"""GPTQ through the pipeline: Hessians from hooks, true-sequential groups, replay, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quant
import quant.traverse
from quant.data import CalibConfig, calibration_windows
from quant.errors import ModelError
from quant.layers import QuantLinear, set_kernel_preference
from quant.models import load_fp
from quant.pipeline import QuantizeJob, quantize
from quant.stats import collect_hessians, input_groups
from quant.traverse import BlockRun, capture_block_inputs, find_blocks, find_linears
from tests.conftest import make_tiny_model, quantize_one

CALIB = CalibConfig("wiki-demo", nsamples=6, seqlen=64, seed=0)


def block_inputs(model_dir, tokenizer):
    model = load_fp(model_dir, torch.float32)
    _, blocks = find_blocks(model)
    ids = calibration_windows(CALIB, tokenizer)
    return model, blocks, ids, capture_block_inputs(model, blocks, ids, batch_size=4)


def test_groups_and_hessian_of_first_block(tiny_dir, demo_tokenizer):
    model, blocks, ids, inputs = block_inputs(tiny_dir, demo_tokenizer)
    linears = find_linears(blocks[0])
    run = BlockRun(blocks[0], inputs, 0, torch.device("cpu"))
    groups = input_groups(run, linears)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                      ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    hessians = collect_hessians(run, groups[:1], torch.float64)
    with torch.no_grad():
        x = blocks[0].input_layernorm(model.model.embed_tokens(ids)).double().reshape(-1, 64)
    expected = 2 * x.t() @ x / x.shape[0]
    assert torch.allclose(hessians["self_attn.k_proj"], expected, rtol=1e-6, atol=1e-9)
    assert hessians["self_attn.q_proj"] is hessians["self_attn.v_proj"]


@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    return quantize(QuantizeJob("gptq", {"bits": 3, "group_size": 32, "act_order": True},
                                str(tiny_dir), CALIB, out, progress=False))


def test_report_and_act_order_checkpoint(gptq_ckpt, tiny_dir, demo_tokenizer):
    report = json.loads((gptq_ckpt / "quant_report.json").read_text())
    for entry in report["layers"].values():
        assert entry["scheme"] == "int3 g32 act-order"
        assert entry["gptq_loss"] >= 0 and entry["damp"] == 0.01
        assert 0 < entry["rel_output_mse"] < 0.2 and "seconds" in entry
    model = quant.load(gptq_ckpt)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert module.g_idx.shape == (module.in_features,)
            reference.get_submodule(name).weight.data = module.quantized_weight().dequantize()
    ids = demo_tokenizer("act order keeps g_idx", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        set_kernel_preference(model, "triton")  # the g_idx path of the kernel
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)


def test_replaying_finished_children_changes_nothing(tiny_dir, tmp_path, monkeypatch):
    job = lambda out: QuantizeJob("gptq", {"bits": 3, "group_size": 32, "act_order": True},
                                  str(tiny_dir), CALIB, tmp_path / out, progress=False)
    shortcuts = []
    tail_output = quant.traverse.ChildReplay.tail_output

    def spy(self, child, batch):
        out = tail_output(self, child, batch)
        shortcuts.append((child, self.tails[child].linear, out is not None))
        return out

    monkeypatch.setattr(quant.traverse.ChildReplay, "tail_output", spy)
    replayed = quantize(job("replay"))
    # every block's attention and MLP came from their quantized tails' recorded inputs
    assert sorted(set(shortcuts)) == [("mlp", "mlp.down_proj", True),
                                      ("self_attn", "self_attn.o_proj", True)]
    monkeypatch.setattr(quant.traverse.ChildReplay, "refresh", lambda self: None)
    recomputed = quantize(job("no-replay"))
    a = load_file(str(replayed / "model.safetensors"))
    b = load_file(str(recomputed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_activations_are_refused(tmp_path, demo_tokenizer):
    src = make_tiny_model(tmp_path / "nan", demo_tokenizer)
    from safetensors.torch import save_file
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.embed_tokens.weight"][:] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="NaN or inf"):
        quantize(QuantizeJob("gptq", {"bits": 4, "group_size": 32}, str(src), CALIB,
                             tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


def test_zero_inputs_fall_back_to_rounding(tmp_path, demo_tokenizer):
    src = make_tiny_model(tmp_path / "zero", demo_tokenizer)
    from safetensors.torch import save_file
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.input_layernorm.weight"][:] = 0  # q/k/v see only zeros
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = quantize(QuantizeJob("gptq", {"bits": 4, "group_size": 32}, str(src), CALIB,
                               tmp_path / "out", progress=False))
    report = json.loads((out / "quant_report.json").read_text())["layers"]
    assert report["model.layers.0.self_attn.q_proj"]["dead_columns"] == 64
    assert report["model.layers.0.self_attn.o_proj"]["dead_columns"] == 64  # v is 0 too
    assert report["model.layers.0.mlp.gate_proj"]["dead_columns"] == 0
    model = quant.load(out)
    rtn = quant.methods.make_method("rtn", bits=4, group_size=32)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    expected = quantize_one(rtn, fp.model.layers[0].self_attn.q_proj.weight.data)[0].dequantize()
    got = model.model.layers[0].self_attn.q_proj.quantized_weight().dequantize()
    assert torch.equal(got, expected)
