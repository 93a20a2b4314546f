"""Reproduce the GPTQ quality table on the demo model (wiki-demo protocol: 128 x 512
calibration windows, seed 0, asymmetric, group 64): perplexity and quantize time per row.

    python scripts/gptq_demo_table.py [--rows 4-off 4-act 3-off ...] [--out benchmarks/...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROWS = {  # name: (method, options)
    "4-off": ("gptq", {"bits": 4, "act_order": False}), "4-act": ("gptq", {"bits": 4, "act_order": True}),
    "4-static": ("gptq", {"bits": 4, "act_order": True, "static_groups": True}),
    "3-off": ("gptq", {"bits": 3, "act_order": False}), "3-act": ("gptq", {"bits": 3, "act_order": True}),
    "3-static": ("gptq", {"bits": 3, "act_order": True, "static_groups": True}),
    "2-act": ("gptq", {"bits": 2, "act_order": True}), "2-off": ("gptq", {"bits": 2, "act_order": False}),
    "rtn-4": ("rtn", {"bits": 4}), "rtn-3": ("rtn", {"bits": 3}), "rtn-2": ("rtn", {"bits": 2}),
}


def run_row(name: str, workdir: Path) -> dict:
    import torch

    from quant.data import CalibConfig
    from quant.eval.evaluate import evaluate_ppl
    from quant.pipeline import QuantizeJob, quantize

    method, options = ROWS[name]
    out = quantize(QuantizeJob(method, {**options, "group_size": 64}, None,
                               CalibConfig("wiki-demo", 128, 512, 0), workdir / name,
                               overwrite=True))
    report = json.loads((out / "quant_report.json").read_text())
    result = evaluate_ppl(str(out), device=torch.device("cpu"))
    return {"row": name, "method": method, "options": {**options, "group_size": 64},
            "ppl": result["ppl"], "bits_per_weight": report["totals"]["bits_per_weight"],
            "quantize_seconds": report["quantize_seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/gptq-demo-cpu.json"))
    args = p.parse_args(argv)
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            row = run_row(name, Path(tmp))
            previous = [r for r in previous if r["row"] != name] + [row]
            print(json.dumps(row), file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "device": f"cpu ({platform.processor() or platform.machine()}, 2 cores)",
                "protocol": "wiki-demo, 128 x 512 calibration windows, seed 0, group 64",
                "rows": previous}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
