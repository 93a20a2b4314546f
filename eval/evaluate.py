"""Evaluate a model (a lowbit checkpoint or a full-precision model) and record the result.

Results are JSON records; for a checkpoint directory they are also appended to its
`eval.json`, which the reports and the fits calculator read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quant import checkpoint, data, models
from quant.eval.perplexity import perplexity

EVAL_FILE = "eval.json"


def load_model(spec: str | None, device: torch.device, allow_pickle: bool = False):
    """(model, tokenizer, is_quantized) for a checkpoint dir, a local model or a demo alias."""
    import quant

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    path = Path(spec) if spec else None
    if path is not None and path.is_dir() and checkpoint.is_lowbit_checkpoint(path):
        return quant.load(path, device=device, dtype=dtype), models.load_tokenizer(path), True
    source = models.resolve(spec)
    model = models.load_fp(source, dtype, allow_pickle)
    return model.to(device), models.load_tokenizer(source), False


def evaluate_ppl(spec: str | None, dataset: str = "wiki-demo", seqlen: int = 512,
                 device: torch.device = torch.device("cpu"), batch_size: int = 4,
                 progress: bool = True, allow_pickle: bool = False) -> dict:
    data.check_dataset_name(dataset)
    started = time.time()
    model, tokenizer, quantized = load_model(spec, device, allow_pickle)
    windows = data.eval_windows(dataset, tokenizer, seqlen)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    result = {"model": spec or "smollm2-135m", "quantized": quantized, "metric": "perplexity",
              "dataset": dataset, "seqlen": seqlen, "windows": len(windows), "ppl": ppl,
              "device": str(device), "seconds": round(time.time() - started, 2)}
    if quantized:
        record(Path(spec), result)
    return result


def record(directory: Path, result: dict) -> None:
    """Append a result to the checkpoint's eval.json (replacing one for the same setting)."""
    path = directory / EVAL_FILE
    results = json.loads(path.read_text()) if path.is_file() else []
    key = ("metric", "dataset", "seqlen", "quantized", "model")
    results = [r for r in results if any(r.get(k) != result.get(k) for k in key)]
    checkpoint.write_json(path, results + [result])
