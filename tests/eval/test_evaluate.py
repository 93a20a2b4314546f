"""The fp perplexity that `quantize` prints is measured once per model, data and setting,
then reused until any of them changes."""

import os
import shutil

import pytest
import torch

from quant.data import CalibConfig
from quant.eval import evaluate
from quant.pipeline import QuantizeJob, quantize


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """evaluate_ppl with a fresh cache directory, counting the perplexity measurements."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    calls = []
    measure = evaluate.perplexity

    def perplexity(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)
    monkeypatch.setattr(evaluate, "perplexity", perplexity)
    return calls


def test_fp_result_is_reused_until_model_data_or_setting_changes(counted, tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(400)))

    def run(seqlen=64, reuse=True):
        return evaluate.evaluate_ppl(str(model), str(text), seqlen, progress=False,
                                     reuse_fp=reuse)

    first = run()
    assert len(counted) == 1 and not first.get("cached")
    again = run()
    assert len(counted) == 1 and again["cached"] and again["ppl"] == first["ppl"]
    assert not run(reuse=False).get("cached") and len(counted) == 2  # `quant eval` measures
    run(seqlen=32)
    assert len(counted) == 3                       # another window length
    text.write_text(text.read_text() + " a longer text")
    run()
    assert len(counted) == 4                       # the data changed
    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run()
    assert len(counted) == 5                       # the model's files changed
    cache_file = evaluate.fp_cache_file(str(model), str(text), 64, torch.device("cpu"))
    cache_file.write_text("{damaged")
    assert not run().get("cached") and len(counted) == 6


def test_checkpoints_are_always_measured(counted, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i % 31} text" for i in range(600)))
    out = tmp_path / "ckpt"
    quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir),
                         CalibConfig(str(text), nsamples=2, seqlen=64), out, progress=False))
    for _ in range(2):
        result = evaluate.evaluate_ppl(str(out), str(text), 64, progress=False, reuse_fp=True)
        assert result["quantized"] and not result.get("cached")
    assert len(counted) == 2
    assert not (tmp_path / "cache" / "fp-eval").exists()
