"""Quality across domains on the demo model: quantize with each row's method, options and
calibration set (128 x 512 windows unless the method's default differs, seed 0), then
measure perplexity on every demo domain's held-out split (`all-demo`), against fp.

    python scripts/domains_demo.py --rows aqlm-2-mix gptq-4-act-mix [--reuse]
        [--workdir /tmp/lowbit-domains] [--out benchmarks/domains-demo-cpu.json]

--reuse evaluates a checkpoint already in the work directory when its recorded method,
options and calibration are the row's, instead of quantizing again.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

G64 = {"group_size": 64}
ROWS = {  # name: (method, options, calibration set)
    "rtn-4": ("rtn", {"bits": 4, **G64}, "mix-demo"),
    "gptq-4-act-mix": ("gptq", {"bits": 4, **G64, "act_order": True}, "mix-demo"),
    "gptq-4-off-mix": ("gptq", {"bits": 4, **G64, "act_order": False}, "mix-demo"),
    "gptq-4-act-wiki": ("gptq", {"bits": 4, **G64, "act_order": True}, "wiki-demo"),
    "gptq-4-off-wiki": ("gptq", {"bits": 4, **G64, "act_order": False}, "wiki-demo"),
    "gptq-3-act-mix": ("gptq", {"bits": 3, **G64, "act_order": True}, "mix-demo"),
    "gptq-3-act-wiki": ("gptq", {"bits": 3, **G64, "act_order": True}, "wiki-demo"),
    "gptq-4-act-self": ("gptq", {"bits": 4, **G64, "act_order": True}, "self:128"),
    "gptq-3-act-self": ("gptq", {"bits": 3, **G64, "act_order": True}, "self:128"),
    "aqlm-2-wiki-nodistill": ("aqlm", {"bits": 2, "distill_steps": 0}, "wiki-demo"),
    "aqlm-2-wiki": ("aqlm", {"bits": 2}, "wiki-demo"),
    "aqlm-2-mix-nodistill": ("aqlm", {"bits": 2, "distill_steps": 0}, "mix-demo"),
    "aqlm-2-mix": ("aqlm", {"bits": 2}, "mix-demo"),
    "aqlm-2-self": ("aqlm", {"bits": 2}, "self:128"),
}


def command(method: str, options: dict, calib: str) -> str:
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
             for k, v in options.items() if v is not False]
    flags += [f"--no-{k.replace('_', '-')}" for k, v in options.items() if v is False]
    return " ".join(["quantize", "--method", method, *flags, "--calib", calib])


def matches(out: Path, method: str, options: dict, calib: str) -> bool:
    try:
        report = json.loads((out / "quant_report.json").read_text())
    except OSError:
        return False
    return (report["method"] == method and report["calibration"]["dataset"] == calib
            and all(report["options"].get(k) == v for k, v in options.items()))


def run_row(name: str, workdir: Path, reuse: bool) -> dict:
    import torch

    from quant.data import CalibConfig
    from quant.eval.evaluate import compare_to_fp, evaluate_ppls, expand_datasets
    from quant.pipeline import QuantizeJob, quantize

    method, options, calib = ROWS[name]
    out = workdir / name
    if not (reuse and matches(out, method, options, calib)):
        quantize(QuantizeJob(method, options, None, CalibConfig(calib, None, 512, 0), out,
                             overwrite=True))
    report = json.loads((out / "quant_report.json").read_text())
    datasets = expand_datasets("all-demo")
    cpu = torch.device("cpu")
    fp = evaluate_ppls(None, datasets, device=cpu, reuse_fp=True)
    comparison = compare_to_fp(evaluate_ppls(str(out), datasets, device=cpu), fp)
    return {"row": name, "command": command(method, options, calib), "method": method,
            "options": report["options"], "calibration": report["calibration"],
            "bits_per_weight": report["totals"]["bits_per_weight"],
            "matmul_dtype": report.get("matmul_dtype"),
            "quantize_seconds": report["quantize_seconds"],
            "distill": report.get("distill"),
            "ppl": {r["dataset"]: {"fp": r["fp"], "quantized": r["quantized"],
                                   "ratio": r["ratio"]} for r in comparison["rows"]},
            "geomean_ratio": comparison["geomean_ratio"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-domains"))
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/domains-demo-cpu.json"))
    args = p.parse_args(argv)
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for name in args.rows:
        row = run_row(name, args.workdir, args.reuse)
        previous = [r for r in previous if r["row"] != name] + [row]
        print(json.dumps({k: row[k] for k in ("row", "bits_per_weight", "geomean_ratio")}),
              file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": f"cpu ({platform.processor() or platform.machine()}, 2 cores)",
            "protocol": "demo model; calibration seed 0, seqlen 512, the method's default "
                        "window count; perplexity on every demo domain's held-out split "
                        "(seqlen 512), ratio to the fp model's",
            "rows": previous}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
