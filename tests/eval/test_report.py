"""quant report: Markdown whose numbers are the JSON's, real PNGs, the Pareto front, the
report at the end of quantize, and one-line refusals."""

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from quant.data import CalibConfig
from quant.eval import evaluate, report
from quant.eval.memory import MemoryJob
from quant.info import describe
from quant.pipeline import QuantizeJob, quantize

JOBS = {"rtn4": ("rtn", {"bits": 4, "group_size": 32}),
        "gptq4": ("gptq", {"bits": 4, "group_size": 32}),
        "aqlm2": ("aqlm", {"codebooks": "1x8", "in_group": 4, "max_epochs": 2,
                           "finetune_steps": 0, "distill_steps": 0})}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_dir):
    """Three tiny checkpoints, each with perplexity against fp on two data sets; the first
    also with a KL and a measured memory record."""
    root = tmp_path_factory.mktemp("report")
    datasets = []
    for number, words in enumerate((("the", "cat", "sat", "on", "a", "mat"),
                                    ("def", "f(x):", "return", "x", "+", "1"))):
        datasets.append(str(root / f"text{number}.txt"))
        Path(datasets[-1]).write_text(" ".join(words[i * 7 % 6] + str(i % 13)
                                               for i in range(1500)))
    dirs = []
    for name, (method, options) in JOBS.items():
        out = quantize(QuantizeJob(method, options, str(tiny_dir),
                                   CalibConfig("wiki-demo", nsamples=4, seqlen=64),
                                   root / name, progress=False))
        results = evaluate.evaluate_ppls(str(out), datasets, seqlen=128, progress=False)
        evaluate.versus_fp(out, results, str(tiny_dir), seqlen=128)
        dirs.append(out)
    evaluate.evaluate_kl(str(dirs[0]), datasets[:1], seqlen=64, max_windows=2,
                         progress=False)
    evaluate.evaluate_memory(str(dirs[0]), MemoryJob(context=64, batch=1, new_tokens=2),
                             torch.device("cpu"))
    return dirs


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of every Markdown table row that follows a header row starting `header`."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("|---"):
            continue
        elif inside and line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        else:
            inside = False
    return rows


def test_markdown_numbers_are_the_json_numbers_and_plots_are_pngs(evaluated, tmp_path):
    path, notes = report.write_report(evaluated, tmp_path / "out")
    text = path.read_text()
    assert notes == []
    summary = {row[0]: row for row in table_rows(text, "| checkpoint |")}
    assert list(summary) == list(JOBS)
    for directory in evaluated:
        info = describe(directory)
        quant_report = json.loads((directory / "quant_report.json").read_text())
        eval_json = json.loads((directory / "eval.json").read_text())
        name, method, bpw, bpw_model, mib, geomean, seconds = summary[directory.name]
        assert method == quant_report["method"]
        assert float(bpw) == round(info["quantized_bits_per_weight"], 3)
        assert float(bpw_model) == round(info["model_bits_per_weight"], 3)
        assert float(mib) == round(info["bytes_on_disk"] / 2**20, 1)
        assert float(seconds) == round(quant_report["quantize_seconds"])
        comparison = [r for r in eval_json if r["metric"] == "perplexity-vs-fp"][-1]
        assert float(geomean) == round(comparison["geomean_ratio"], 3)
        section = text.split(f"## {directory.name}\n")[1].split("\n## ")[0]
        rows = {r[0]: r for r in table_rows(section, "| data set | seqlen | fp ppl")}
        for want in comparison["rows"]:
            _, seqlen, fp, quantized, ratio = rows[want["dataset"]]
            assert (int(seqlen), float(fp), float(quantized), float(ratio)) == (
                128, round(want["fp"], 3), round(want["quantized"], 3), round(want["ratio"], 3))
    first = text.split(f"## {evaluated[0].name}\n")[1].split("\n## ")[0]
    kl = [r for r in json.loads((evaluated[0] / "eval.json").read_text()) if r["metric"] == "kl"]
    (row,) = table_rows(first, "| data set | seqlen | tokens")
    assert float(row[3]) == round(kl[0]["kl_mean"], 4) and int(row[2]) == kl[0]["tokens"]
    memory = [r for r in json.loads((evaluated[0] / "eval.json").read_text())
              if r["metric"] == "memory"][0]
    (row,) = table_rows(first, "| memory job |")
    assert row[1] == "measured" and float(row[3]) == round(memory["peak_bytes"] / 2**20, 1)
    # a checkpoint never measured shows what `quant fits DIR` answers for its default job
    from quant.eval import fits

    second = text.split(f"## {evaluated[1].name}\n")[1].split("\n## ")[0]
    (row,) = table_rows(second, "| memory job |")
    answer = fits.fits(fits.FitsJob(model=str(evaluated[1])))["results"][0]
    assert row[1] == "quant fits" and float(row[3]) == round(answer["total_bytes"] / 2**20, 1)
    assert float(row[4]) == round(answer["breakdown"]["weights"] / 2**20, 1)

    images = sorted(p.name for p in path.parent.glob("*.png"))
    assert images == sorted(["ppl_vs_bpw.png", "memory.png",
                             *(f"layers-{d.name}.png" for d in evaluated)])
    import matplotlib.image

    for image in images:
        data = (path.parent / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, image
        pixels = matplotlib.image.imread(path.parent / image)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
        assert f"({image})" in text


def test_without_matplotlib_the_markdown_is_still_written(evaluated, tmp_path, monkeypatch,
                                                          capsys):
    from quant.cli import main

    def missing():
        raise ImportError("the plots need matplotlib: pip install 'lowbit[report]'")
    monkeypatch.setattr(report, "_pyplot", missing)
    assert main(["report", str(evaluated[0]), "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "r" / "report.md").is_file() and not list((tmp_path / "r").glob("*.png"))
    assert err.count("\n") == 1 and "pip install 'lowbit[report]'" in err
    assert out.strip() == f"report: {tmp_path / 'r' / 'report.md'}"


def test_pareto_front_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.choice([2.0, 2.5, 3.0, 4.0]), rng.choice([5.0, 6.0, 7.0, 9.0]))
                  for _ in range(rng.randint(1, 7))]
        dominated = {p for p, q in itertools.product(points, points)
                     if q[0] <= p[0] and q[1] <= p[1] and q != p}
        assert report.pareto(points) == sorted(set(points) - dominated)


def test_quantize_ends_with_the_report(tiny_dir, tmp_path, capsys):
    from quant.cli import quantize_main

    out, text = tmp_path / "q", tmp_path / "words.txt"
    text.write_text(" ".join(f"word{i % 31} and{i % 7}" for i in range(3000)))
    assert quantize_main([str(tiny_dir), "--out", str(out), "--nsamples", "2", "--seqlen",
                          "32", "--calib", str(text), "--eval-ppl", str(text)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    assert f"| {text} | 512 |" in markdown and (out / "layers.png").is_file()


def test_refusals(evaluated, tiny_dir, tmp_path, capsys):
    from quant.cli import main

    bare = shutil.copytree(evaluated[0], tmp_path / "bare")
    (bare / "eval.json").unlink()
    for args, pattern in [([str(bare)], f"run `quant eval {bare} --ppl all-demo`"),
                          ([str(tiny_dir)], "is not a lowbit checkpoint")]:
        assert main(["report", *args, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and pattern in err, err
    assert not (tmp_path / "r").exists()
