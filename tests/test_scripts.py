"""The benchmark scripts are wired: their CPU dry runs produce the promised files."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kernels_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"),
                           "--dry-run", "--out", str(tmp_path), "--bits", "2", "3",
                           "--batches", "1", "16"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cpu_dry_run-int.json").read_text())
    bench = load_script("bench_kernels")
    shapes = {(c["n"], c["k"]) for c in result["cases"]}
    assert shapes == {(n // 64, k // 64 // 64 * 64 or 64) for n, k in bench.SHAPES}
    assert len(result["cases"]) == 2 * 5 * 2 and result["dry_run"] is True
    for case in result["cases"]:
        assert case["rel_err_vs_reference"] < 1e-2
        assert case["ms"] > 0 and case["fp16_ms"] > 0 and case["gbps"] > 0
        assert set(case["alternatives_ms"]) == {"fused", "dequant"}
    table = (tmp_path / "cpu_dry_run-int.md").read_text()
    assert table.count("\n| ") == 1 + 20 and "DRY RUN" in table
    codebook = json.loads((tmp_path / "cpu_dry_run-codebook.json").read_text())
    assert len(codebook["cases"]) == 4 * 5 * 2  # 4 default shapes, 5 layer shapes, 2 batches
    for case in codebook["cases"]:
        assert case["rel_err_vs_reference"] < 1e-2 and case["ms"] > 0
        assert case["impl"] == {1: "gemv", 16: "fused"}[case["rows"]]
        assert set(case["alternatives_ms"]) == {"gemv", "fused", "dequant"}
        assert case["k"] % (3 if case["codebooks"] == "1x8g3" else 16) == 0


def test_codebook_bench_width_fits_the_in_group():
    bench = load_script("bench_kernels")
    assert bench.codebook_width(4096, "1x16g8") == 4096
    assert bench.codebook_width(4096, "1x8g3") == 4080  # 4096 is no multiple of 3
    assert bench.codebook_width(11008, "1x8g3") == 10992
    assert bench.codebook_width(20, "1x8g3") == 48  # never below one step


def test_tuned_configs_round_trip(tmp_path, monkeypatch):
    from quant.kernels import tuning

    bench = load_script("bench_kernels")
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "split": 4, "group_m": 8,
           "num_warps": 4, "num_stages": 3}
    int4 = {"format": "int", "scheme": "int4", "steps": 4096}
    result = {"cases": [{"bits": 4, "n": 4096, "k": 4096, "rows": 3, **int4,
                         "tuned": {"impl": "fused", "config": cfg, "ms": 0.01}}]}
    tile = tuning.Tile(16, 32, 16, split=2, num_warps=8)
    book = {"format": "codebook", "scheme": "1x16g8", "steps": 512}
    codebooks = {"cases": [{"n": 11008, "k": 4096, "rows": 1, **book,
                            "tuned": bench.tuned_record(("gemv", tile, 0.01))},
                           {"n": 4096, "rows": 1, **book, "tuned": None}]}
    path = bench.store_tuned(result, codebooks, "NVIDIA H100 80GB HBM3")
    assert tuning.load_tuned(path) == {
        ("int", "int4", 4096, 4096, 4): ("fused", tuning.Tile(**cfg)),
        ("codebook", "1x16g8", 11008, 512, 1): ("gemv", tile)}
    # a later codebook-only sweep replaces its own entries and keeps the others
    faster = tuning.Tile(block_n=16, block_k=16)
    later = {"cases": [{"n": 11008, "rows": 1, **book,
                        "tuned": bench.tuned_record(("fused", faster, 0.005))},
                       {"n": 4096, "rows": 16, **book, "scheme": "2x8g8",
                        "tuned": bench.tuned_record(("fused", tile, 0.01))}]}
    assert bench.store_tuned(None, later, "NVIDIA H100 80GB HBM3") == path
    assert tuning.load_tuned(path) == {
        ("int", "int4", 4096, 4096, 4): ("fused", tuning.Tile(**cfg)),
        ("codebook", "1x16g8", 11008, 512, 1): ("fused", faster),
        ("codebook", "2x8g8", 4096, 512, 16): ("fused", tile)}
    assert all(c.block_k <= 128 and 128 % c.block_k == 0 for c in bench.candidates(1, 128))
    assert {c.block_m for c in bench.candidates(64, 128)} == {32, 64, 128}


def test_codebook_candidates_fit_the_row_count():
    bench = load_script("bench_kernels")
    one, sixteen, many = (bench.codebook_candidates(rows) for rows in (1, 16, 64))
    assert {impl for impl, _ in one} == {"gemv", "fused"}
    assert {impl for impl, _ in sixteen} == {"fused"} and len(sixteen) == len(many)
    assert {t.block_m for _, t in sixteen} == {16} and {t.block_m for _, t in many} == {64}
    assert bench.codebook_candidates(65) == []  # beyond the fused kernel: dequant only


def test_codebook_tune_keeps_the_fastest_trial_and_skips_failing_tiles(monkeypatch):
    from quant.kernels.tuning import Tile

    bench = load_script("bench_kernels")
    broken = Tile(block_n=16, block_k=7)  # tl.arange needs a power of two
    trials = [("fused", Tile(block_n=32, block_k=8)), ("gemv", Tile(block_n=16, block_k=8)),
              ("gemv", broken)]
    monkeypatch.setattr(bench, "codebook_candidates", lambda rows: trials)
    # timer calls: fp16, the dispatched gemv (reused as its default), the fused and dequant
    # defaults, then the trials
    times = iter([1.0, 5.0, 4.0, 6.0, 3.0, 2.0, 0.5])

    def timer(fn):
        fn()
        return next(times), 0.0, 0.0

    case = bench.bench_codebook_case("1x8g4", 40, 64, 1, torch.device("cpu"), timer, timer)
    assert case["alternatives_ms"] == {"gemv": 5.0, "fused": 4.0, "dequant": 6.0}
    assert case["tuned"] == {"impl": "gemv", "ms": 2.0,
                             "config": dataclasses.asdict(Tile(block_n=16, block_k=8))}


def test_bench_quantize_dry_run(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quantize.py"),
                           "--dry-run", "--method", "gptq", "--bits", "3",
                           "--group-size", "32", "--no-act-order", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["options"] == {"bits": 3, "group_size": 32, "act_order": False}
    assert len(result["block_seconds"]) == 2 and all(s > 0 for s in result["block_seconds"])
    assert sum(result["block_seconds"]) <= result["quantize_seconds"]
    assert len(result["layers"]) == 14
    assert all(e["scheme"] == "int3 g32" and 0 < e["rel_output_mse"] < 1
               for e in result["layers"].values())


def test_aqlm_synthetic_small_layer(tmp_path):
    """The 1x16 bar's script on a 1024x1024 layer (the smallest with as many groups as a
    16-bit codebook has codewords): 1x16 beats 2-bit GPTQ g128 on the same H."""
    out = tmp_path / "syn.json"
    synthetic = load_script("aqlm_synthetic")
    assert synthetic.main(["--size", "1024", "--epochs", "1", "--out", str(out)]) == 0
    gptq_row, aqlm_row = json.loads(out.read_text())["rows"]
    assert aqlm_row["method"] == "aqlm 1x16 g8" and aqlm_row["epochs"] == 1
    codebook, scale = 16 * 8 * 2 ** 16 / 1024 ** 2, 16 / 1024  # fp16, counted per weight
    assert aqlm_row["bits_per_weight"] == pytest.approx(2 + codebook + scale, abs=1e-4)
    assert gptq_row["bits_per_weight"] == pytest.approx(2 + 18 / 128, abs=1e-4)  # fp16 scale,
    # 2-bit zero point per group of 128
    assert 0 < aqlm_row["rel_output_error"] < gptq_row["rel_output_error"] / 2
