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


def test_all_demo_table_ratios_and_eval_json(counted, tiny_dir, tmp_path, capsys):
    """`quantize` ends with every demo domain's perplexity, fp and quantized, their ratios
    and the geometric mean of the ratios; `quant eval --ppl all-demo` gives the same, and
    eval.json holds one result per split."""
    import json
    import math

    from quant import data
    from quant.cli import main, quantize_main

    out = tmp_path / "ckpt"
    assert quantize_main([str(tiny_dir), "--method", "rtn", "--bits", "3", "--nsamples", "6",
                          "--seqlen", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    domains = data.demo_sets()
    assert len(counted) == 2 * len(domains)        # fp and quantized, each split once
    assert main(["eval", str(out), "--ppl", "all-demo"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(counted) == 3 * len(domains)        # the fp results are reused
    assert [r["dataset"] for r in result["results"]] == domains
    for r in result["results"]:
        assert r["windows"] == (40 if r["dataset"] == "wiki-demo" else 32)
    rows = result["comparison"]["rows"]
    for row in rows:
        assert row["ratio"] == pytest.approx(row["quantized"] / row["fp"], rel=1e-12)
    geomean = math.prod(r["ratio"] for r in rows) ** (1 / len(rows))
    assert result["comparison"]["geomean_ratio"] == pytest.approx(geomean, rel=1e-9)

    # one split against an independent torch computation on the checkpoint
    import quant
    from quant.models import load_tokenizer

    model = quant.load(out, dtype=torch.float32)
    windows = data.eval_windows("code-demo", load_tokenizer(out), 512)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view(len(windows), -1)
    code = next(r for r in rows if r["dataset"] == "code-demo")
    assert code["quantized"] == pytest.approx(math.exp(losses.mean(1).double().mean()), rel=1e-4)

    assert "geometric mean" in printed and all(d in printed for d in domains)
    records = json.loads((out / "eval.json").read_text())
    for quantized in (True, False):
        assert sorted(r["dataset"] for r in records if r["metric"] == "perplexity"
                      and r["quantized"] is quantized) == sorted(domains)
    summary, = [r for r in records if r["metric"] == "perplexity-vs-fp"]
    assert summary["datasets"] == domains
    assert summary["geomean_ratio"] == pytest.approx(geomean, rel=1e-9)
