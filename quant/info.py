"""`quant info`: what a checkpoint holds, layer by layer, and what it costs on disk."""

from __future__ import annotations

import math
from pathlib import Path

from quant import checkpoint
from quant.formats import format_class, stored_bits


def describe(directory: Path) -> dict:
    directory = Path(directory)
    checkpoint.verify(directory, checksums=False)
    qc = checkpoint.read_quant_config(directory)
    report = checkpoint.read_report(directory)
    shapes = {name: r["shape"] for name, r in report.get("layers", {}).items()}
    layers, quant_bits, quant_weights = [], 0, 0
    for name, config in qc["modules"].items():
        fmt = format_class(config)
        entry = {"name": name, **config, "scheme": fmt.describe(config)}
        if name in shapes:
            out_features, in_features = shapes[name]
            bits = stored_bits(fmt.tensor_specs(out_features, in_features, config))
            entry.update(shape=shapes[name], bits_per_weight=bits / (out_features * in_features))
            quant_bits, quant_weights = quant_bits + bits, quant_weights + out_features * in_features
        if "rel_output_mse" in report.get("layers", {}).get(name, {}):
            entry["rel_output_mse"] = report["layers"][name]["rel_output_mse"]
        layers.append(entry)

    files = checkpoint.weight_files(directory)
    on_disk = sum(f.stat().st_size for f in files)
    other_params = sum(math.prod(t["shape"]) for f in files for name, t in checkpoint.check_safetensors_file(f).items()
                       if name.rsplit(".", 1)[0] not in qc["modules"])
    return {"directory": str(directory), "method": report.get("method"),
            "quantized_layers": len(layers), "layers": layers,
            "quantized_bits_per_weight": quant_bits / quant_weights if quant_weights else None,
            "model_bits_per_weight": 8 * on_disk / (quant_weights + other_params)
            if quant_weights else None,
            "parameters": quant_weights + other_params, "bytes_on_disk": on_disk,
            "files": [f.name for f in files], "distill": report.get("distill")}


def render(summary: dict) -> str:
    rows = [f"{'layer':<44} {'scheme':<22} {'bpw':>7} {'out_mse':>9}"]
    for layer in summary["layers"]:
        mse = layer.get("rel_output_mse")
        rows.append(f"{layer['name']:<44} {layer['scheme']:<22} "
                    f"{layer.get('bits_per_weight', float('nan')):>7.3f} "
                    f"{'-' if mse is None else format(mse, '.2e'):>9}")
    q_bpw, m_bpw = summary["quantized_bits_per_weight"], summary["model_bits_per_weight"]
    rows += ["",
             f"method: {summary['method']}   quantized layers: {summary['quantized_layers']}",
             f"bits per weight: {q_bpw:.3f} in quantized layers, {m_bpw:.3f} over all "
             f"{summary['parameters'] / 1e6:.1f}M parameters" if q_bpw else "bits per weight: unknown",
             f"size on disk: {summary['bytes_on_disk'] / 2**20:.1f} MiB in "
             f"{', '.join(summary['files'])}"]
    if summary.get("distill"):
        rows += [distill_line(summary["distill"]),
                 "(out_mse: each layer's output error when it was quantized, before distillation)"]
    return "\n".join(rows)


def distill_line(d: dict) -> str:
    """One line for a report's `distill` entry."""
    return (f"distillation: KL to the fp model per token {d['kl_before']:.4f} -> "
            f"{d['kl_after']:.4f} on held-out calibration sequences ({d['steps']} steps, "
            f"{d['seconds']:.0f} s)")
