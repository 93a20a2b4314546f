"""Quantize a random Llama-7B-shaped stack of decoder blocks through the real pipeline and
record the time per block and per layer (GPU when there is one).

    python scripts/bench_quantize.py --method gptq --bits 4 --group-size 128
    python scripts/bench_quantize.py --method aqlm --codebooks 1x16 --in-group 8
    python scripts/bench_quantize.py --dry-run   # tiny shapes on the CPU: the wiring only

Writes benchmarks/<device>-quantize-<method>.json (the timing rows) unless --out says where.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32}
DRY_RUN = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 4}


def parse_args(argv):
    from quant.cli import add_method_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="gptq")
    add_method_args(p)  # the same method flags as `quantize`
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU, few samples")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def random_model_dir(path: Path, shape: dict, blocks: int) -> Path:
    """A random fp16 Llama with `blocks` decoder blocks of `shape` and the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant import assets
    from quant.models import load_tokenizer

    tokenizer = load_tokenizer(assets.model_dir("smollm2-135m"))
    config = AutoConfig.for_model("llama", num_hidden_layers=blocks, vocab_size=len(tokenizer),
                                  max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> int:
    import torch

    from quant.cli import method_options
    from quant.data import CalibConfig
    from quant.pipeline import QuantizeJob, quantize

    args = parse_args(argv)
    shape, device = (DRY_RUN, "cpu") if args.dry_run else (LLAMA_7B, "auto")
    nsamples, seqlen = (4, 64) if args.dry_run else (args.nsamples, args.seqlen)
    device_name = ("cpu_dry_run" if args.dry_run else torch.cuda.get_device_name()
                   .replace(" ", "_") if torch.cuda.is_available() else "cpu")
    options = method_options(args)
    with tempfile.TemporaryDirectory() as tmp:
        src = random_model_dir(Path(tmp) / "model", shape, args.blocks)
        out = quantize(QuantizeJob(args.method, options, str(src),
                                   CalibConfig("wiki-demo", nsamples, seqlen, 0),
                                   Path(tmp) / "q", device=device))
        report = json.loads((out / "quant_report.json").read_text())
    result = {"device": device_name, "method": args.method, "options": options,
              "shape": shape, "blocks": args.blocks, "calibration": [nsamples, seqlen],
              "dry_run": args.dry_run, "quantize_seconds": report["quantize_seconds"],
              "block_seconds": report["block_seconds"],
              "layers": {name: {"seconds": e["seconds"], "shape": e["shape"],
                                "scheme": e.get("scheme"),
                                "rel_output_mse": e.get("rel_output_mse")}
                         for name, e in report["layers"].items()}}
    target = args.out or ROOT / "benchmarks" / f"{device_name}-quantize-{args.method}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("device", "quantize_seconds",
                                             "block_seconds")}, indent=1))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
