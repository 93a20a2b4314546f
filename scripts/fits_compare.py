"""lowbit's fits calculator side by side with gpu_poor's published formula (re-derived from
its description: github.com/RahulSChand/gpu_poor src/App.js) and `accelerate
estimate-memory` (accelerate's own functions on the same config), on GPU-sized cases and on
demo-model cases measured here on the CPU (quant.eval.memory).

    python scripts/fits_compare.py [--out benchmarks/fits-compare.json] [--no-measure]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# (model, quant, context, batch, train): GPU-sized cases, no measurement here
GPU_CASES = [("llama-3-8b", "fp16", 8192, 1, None), ("llama-3-8b", "gptq:4g128", 8192, 1, None),
             ("llama-3.1-70b", "fp16", 32768, 1, None), ("qwen2.5-7b", "fp16", 32768, 1, None),
             ("mistral-7b-v0.1", "fp16", 16384, 1, None), ("llama-3-8b", "fp16", 2048, 1, "lora")]
# demo-model cases measured on this CPU: (checkpoint, context, batch, train); checkpoint
# None is the fp32 model, "rtn4" a 4-bit g64 RTN checkpoint of it
CPU_CASES = [(ckpt, context, batch, None) for ckpt in (None, "rtn4")
             for context in (512, 2048, 8192) for batch in (1, 4)] + \
    [(None, 512, 1, "lora"), (None, 512, 4, "lora")]
GPU_POOR_OVERHEAD_MIB = 650


def gpu_poor(config, context: int, batch: int, train: str | None, nbytes: int = 2,
             overhead: bool = True, int4: bool = False) -> dict:
    """gpu_poor's estimate (HF runtime, Adam; no quantization, or its bnb int4), in MiB:
    every layer's K and V projections counted h x h (no grouped-query attention),
    embeddings and head twice, the KV cache from the hidden size."""
    h, n, a, v = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                  config.vocab_size)
    inter = config.intermediate_size
    params = 2 * v * h + 4 * n * h * h + 3 * n * h * inter
    scale = nbytes / 2  # its formulas count 2-byte elements
    model = math.ceil(2 * params * scale / MIB)
    if int4:  # its bnb int4 size: 0.31 of fp16, plus the 6% it adds to every quantized case
        model = math.ceil(model * (0.31 + 0.06))
    if train:
        kv = 0
        act = math.ceil(batch * n * (32 * context * h + 8 * a * context ** 2 + 12 * context * inter
                                     + 8 * context) * scale / MIB)
        grad_opt = math.ceil(384 * n * h * scale / MIB) if train == "lora" else \
            math.ceil(6 * params * scale / MIB)
    else:
        kv = math.ceil(batch * 8 * context * h * n * scale / MIB)
        act = math.ceil(batch * (10 * context * h + 2 * a * context ** 2) * scale / MIB)
        grad_opt = 0
    parts = {"Model Size": model, "KV Cache": kv, "Activation Memory": act,
             "Grad & Optimizer memory": grad_opt,
             "cuda + other overhead": GPU_POOR_OVERHEAD_MIB if overhead else 0}
    return {**parts, "Total": sum(parts.values())}


def accelerate_estimate(config, dtype: str) -> dict:
    """accelerate estimate-memory: the base model (no LM head) built empty in fp32, its
    total and largest layer scaled to the dtype, training = the largest of its Adam parts."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModel

    with init_empty_weights():
        model = AutoModel.from_config(config, dtype=torch.float32)  # as accelerate builds it
    total, _ = calculate_maximum_sizes(model)
    divisor = {"float32": 1, "float16": 2}[dtype]
    training = max(estimate_training_usage(total, dtype).values())
    return {"weights_mib": round(total / divisor / MIB), "training_adam_mib": round(training / MIB)}


def ours(model, quant, context, batch, train, device="cuda") -> dict:
    from quant.eval import fits

    job = fits.FitsJob(context=context, batch=batch, train=train, device=device)
    result = fits.estimate(job, model, quant)
    return {**fits.gpu_poor_keys(result["breakdown"]),
            "weights_exact": result["weights_exact"]}


def measured_demo(checkpoint, context, batch, train) -> dict:
    import torch

    import quant
    from quant import assets, models
    from quant.eval.memory import MemoryJob, measure

    model = quant.load(checkpoint) if checkpoint else \
        models.load_fp(assets.model_dir("smollm2-135m"), torch.float32)
    job = MemoryJob(context=context, batch=batch, new_tokens=2, train=train)
    found = measure(model, job, torch.device("cpu"))
    return {"peak_mib": round(found["peak_bytes"] / MIB),
            "breakdown_mib": {k: round(v / MIB) for k, v in found["breakdown"].items()}}


def demo_rtn4() -> Path:
    """A 4-bit g64 RTN checkpoint of the demo model (made once, in a temporary folder)."""
    import tempfile

    from quant.data import CalibConfig
    from quant.pipeline import QuantizeJob, quantize

    out = Path(tempfile.mkdtemp()) / "smollm2-rtn4"
    return quantize(QuantizeJob("rtn", {"bits": 4, "group_size": 64}, None,
                                CalibConfig(nsamples=2), out, progress=False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fits-compare.json")
    p.add_argument("--no-measure", action="store_true",
                   help="keep the CPU measurements already in --out instead of measuring")
    args = p.parse_args(argv)
    import torch

    from quant.eval import fits

    torch.set_num_threads(2)
    kept = {r["case"]: r for r in json.loads(args.out.read_text())["rows"]} \
        if args.no_measure and args.out.is_file() else {}
    rows = []
    for name, quant, context, batch, train in GPU_CASES:
        model = fits.load_model(name)
        rows.append({"case": f"{name} {quant} context {context} batch {batch}"
                             + (f" train {train}" if train else ""),
                     "lowbit": ours(model, quant, context, batch, train),
                     "gpu_poor": gpu_poor(model.config, context, batch, train,
                                          int4=quant.startswith("gptq:4")),
                     "accelerate": accelerate_estimate(model.config, "float16")})
    checkpoints = {None: None, "rtn4": demo_rtn4()}
    for ckpt, context, batch, train in CPU_CASES:
        demo = fits.load_model(str(checkpoints[ckpt]) if ckpt else "smollm2-135m")
        row = {"case": f"smollm2-135m {'rtn 4-bit g64' if ckpt else 'fp32'} CPU context "
                       f"{context} batch {batch}" + (f" train {train}" if train else ""),
               "lowbit": ours(demo, None if ckpt else "fp32", context, batch, train,
                              device="cpu")}
        if not ckpt:  # the references have no lowbit format
            row["gpu_poor"] = gpu_poor(demo.config, context, batch, train, nbytes=4,
                                       overhead=False)
            row["accelerate"] = accelerate_estimate(demo.config, "float32")
        if not args.no_measure:
            started = time.time()
            row["measured"] = measured_demo(checkpoints[ckpt], context, batch, train)
            row["measure_seconds"] = round(time.time() - started, 1)
        elif "measured" in kept.get(row["case"], {}):
            row.update({k: kept[row["case"]][k] for k in ("measured", "measure_seconds")})
        if "measured" in row:
            row["lowbit_rel_error"] = round(
                (row["lowbit"]["Total"] - row["measured"]["peak_mib"]) /
                row["measured"]["peak_mib"], 4)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    args.out.write_text(json.dumps({
        "command": "python scripts/fits_compare.py",
        "machine": "2-core CPU (measurements: fp32, torch MemTracker live tensor bytes)",
        "units": "MiB",
        "notes": {
            "gpu_poor": "its published formula re-derived (src/App.js at ad2fc0e): HF "
                        "inference/training, no quantization, Adam; on CPU cases at 4-byte "
                        "elements and without its 650 MiB CUDA overhead",
            "accelerate": "accelerate's calculate_maximum_sizes/estimate_training_usage on the "
                          "config (AutoModel: no LM head; weights only)",
            "lowbit": "quant.eval.fits; GPU cases with its default overheads"},
        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
