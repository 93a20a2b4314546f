"""Model fine-tuning by distillation: the quantized model's next-token distributions are
pulled towards the fp model's (KL), codes frozen; never worse on held-out sequences;
written into the checkpoint."""

import copy
import json

import pytest
import torch

import quant
from quant.data import CalibConfig, calibration_windows
from quant import finetune
from quant.finetune import (FinetuneConfig, TeacherKL, distillation_loss, finetune_model,
                            split_sequences, tunable_layers)
from quant.models import load_fp
from quant.pipeline import QuantizeJob, quantize

CALIB = CalibConfig("wiki-demo", nsamples=12, seqlen=64, seed=0)
OPTIONS = {"codebooks": "2x6", "in_group": 4, "bits": 3, "max_epochs": 2, "finetune_steps": 0}


@pytest.fixture(scope="module")
def untuned(tiny_dir, tmp_path_factory):
    """The tiny model quantized without any fine-tuning."""
    return quantize(QuantizeJob("aqlm", OPTIONS, str(tiny_dir), CALIB,
                                tmp_path_factory.mktemp("distill") / "q", progress=False))


@pytest.fixture(scope="module")
def ids(demo_tokenizer):
    return calibration_windows(CALIB, demo_tokenizer)


def kl_float64(model, teacher, ids: torch.Tensor) -> float:
    """Mean over tokens of sum_v p(v) (log p(v) - log q(v)), p the teacher's, in float64."""
    total = count = 0
    with torch.no_grad():
        for seq in ids:
            p = torch.log_softmax(teacher(seq[None]).logits.double(), -1)
            q = torch.log_softmax(model(seq[None]).logits.double(), -1)
            total += float((p.exp() * (p - q)).sum())
            count += seq.numel()
    return total / count


def scaled(directory, factor: float):
    """The checkpoint loaded with every codebook layer's scales times `factor`."""
    model = quant.load(directory)
    for layer in tunable_layers(model).values():
        layer.scales.data = layer.scales.data * factor
    return model


def test_check_sequences_are_held_out_and_seeded():
    train, check = split_sequences(20, seed=3)
    assert sorted(train.tolist() + check.tolist()) == list(range(20))
    assert len(check) == 4 and not set(check.tolist()) & set(train.tolist())
    assert torch.equal(split_sequences(20, 3)[1], check)
    train, check = split_sequences(6, seed=0)  # too few to hold any out
    assert len(train) == 6 and set(check.tolist()) <= set(train.tolist())


def test_distillation_loss_is_the_mean_kl_per_token(untuned, tiny_dir, ids):
    model, teacher = quant.load(untuned), load_fp(tiny_dir, torch.float32)
    assert distillation_loss(model, teacher, ids[:3], "cpu") == \
        pytest.approx(kl_float64(model, teacher, ids[:3]), rel=1e-4)
    assert distillation_loss(teacher, teacher, ids[:3], "cpu") == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 64])  # uneven chunks; one chunk
def test_teacher_kl_value_and_gradient_match_float64(monkeypatch, chunk_rows):
    monkeypatch.setattr(finetune, "KL_CHUNK_ENTRIES", chunk_rows * 500)
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 37, 500, dtype=torch.float64) * 4
    reference = student.clone().requires_grad_()
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(reference, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    expected.backward()

    ours = student.float().requires_grad_()
    value = TeacherKL.apply(ours, teacher.float())
    (3 * value).backward()
    assert value.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(ours.grad.double(), 3 * reference.grad, rtol=1e-4, atol=1e-9)
    with torch.no_grad():  # evaluation forms no gradient
        assert float(TeacherKL.apply(student.float(), teacher.float())) == float(value.detach())


def test_distillation_undoes_a_systematic_error_and_keeps_codes(untuned, tiny_dir, ids):
    """Every scale 30% too large: a random tiny model has no structure to learn beyond
    what quantization got wrong, so the held-out KL must fall well below the start."""
    model, teacher = scaled(untuned, 1.3), load_fp(tiny_dir, torch.float32)
    start = copy.deepcopy(model.state_dict())
    result = finetune_model(model, teacher, ids, FinetuneConfig(steps=16, lr=1e-3), "cpu")
    _, check = split_sequences(len(ids), 0)
    assert result["kl_after"] < 0.75 * result["kl_before"]
    assert result["kl_before"] == pytest.approx(
        kl_float64(scaled(untuned, 1.3), teacher, ids[check]), rel=1e-4)
    assert result["kl_after"] == pytest.approx(kl_float64(model, teacher, ids[check]), rel=1e-4)
    assert not any(layer._pinned is not None for layer in tunable_layers(model).values())
    end = model.state_dict()
    for name, tensor in start.items():
        changed = not torch.equal(tensor, end[name])
        tuned = name.endswith(("codebooks", "scales")) or "norm" in name
        assert changed == tuned, name


def test_distillation_computes_gradients_only_for_what_it_tunes(untuned, tiny_dir, ids):
    """The embedding (tied to the output head) is not tuned: backward must not spend a
    [vocab, hidden] product on it every step, and every flag is put back afterwards."""
    model, teacher = quant.load(untuned), load_fp(tiny_dir, torch.float32)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags["model.embed_tokens.weight"]
    finetune_model(model, teacher, ids, FinetuneConfig(steps=2, lr=1e-3), "cpu")
    for name, p in model.named_parameters():
        assert p.requires_grad == flags[name], name
        assert (p.grad is not None) == ("norm" in name), name


def test_distillation_that_hurts_is_undone(untuned, tiny_dir, ids):
    model, teacher = quant.load(untuned), load_fp(tiny_dir, torch.float32)
    start = copy.deepcopy(model.state_dict())
    result = finetune_model(model, teacher, ids, FinetuneConfig(steps=3, lr=30.0), "cpu")
    assert result["kl_after"] == result["kl_before"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())


def test_pipeline_distills_and_writes_the_tuned_model(untuned, tiny_dir, ids, tmp_path):
    out = quantize(QuantizeJob("aqlm", {**OPTIONS, "distill_steps": 12, "distill_lr": 1e-4},
                               str(tiny_dir), CALIB, tmp_path / "d", progress=False))
    entry = json.loads((out / "quant_report.json").read_text())["distill"]
    assert entry["steps"] == 12 and entry["kl_after"] <= entry["kl_before"]
    teacher = load_fp(tiny_dir, torch.float32)
    _, check = split_sequences(len(ids), CALIB.seed)
    # within the pipeline the matmuls may be bf16 (tests/test_bf16_calibration.py), and the
    # norms are written in the source's fp16
    assert entry["kl_before"] == pytest.approx(
        kl_float64(quant.load(untuned), teacher, ids[check]), rel=0.01)
    assert kl_float64(quant.load(out), teacher, ids[check]) == \
        pytest.approx(entry["kl_after"], rel=0.02)
