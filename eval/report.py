"""`quant report`: Markdown and PNG plots rendered from the JSON that `quantize` and
`quant eval` wrote (quant_report.json, eval.json and the checkpoint's plan). Nothing here
measures; a figure missing from the JSON is shown as missing.

`collect` turns one checkpoint into a plain dict (the report's JSON), `markdown` renders
the dicts, and each plot is one function: data in, file out.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

from quant import checkpoint
from quant.errors import ConfigError, DataError, LowbitError
from quant.eval.evaluate import read_cached, fp_cache_file, fp_source, recorded

REPORT_FILE = "report.md"
MIB = 2**20
MEMORY_PARTS = ("weights", "kv_cache", "activations", "gradients", "optimizer", "overhead")


# ---- the data --------------------------------------------------------------------------

def collect(directory: Path) -> dict:
    """What the report shows of one checkpoint, read from its JSON files."""
    from quant.info import describe

    directory = Path(directory)
    if not checkpoint.is_lowbit_checkpoint(directory):
        raise ConfigError(f"{directory} is not a lowbit checkpoint (no lowbit "
                          "quantization_config in its config.json)")
    summary = describe(directory)
    report = checkpoint.read_report(directory)
    ppl, kl, memory = (recorded(directory, m) for m in ("perplexity", "kl", "memory"))
    if not (ppl or kl or memory):
        raise DataError(f"{directory} has no eval results; run `quant eval {directory} --ppl "
                        "all-demo` (or --kl, --memory) first")
    schemes = collections.Counter(layer["scheme"] for layer in summary["layers"])
    rows = perplexity_rows(ppl, directory)
    return {"name": directory.name, "directory": str(directory),
            "method": summary["method"] or "-",
            "scheme": ", ".join(s if n == len(summary["layers"]) else f"{n} x {s}"
                                for s, n in schemes.most_common()),
            "bpw_quantized": summary["quantized_bits_per_weight"],
            "bpw_model": summary["model_bits_per_weight"],
            "bytes_on_disk": summary["bytes_on_disk"],
            "quantize_seconds": report.get("quantize_seconds"),
            "calibration": report.get("calibration", {}).get("dataset"),
            "perplexity": rows,
            "geomean_ratio": _geomean(recorded(directory, "perplexity-vs-fp"), rows),
            "kl": [{k: r[k] for k in ("dataset", "seqlen", "tokens", "kl_mean", "kl_p99",
                                      "top1_agreement", "ppl", "ppl_reference")}
                   for r in _latest(kl, ("dataset", "seqlen"))],
            "memory": [memory_row(r) for r in _latest(memory, ("job", "device"))]
            or [predicted_memory(directory)],
            "layers": [{"name": layer["name"], "scheme": layer["scheme"],
                        "bits_per_weight": layer["bits_per_weight"],
                        "rel_output_mse": layer.get("rel_output_mse")}
                       for layer in summary["layers"]]}


def _latest(results: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """The newest result for each setting, in the order settings first appear."""
    newest = {}
    for r in results:
        newest[tuple(str(r.get(k)) for k in keys)] = r
    return list(newest.values())


def perplexity_rows(results: list[dict], directory: Path | None = None) -> list[dict]:
    """One row per (data set, window length): the checkpoint's and the fp model's
    perplexity and their ratio, where both were recorded (the fp one in eval.json, else in
    the fp results `quantize` and `quant eval` keep for the checkpoint's source model)."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["dataset"], r["seqlen"]), {
            "dataset": r["dataset"], "seqlen": r["seqlen"], "fp": None, "quantized": None,
            "device": r.get("device", "cpu")})
        row["quantized" if r.get("quantized") else "fp"] = r["ppl"]
    source = fp_source(directory) if directory is not None else None
    for row in rows.values():
        device = row.pop("device")
        if row["fp"] is None and source is not None:
            row["fp"] = cached_fp(source, row["dataset"], row["seqlen"], device)
        row["ratio"] = row["quantized"] / row["fp"] \
            if row["quantized"] is not None and row["fp"] else None
    return list(rows.values())


def cached_fp(source: Path, dataset: str, seqlen: int, device: str) -> float | None:
    import torch

    try:
        path = fp_cache_file(source, dataset, seqlen, torch.device(device))
    except LowbitError:  # the text is no longer readable here: no baseline to show
        return None
    cached = read_cached(path)
    return cached["ppl"] if cached else None


def _geomean(comparisons: list[dict], rows: list[dict]) -> float | None:
    """The recorded geometric mean of the ratios to fp, else that of the rows' ratios at
    the most common window length when every such row has one and there are several."""
    if comparisons:
        return comparisons[-1]["geomean_ratio"]
    if not rows:
        return None
    seqlen = collections.Counter(r["seqlen"] for r in rows).most_common(1)[0][0]
    ratios = [r["ratio"] for r in rows if r["seqlen"] == seqlen]
    if len(ratios) < 2 or None in ratios:
        return None
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


def memory_row(r: dict) -> dict:
    job = r.get("job", {})
    label = f"{job.get('train') or job.get('workload', 'generate')}, context " \
            f"{job.get('context')}, batch {job.get('batch')}"
    return {"source": "measured", "job": label, "device": r.get("device"),
            "peak_bytes": r["peak_bytes"],
            "breakdown": {k: r["breakdown"].get(k, 0) for k in MEMORY_PARTS},
            "predicted_bytes": r.get("predicted", {}).get("peak_bytes")}


PREDICTED_CONTEXT = 4096  # quant fits' default prompt, for a checkpoint never measured


def predicted_memory(directory: Path) -> dict:
    """`quant fits`' breakdown (arithmetic from the plan and config, no measurement) of
    generating from the checkpoint with a PREDICTED_CONTEXT-token prompt on a GPU."""
    from quant.eval import fits

    job = fits.FitsJob(model=str(directory), context=PREDICTED_CONTEXT)
    result = fits.estimate(job, fits.load_model(str(directory)), None)
    return {"source": "quant fits", "job": f"generate, context {job.context}, batch {job.batch}",
            "device": "cuda", "peak_bytes": result["total_bytes"],
            "breakdown": {k: result["breakdown"].get(k, 0) for k in MEMORY_PARTS},
            "predicted_bytes": None}


# ---- Markdown --------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(checkpoints: list[dict], images: list[str]) -> str:
    lines = ["# lowbit report", "",
             "Rendered by `quant report` from each checkpoint's `quant_report.json` and "
             "`eval.json`; perplexity ratios are to the fp model on the same windows.", "",
             "| checkpoint | method | bits/weight (quantized layers) | bits/weight (model) | "
             "size (MiB) | geomean x fp | quantize (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['method']} | {c['bpw_quantized']:.3f} | "
              f"{c['bpw_model']:.3f} | {c['bytes_on_disk'] / MIB:.1f} | "
              f"{_num(c['geomean_ratio'], '.3f')} | {_num(c['quantize_seconds'], '.0f')} |"
              for c in checkpoints]
    lines += ["", *(f"![{Path(i).stem}]({i})" for i in images)]
    for c in checkpoints:
        lines += ["", *_checkpoint_section(c)]
    return "\n".join(lines) + "\n"


def _checkpoint_section(c: dict) -> list[str]:
    lines = [f"## {c['name']}", "",
             f"- directory: `{c['directory']}`",
             f"- method: {c['method']}; scheme: {c['scheme']}",
             f"- bits per weight: {c['bpw_quantized']:.3f} in quantized layers, "
             f"{c['bpw_model']:.3f} over the whole model",
             f"- size on disk: {c['bytes_on_disk'] / MIB:.1f} MiB",
             f"- time to quantize: {_num(c['quantize_seconds'], '.0f')} s "
             f"(calibration: {c['calibration'] or '-'})"]
    if c["perplexity"]:
        lines += ["", "| data set | seqlen | fp ppl | quantized ppl | x fp |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['seqlen']} | {_num(r['fp'], '.3f')} | "
                  f"{_num(r['quantized'], '.3f')} | {_num(r['ratio'], '.3f')} |"
                  for r in c["perplexity"]]
        if c["geomean_ratio"] is not None:
            lines.append(f"| geometric mean | | | | {c['geomean_ratio']:.3f} |")
    if c["kl"]:
        lines += ["", "| data set | seqlen | tokens | KL mean | KL p99 | top-1 agreement | "
                  "ppl | fp ppl |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['seqlen']} | {r['tokens']} | {r['kl_mean']:.4f} | "
                  f"{r['kl_p99']:.4f} | {r['top1_agreement']:.4f} | {r['ppl']:.3f} | "
                  f"{r['ppl_reference']:.3f} |" for r in c["kl"]]
    if c["memory"]:
        lines += ["", "| memory job | source | device | peak (MiB) | " + " | ".join(
            f"{p} (MiB)" for p in MEMORY_PARTS) + " | quant fits predicted (MiB) |",
            "|---|---|---|---|" + "---|" * (len(MEMORY_PARTS) + 1)]
        lines += [f"| {r['job']} | {r['source']} | {r['device']} | {r['peak_bytes'] / MIB:.1f} | "
                  + " | ".join(
            f"{r['breakdown'][p] / MIB:.1f}" for p in MEMORY_PARTS) +
            f" | {_num(r['predicted_bytes'] and r['predicted_bytes'] / MIB, '.1f')} |"
            for r in c["memory"]]
    return lines


# ---- plots -----------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plots need matplotlib: pip install 'lowbit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits and perplexity, by rising bits."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_ppl_vs_bpw(checkpoints: list[dict], path: Path) -> None:
    """Perplexity against bits per weight of the quantized layers, a panel per data set,
    a series per method, the fp level dashed, the Pareto front joined."""
    plt = _pyplot()
    datasets = list(dict.fromkeys((r["dataset"], r["seqlen"]) for c in checkpoints
                                  for r in c["perplexity"] if r["quantized"] is not None))
    cols = min(3, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    methods = sorted({c["method"] for c in checkpoints})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    markers = dict(zip(methods, "osD^vP*X" * 4))
    for ax, (dataset, seqlen) in zip(axes.flat, datasets):
        points, fp = [], []
        for c in checkpoints:
            for r in c["perplexity"]:
                if (r["dataset"], r["seqlen"]) != (dataset, seqlen):
                    continue
                if r["fp"] is not None:
                    fp.append(r["fp"])
                if r["quantized"] is not None:
                    points.append((c["bpw_quantized"], r["quantized"]))
                    ax.scatter(*points[-1], color=colors[c["method"]], marker=markers[c["method"]],
                               s=60, zorder=3, label=c["method"])
                    ax.annotate(c["name"], points[-1], textcoords="offset points",
                                xytext=(5, 5), fontsize=8)
        front = pareto(points)
        ax.plot(*zip(*front), color="0.5", lw=1, zorder=2, label="Pareto front")
        if fp:
            ax.axhline(fp[-1], color="k", ls="--", lw=1, label=f"fp ({fp[-1]:.2f})")
        _log_axis(ax)
        ax.margins(x=0.15)
        ax.set_title(dataset if seqlen == 512 else f"{dataset} (seqlen {seqlen})")
        ax.set_xlabel("bits per weight (quantized layers)")
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    fig.suptitle("Perplexity against size (lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_axis(ax, axis: str = "y") -> None:
    """A log scale whose ticks read as plain numbers (8, 10, 20), not powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    getattr(ax, f"set_{axis}scale")("log")
    which = getattr(ax, f"{axis}axis")
    which.set_major_formatter(FormatStrFormatter("%g"))
    which.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    which.set_minor_formatter(FormatStrFormatter("%g"))


def plot_layers(c: dict, path: Path) -> None:
    """Bits per weight and relative output error of each quantized layer, in model order,
    coloured by the layer's role (its last name part)."""
    plt = _pyplot()
    layers = c["layers"]
    roles = list(dict.fromkeys(layer["name"].rsplit(".", 1)[-1] for layer in layers))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
    color = [palette[roles.index(layer["name"].rsplit(".", 1)[-1])] for layer in layers]
    x = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    top.bar(x, [layer["bits_per_weight"] for layer in layers], color=color, width=1.0)
    top.set_ylabel("bits per weight")
    top.set_title(f"{c['name']}: bits and output error per layer")
    errors = [layer["rel_output_mse"] for layer in layers]
    if any(e is not None for e in errors):
        bottom.bar(x, [e or 0 for e in errors], color=color, width=1.0)
        bottom.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "no per-layer error recorded", ha="center",
                    transform=bottom.transAxes)
    bottom.set_ylabel("relative output error\n(log scale)")
    _block_ticks(bottom, [layer["name"] for layer in layers])
    top.set_ylim(0, max(layer["bits_per_weight"] for layer in layers) * 1.3)
    for role, col in zip(roles, palette):
        top.bar(0, 0, color=col, label=role)
    top.legend(ncol=min(len(roles), 8), fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block_ticks(ax, names: list[str]) -> None:
    """x ticks at the first layer of every few decoder blocks, labelled with the block."""
    firsts = {}
    for i, name in enumerate(names):
        match = re.search(r"\.(\d+)\.", name)
        if match:
            firsts.setdefault(int(match.group(1)), i)
    if not firsts:
        ax.set_xlabel("quantized layer, in model order")
        return
    step = max(1, math.ceil(len(firsts) / 15))
    shown = sorted(firsts)[::step]
    ax.set_xticks([firsts[b] for b in shown], [str(b) for b in shown])
    ax.set_xlabel("decoder block (each bar one quantized layer, in model order)")


def plot_memory(checkpoints: list[dict], path: Path) -> None:
    """Stacked bars of the memory breakdown of each checkpoint and job: measured, or
    predicted by quant fits for a checkpoint never measured."""
    plt = _pyplot()
    bars = [(f"{c['name']}\n{r['job']} ({r['device']}, {r['source']})", r)
            for c in checkpoints for r in c["memory"]]
    fig, ax = plt.subplots(figsize=(10, max(3.5, 1.5 + 0.7 * len(bars))))
    left = [0.0] * len(bars)
    for part in MEMORY_PARTS:
        widths = [r["breakdown"][part] / MIB for _, r in bars]
        if any(widths):
            ax.barh(range(len(bars)), widths, left=left, label=part.replace("_", " "))
            left = [a + b for a, b in zip(left, widths)]
    predicted = [(i, r["predicted_bytes"] / MIB) for i, (_, r) in enumerate(bars)
                 if r["predicted_bytes"]]
    if predicted:
        ax.scatter([p for _, p in predicted], [i for i, _ in predicted], marker="|", s=400,
                   color="k", zorder=3, label="quant fits predicted peak")
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB at the peak")
    ax.set_title("Memory by part (measured, or predicted by quant fits where not measured)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=6,
              frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the report ------------------------------------------------------------------------

def write_report(directories: list[Path], out: Path) -> tuple[Path, list[str]]:
    """Write report.md (and the plots, when matplotlib is installed) into `out`; returns
    its path and notes for the user."""
    checkpoints = [collect(d) for d in directories]
    names = [c["name"] for c in checkpoints]
    if len(set(names)) < len(names):  # the layer plots are named by directory
        for i, c in enumerate(checkpoints):
            c["name"] = f"{i + 1}-{c['name']}"
    out.mkdir(parents=True, exist_ok=True)
    images, notes = [], []
    try:
        _pyplot()
    except ImportError as exc:
        notes.append(f"no plots: {exc}")
    else:
        images = _plots(checkpoints, out)
    path = out / REPORT_FILE
    path.write_text(markdown(checkpoints, images))
    return path, notes


def _plots(checkpoints: list[dict], out: Path) -> list[str]:
    images = []
    if any(r["quantized"] is not None for c in checkpoints for r in c["perplexity"]):
        plot_ppl_vs_bpw(checkpoints, out / "ppl_vs_bpw.png")
        images.append("ppl_vs_bpw.png")
    for c in checkpoints:
        name = "layers.png" if len(checkpoints) == 1 else f"layers-{c['name']}.png"
        plot_layers(c, out / name)
        images.append(name)
    if any(c["memory"] for c in checkpoints):
        plot_memory(checkpoints, out / "memory.png")
        images.append("memory.png")
    return images
