"""The wiki-demo protocol numbers on the demo model (issue: fp 8.18 +- 0.02, RTN <= 10.25)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import quant
from quant.data import eval_windows
from quant.eval.perplexity import perplexity
from tests.methods.test_rtn import reference_rtn

pytestmark = pytest.mark.demo


def hf_perplexity(model, windows):
    """The protocol in its plainest form: exp(mean over windows of model(x, labels=x).loss)."""
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_rtn_4bit_g64_on_demo(demo_dir, demo_rtn_dir, demo_tokenizer):
    windows = eval_windows("wiki-demo", demo_tokenizer, 512)
    ours = perplexity(quant.load(demo_rtn_dir), windows, progress=False)

    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    fp = perplexity(model, windows, progress=False)
    assert fp == pytest.approx(8.18, abs=0.02)
    with torch.no_grad():  # independent few-line RTN applied to every decoder linear
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.data = reference_rtn(module.weight.data, 4, 64, False).float()
    reference = hf_perplexity(model, windows)
    assert ours == pytest.approx(reference, rel=2e-4)
    assert ours <= 10.25
