"""The per-layer plan: made from a model's config alone, it is what the checkpoint holds
(`quant plan` and `quant info` agree on every layer), structure never comes from
quant_report.json, and a checkpoint that disagrees with its plan is refused."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import quant
from quant import checkpoint
from quant import plan as plans
from quant.data import CalibConfig
from quant.errors import CheckpointError, ModelError
from quant.export import export
from quant.methods import make_method
from quant.pipeline import QuantizeJob, quantize
from tests.conftest import make_tiny_model
from tests.test_cli import assert_user_error, run

CALIB = CalibConfig("wiki-demo", nsamples=4, seqlen=64, seed=0)
JOBS = {  # name: (method, options): integer grids with and without g_idx, mixed aqlm shapes
    "rtn": ("rtn", {"bits": 4, "group_size": 32}),
    "gptq": ("gptq", {"bits": 3, "group_size": 32}),
    "gptq-static": ("gptq", {"bits": 4, "group_size": 32, "static_groups": True}),
    "aqlm": ("aqlm", {"bits": 2, "max_epochs": 1, "distill_steps": 0}),
}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory, demo_tokenizer):
    """A tiny model whose widths 3 and 4 divide, so aqlm --bits 2 mixes 1x8 g4 and g3."""
    return make_tiny_model(tmp_path_factory.mktemp("plan") / "fp", demo_tokenizer, hidden=96,
                           intermediate=192, heads=4, kv_heads=2, exact=True)


@pytest.fixture(scope="module")
def checkpoints(fp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {name: quantize(QuantizeJob(method, options, str(fp_dir), CALIB, root / name,
                                       progress=False))
            for name, (method, options) in JOBS.items()}


def cli_json(*args):
    proc = run(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def flags(options: dict) -> list[str]:
    return [part for key, value in options.items()
            for part in (f"--{key.replace('_', '-')}", str(value))
            if not isinstance(value, bool)] + \
        [f"--{key.replace('_', '-')}" for key, value in options.items() if value is True]


@pytest.mark.parametrize("job", list(JOBS))
def test_plan_and_info_agree_on_every_layer(job, fp_dir, checkpoints):
    method, options = JOBS[job]
    planned = cli_json("plan", str(fp_dir), "--method", method, *flags(options))
    info = cli_json("info", str(checkpoints[job]))
    keys = ("name", "scheme", "shape", "bits", "bits_per_weight")
    assert [{k: layer[k] for k in keys} for layer in planned["layers"]] == \
        [{k: layer[k] for k in keys} for layer in info["layers"]]
    for total in ("quantized_layers", "quantized_bits_per_weight", "model_bits_per_weight",
                  "parameters", "checkpoint_bytes"):
        assert planned[total] == info[total], total
    # the files hold exactly the planned bytes, plus one header per file
    weights = checkpoints[job] / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    assert weights.stat().st_size == header + planned["checkpoint_bytes"]
    schemes = {layer["scheme"] for layer in info["layers"]}
    assert schemes == {"rtn": {"int4 g32"}, "gptq": {"int3 g32 act-order"},
                       "gptq-static": {"int4 g32"}, "aqlm": {"1x8 g4", "1x8 g3"}}[job]


def test_a_config_json_alone_plans_like_the_model(fp_dir, tmp_path):
    (tmp_path / "config-only").mkdir()
    shutil.copy(fp_dir / "config.json", tmp_path / "config-only")
    alone = cli_json("plan", str(tmp_path / "config-only"), "--method", "aqlm", "--bits", "2")
    full = cli_json("plan", str(fp_dir), "--method", "aqlm", "--bits", "2")
    assert alone["plan"] == full["plan"]
    plan = plans.Plan.from_json(full["plan"])
    assert plan.to_json() == full["plan"]
    wide = [name for name, spec in plan.layers.items() if spec.scheme == "1x8 g3"]
    assert wide and all(name.endswith(("up_proj", "o_proj")) for name in wide)
    assert all("widened" in plan.layers[name].note for name in wide)


def test_the_report_is_not_needed(checkpoints, tmp_path):
    for job in ("gptq", "aqlm"):
        bare = tmp_path / job
        shutil.copytree(checkpoints[job], bare)
        with_report = cli_json("info", str(bare))
        (bare / checkpoint.REPORT).unlink()
        without = cli_json("info", str(bare))
        assert without["layers"] == [{k: v for k, v in layer.items() if k != "rel_output_mse"}
                                     for layer in with_report["layers"]]
        ids = torch.tensor([[1, 42, 7, 300]])
        with torch.no_grad():
            expected = quant.load(checkpoints[job])(ids).logits
            assert torch.equal(quant.load(bare)(ids).logits, expected)
    exported = export(tmp_path / "gptq", "gptq", tmp_path / "gptq-v1")
    assert (exported / "model.safetensors").exists()
    assert "mixes 2 layer schemes (1x8 g3, 1x8 g4)" in run(
        "export", str(tmp_path / "aqlm"), str(tmp_path / "x"), "--format", "aqlm").stderr


def test_a_checkpoint_that_disagrees_with_its_config_is_refused(checkpoints, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(checkpoints["aqlm"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["in_group_size"] = 4
    (edited / "config.json").write_text(json.dumps(config))
    message = "tensor model.layers.0.mlp.up_proj.codes is I8 [192, 32, 1], its config says"
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        quant.load(edited)
    assert_user_error(run("info", str(edited)), message)
    assert_user_error(run("export", str(edited), str(tmp_path / "x"), "--format", "aqlm"),
                      message)
    config["quantization_config"]["modules"] = {}  # every linear would be left random
    (edited / "config.json").write_text(json.dumps(config))
    assert_user_error(run("eval", str(edited)), "tensor model.layers.0.self_attn.q_proj.weight "
                                                "is missing")
    assert not (tmp_path / "x").exists()


def test_the_library_applies_the_method_s_calibration_defaults(fp_dir, tmp_path):
    out = quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(fp_dir),
                               CalibConfig(seqlen=64), tmp_path / "lib", progress=False))
    proc = run("quantize", str(fp_dir), "--bits", "4", "--group-size", "32", "--seqlen", "64",
               "--no-eval", "--out", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    for directory in (out, tmp_path / "cli"):
        qc = checkpoint.read_quant_config(directory)
        assert qc["calibration"]["nsamples"] == make_method("rtn").calibration.nsamples == 32


LLAMA_3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, dtype="bfloat16",
                   architectures=["LlamaForCausalLM"])


def test_a_70b_config_plans_to_a_hand_count(tmp_path):
    """Llama-3-70B's published config: 80 blocks of q/o 8192x8192, k/v 1024x8192,
    gate/up 28672x8192, down 8192x28672; untied 128256x8192 embeddings and lm_head."""
    LlamaConfig(**LLAMA_3_70B).save_pretrained(tmp_path)
    linears = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192),
               (28672, 8192), (8192, 28672)]
    weights = 80 * sum(o * i for o, i in linears)
    kept = 2 * 128256 * 8192 + (2 * 80 + 1) * 8192  # embeddings, lm_head, norms (bf16)

    gptq = plans.for_source(tmp_path, make_method("gptq", bits=4, group_size=128,
                                                  act_order=False))
    # 4-bit codes, then per 128 inputs one fp16 scale and one 4-bit zero per output
    int_bits = 80 * sum(o * i * 4 + i // 128 * o * (16 + 4) for o, i in linears)
    assert gptq.bits_per_weight() == int_bits / weights == pytest.approx(4 + 20 / 128)
    assert gptq.checkpoint_bytes() == int_bits // 8 + 2 * kept
    assert gptq.parameters() == weights + kept

    aqlm = plans.for_source(tmp_path, make_method("aqlm", bits=2))
    # the paper's 2-bit, 1x16 g8: a 16-bit code per 8 weights, a 65536 x 8 fp16 codebook and
    # an fp16 scale per row; k/v, where that codebook passes a quarter of the codes' size:
    # 1x8 g4, an 8-bit code per 4 weights and a 256 x 4 codebook
    schemes = [aqlm.layers[f"model.layers.7.{n}"].scheme for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert schemes == ["1x16 g8", "1x8 g4", "1x8 g4", "1x16 g8", "1x16 g8", "1x16 g8", "1x16 g8"]
    aqlm_bits = 80 * sum(o * i // 8 * 16 + 65536 * 8 * 16 + o * 16 if s == "1x16 g8" else
                         o * i // 4 * 8 + 256 * 4 * 16 + o * 16
                         for (o, i), s in zip(linears, schemes))
    assert aqlm.bits_per_weight() == aqlm_bits / weights
    assert aqlm.checkpoint_bytes() == aqlm_bits // 8 + 2 * kept


def test_ties_are_stored_once(demo_tokenizer, tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = plans.for_method(model, make_method("rtn", bits=4), torch.float16)
    assert plan.kept["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert "lm_head.weight" not in plan.stored_tensors()
    assert plan.parameters() == sum(p.numel() for p in model.parameters())  # each tensor once


def test_plan_bad_input(fp_dir, tmp_path):
    assert_user_error(run("plan", str(fp_dir), "--group-size", "64"),
                      "model.layers.0.self_attn.q_proj: --group-size 64 does not divide")
    assert_user_error(run("plan", str(fp_dir), "--method", "aqlm", "--codebooks", "1x16"),
                      "model.layers.0.self_attn.q_proj: --codebooks 1x16")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
        "vocab_size": 1000}))
    assert_user_error(run("plan", str(bert)), "BertForMaskedLM is not a causal language model")
    with pytest.raises(ModelError, match="no repeated decoder blocks"):
        plans.quantizable_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_no_method_is_probed_for_optional_parts():
    root = Path(quant.__file__).parent
    proc = subprocess.run(["grep", "-rn", r"getattr(method\|hasattr(method", str(root)],
                          capture_output=True, text=True)
    assert proc.stdout == ""
