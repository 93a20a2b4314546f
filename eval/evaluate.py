"""Evaluate a model (a lowbit checkpoint or a full-precision model) and record the result.

Results are JSON records; for a checkpoint directory they are also appended to its
`eval.json`, which the reports and the fits calculator read. Results of full-precision
models are also kept in the cache directory, keyed by everything they depend on, so that
`quantize` need not measure the same fp baseline on every run (`reuse_fp`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from quant import assets, checkpoint, data, models
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
                 progress: bool = True, allow_pickle: bool = False,
                 reuse_fp: bool = False) -> dict:
    """Perplexity of a checkpoint or an fp model; with `reuse_fp`, an fp model's result
    measured before under the same conditions is returned instead (marked "cached")."""
    data.check_dataset_name(dataset)
    cached = None if _is_checkpoint(spec) else fp_cache_file(spec, dataset, seqlen, device)
    if reuse_fp and cached is not None:
        earlier = _read_cached(cached)
        if earlier is not None:
            return {**earlier, "cached": True}
    started = time.time()
    model, tokenizer, quantized = load_model(spec, device, allow_pickle)
    windows = data.eval_windows(dataset, tokenizer, seqlen)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    result = {"model": spec or "smollm2-135m", "quantized": quantized, "metric": "perplexity",
              "dataset": dataset, "seqlen": seqlen, "windows": len(windows), "ppl": ppl,
              "device": str(device), "seconds": round(time.time() - started, 2)}
    if quantized:
        record(Path(spec), result)
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(cached, result)
    return result


def _is_checkpoint(spec: str | None) -> bool:
    return spec is not None and Path(spec).is_dir() and checkpoint.is_lowbit_checkpoint(Path(spec))


def fp_cache_file(spec: str | None, dataset: str, seqlen: int, device: torch.device) -> Path:
    """Where the fp result for these conditions is kept: named by a hash of the model's
    files (name, size, modification time), the data set (a local file's too), the window
    length, the device type (fp32 on CPU, fp16 on GPU), the library versions and the code
    that makes the windows and the perplexity (an edited checkout measures again)."""
    import transformers

    from quant.eval import perplexity as perplexity_module
    from quant.pipeline import version

    def stat(path: Path) -> list:
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]

    source = models.resolve(spec)
    key = {"files": [stat(p) for p in sorted(source.iterdir()) if p.is_file()],
           "dataset": [dataset, *(stat(Path(dataset)) if Path(dataset).is_file() else [])],
           "seqlen": seqlen, "device": torch.device(device).type,
           "versions": [torch.__version__, transformers.__version__, version()],
           "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
                    for m in (data, perplexity_module)]}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return assets.cache_dir() / "fp-eval" / f"{digest}.json"


def _read_cached(path: Path) -> dict | None:
    try:
        result = json.loads(path.read_text())
        return result if isinstance(result, dict) and "ppl" in result else None
    except (OSError, ValueError):  # absent or damaged: measure again
        return None


def record(directory: Path, result: dict) -> None:
    """Append a result to the checkpoint's eval.json (replacing one for the same setting)."""
    path = directory / EVAL_FILE
    results = json.loads(path.read_text()) if path.is_file() else []
    key = ("metric", "dataset", "seqlen", "quantized", "model")
    results = [r for r in results if any(r.get(k) != result.get(k) for k in key)]
    checkpoint.write_json(path, results + [result])
