"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from quant.data import CalibConfig
from quant.methods import METHODS, make_method
from quant.pipeline import QuantizeJob, quantize


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quant.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_user_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture()
def work(tmp_path):
    return tmp_path


def left_behind(work):
    return sorted(p.name for p in work.iterdir() if p.name not in {"corpus.txt", "src"})


@pytest.mark.parametrize("args,pattern", [
    (["./no-such-model"], "does not exist"),
    (["/definitely/not/here"], "does not exist"),
    (["some-org/some-model"], "model hub"),
    (["{tiny}", "--bits", "1"], "--bits 1 is not supported"),
    (["{tiny}", "--bits", "7"], "--bits 7 is not supported"),
    (["{tiny}", "--bits", "9"], "--bits 9 is not supported"),
    (["{tiny}", "--group-size", "48"], "does not divide the input dimension 64"),
    (["{tiny}", "--group-size", "128"], "larger than the input dimension 64"),
    (["{tiny}", "--calib", "{short}", "--nsamples", "8"], "fewer than nsamples x seqlen"),
    (["{tiny}", "--calib", "wikitext103"], "unknown data set"),
    (["{tiny}", "--calib", "news-demo"], "use one of wiki-demo, c4-demo, code-demo"),
    (["{tiny}", "--calib", "technical-demo", "--nsamples", "60"], "at most --nsamples 53"),
    (["{tiny}", "--calib", "mix-demo", "--nsamples", "400"], "at most about --nsamples 318"),
    (["{tiny}", "--calib", "self:0"], "self:N needs a whole number of sequences N >= 1"),
    (["{tiny}", "--calib", "self:4", "--nsamples", "8"], "drop --nsamples 8 or make it 4"),
    (["{tiny}", "--eval-ppl", "news-demo"], "unknown data set"),
    (["{tiny}", "--eval-ppl", "self:8"], "it has no text to evaluate on"),
    (["{tiny}", "--method", "nope"], "unknown method"),
    (["{tiny}", "--nsamples", "0"], "--nsamples must be at least 1"),
    (["{tiny}", "--device", "tpu"], "--device"),
    (["{tiny}", "--bits", "four"], "invalid int value"),
])
def test_quantize_bad_input(work, tiny_dir, args, pattern):
    (work / "corpus.txt").write_text("far too short for calibration")
    args = [a.format(tiny=tiny_dir, short=work / "corpus.txt") for a in args]
    proc = run("quantize", *args, "--out", str(work / "out"), "--no-eval", cwd=work)
    assert_user_error(proc, pattern)
    assert left_behind(work) == []


def test_output_exists(work, tiny_dir):
    (work / "out").mkdir()
    (work / "out" / "mine.txt").write_text("keep me")
    proc = run("quantize", str(tiny_dir), "--out", str(work / "out"), "--no-eval")
    assert_user_error(proc, "already exists")
    assert (work / "out" / "mine.txt").read_text() == "keep me"


def test_overwrite_replaces_only_what_lowbit_wrote(work, small_ckpt, tiny_dir, capsys):
    """--overwrite never deletes a directory of the user's; it replaces our checkpoints
    and exports, and an empty directory."""
    from quant.cli import main, quantize_main

    def refused(code):
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    mine = work / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    quick = [str(tiny_dir), "--no-eval", "--nsamples", "2", "--seqlen", "32", "--overwrite"]
    assert "is not a lowbit checkpoint or export" in refused(
        quantize_main([*quick, "--out", str(mine)]))
    assert "is not a lowbit checkpoint or export" in refused(
        main(["export", str(small_ckpt), str(mine), "--format", "gptq", "--overwrite"]))
    assert (mine / "thesis.tex").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert "is not a directory" in refused(
        quantize_main([*quick, "--out", str(mine / "thesis.tex")]))

    exported = work / "exported"
    for _ in range(2):  # an export of ours is replaced by the next one
        assert main(["export", str(small_ckpt), str(exported), "--format", "gptq",
                     "--overwrite"]) == 0
    (work / "empty").mkdir()
    for out in (work / "empty", work / "ckpt"):  # an empty directory; then our checkpoint
        assert quantize_main([*quick, "--out", str(out)]) == 0
    assert quantize_main([*quick, "--out", str(work / "ckpt")]) == 0
    assert (work / "ckpt" / "model.safetensors").is_file()


def test_pickle_source_refused_unless_opted_in(work, tiny_dir):
    src = work / "src"
    shutil.copytree(tiny_dir, src)
    from safetensors.torch import load_file
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    proc = run("quantize", str(src), "--out", str(work / "out"), "--no-eval")
    assert_user_error(proc, "pickle")
    assert left_behind(work) == []
    proc = run("quantize", str(src), "--out", str(work / "out"), "--no-eval", "--allow-pickle",
               "--nsamples", "2", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 32}, str(tiny_dir),
                         CalibConfig(nsamples=2, seqlen=64), out, progress=False))
    return out


def test_eval_refuses_broken_checkpoints(work, small_ckpt):
    broken = work / "broken"
    shutil.copytree(small_ckpt, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert_user_error(run("eval", str(broken)), "truncated")
    weights.write_bytes(b"\x00" * 4)
    assert_user_error(run("eval", str(broken)), "truncated or not a safetensors file")


def test_eval_and_info(small_ckpt, tmp_path):
    proc = run("eval", str(small_ckpt), "--ppl", "wiki-demo", "--seqlen", "256",
               "--output", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["windows"] == 40 * 512 // 256 and result["quantized"] is True
    assert result["ppl"] > 1 and json.loads((tmp_path / "r.json").read_text()) == result
    recorded = json.loads((small_ckpt / "eval.json").read_text())
    assert recorded[-1]["ppl"] == result["ppl"]

    info = run("info", str(small_ckpt), "--json")
    summary = json.loads(info.stdout)
    assert summary["quantized_layers"] == 14
    report = json.loads((small_ckpt / "quant_report.json").read_text())
    assert summary["quantized_bits_per_weight"] == pytest.approx(
        report["totals"]["bits_per_weight"], abs=1e-3)
    assert summary["bytes_on_disk"] == (small_ckpt / "model.safetensors").stat().st_size
    text = run("info", str(small_ckpt)).stdout
    assert "model.layers.1.mlp.down_proj" in text and "bits per weight" in text
    assert text.count(" int4 g32 ") == 14 and "act-order" not in text
    assert_user_error(run("info", str(tmp_path)), "not a model directory")


def test_help_of_a_shared_option_gives_every_method_s_meaning():
    """--bits means bits per weight to rtn/gptq and code bits to aqlm: the help shows both."""
    def squeeze(text):  # argparse wraps lines, even inside words
        return re.sub(r"\s+", "", text)

    text = squeeze(run("quantize", "--help").stdout)
    for cls in METHODS.values():
        bits = {f.name: f for f in dataclasses.fields(cls.Config)}["bits"]
        assert squeeze(bits.metadata["help"]) in text, cls


def test_two_bit_integer_grids_point_to_aqlm(work, tiny_dir, capsys):
    """A 2-bit rtn/gptq run still runs, after one line saying it ruins most models."""
    from quant.cli import quantize_main

    assert quantize_main([str(tiny_dir), "--bits", "2", "--out", str(work / "out"), "--no-eval",
                          "--nsamples", "2", "--seqlen", "32"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--method aqlm --bits 2" in notes[0]
    assert (work / "out" / "model.safetensors").exists()
    for name in ("rtn", "gptq"):
        assert make_method(name, bits=2).caution() is not None
        assert make_method(name, bits=3).caution() is None
    assert make_method("aqlm", bits=2).caution() is None
