import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import quant
from quant import checkpoint
from quant.data import CalibConfig, calibration_windows
from quant.pipeline import QuantizeJob, quantize
from tests.conftest import make_tiny_model

CALIB = CalibConfig("wiki-demo", nsamples=4, seqlen=64, seed=0)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-rtn"
    quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir), CALIB, out,
                         progress=False))
    return out


def test_checkpoint_directory(tiny_ckpt):
    config = json.loads((tiny_ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format_version"] == 1
    assert len(qc["modules"]) == 2 * 7 and qc["modules_to_not_convert"] == ["lm_head"]
    assert qc["modules"]["model.layers.1.mlp.down_proj"] == {
        "format": "int", "bits": 4, "group_size": 32, "sym": False, "act_order": False}
    assert qc["calibration"]["nsamples"] == 4 and qc["calibration"]["seed"] == 0
    names = set(load_file(str(tiny_ckpt / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names and "lm_head.weight" in names
    assert {p.name for p in tiny_ckpt.iterdir()} >= {
        "config.json", "model.safetensors", "quant_report.json", "tokenizer.json"}
    assert not list(tiny_ckpt.parent.glob(".*partial"))  # staging removed


def test_report_bits_match_file_bytes(tiny_ckpt):
    report = json.loads((tiny_ckpt / "quant_report.json").read_text())
    tensors = load_file(str(tiny_ckpt / "model.safetensors"))
    for name, layer in report["layers"].items():
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                     if k.startswith(name + ".") and not k.endswith(".bias"))
        out_f, in_f = layer["shape"]
        assert layer["bits_per_weight"] == pytest.approx(8 * stored / (out_f * in_f), abs=1e-4)
    assert report["files"]["model.safetensors"]["bytes"] == \
        (tiny_ckpt / "model.safetensors").stat().st_size


def test_output_error_matches_independent_computation(tiny_ckpt, tiny_dir, demo_tokenizer):
    """q_proj of block 0 sees RMSNorm(embeddings): recompute its error in float64."""
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    qmodel = quant.load(tiny_ckpt, dtype=torch.float64)
    ids = calibration_windows(CALIB, demo_tokenizer)
    x = fp.model.layers[0].input_layernorm(fp.model.embed_tokens(ids))
    w = fp.model.layers[0].self_attn.q_proj.weight
    w_q = qmodel.model.layers[0].self_attn.q_proj.quantized_weight().dequantize(torch.float64)
    expected = ((x @ (w_q - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()).item()
    report = json.loads((tiny_ckpt / "quant_report.json").read_text())
    got = report["layers"]["model.layers.0.self_attn.q_proj"]["rel_output_mse"]
    assert got == pytest.approx(expected, rel=1e-3)
    assert 1e-5 < got < 0.1


def _run_quantize(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "quant.cli", "quantize", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, demo_tokenizer):
    src = make_tiny_model(tmp_path / "deep", demo_tokenizer, layers=8, hidden=384,
                          intermediate=1024, heads=6, kv_heads=2)
    args = [str(src), "--method", "rtn", "--bits", "3", "--group-size", "64",
            "--nsamples", "32", "--seqlen", "256", "--no-eval", "--device", "cpu"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    staging = checkpoint.Staging(killed)

    proc = _run_quantize([*args, "--out", str(killed)])
    deadline = time.time() + 300
    while staging.done_blocks() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = staging.done_blocks()
    assert 1 <= done < 8, f"kill landed after {done} blocks"
    assert not killed.exists()  # nothing that looks like a finished checkpoint

    resumed = _run_quantize([*args, "--out", str(killed), "--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    full = _run_quantize([*args, "--out", str(whole)])
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err

    a, b = load_file(str(killed / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    report = json.loads((killed / "quant_report.json").read_text())
    assert len(report["layers"]) == 8 * 7


def test_resume_refuses_other_settings(tmp_path, tiny_dir):
    out = tmp_path / "o"
    staging = checkpoint.Staging(out)
    staging.open({"settings": 1}, resume=False, overwrite=False)
    job = QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir), CALIB, out,
                      resume=True, progress=False)
    with pytest.raises(quant.errors.ConfigError, match="other settings"):
        quantize(job)
    job.resume = False
    with pytest.raises(quant.errors.ConfigError, match="--resume"):
        quantize(job)
