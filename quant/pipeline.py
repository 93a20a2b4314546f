"""The quantization pipeline: the only place that runs the model while quantizing.

Block by block: take the block's inputs for the calibration batch, gather the statistics
the method needs with hooks, quantize each linear and swap in its QuantLinear, re-run the
block (measuring each layer's output error) to make the next block's inputs, and persist
the block. Then the whole-model stage a method may ask for (distillation) runs. The
checkpoint directory appears by one rename when all of it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quant import checkpoint, models
from quant.data import CalibConfig, calibration_windows
from quant.errors import ConfigError, ModelError
from quant.finetune import block_outputs, finetune_block, finetune_model, norm_parameters
from quant.formats import format_class
from quant.formats.int_weight import PACKING
from quant.layers import QuantLinear, set_module
from quant.methods import make_method
from quant.stats import collect_hessians, input_groups, relative_output_error
from quant.traverse import (BlockInputs, ChildReplay, capture_block_inputs, find_blocks,
                            find_linears, replay_finished_children, run_batches)

NOT_CONVERTED = ("lm_head",)


@dataclass
class QuantizeJob:
    """Everything `quantize` needs; the CLI fills it from its arguments."""

    method: str = "rtn"
    method_options: dict = field(default_factory=dict)
    model: str | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    out: Path | None = None
    overwrite: bool = False
    resume: bool = False
    device: str = "auto"
    matmul_dtype: str = "auto"  # CPU: float32 | bfloat16 matmuls while calibrating
    allow_pickle: bool = False
    batch_tokens: int = 8192  # calibration tokens per block forward
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --matmul-dtype


def native_bf16_cpu() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def calibration_matmuls(name: str, device: torch.device, method) -> torch.dtype:
    """The dtype of the block forwards' matmuls on a CPU (torch autocast; weights, norms,
    residuals and statistics stay fp32). bf16 matmuls run 2.5x faster with AVX512-BF16/AMX,
    and a method whose own error is far above bf16 rounding (`bf16_calibration`) uses
    them by default."""
    if device.type != "cpu":
        if name != "auto":
            raise ConfigError("--matmul-dtype applies to CPU runs (a GPU calibrates in fp16)")
        return torch.float16
    if name == "auto":
        fast = getattr(method, "bf16_calibration", False) and native_bf16_cpu()
        return torch.bfloat16 if fast else torch.float32
    return MATMUL_DTYPES[name]


def calibration_autocast(matmuls: torch.dtype):
    """The context the pipeline runs the model in: CPU bf16 autocast when `matmuls` asks
    for it (calibration_matmuls), else nothing changes."""
    return torch.autocast("cpu", torch.bfloat16, enabled=matmuls == torch.bfloat16)


def default_out(model_spec: str | None, method: str, config) -> Path:
    name = Path(model_spec.rstrip("/")).name if model_spec else "smollm2-135m"
    bits = getattr(config, "bits", None)
    return Path(f"{name}-{method}" + (f"-{bits}bit" if bits else ""))


def check_output(out: Path, overwrite: bool, explicit: bool) -> None:
    """Refuse to replace an existing directory unless asked (or it is our own auto-named one)."""
    if out.exists() and not overwrite and (explicit or not checkpoint.is_lowbit_checkpoint(out)):
        raise ConfigError(f"output directory {out} already exists; pass --overwrite to replace "
                          "it or choose another --out")


def quantize(job: QuantizeJob) -> Path:
    """Quantize `job.model` with `job.method`; returns the checkpoint directory."""
    started = time.time()
    method = make_method(job.method, **job.method_options)
    calib = job.calib.validate()
    device = resolve_device(job.device)
    matmuls = calibration_matmuls(job.matmul_dtype, device, method)
    out = Path(job.out or default_out(job.model, job.method, method.config))
    check_output(out, job.overwrite, explicit=job.out is not None)

    source = models.resolve(job.model)
    models.check_weights(source, job.allow_pickle)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    staging = checkpoint.Staging(out)
    fingerprint = {"source": str(source.resolve()), "method": job.method,
                   "options": dataclasses.asdict(method.config),
                   "calibration": dataclasses.asdict(calib), "dtype": str(dtype),
                   "matmuls": str(matmuls)}
    staging.check(fingerprint, job.resume, job.overwrite)

    plan_layers(*find_blocks(models.skeleton(source)), method)  # fail before loading weights
    tokenizer = models.load_tokenizer(source)
    input_ids = calibration_windows(calib, tokenizer)
    model = models.load_fp(source, dtype, job.allow_pickle)
    prefix, blocks = find_blocks(model)
    plan = plan_layers(prefix, blocks, method)
    done = staging.open(fingerprint, job.resume, job.overwrite)

    inputs = capture_block_inputs(model, blocks, input_ids, max(1, job.batch_tokens // calib.seqlen))
    modules, layers, block_seconds = {}, {}, []
    bar = tqdm(range(len(blocks)), desc=f"quantize ({job.method})", unit="block",
               disable=not job.progress)
    for i in bar:
        tick = time.time()
        block, block_prefix = blocks[i].to(device), f"{prefix}.{i}."
        with calibration_autocast(matmuls):
            if i < done:
                block_modules, report = restore_block(block, staging, i, block_prefix)
                propagate(block, inputs, i, device)
            else:
                block_modules, report = quantize_block(block, plan[i], method, inputs, i,
                                                       block_prefix, device, bar)
                staging.save_block(i, quantized_tensors(block, block_prefix), block_modules,
                                   report)
        blocks[i] = block.to("cpu")
        modules.update(block_modules)
        layers.update(report)
        block_seconds.append(round(time.time() - tick, 2))
    distilled = distill(model, method, source, input_ids, device, matmuls, calib.seed,
                        job.progress)

    quant_config = {
        "quant_method": checkpoint.QUANT_METHOD, "format_version": checkpoint.FORMAT_VERSION,
        "packing": {"int": PACKING}, "modules": modules,
        "modules_to_not_convert": [n for n, _ in model.named_modules()
                                   if n.split(".")[-1] in NOT_CONVERTED],
        "calibration": {**dataclasses.asdict(calib), "tokens": calib.nsamples * calib.seqlen},
        "lowbit_version": version(),
    }
    summary = {"model": job.model or "smollm2-135m", "source": str(source),
               "method": job.method, "options": dataclasses.asdict(method.config),
               "device": str(device), "matmul_dtype": str(matmuls).removeprefix("torch."),
               "quantize_seconds": round(time.time() - started, 2),
               "block_seconds": block_seconds, **distilled}
    write_checkpoint(staging, model, tokenizer, source, quant_config, layers, summary)
    return out


def distill(model, method, source: Path, input_ids: torch.Tensor, device, matmuls,
            seed: int, progress: bool) -> dict:
    """The model fine-tuning stage a method asks for (`method.distill`): the quantized
    model learns the fp model's next-token distributions. Returns its report entry."""
    config = getattr(method, "distill", None)
    if not config:
        return {}
    tick = time.time()
    teacher = models.load_fp(source, model.dtype).to(device).eval()
    model.to(device)
    bar = partial(tqdm, desc="distill", unit="step", disable=not progress)
    with calibration_autocast(matmuls):
        result = finetune_model(model, teacher, input_ids, config, device, seed, bar)
    model.to("cpu")
    if result is None:
        return {}
    return {"distill": {"steps": config.steps, "lr": config.lr, "sequences": config.sequences,
                        **result, "seconds": round(time.time() - tick, 2)}}


def plan_layers(prefix: str, blocks, method) -> list[dict[str, torch.nn.Linear]]:
    """The linears of each block, checked against the method before any work starts."""
    plan = []
    for i, block in enumerate(blocks):
        linears = find_linears(block, skip=NOT_CONVERTED)
        for name, linear in linears.items():
            method.check_layer(f"{prefix}.{i}.{name}", linear.out_features, linear.in_features)
        plan.append(linears)
    if not any(plan):
        raise ModelError("the model's decoder blocks contain no nn.Linear layers to quantize")
    return plan


# ---- one block ---------------------------------------------------------------------------

def quantize_block(block, linears: dict, method, inputs: BlockInputs, index: int,
                   prefix: str, device, bar) -> tuple[dict, dict]:
    """Quantize one block in place and advance `inputs`; returns (module configs, reports).

    Methods that need the Hessian get it per group of linears sharing an input; with
    true-sequential each group's inputs come through the already quantized groups."""
    modules, report, reference = {}, {}, {}
    tuning = getattr(method, "finetune", None)
    targets = block_outputs(block, inputs, index, device) if tuning else None
    with replay_finished_children(block, linears) as replay:
        if method.needs_hessian:
            with replay.learning_tails():
                groups = input_groups(block, linears, inputs, index, device)
            stages = [[g] for g in groups] if method.true_sequential else [groups]
        else:
            groups, stages = [], [[[name] for name in linears]]
        for stage in stages:
            # in true-sequential order everything upstream of a stage is final
            recording = (replay.recording_tail_inputs(sum(stage, [])) if len(stages) > 1
                         else contextlib.nullcontext())
            with recording:
                hessians = collect_hessians(block, stage, inputs, index, device,
                                            method.hessian_dtype, replay) if groups else {}
            for group in stage:
                bar.set_postfix_str(",".join(name.split(".")[-1] for name in group))
                quantized = quantize_linears(prefix, {n: linears[n] for n in group}, method,
                                             hessians.get(group[0]))
                for name, (fmt, dense, entry) in quantized.items():
                    layer = QuantLinear.from_weight(fmt, linears[name].bias)
                    layer.pin_dense(dense)
                    set_module(block, name, layer)
                    reference[name] = linears[name]
                    modules[prefix + name] = fmt.config
                    report[prefix + name] = entry
        if not tuning:
            measured = propagate(block, inputs, index, device, None if groups else reference,
                                 replay)
    if tuning:  # after the replay: tuning changes what the finished children compute
        tuned = finetune_block(block, inputs, index, device, targets, tuning)
        inputs.advance(tuned["outputs"])
        measured = {}
        for name in reference:
            report[prefix + name]["block_finetune"] = {
                "steps": tuning.steps, "rel_block_output_mse_before": tuned["before"],
                "rel_block_output_mse_after": tuned["after"]}
    for name in reference:
        block.get_submodule(name).pin_dense(None)
    for name, err in measured.items():
        report[prefix + name]["rel_output_mse"] = err
    return modules, report


@torch.autocast("cpu", enabled=False)  # the method's own math is fp32 (or fp64)
def quantize_linears(prefix: str, linears: dict, method, hessian) -> dict[str, tuple]:
    """{name: (format, fp32 dequantized weight, report entry)} for linears sharing one
    input (and Hessian)."""
    weights = {}
    for name, linear in linears.items():
        weights[name] = linear.weight.data.float()
        if not torch.isfinite(weights[name]).all():
            raise ModelError(f"{prefix}{name}: the weight contains NaN or inf; "
                             "the source checkpoint is corrupt")
    tick = time.time()
    if hasattr(method, "quantize_group") and hessian is not None:
        results = method.quantize_group(list(weights.values()), hessian)
    else:
        results = [method.quantize(w, hessian, name=prefix + name)
                   for name, w in weights.items()]
    seconds = time.time() - tick
    rows = sum(w.shape[0] for w in weights.values())
    out = {}
    for (name, weight), (fmt, info) in zip(weights.items(), results):
        dequantized = fmt.dequantize(torch.float32)
        if not torch.isfinite(dequantized).all():
            raise ModelError(f"{prefix}{name}: quantization produced non-finite values")
        entry = {**fmt.config, "scheme": fmt.name, "shape": [fmt.out_features, fmt.in_features],
                 "bits_per_weight": round(fmt.bits_per_weight, 4),
                 "rel_weight_mse": float((dequantized - weight).pow(2).sum() / weight.pow(2).sum()),
                 "seconds": round(seconds * weight.shape[0] / rows, 3), **info}
        if hessian is not None:  # exact on the inputs the layer was quantized with
            entry["rel_output_mse"] = relative_output_error(weight, dequantized, hessian)
        out[name] = (fmt, dequantized, entry)
    return out


def propagate(block, inputs: BlockInputs, index: int, device,
              reference: dict[str, torch.nn.Linear] | None = None,
              replay: ChildReplay | None = None) -> dict[str, float]:
    """Run the (quantized) block on every batch, replacing inputs.hidden with its outputs.

    With `reference` (fp linears by name), also returns each quantized layer's relative
    output error ||(W_q - W) x||^2 / ||W x||^2 over the batches it saw."""
    sums = {name: [0.0, 0.0] for name in reference or {}}

    def measure(name):
        def hook(module, args, output):
            ref = reference[name]
            expected = F.linear(args[0], ref.weight.to(args[0].dtype),
                                None if ref.bias is None else ref.bias.to(args[0].dtype))
            sums[name][0] += float(torch.linalg.vector_norm(output - expected)) ** 2
            sums[name][1] += float(torch.linalg.vector_norm(expected)) ** 2
        return hook

    handles = [block.get_submodule(name).register_forward_hook(measure(name)) for name in sums]
    try:
        with torch.no_grad():
            outputs = run_batches(block, inputs, index, device, replay)
            inputs.advance(outputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: num / max(den, 1e-30) for name, (num, den) in sums.items()}


def quantized_tensors(block, prefix: str) -> dict[str, torch.Tensor]:
    """What a finished block changed: its QuantLinears' tensors and (block fine-tuning
    tunes them) its norms."""
    norms = {id(p) for p in norm_parameters(block)}
    return {prefix + name: t.detach() for name, t in block.state_dict(keep_vars=True).items()
            if _is_quantized_tensor(block, name) or id(t) in norms}


def _is_quantized_tensor(block, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = block.get_submodule(owner) if owner else block
    return isinstance(module, QuantLinear)


def restore_block(block, staging, index: int, prefix: str) -> tuple[dict, dict]:
    """Install the QuantLinears a previous run persisted for this block."""
    tensors, modules, report = staging.load_block(index)
    for full, config in modules.items():
        name = full[len(prefix):]
        linear = block.get_submodule(name)
        own = {k[len(full) + 1:]: v for k, v in tensors.items() if k.startswith(full + ".")}
        bias = own.pop("bias", None)
        fmt = format_class(config).from_state_dict(own, config, linear.out_features,
                                                   linear.in_features, where=full)
        set_module(block, name, QuantLinear.from_weight(fmt, bias).to(linear.weight.device))
    with torch.no_grad():  # the norms, as block fine-tuning left them
        for full, tensor in tensors.items():
            if not any(full.startswith(module + ".") for module in modules):
                block.get_parameter(full[len(prefix):]).copy_(tensor)
    return modules, report


# ---- the checkpoint ----------------------------------------------------------------------

def write_checkpoint(staging, model, tokenizer, source: Path, quant_config: dict,
                     layers: dict, summary: dict) -> None:
    final = staging.final_dir()
    config = checkpoint.read_model_config(source)
    dtype = _torch_dtype(config.get("dtype") or config.get("torch_dtype"))
    config["quantization_config"] = quant_config
    checkpoint.write_json(final / "config.json", config)
    for extra in ("generation_config.json",):
        if (source / extra).exists():
            shutil.copy(source / extra, final / extra)
    tokenizer.save_pretrained(final)

    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized.update(f"{name}.{t}" for t in module.tensor_names)
    tensors = {name: (t if name in quantized or not t.is_floating_point() else t.to(dtype))
               for name, t in checkpoint.dedupe_shared(model.state_dict()).items()}
    files = checkpoint.save_weights(final, tensors)

    quant_bits = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers.values())
    quant_weights = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    report = {**summary, "calibration": quant_config["calibration"],
              "totals": {"quantized_layers": len(layers),
                         "bits_per_weight": round(quant_bits / max(quant_weights, 1), 4),
                         "bytes_on_disk": sum(f["bytes"] for f in files.values())},
              "files": files, "layers": layers}
    checkpoint.write_json(final / checkpoint.REPORT, report)
    staging.publish()


def _torch_dtype(name) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float16


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lowbit")
    except PackageNotFoundError:
        return "0+unknown"
