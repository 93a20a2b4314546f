"""`quant export`: rewrite a uniform lowbit checkpoint in the layout another runtime reads.

GPTQ (v1): the `gptq` quant_method of transformers / GPTQModel / vLLM: qweight as ours,
qzeros holding zero - 1 (the v1 convention), fp16 scales, and g_idx always present.
AQLM: the `aqlm` quant_method of transformers + the aqlm package. Our codebook tensors
already have its names and layout; only the config changes (`aqlm_config`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from quant import checkpoint
from quant import plan as plans
from quant.errors import CheckpointError, ConfigError
from quant.formats import IntWeight
from quant.formats.packing import pack
from quant.plan import Plan

GPTQ_BITS = (2, 3, 4, 8)
OWN_FILES = {"config.json", checkpoint.REPORT, "eval.json", checkpoint.WEIGHTS, checkpoint.INDEX}


def uniform_config(plan: Plan, fmt: str) -> dict:
    """The one module config every quantized layer of `plan` shares."""
    schemes = sorted({spec.scheme for spec in plan.layers.values()})
    if not schemes:
        raise CheckpointError(f"this checkpoint has no quantized layers to export to {fmt}")
    if len(schemes) != 1:
        raise CheckpointError(f"only uniform checkpoints export to {fmt}: this one mixes "
                              f"{len(schemes)} layer schemes ({', '.join(schemes)})")
    return next(iter(plan.layers.values())).config


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
    plan = plans.checked(directory)
    qc = checkpoint.read_quant_config(directory)
    config = uniform_config(plan, "gptq")
    if config["format"] != "int" or config["bits"] not in GPTQ_BITS:
        raise CheckpointError(f"GPTQ runtimes read integer weights of {GPTQ_BITS} bits; this "
                              f"checkpoint has {config['format']} {config.get('bits')}-bit layers")
    tensors = checkpoint.load_tensors(directory)
    options = checkpoint.read_report(directory).get("options", {})  # how it was made, if known
    exported = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in plan.layers}
    for name, spec in plan.layers.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if "bias" in own:
            exported[f"{name}.bias"] = own.pop("bias").half()
        weight = IntWeight.from_state_dict(own, config, spec.out_features, spec.in_features,
                                           where=name)
        exported.update(gptq_tensors(name, weight))
    gptq_config = {
        "quant_method": "gptq", "bits": config["bits"], "group_size": config["group_size"],
        "desc_act": config["act_order"], "sym": config["sym"], "checkpoint_format": "gptq",
        "format": "gptq", "true_sequential": options.get("true_sequential", True),
        "damp_percent": options.get("percdamp", 0.01),
        "modules_to_not_convert": qc.get("modules_to_not_convert", [])}
    model_config = checkpoint.read_model_config(directory)
    model_config["quantization_config"] = gptq_config
    with checkpoint.atomic_dir(out, overwrite) as tmp:
        checkpoint.write_json(tmp / "config.json", model_config)
        checkpoint.write_json(tmp / "quantize_config.json", gptq_config)
        _copy_side_files(directory, tmp)
        checkpoint.save_weights(tmp, exported)
    return Path(out)


def aqlm_config(layer: dict, not_quantized: list[str]) -> dict:
    """transformers' AqlmConfig fields for one codebook shape; `not_quantized` are the
    nn.Linear names left in full precision (AQLM lists their weights)."""
    return {"quant_method": "aqlm", "in_group_size": layer["in_group_size"],
            "out_group_size": layer["out_group_size"], "num_codebooks": layer["num_codebooks"],
            "nbits_per_codebook": layer["nbits_per_codebook"],
            "linear_weights_not_to_quantize": [f"{n}.weight" for n in not_quantized]}


def export_aqlm(directory: Path, out: Path, overwrite: bool = False) -> Path:
    directory = Path(directory)
    plan = plans.checked(directory)
    qc = checkpoint.read_quant_config(directory)
    try:
        config = uniform_config(plan, "aqlm")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; quantize with one shape: --wide-layers '' (if --bits "
                              "then picks one), or --codebooks 1x8 --in-group 4") from None
    if config["format"] != "codebook":
        raise CheckpointError(f"AQLM runtimes read codebook weights; this checkpoint has "
                              f"{config['format']} layers")
    tensors = checkpoint.load_tensors(directory)
    exported = {k: (v.half() if k.endswith(".bias") else v) for k, v in tensors.items()}
    model_config = checkpoint.read_model_config(directory)
    model_config["quantization_config"] = aqlm_config(config, qc.get("modules_to_not_convert", []))
    with checkpoint.atomic_dir(out, overwrite) as tmp:
        checkpoint.write_json(tmp / "config.json", model_config)
        _copy_side_files(directory, tmp)
        checkpoint.save_weights(tmp, exported)
    return Path(out)


def lowbit_config_for_aqlm(directory: Path, config) -> dict:
    """The lowbit quantization_config equivalent to the aqlm one of `config` (the
    checkpoint's transformers config), so our layers (and kernels) run it: every
    nn.Linear not listed as kept in full precision."""
    from quant import models
    from quant.traverse import find_linears

    aqlm = config.quantization_config
    kept = {n.removesuffix(".weight") for n in aqlm.get("linear_weights_not_to_quantize", [])}
    layer = {"format": "codebook", **{k: aqlm[k] for k in (
        "num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")}}
    if layer["out_group_size"] != 1:
        raise CheckpointError(f"{directory}: AQLM with out_group_size "
                              f"{layer['out_group_size']} is not supported (only 1)")
    linears = find_linears(models.skeleton(Path(directory), config))
    return {"quant_method": checkpoint.QUANT_METHOD, "format_version": checkpoint.FORMAT_VERSION,
            "modules": {name: dict(layer) for name in linears if name not in kept},
            "modules_to_not_convert": sorted(kept)}


EXPORTERS = {"gptq": export_gptq, "aqlm": export_aqlm}


def export(directory: Path, fmt: str, out: Path, overwrite: bool = False) -> Path:
    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORTERS)})")
    return EXPORTERS[fmt](directory, out, overwrite)
