"""Block fine-tuning of AQLM layers: codes frozen, codebooks/scales/norms tuned to the fp
block's outputs; never worse than before; persisted (norms included) and resumable."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import quant
from quant import checkpoint
from quant.data import CalibConfig, calibration_windows
from quant import pipeline
from quant.finetune import (CHECK_EVERY, FinetuneConfig, Tunables, block_outputs,
                            finetune_block, relative_error)
from quant.formats.codebook_weight import CodebookWeight, reconstruct
from quant.layers import QuantLinear
from quant.methods import make_method
from quant.models import load_fp
from quant.pipeline import QuantizeJob, quantize, quantize_block, quantized_tensors, restore_block
from quant.plan import LayerSpec
from quant.traverse import BlockRun, capture_block_inputs, find_blocks, find_linears

CALIB = CalibConfig("wiki-demo", nsamples=8, seqlen=64, seed=0)
OPTIONS = {"codebooks": "2x6", "in_group": 4, "bits": 3, "max_epochs": 2, "finetune_steps": 0}


def test_tunable_parts_reproduce_the_format_and_round_to_storage():
    gen = torch.Generator().manual_seed(0)
    fmt = CodebookWeight.from_parts(torch.randint(0, 64, (6, 3, 2), generator=gen),
                                    torch.randn(2, 64, 4, generator=gen),
                                    torch.rand(6, generator=gen) + 0.5)
    parts = fmt.tunable()
    assert torch.equal(fmt.dequantize_tunable(parts), fmt.dequantize())
    parts = {k: v + 0.01 for k, v in parts.items()}
    tuned = fmt.with_tunable(parts)
    assert torch.equal(tuned.codes, fmt.codes)
    assert torch.equal(tuned.codebooks[:, :, 0].float(), parts["codebooks"].half().float())
    assert torch.equal(tuned.scales.view(-1).float(), parts["scales"].half().float())


@pytest.mark.parametrize("steps", [10, 7])
def test_adam_holds_its_learning_rate_then_decays_it_linearly_to_zero(steps):
    # On a constant gradient Adam's bias-corrected step is exactly its learning rate, so a
    # norm weight under loss = sum(weight) moves by the rate of each step.
    root = torch.nn.Module()
    root.norm = torch.nn.Parameter(torch.zeros(3))
    seen = []

    def loss(step):
        seen.append(float(root.norm[0].detach()))
        return root.norm.sum()

    Tunables(root, "cpu").adam(loss, FinetuneConfig(steps=steps, lr=0.1))
    moves = -torch.diff(torch.tensor(seen + [float(root.norm[0].detach())], dtype=torch.float64))
    decay = round(0.3 * steps)  # the last 30% of the steps fall linearly to zero
    expected = [0.1 * min(1.0, (steps - k) / decay) for k in range(steps)]
    assert moves.tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("through", ["tunable", "reconstruct"])
def test_tunable_gradients_equal_the_float64_sum_over_each_codeword_s_uses(through):
    """Tuning backpropagates through each codebook's cached sparse uses; a plain
    `reconstruct` through uses built in the backward: both give the float64 sum."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 7, 2), generator=gen)
    fmt = CodebookWeight.from_parts(codes, torch.randn(2, 16, 3, generator=gen),
                                    torch.rand(5, generator=gen) + 0.5)
    parts = {k: v.double().requires_grad_() for k, v in fmt.tunable().items()}
    upstream = torch.randn(5, 21, generator=gen, dtype=torch.float64)
    weight = fmt.dequantize_tunable(parts) if through == "tunable" else \
        reconstruct(codes, parts["codebooks"], parts["scales"])
    (weight * upstream).sum().backward()
    # d/dC_m[k] = sum over (row, group) whose m-th code is k of scale_row * upstream's group
    books, scales = parts["codebooks"].detach(), parts["scales"].detach()
    expected = torch.zeros_like(books)
    for row in range(5):
        for group in range(7):
            for m in range(2):
                expected[m, codes[row, group, m]] += scales[row] * upstream[row, 3 * group:
                                                                            3 * group + 3]
    assert torch.allclose(parts["codebooks"].grad, expected, rtol=1e-12, atol=1e-12)
    words = (books[0][codes[..., 0]] + books[1][codes[..., 1]]).reshape(5, 21)
    assert torch.allclose(parts["scales"].grad, (words * upstream).sum(1), rtol=1e-12)


@pytest.fixture(scope="module")
def quantized_block(tiny_dir, demo_tokenizer):
    """Block 0 of the tiny model, AQLM-quantized (no tuning), its inputs and fp targets."""
    model = load_fp(tiny_dir, torch.float32)
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_windows(CALIB, demo_tokenizer), 4)
    run = BlockRun(blocks[0], inputs, 0, torch.device("cpu"), f"{prefix}.0")
    targets = block_outputs(run)
    hidden = list(inputs.hidden)
    method = make_method("aqlm", **OPTIONS)
    specs = {name: method.plan_layer(name, linear.out_features, linear.in_features)
             for name, linear in find_linears(run.block).items()}
    quantize_block(run, specs, method)
    inputs.hidden = hidden
    return run, targets


def copy_of(run):
    """The block run on a deep copy of its block."""
    return BlockRun(copy.deepcopy(run.block), run.inputs, run.index, run.device, run.name)


def tensors_of(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def test_tuning_lowers_the_block_error_and_keeps_codes(quantized_block):
    run, targets = quantized_block
    run = copy_of(run)
    start = tensors_of(run.block)
    result = finetune_block(run, targets, FinetuneConfig(steps=20, lr=3e-3))
    assert result["after"] < 0.9 * result["before"]
    _, outputs = relative_error(run, targets)
    assert all(torch.equal(a, b) for a, b in zip(outputs, result["outputs"]))
    checked = range(0, len(run.inputs.hidden), CHECK_EVERY)
    after, _ = relative_error(run.subset(checked), [targets[b] for b in checked])
    assert result["after"] == pytest.approx(after)
    end = tensors_of(run.block)
    for name in start:
        changed = not torch.equal(start[name], end[name])
        assert changed == (name.endswith(("codebooks", "scales")) or "norm" in name), name


def test_a_step_on_some_sequences_sees_exactly_their_rows_of_the_batch(quantized_block):
    run, _ = quantized_block
    with torch.no_grad():
        full = run.forward(run.inputs.hidden[1], run.inputs.calls[0][1])
        part = run.forward(*run.rows(1, slice(1, 3)))
    assert part.shape[0] == 2
    torch.testing.assert_close(part, full[1:3], rtol=1e-5, atol=1e-5)


def test_tuning_that_hurts_is_undone(quantized_block):
    run, targets = quantized_block
    run = copy_of(run)
    start = tensors_of(run.block)
    result = finetune_block(run, targets, FinetuneConfig(steps=3, lr=10.0))
    assert result["after"] == result["before"]
    end = tensors_of(run.block)
    assert all(torch.equal(v, end[k]) for k, v in start.items())


def test_a_tuned_block_is_restored_with_its_norms(quantized_block, tmp_path):
    run, targets = quantized_block
    run = copy_of(run)
    block = run.block
    finetune_block(run, targets, FinetuneConfig(steps=5, lr=3e-3))
    specs = {n: LayerSpec(m.out_features, m.in_features, m.config)
             for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    staging = checkpoint.Staging(tmp_path / "out")
    staging.open({"run": 1}, resume=False, overwrite=False)
    staging.save_block(0, quantized_tensors(run), {f"model.layers.0.{n}": s.config
                                                    for n, s in specs.items()}, {})
    fresh = copy.deepcopy(quantized_block[0].block)
    for name, m in fresh.named_modules():  # back to plain linears, as a resumed run has them
        if isinstance(m, QuantLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            quant.layers.set_module(fresh, name, linear)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
    restore_block(BlockRun(fresh, run.inputs, 0, run.device, "model.layers.0"), specs, staging)
    restored, tuned = tensors_of(fresh), tensors_of(block)
    assert restored.keys() == tuned.keys()
    assert all(torch.equal(v, restored[k]) for k, v in tuned.items())


def test_pipeline_tunes_each_block_and_writes_the_tuned_norms(tiny_dir, tmp_path):
    out = quantize(QuantizeJob("aqlm", {**OPTIONS, "finetune_steps": 6, "finetune_lr": 3e-3},
                               str(tiny_dir), CALIB, tmp_path / "q", progress=False))
    report = json.loads((out / "quant_report.json").read_text())["layers"]
    tuned = [entry["block_finetune"] for entry in report.values()]
    assert all(t["steps"] == 6 and t["rel_block_output_mse_after"]
               <= t["rel_block_output_mse_before"] for t in tuned)
    assert any(t["rel_block_output_mse_after"] < t["rel_block_output_mse_before"] for t in tuned)
    written = load_file(str(out / "model.safetensors"))
    source = load_file(str(tiny_dir / "model.safetensors"))
    norms = [k for k in source if "layernorm" in k and k.startswith("model.layers.")]
    assert any(not torch.equal(written[k], source[k]) for k in norms)


def test_a_resumed_tuned_run_equals_an_uninterrupted_one(tiny_dir, tmp_path, monkeypatch):
    options = {**OPTIONS, "finetune_steps": 4}
    whole = quantize(QuantizeJob("aqlm", options, str(tiny_dir), CALIB, tmp_path / "whole",
                                 progress=False))
    real = pipeline.quantize_block

    def crash_at_the_last_block(run, specs, method):
        if run.index == len(find_blocks(load_fp(tiny_dir, torch.float32))[1]) - 1:
            raise RuntimeError("crash")
        return real(run, specs, method)

    monkeypatch.setattr(pipeline, "quantize_block", crash_at_the_last_block)
    job = QuantizeJob("aqlm", options, str(tiny_dir), CALIB, tmp_path / "resumed", progress=False)
    with pytest.raises(RuntimeError, match="crash"):
        quantize(job)
    monkeypatch.undo()
    job.resume = True
    resumed = quantize(job)
    a = load_file(str(resumed / "model.safetensors"))
    b = load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
