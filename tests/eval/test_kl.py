"""KL divergence to the fp model: streamed statistics against a float64 computation on the
whole set, zero for a model against itself, and ordered by bits on the demo model."""

import hashlib
import json
import math
import shutil

import pytest
import torch

from quant.data import CalibConfig
from quant.eval import evaluate
from quant.eval.kl import kl_stats
from quant.pipeline import QuantizeJob, quantize


def cli(capsys, *args):
    """(exit code, stdout, stderr) of `quant ARGS`, in this process."""
    from quant.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_int3(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("kl") / "int3"
    return quantize(QuantizeJob("rtn", {"bits": 3, "group_size": 32}, str(tiny_dir),
                                CalibConfig(nsamples=2, seqlen=64), out, progress=False))


def reference_kl(model, fp, windows):
    """The same figures from every logit of the set at once, in float64."""
    with torch.no_grad():
        q = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        p = torch.log_softmax(fp(input_ids=windows).logits[:, :-1].double(), -1)
    per_token = (p.exp() * (p - q)).sum(-1).flatten()
    targets = windows[:, 1:, None]
    return {"kl_mean": per_token.mean().item(),
            "kl_p99": per_token.sort().values[math.ceil(0.99 * (len(per_token) - 1))].item(),
            "top1_agreement": (q.argmax(-1) == p.argmax(-1)).double().mean().item(),
            "ppl": math.exp(-q.gather(-1, targets).mean().item()),
            "ppl_reference": math.exp(-p.gather(-1, targets).mean().item())}


def test_streamed_statistics_equal_a_float64_computation(tiny_int3, tiny_dir):
    import quant
    from quant import models

    model = quant.load(tiny_int3, dtype=torch.float32)
    fp = models.load_fp(tiny_dir, torch.float32)
    windows = torch.randint(0, 2000, (5, 48), generator=torch.Generator().manual_seed(0))
    got = kl_stats(model, fp, windows, batch_size=2, progress=False)
    want = reference_kl(model, fp, windows)
    assert got["tokens"] == 5 * 47
    assert got["kl_mean"] > 1e-3  # 3-bit really differs from fp
    for key, value in want.items():
        # the 99th percentile interpolates between neighbours: within the gap to the next
        tolerance = 0.05 * value if key == "kl_p99" else 1e-4 * max(1.0, value)
        assert got[key] == pytest.approx(value, abs=tolerance), key


def test_a_model_against_itself_is_zero(tiny_dir):
    result = evaluate.evaluate_kl(str(tiny_dir), ["wiki-demo"], reference=str(tiny_dir),
                                  seqlen=64, max_windows=3, progress=False)[0]
    assert abs(result["kl_mean"]) < 1e-6 and abs(result["kl_p99"]) < 1e-6
    assert result["top1_agreement"] == 1.0 and result["ppl"] == result["ppl_reference"]
    assert result["windows"] == 3 and result["tokens"] == 3 * 63


@pytest.mark.demo
def test_four_bits_are_closer_to_fp_than_two(demo_rtn_dir, demo_dir, tmp_path):
    two = quantize(QuantizeJob("rtn", {"bits": 2, "group_size": 64}, str(demo_dir),
                               CalibConfig(nsamples=2), tmp_path / "rtn2", progress=False))
    kl = {bits: evaluate.evaluate_kl(str(path), ["wiki-demo"], seqlen=256, max_windows=2,
                                     progress=False)[0]
          for bits, path in ((4, demo_rtn_dir), (2, two))}
    assert kl[4]["reference"] == str(demo_dir)  # found from the checkpoint's record
    assert 0 < kl[4]["kl_mean"] < kl[2]["kl_mean"]
    assert kl[4]["top1_agreement"] > kl[2]["top1_agreement"]
    assert kl[4]["ppl_reference"] == pytest.approx(kl[2]["ppl_reference"], rel=1e-6)
    recorded = [r for r in json.loads((two / "eval.json").read_text()) if r["metric"] == "kl"]
    assert recorded == [kl[2]]


def test_cli_records_and_refuses_without_a_reference(tiny_int3, tiny_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "eval", str(tiny_int3), "--kl", "--dataset", "code-demo",
                         "--seqlen", "64", "--windows", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["metric"] == "kl" and result["dataset"] == "code-demo"
    from quant import assets  # the record names its text by the file's hash

    assert result["text_sha256"] == hashlib.sha256(
        assets.text_path("code-demo").read_bytes()).hexdigest()
    assert result in json.loads((tiny_int3 / "eval.json").read_text())
    assert "KL mean" in err

    orphan = shutil.copytree(tiny_int3, tmp_path / "orphan")
    report = json.loads((orphan / "quant_report.json").read_text())
    report["source"] = str(tmp_path / "gone")
    (orphan / "quant_report.json").write_text(json.dumps(report))
    for args, pattern in [((str(orphan), "--kl"), "pass --reference MODEL"),
                          ((str(tiny_dir), "--kl"), "pass --reference MODEL"),
                          ((str(orphan), "--windows", "2"), "goes with --kl")]:
        code, _, err = cli(capsys, "eval", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and pattern in err, err
    code, _, err = cli(capsys, "eval", str(orphan), "--kl", "--reference", str(tiny_dir),
                       "--seqlen", "64", "--windows", "1")
    assert code == 0, err
