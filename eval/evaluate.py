"""Evaluate a model (a lowbit checkpoint or a full-precision model) and record the result.

Results are JSON records; for a checkpoint directory they are also appended to its
`eval.json`, which the reports and the fits calculator read. Results of full-precision
models are also kept in the cache directory, keyed by everything they depend on, so that
`quantize` need not measure the same fp baseline on every run (`reuse_fp`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from quant import assets, checkpoint, data, models
from quant.errors import ConfigError
from quant.eval.perplexity import perplexity

EVAL_FILE = "eval.json"


def locate(spec: str | None) -> tuple[Path, bool]:
    """(directory, whether it is a lowbit checkpoint) for a checkpoint dir, a local model,
    a hub id or a demo alias."""
    path = Path(spec) if spec else None
    if path is not None and path.is_dir() and checkpoint.is_lowbit_checkpoint(path):
        return path, True
    return models.resolve(spec), False


def load_model(source: Path, quantized: bool, device: torch.device,
               allow_pickle: bool = False):
    """(model, tokenizer) from a directory `locate` found."""
    import quant

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if quantized:
        model = quant.load(source, device=device, dtype=dtype)
    else:
        model = models.load_fp(source, dtype, allow_pickle).to(device)
    return model, models.load_tokenizer(source)


def evaluate_ppl(spec: str | None, dataset: str = "wiki-demo", seqlen: int = 512,
                 device: torch.device = torch.device("cpu"), batch_size: int = 4,
                 progress: bool = True, allow_pickle: bool = False,
                 reuse_fp: bool = False) -> dict:
    """Perplexity of a checkpoint or an fp model on one data set's evaluation split."""
    return evaluate_ppls(spec, [dataset], seqlen, device, batch_size, progress, allow_pickle,
                         reuse_fp)[0]


def evaluate_ppls(spec: str | None, datasets: list[str], seqlen: int = 512,
                  device: torch.device = torch.device("cpu"), batch_size: int = 4,
                  progress: bool = True, allow_pickle: bool = False,
                  reuse_fp: bool = False) -> list[dict]:
    """Perplexity of a checkpoint or an fp model on each data set (the model is loaded
    once); with `reuse_fp`, an fp model's result measured before under the same conditions
    is returned instead (marked "cached"). A checkpoint's results go to its eval.json."""
    for dataset in datasets:
        data.check_eval_name(dataset)
    source, quantized = locate(spec)
    cache = {d: None if quantized else fp_cache_file(source, d, seqlen, device)
             for d in datasets}
    results = {}
    if reuse_fp and not quantized:
        for dataset, path in cache.items():
            earlier = read_cached(path)
            if earlier is not None:
                results[dataset] = {**earlier, "cached": True}
    todo = [d for d in datasets if d not in results]
    if todo:
        model, tokenizer = load_model(source, quantized, device, allow_pickle)
    for dataset in todo:
        started = time.time()
        windows = data.eval_windows(dataset, tokenizer, seqlen)
        ppl = perplexity(model, windows, batch_size=batch_size, progress=progress,
                         desc=f"perplexity {dataset}")
        result = {"model": spec or assets.DEFAULT_MODEL, "quantized": quantized,
                  "metric": "perplexity", "dataset": dataset,
                  "text_sha256": data.text_sha256(dataset), "seqlen": seqlen,
                  "windows": len(windows), "ppl": ppl, "device": str(device),
                  "seconds": round(time.time() - started, 2)}
        if quantized:
            record(source, result)
        else:
            cache[dataset].parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(cache[dataset], result)
        results[dataset] = result
    return [results[d] for d in datasets]


def evaluate_kl(spec: str | None, datasets: list[str], reference: str | None = None,
                seqlen: int = 512, device: torch.device = torch.device("cpu"),
                batch_size: int = 4, max_windows: int | None = None,
                progress: bool = True, allow_pickle: bool = False) -> list[dict]:
    """KL divergence of a checkpoint (or any model) from its fp `reference` (default: the
    fp model the checkpoint was quantized from) on each data set's evaluation windows (the
    first `max_windows` of them when given). A checkpoint's results go to its eval.json."""
    from quant.eval.kl import kl_stats

    for dataset in datasets:
        data.check_eval_name(dataset)
    source, quantized = locate(spec)
    reference_dir = _kl_reference(source, quantized, reference)
    model, tokenizer = load_model(source, quantized, device, allow_pickle)
    fp_model, _ = load_model(reference_dir, False, device, allow_pickle)
    results = []
    for dataset in datasets:
        started = time.time()
        windows = data.eval_windows(dataset, tokenizer, seqlen)[:max_windows]
        stats = kl_stats(model, fp_model, windows, batch_size, progress, desc=f"kl {dataset}")
        result = {"model": spec or assets.DEFAULT_MODEL, "quantized": quantized, "metric": "kl",
                  "dataset": dataset, "text_sha256": data.text_sha256(dataset),
                  "seqlen": seqlen, "windows": len(windows),
                  "reference": str(reference or reference_dir), **stats,
                  "device": str(device), "seconds": round(time.time() - started, 2)}
        if quantized:
            record(source, result)
        results.append(result)
    return results


def _kl_reference(source: Path, quantized: bool, reference: str | None) -> Path:
    """The fp model a KL is measured against: --reference, else the checkpoint's source."""
    if reference is not None:
        return locate(reference)[0]
    recorded = fp_source(source) if quantized else None
    if recorded is not None:
        return recorded
    if not quantized:
        raise ConfigError(f"{source} is not a lowbit checkpoint, so there is no fp model to "
                          "compare it with; pass --reference MODEL")
    named = checkpoint.read_report(source).get("source") or "not recorded"
    raise ConfigError(f"the fp model {source} was quantized from ({named}) is not on this "
                      "machine; pass --reference MODEL (that model's directory, hub id or "
                      "demo alias)")


def expand_datasets(name: str) -> list[str]:
    """The data sets `--ppl NAME` evaluates: every demo domain for all-demo."""
    return data.demo_sets() if name == data.ALL_DEMO else [name]


def fp_source(checkpoint_dir: Path) -> Path | None:
    """The fp model a checkpoint was quantized from, when its directory is still there."""
    try:
        source = checkpoint.read_report(checkpoint_dir).get("source")
    except Exception:  # no or damaged report: no baseline
        return None
    return Path(source) if source and (Path(source) / "config.json").is_file() else None


def compare_to_fp(quantized: list[dict], fp: list[dict]) -> dict:
    """Per data set, the quantized and fp perplexities and their ratio, and the geometric
    mean of the ratios (the figure quoted across domains)."""
    rows = [{"dataset": q["dataset"], "fp": f["ppl"], "quantized": q["ppl"],
             "ratio": q["ppl"] / f["ppl"]} for q, f in zip(quantized, fp)]
    geomean = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    return {"metric": "perplexity-vs-fp", "datasets": [r["dataset"] for r in rows],
            "seqlen": quantized[0]["seqlen"], "rows": rows, "geomean_ratio": geomean}


def versus_fp(directory: Path, results: list[dict], fp_spec: str | None, seqlen: int = 512,
              device: torch.device = torch.device("cpu"), batch_size: int = 4) -> dict:
    """Compare a checkpoint's perplexity `results` with the fp model `fp_spec`'s on the same
    data sets (measured, or reused from the cache); the fp results and the comparison go
    to the checkpoint's eval.json. Returns the comparison."""
    fp = evaluate_ppls(fp_spec, [r["dataset"] for r in results], seqlen, device, batch_size,
                       reuse_fp=True)
    name = str(fp_source(directory) or fp[0]["model"])
    for result in fp:
        record(directory, {**result, "model": name})
    comparison = compare_to_fp(results, fp)
    record(directory, {**comparison, "dataset": "+".join(comparison["datasets"]),
                       "quantized": True, "model": results[0]["model"]})
    return comparison


def domain_table(rows: list[dict], geomean: float | None = None) -> str:
    """A text table of per-data-set perplexities: rows of compare_to_fp, or rows with
    only "fp" or only "quantized"."""
    def cell(row: dict, key: str, width: int) -> str:
        return f"{row[key]:{width}.3f}" if row.get(key) is not None else f"{'-':>{width}}"

    lines = [f"{'data set':<20} {'fp':>9} {'quantized':>10} {'x fp':>7}"]
    lines += [f"{r['dataset']:<20} {cell(r, 'fp', 9)} {cell(r, 'quantized', 10)} "
              f"{cell(r, 'ratio', 7)}" for r in rows]
    if geomean is not None:
        lines.append(f"{'geometric mean':<20} {'':>9} {'':>10} {geomean:7.3f}")
    return "\n".join(lines)


def kl_table(results: list[dict]) -> str:
    """A text table of evaluate_kl's results, one row per data set."""
    lines = [f"{'data set':<20} {'tokens':>7} {'KL mean':>8} {'KL p99':>8} {'top-1':>7} "
             f"{'ppl':>9} {'ppl fp':>9}"]
    lines += [f"{r['dataset']:<20} {r['tokens']:>7} {r['kl_mean']:8.4f} {r['kl_p99']:8.4f} "
              f"{r['top1_agreement']:7.2%} {r['ppl']:9.3f} {r['ppl_reference']:9.3f}"
              for r in results]
    return "\n".join(lines)


def fp_cache_file(source: Path | str, dataset: str, seqlen: int, device: torch.device) -> Path:
    """Where the fp result for these conditions is kept: named by a hash of the files of
    the model directory `source` (name, size, modification time), the data set and a hash
    of its text, the window length, the device type (fp32 on CPU, fp16 on GPU), the library
    versions and the code that makes the windows and the perplexity (an edited checkout
    measures again)."""
    import transformers

    from quant.eval import perplexity as perplexity_module
    from quant.pipeline import version

    def stat(path: Path) -> list:
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]

    key = {"files": [stat(p) for p in sorted(Path(source).iterdir()) if p.is_file()],
           "dataset": [dataset, data.text_sha256(dataset)],
           "seqlen": seqlen, "device": torch.device(device).type,
           "versions": [torch.__version__, transformers.__version__, version()],
           "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
                    for m in (data, perplexity_module)]}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return assets.cache_dir() / "fp-eval" / f"{digest}.json"


def read_cached(path: Path) -> dict | None:
    try:
        result = json.loads(path.read_text())
        return result if isinstance(result, dict) and "ppl" in result else None
    except (OSError, ValueError):  # absent or damaged: measure again
        return None


def recorded(directory: Path | None, metric: str) -> list[dict]:
    """The results of `metric` recorded in a checkpoint's eval.json, oldest first."""
    path = Path(directory) / EVAL_FILE if directory is not None else None
    if path is None or not path.is_file():
        return []
    try:
        results = json.loads(path.read_text())
    except ValueError:
        return []
    return [r for r in results if isinstance(r, dict) and r.get("metric") == metric]


def record(directory: Path, result: dict) -> None:
    """Append a result to the checkpoint's eval.json (replacing one for the same setting)."""
    path = directory / EVAL_FILE
    results = json.loads(path.read_text()) if path.is_file() else []
    key = ("metric", "dataset", "seqlen", "quantized", "model", "job", "device")
    results = [r for r in results if any(r.get(k) != result.get(k) for k in key)]
    checkpoint.write_json(path, results + [result])


def evaluate_memory(spec: str | None, job, device: torch.device,
                    allow_pickle: bool = False) -> dict:
    """Measured memory of `job` (quant.eval.memory.MemoryJob) on a checkpoint or fp model,
    with the fits calculator's prediction for the same job beside it."""
    from quant.eval import fits
    from quant.eval.memory import describe_job, measure

    job.validate()
    started = time.time()
    source, quantized = locate(spec)
    model, _ = load_model(source, quantized, device, allow_pickle)
    measured = measure(model, job, device)
    fits_job = job.fits_job(device.type)
    predicted = fits.estimate(fits_job, fits.load_model(str(source)),
                              None if quantized else fits_job.dtype)
    result = {"model": spec or assets.DEFAULT_MODEL, "quantized": quantized, "metric": "memory",
              "job": describe_job(job), **measured,
              "predicted": {"peak_bytes": predicted["total_bytes"],
                            "breakdown": predicted["breakdown"]},
              "seconds": round(time.time() - started, 2)}
    if quantized:
        record(source, result)
    return result
