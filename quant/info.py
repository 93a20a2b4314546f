"""`quant info`: what a checkpoint holds, layer by layer, and what it costs on disk.

Structure comes from the checkpoint's plan (config.json); `quant_report.json`, when
present, adds measurements (each layer's output error, distillation)."""

from __future__ import annotations

from pathlib import Path

from quant import checkpoint
from quant import plan as plans


def describe(directory: Path) -> dict:
    directory = Path(directory)
    plan = plans.checked(directory, checksums=False)
    report = checkpoint.read_report(directory)
    summary = plan.summary()
    measured = report.get("layers", {})
    for layer in summary["layers"]:
        if "rel_output_mse" in measured.get(layer["name"], {}):
            layer["rel_output_mse"] = measured[layer["name"]]["rel_output_mse"]
    files = checkpoint.weight_files(directory)
    return {"directory": str(directory), "method": report.get("method"), **summary,
            "bytes_on_disk": sum(f.stat().st_size for f in files),
            "files": [f.name for f in files], "distill": report.get("distill")}


def render(summary: dict) -> str:
    """The table `quant info` and `quant plan` print."""
    measured = any("rel_output_mse" in layer for layer in summary["layers"])
    rows = [f"{'layer':<44} {'scheme':<22} {'bits':>10} {'bpw':>7}"
            + (f" {'out_mse':>9}" if measured else "")]
    for layer in summary["layers"]:
        mse = layer.get("rel_output_mse")
        rows.append(f"{layer['name']:<44} {layer['scheme']:<22} {layer['bits']:>10} "
                    f"{layer['bits_per_weight']:>7.3f}"
                    + (f" {'-' if mse is None else format(mse, '.2e'):>9}" if measured else ""))
    rows += ["",
             f"method: {summary.get('method') or '-'}   "
             f"quantized layers: {summary['quantized_layers']}",
             f"bits per weight: {summary['quantized_bits_per_weight']:.3f} in quantized layers, "
             f"{summary['model_bits_per_weight']:.3f} over all "
             f"{summary['parameters'] / 1e6:.1f}M parameters",
             f"checkpoint tensors: {summary['checkpoint_bytes']} bytes "
             f"({summary['checkpoint_bytes'] / 2**20:.1f} MiB; other tensors in "
             f"{', '.join(summary['kept_dtypes'])})"]
    if "bytes_on_disk" in summary:
        rows.append(f"size on disk: {summary['bytes_on_disk'] / 2**20:.1f} MiB in "
                    f"{', '.join(summary['files'])}")
    if summary.get("distill"):
        rows += [distill_line(summary["distill"]),
                 "(out_mse: each layer's output error when it was quantized, before distillation)"]
    return "\n".join(rows)


def distill_line(d: dict) -> str:
    """One line for a report's `distill` entry."""
    return (f"distillation: KL to the fp model per token {d['kl_before']:.4f} -> "
            f"{d['kl_after']:.4f} on held-out calibration sequences ({d['steps']} steps, "
            f"{d['seconds']:.0f} s)")
