"""Benchmark lowbit's quantized matmul kernels against fp16 on Llama shapes.

On a GPU: median times with `triton.testing.do_bench` (quantiles 0.5/0.2/0.8), the
speedup over fp16 `torch.matmul` measured in the same run, achieved GB/s and its fraction
of the device-to-device copy bandwidth measured in the same run. Writes
`benchmarks/<device>-int.json` and a Markdown table beside it; `--tune` also sweeps tile
configs and stores the winners in `kernels/configs/<device>.json`.

    python scripts/bench_kernels.py                    # GPU
    python scripts/bench_kernels.py --tune             # GPU, store tuned configs
    python scripts/bench_kernels.py --dry-run --out /tmp/b   # CPU: shapes / 64, interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]  # (N, K)
BATCHES = [1, 4, 16, 64]
DRY_RUN_SCALE = 64


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4],
                   help="int widths to bench (writes <device>-int.json); none: skip")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--tune", action="store_true", help="sweep tile configs, store the best")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU wiring check: shapes divided by 64, Triton interpreter, wall clock")
    p.add_argument("--codebooks", nargs="*", default=["1x16g8", "2x8g8", "1x8g4", "1x8g3"],
                   help="AQLM shapes MxBgG to bench (writes <device>-codebook.json); none: "
                        "skip. Default: the paper's two and the demo's --bits 2 choices")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    return p.parse_args(argv)


# ---- timing ------------------------------------------------------------------------------

def make_timer(dry_run: bool, rep_ms: int = 100):
    """fn -> (median, p20, p80) milliseconds, over about rep_ms of runs on a GPU."""
    if not dry_run:
        import triton.testing

        return lambda fn: tuple(triton.testing.do_bench(fn, warmup=rep_ms // 4, rep=rep_ms,
                                                        quantiles=[0.5, 0.2, 0.8]))

    def wall(fn):
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        samples.sort()
        return statistics.median(samples), samples[0], samples[-1]
    return wall


def copy_bandwidth(device, timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy (read + write)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * nbytes / ms / 1e6


# ---- one case ----------------------------------------------------------------------------

def random_int_weight(n, k, bits, group, device):
    import torch

    from quant.formats import IntWeight

    gen = torch.Generator().manual_seed(bits * 7 + n + k)
    ngroups = k // group
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 1 << bits, (ngroups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(ngroups, n, generator=gen) * 0.01 + 0.001).half()
    w = IntWeight.from_ints(q, zeros, scales, bits=bits, group_size=group, sym=False)
    for name in ("qweight", "qzeros", "scales"):
        setattr(w, name, getattr(w, name).to(device))
    return w


def weight_bytes(weight) -> int:
    """The bytes a kernel streams for the weight: every tensor its format stores."""
    from quant.plan import LayerSpec

    return LayerSpec(weight.out_features, weight.in_features, weight.config).stored_bits() // 8


def tuning_key(weight) -> dict:
    """The fields a tuned entry for this weight is keyed by (kernels/tuning.py)."""
    scheme, steps = weight.tuning_key()
    return {"format": weight.format_name, "scheme": scheme, "steps": steps}


def candidates(rows: int, group: int):
    """Tile configs swept by --tune for a regime."""
    from quant.kernels.tuning import Tile

    if rows <= 16:
        grid = itertools.product((32, 64, 128), (64, 128), (0, 1, 4, 8), (4, 8), (3, 4))
        configs = [Tile(16, bn, bk, split, 8, w, s) for bn, bk, split, w, s in grid]
    else:
        grid = itertools.product((32, 64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (3, 4))
        configs = [Tile(bm, bn, bk, 1, 8, w, s) for bm, bn, bk, w, s in grid]
    return [c for c in configs if group % c.block_k == 0]


def measure(weight, x, timer) -> dict:
    """The fields every case reports: fp16 and the dispatched kernel timed in the same run,
    bandwidth and the error against the torch reference."""
    import torch

    from quant.kernels import ops
    from quant.kernels.reference import matmul_reference

    rows, n = x.shape[0], weight.out_features
    dense = torch.randn(n, weight.in_features, device=x.device, dtype=torch.float16).t()
    fp16_ms = timer(lambda: x @ dense)
    name, impl, config = ops.select(weight, x, "triton")
    ref = matmul_reference(x, weight).float()
    rel_err = float((impl(x, weight, config).float() - ref).norm() / ref.norm())
    chosen = timer(lambda: impl(x, weight, config))
    moved = weight_bytes(weight) + x.numel() * 2 + rows * n * 2
    return {"impl": name, "config": dataclasses.asdict(config) if config else None,
            "ms": chosen[0], "ms_p20": chosen[1], "ms_p80": chosen[2],
            "fp16_ms": fp16_ms[0], "speedup_vs_fp16": fp16_ms[0] / chosen[0],
            "gbps": moved / chosen[0] / 1e6, "rel_err_vs_reference": rel_err}


def bench_case(bits, n, k, rows, group, device, timer, sweep_timer=None) -> dict:
    """The dispatched int kernel and both implementations against fp16; given a
    sweep_timer (--tune), also the best of a sweep of tiles."""
    import torch

    from quant.kernels import tuning
    from quant.kernels.int_dequant import dequant_matmul
    from quant.kernels.int_matmul import int_matmul

    weight = random_int_weight(n, k, bits, group, device)
    x = torch.randn(rows, k, device=device, dtype=torch.float16)
    case = measure(weight, x, timer)
    config = tuning.Tile(**case["config"])
    alternatives = {"fused": timer(lambda: int_matmul(x, weight, config))[0]
                    if case["impl"] != "fused" else case["ms"],
                    "dequant": timer(lambda: dequant_matmul(x, weight))[0]}
    best_tuned = None
    if sweep_timer:
        trials = time_trials([("fused", c) for c in candidates(rows, group)],
                             lambda impl, c: int_matmul(x, weight, c), sweep_timer)
        trials.append(("dequant", tuning.DEQUANT_TILE, alternatives["dequant"]))
        best_tuned = min(trials, key=lambda t: t[2])
    return {"bits": bits, "n": n, "k": k, "rows": rows, "group_size": group, **case,
            **tuning_key(weight), "alternatives_ms": alternatives,
            "tuned": tuned_record(best_tuned)}


def random_codebook_weight(n, k, m, nbits, g, device):
    import torch

    from quant.formats import CodebookWeight

    gen = torch.Generator().manual_seed(m * 31 + nbits + n + k)
    codes = torch.randint(0, 1 << nbits, (n, k // g, m), generator=gen)
    books = torch.randn(m, 1 << nbits, g, generator=gen) * 0.05
    return CodebookWeight.from_parts(codes, books, torch.rand(n, generator=gen) + 0.5).to(device)


def parse_codebook_shape(shape: str) -> tuple[int, int, int]:
    """'1x16g8' -> (1, 16, 8)."""
    m, nbits, g = (int(v) for v in shape.replace("x", " ").replace("g", " ").split())
    return m, nbits, g


def codebook_width(k: int, shape: str) -> int:
    """The input width benched for a layer of width k: the nearest below that both 16 and
    the in-group divide (an in-group of 3 does not divide 4096: 4080 stands in)."""
    step = math.lcm(16, parse_codebook_shape(shape)[2])
    return max(step, k // step * step)


def codebook_candidates(rows: int) -> list:
    """(implementation, tile) pairs swept by --tune for a codebook case: the GEMV for one
    row, the tensor-core kernel up to 64 rows (its BLOCK_M fixed by the rows)."""
    from quant.kernels.tuning import Tile, regime

    block_m = 16 if rows <= 16 else 64
    grid = list(itertools.product((16, 32, 64, 128), (8, 16, 32), (4, 8), (0, 1)))
    trials = [("fused", Tile(block_m, bn, bj, split, num_warps=w)) for bn, bj, w, split in grid
              if bn >= 32 and regime("codebook", rows) != "gemm"]
    if rows == 1:
        trials += [("gemv", Tile(16, bn, bj, split, num_warps=w)) for bn, bj, w, split in grid]
    return trials


def time_trials(trials, run, timer) -> list:
    """(implementation, tile, ms) of each trial that compiles and runs on this GPU."""
    timed = []
    for impl, tile in trials:
        try:
            timed.append((impl, tile, timer(lambda impl=impl, tile=tile: run(impl, tile))[0]))
        except Exception as exc:  # a tile beyond the GPU's registers or shared memory
            print(f"  skipped {impl} {tile}: {str(exc).splitlines()[0][:120]}", file=sys.stderr)
    return timed


def bench_codebook_case(shape: str, n, k, rows, device, timer, sweep_timer=None) -> dict:
    """The dispatched kernel against fp16, every codebook implementation with its default
    tile for this row count, and given a sweep_timer (--tune) the best of a sweep of tiles."""
    import torch

    from quant.kernels import ops, tuning

    m, nbits, g = parse_codebook_shape(shape)
    weight = random_codebook_weight(n, k, m, nbits, g, device)
    x = torch.randn(rows, k, device=device, dtype=torch.float16)
    case = measure(weight, x, timer)
    impls = ops.implementations("codebook")
    defaults = dict(tuning.tile_for("codebook", name, device, n, k // g, rows)
                    for _, name in tuning.REGIMES["codebook"])
    dispatched = (case["impl"], case["config"])  # already timed by measure()
    alternatives = {name: case["ms"] if (name, dataclasses.asdict(defaults[name])) == dispatched
                    else timer(lambda fn=fn, tile=defaults[name]: fn(x, weight, tile))[0]
                    for name, fn in impls.items()}
    best_tuned = None
    if sweep_timer:
        trials = time_trials(codebook_candidates(rows),
                             lambda impl, tile: impls[impl](x, weight, tile), sweep_timer)
        trials += [(name, defaults[name], ms) for name, ms in alternatives.items()]
        best_tuned = min(trials, key=lambda t: t[2])
    return {"codebooks": shape, "n": n, "k": k, "groups": k // g, "rows": rows, **case,
            **tuning_key(weight), "alternatives_ms": alternatives,
            "bits_per_weight": weight.bits_per_weight, "tuned": tuned_record(best_tuned)}


def tuned_record(best) -> dict | None:
    return None if best is None else {"impl": best[0], "config": dataclasses.asdict(best[1]),
                                      "ms": best[2]}


# ---- output ------------------------------------------------------------------------------

DRY_RUN_NOTE = "; DRY RUN on CPU: shapes / 64, interpreter, not speed"


def table(title: str, note: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {title}", "", note, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _timing_cells(c: dict) -> list[str]:
    return [f"{c['n']}x{c['k']}", str(c["rows"]), f"{c['fp16_ms']:.4f}", f"{c['ms']:.4f}",
            c["impl"], f"{c['speedup_vs_fp16']:.2f}x", f"{c['gbps']:.0f}"]


TIMING_HEADER = ["N x K", "batch", "fp16 ms", "lowbit ms", "impl", "speedup", "GB/s"]


def codebook_markdown(result: dict) -> str:
    note = "times are medians (ms)" + (DRY_RUN_NOTE if result["dry_run"] else "")
    rows = [[c["codebooks"], *_timing_cells(c)] for c in result["cases"]]
    return table(f"codebook (AQLM) kernels on {result['device']}", note,
                 ["codebooks", *TIMING_HEADER], rows)


def markdown(result: dict) -> str:
    note = (f"copy bandwidth {result['copy_gbps']:.0f} GB/s; group size {result['group_size']}; "
            "times are medians (ms)" + (DRY_RUN_NOTE if result["dry_run"] else ""))
    rows = [[str(c["bits"]), *_timing_cells(c), f"{100 * c['gbps'] / result['copy_gbps']:.0f}%"]
            for c in result["cases"]]
    return table(f"int kernels on {result['device']}", note,
                 ["bits", *TIMING_HEADER, "% copy BW"], rows)


def store_tuned(result: dict | None, codebook_result: dict | None, device_name: str) -> Path:
    """Merge the tuned winners of both benchmarks into kernels/configs/<device>.json: an
    entry for the same (format, scheme, n, k, rows bucket) is replaced, others are kept, so
    the int and codebook sweeps can run separately."""
    from quant.kernels.tuning import CONFIG_DIR, gpu_slug, rows_bucket

    cases = [c for r in (result, codebook_result) for c in (r or {}).get("cases", [])]
    new = [{"format": c["format"], "scheme": c["scheme"], "n": c["n"], "k": c["steps"],
            "rows": rows_bucket(c["rows"]), "impl": c["tuned"]["impl"],
            "config": c["tuned"]["config"]} for c in cases if c.get("tuned")]
    path = CONFIG_DIR / f"{gpu_slug(device_name)}.json"
    old = json.loads(path.read_text()).get("entries", []) if path.is_file() else []
    key = ("format", "scheme", "n", "k", "rows")
    table = {tuple(e[k] for k in key): e for e in old + new}  # new replaces old of its key
    path.write_text(json.dumps({"device": device_name, "entries": list(table.values())},
                               indent=1) + "\n")
    return path


def write_result(stem: Path, result: dict, render) -> None:
    """STEM.json and its Markdown rendering STEM.md, which is also printed."""
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(stem.with_suffix(".md").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    from quant.kernels.tuning import gpu_slug

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run on a GPU, or pass --dry-run to check the wiring on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    device_name = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name()
    scale = DRY_RUN_SCALE if args.dry_run else 1
    timer = make_timer(args.dry_run)
    sweep_timer = make_timer(args.dry_run, rep_ms=25) if args.tune else None
    group = args.group_size if not args.dry_run else min(args.group_size, 64)
    shapes = [(n // scale, max(group, k // scale // group * group)) for n, k in SHAPES]
    meta = {"device": device_name, "dry_run": args.dry_run, "group_size": group,
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "copy_gbps": copy_bandwidth(device, timer, (1 << 20 if args.dry_run else 1 << 30))}
    args.out.mkdir(parents=True, exist_ok=True)
    result = None
    if args.bits:
        cases = []
        for bits, (n, k), rows in itertools.product(args.bits, shapes, args.batches):
            c = bench_case(bits, n, k, rows, group, device, timer, sweep_timer)
            cases.append(c)
            print(f"b{bits} {n}x{k} rows {rows}: {c['ms']:.4f} ms ({c['impl']}), fp16 "
                  f"{c['fp16_ms']:.4f} ms, {c['speedup_vs_fp16']:.2f}x", file=sys.stderr)
        result = {**meta, "cases": cases}
        write_result(args.out / f"{gpu_slug(device_name)}-int", result, markdown)
    codebook_result = None
    if args.codebooks:
        codebook_cases = []
        for shape, (n, k), rows in itertools.product(args.codebooks, shapes, args.batches):
            c = bench_codebook_case(shape, n, codebook_width(k, shape), rows, device, timer,
                                    sweep_timer)
            codebook_cases.append(c)
            print(f"{shape} {n}x{c['k']} rows {rows}: {c['ms']:.4f} ms ({c['impl']}), fp16 "
                  f"{c['fp16_ms']:.4f} ms, {c['speedup_vs_fp16']:.2f}x", file=sys.stderr)
        codebook_result = {**meta, "cases": codebook_cases}
        write_result(args.out / f"{gpu_slug(device_name)}-codebook", codebook_result,
                     codebook_markdown)
    if args.tune and not args.dry_run:
        print(f"tuned configs: {store_tuned(result, codebook_result, device_name)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
