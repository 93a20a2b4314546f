"""Reproduce the GPTQ quality table on the demo model (wiki-demo protocol: 128 x 512
calibration windows, seed 0, asymmetric, group 64): perplexity and quantize time per row.
Each row is a recipe (recipes/demo-*.toml) run with the table's calibration.

    python scripts/gptq_demo_table.py [--rows 4-off 4-act 3-off ...] [--out benchmarks/...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROWS = {  # table row: the recipe it runs (recipes/NAME.toml)
    "4-off": "demo-gptq4-noact", "4-act": "demo-gptq4", "4-static": "demo-gptq4-static",
    "3-off": "demo-gptq3-noact", "3-act": "demo-gptq3", "3-static": "demo-gptq3-static",
    "2-act": "demo-gptq2", "2-off": "demo-gptq2-noact",
    "rtn-4": "demo-rtn4", "rtn-3": "demo-rtn3", "rtn-2": "demo-rtn2",
}
# The table's protocol, the same for every row: wiki-demo calibration and evaluation.
PROTOCOL = {"dataset": "wiki-demo", "nsamples": 128, "seqlen": 512, "seed": 0}


def run_row(name: str, workdir: Path) -> dict:
    import torch

    from quant.data import CalibConfig
    from quant.eval.evaluate import evaluate_ppl
    from quant.pipeline import QuantizeJob, quantize
    from quant.recipes import find_recipe

    recipe = find_recipe(ROWS[name])
    out = quantize(QuantizeJob(recipe.method, recipe.options, recipe.model,
                               CalibConfig(**PROTOCOL), workdir / name, overwrite=True,
                               recipe={"name": recipe.name, "file": recipe.path,
                                       "overrides": {"calibration": PROTOCOL}}))
    report = json.loads((out / "quant_report.json").read_text())
    result = evaluate_ppl(str(out), device=torch.device("cpu"))
    return {"row": name, "recipe": recipe.name, "method": recipe.method,
            "options": recipe.options, "ppl": result["ppl"],
            "bits_per_weight": report["totals"]["bits_per_weight"],
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
