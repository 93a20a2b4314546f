"""Measure activation memory of transformers jobs on tiny random Llama models (CPU, fp32,
torch's MemTracker via quant.eval.memory), fit the training coefficients of
recipes/memory.toml, and check the whole calculator (quant.eval.fits) against every
measurement: the inference phases there were read off the code and are only checked.

    python scripts/fit_memory_constants.py [--write] [--out benchmarks/memory-fit-cpu.json]

--write replaces the [hf.train.*] tables of recipes/memory.toml with the fit. The demo
model is deliberately not in the grid: tests/eval/test_fits.py checks predictions for it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (hidden, intermediate, layers, heads, kv heads, vocab)
    (128, 384, 1, 4, 2, 500), (256, 512, 2, 4, 2, 1000), (256, 768, 2, 4, 4, 2000),
    (384, 768, 1, 6, 2, 1500), (192, 768, 3, 3, 1, 800), (256, 512, 3, 8, 2, 3000),
    (320, 960, 2, 5, 5, 1200), (128, 640, 2, 2, 1, 4000)]
SHAPES = [(1, 128), (2, 96), (1, 256)]  # (batch, tokens)
TRAIN = ["lora", "lora+gc", "full", "full+gc"]
INFER = ["generate", "forward"]
# each training mode's phases and the features each is a linear model of
PHASES = {
    "lora": {"backward": ["L_h", "L_I", "L_kv", "V", "h", "I", "one"]},
    "full": {"backward": ["L_h", "L_I", "L_kv", "V", "h", "I", "one"]},
    "lora+gc": {"logits": ["L_h", "V", "h", "one"], "recompute": ["L_h", "h", "I", "kv", "one"]},
    "full+gc": {"logits": ["L_h", "V", "h", "one"], "recompute": ["L_h", "h", "I", "kv", "one"]},
}


def tiny(hidden, inter, layers, heads, kv_heads, vocab):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=vocab, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure_grid() -> list[dict]:
    import torch

    from quant.eval.memory import MemoryJob, measure

    records = []
    for cfg in CONFIGS:
        for mode in INFER + TRAIN:
            for batch, tokens in SHAPES:
                model = tiny(*cfg)
                train = None if mode in INFER else mode.removesuffix("+gc")
                job = MemoryJob(context=tokens, batch=batch, new_tokens=2,
                                workload=mode if mode in INFER else "generate", train=train,
                                gradient_checkpointing=mode.endswith("+gc"))
                result = measure(model, job, torch.device("cpu"))
                records.append({"config": cfg, "mode": mode, "batch": batch, "tokens": tokens,
                                "measured": result})
                print(f"{cfg} {mode} {batch}x{tokens}: peak {result['peak_bytes']}",
                      file=sys.stderr)
    return records


def fit(records: list[dict]) -> dict:
    """Per training mode, a linear model of the backward's activations (elements per token)
    for each phase; records are assigned to the phase that predicts them highest."""
    from quant.eval.fits import features

    tables = {}
    for mode, phases in PHASES.items():
        rows, ys = [], []
        for r in records:
            kinds = r["measured"]["tracker_kinds"]
            if r["mode"] != mode or kinds["Activation"] == 0 or kinds["Gradient"] > 0:
                continue  # peaks in the optimizer step: modelled, not fitted
            f = features(tiny(*r["config"]).config)
            rows.append(f)
            ys.append((kinds["Activation"] + kinds["Temp"] + kinds["Other"]) / 4 /
                      (r["batch"] * r["tokens"]))
        y = np.array(ys)
        names = list(phases)
        mats = {p: np.array([[f[k] for k in phases[p]] for f in rows]) for p in names}
        assign = np.zeros(len(y), dtype=int) if len(names) == 1 else \
            np.array([0 if f["V"] > 2 * f["I"] else 1 for f in rows])
        for _ in range(50):
            coefs = {p: np.linalg.lstsq(mats[p][assign == i], y[assign == i], rcond=None)[0]
                     for i, p in enumerate(names)}
            preds = np.stack([mats[p] @ coefs[p] for p in names])
            new = preds.argmax(0)
            if (new == assign).all():
                break
            assign = new
        tables[mode] = {p: {k: round(float(c), 3) for k, c in zip(phases[p], coefs[p])}
                        for p in names}
    return tables


def toml_tables(tables: dict) -> str:
    lines = []
    for mode, phases in tables.items():
        lines += ["", f'[hf.train."{mode}".phases]']
        for phase, terms in phases.items():
            inner = ", ".join(f"{k} = {v}" for k, v in terms.items())
            lines.append(f"{phase} = {{ {inner} }}")
    return "\n".join(lines) + "\n"


def write_constants(tables: dict) -> None:
    path = ROOT / "recipes" / "memory.toml"
    text = path.read_text()
    text = re.sub(r'\n\[hf\.train\."[^"]+"\.phases\]\n(?:[a-z]+ = \{[^\n]*\}\n)+', "\n", text)
    marker = "\n# GPU overheads"
    head, _, tail = text.partition(marker)
    path.write_text(head.rstrip("\n") + "\n" + toml_tables(tables) + marker + tail)


def check(records: list[dict]) -> list[dict]:
    """The calculator's prediction for every measured job."""
    from quant.eval import fits

    rows = []
    for r in records:
        model = tiny(*r["config"])
        mode = r["mode"]
        job = fits.FitsJob(context=r["tokens"], batch=r["batch"], new_tokens=2, device="cpu",
                           workload=mode if mode in INFER else "generate",
                           train=None if mode in INFER else mode.removesuffix("+gc"),
                           gradient_checkpointing=mode.endswith("+gc"))
        predicted = fits.estimate(job, fits.Model("tiny", model.config, model), "fp32")
        measured = r["measured"]["peak_bytes"]
        rows.append({"config": r["config"], "mode": mode, "batch": r["batch"],
                     "tokens": r["tokens"], "measured_peak": measured,
                     "predicted_peak": predicted["total_bytes"],
                     "rel_error": round((predicted["total_bytes"] - measured) / measured, 4)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write the fit to recipes/memory.toml")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory-fit-cpu.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    started = time.time()
    records = measure_grid()
    tables = fit(records)
    print(toml_tables(tables))
    if args.write:
        write_constants(tables)
        from quant import recipes

        recipes.memory_constants.cache_clear()
    checked = check(records)
    worst = {m: max(abs(c["rel_error"]) for c in checked if c["mode"] == m)
             for m in INFER + TRAIN}
    print("worst relative error per mode: " + json.dumps(worst), file=sys.stderr)
    args.out.write_text(json.dumps({
        "machine": "2-core CPU, fp32, torch " + torch.__version__,
        "command": "python scripts/fit_memory_constants.py --write",
        "seconds": round(time.time() - started, 1), "fitted": tables,
        "worst_rel_error": worst, "checks": checked}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
