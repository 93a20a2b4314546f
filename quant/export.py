"""`quant export`: rewrite a uniform lowbit checkpoint in the layout another runtime reads.

GPTQ (v1): the `gptq` quant_method of transformers / GPTQModel / vLLM: qweight as ours,
qzeros holding zero - 1 (the v1 convention), fp16 scales, and g_idx always present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from quant import checkpoint
from quant.errors import CheckpointError, ConfigError
from quant.formats import IntWeight
from quant.formats.packing import pack

GPTQ_BITS = (2, 3, 4, 8)
OWN_FILES = {"config.json", checkpoint.REPORT, "eval.json", checkpoint.WEIGHTS, checkpoint.INDEX}


def uniform_config(modules: dict, fmt: str) -> dict:
    configs = {json.dumps(c, sort_keys=True) for c in modules.values()}
    if len(configs) != 1:
        raise CheckpointError(f"only uniform checkpoints export to {fmt}: this one mixes "
                              f"{len(configs)} layer configurations")
    return json.loads(configs.pop())


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.name not in OWN_FILES and not path.name.startswith("model-"):
            shutil.copy(path, dst / path.name)


def gptq_tensors(name: str, weight: IntWeight) -> dict[str, torch.Tensor]:
    """The v1 tensors of one layer."""
    _, zeros = weight.ints()
    if (zeros == 0).any():
        raise CheckpointError(f"{name}: GPTQ v1 stores zero - 1 and cannot represent a zero "
                              f"point of 0 ({int((zeros == 0).sum())} groups); export a "
                              "checkpoint made with --sym, or use the lowbit format")
    return {f"{name}.qweight": weight.qweight, f"{name}.qzeros": pack(zeros - 1, weight.bits),
            f"{name}.scales": weight.scales,
            f"{name}.g_idx": weight.group_index().to(torch.int32)}


def export_gptq(directory: Path, out: Path, overwrite: bool = False) -> Path:
    directory = Path(directory)
    checkpoint.verify(directory)
    qc = checkpoint.read_quant_config(directory)
    config = uniform_config(qc["modules"], "gptq")
    if config["format"] != "int" or config["bits"] not in GPTQ_BITS:
        raise CheckpointError(f"GPTQ runtimes read integer weights of {GPTQ_BITS} bits; this "
                              f"checkpoint has {config['format']} {config.get('bits')}-bit layers")
    tensors = checkpoint.load_tensors(directory)
    full_report = checkpoint.read_report(directory)
    report, options = full_report.get("layers", {}), full_report.get("options", {})
    exported = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in qc["modules"]}
    for name in qc["modules"]:
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if "bias" in own:
            exported[f"{name}.bias"] = own.pop("bias").half()
        out_f, in_f = _shape(name, report)
        weight = IntWeight.from_state_dict(own, config, out_f, in_f, where=name)
        exported.update(gptq_tensors(name, weight))
    gptq_config = {
        "quant_method": "gptq", "bits": config["bits"], "group_size": config["group_size"],
        "desc_act": config["act_order"], "sym": config["sym"], "checkpoint_format": "gptq",
        "format": "gptq", "true_sequential": options.get("true_sequential", True),
        "damp_percent": options.get("percdamp", 0.01),
        "modules_to_not_convert": qc.get("modules_to_not_convert", [])}
    model_config = json.loads((directory / "config.json").read_text())
    model_config["quantization_config"] = gptq_config
    with checkpoint.atomic_dir(out, overwrite) as tmp:
        checkpoint.write_json(tmp / "config.json", model_config)
        checkpoint.write_json(tmp / "quantize_config.json", gptq_config)
        _copy_side_files(directory, tmp)
        checkpoint.save_weights(tmp, exported)
    return Path(out)


def _shape(name: str, report: dict) -> tuple[int, int]:
    if name in report:
        return tuple(report[name]["shape"])
    raise CheckpointError(f"{name}: the layer's shape is not in {checkpoint.REPORT}")


EXPORTERS = {"gptq": export_gptq}


def export(directory: Path, fmt: str, out: Path, overwrite: bool = False) -> Path:
    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORTERS)})")
    return EXPORTERS[fmt](directory, out, overwrite)
