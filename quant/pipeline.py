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
from quant import plan as plans
from quant.data import CalibConfig, calibration_windows, self_count
from quant.errors import ConfigError, ModelError
from quant.finetune import block_outputs, finetune_block, finetune_model, norm_parameters
from quant.formats import format_class
from quant.formats.int_weight import PACKING
from quant.layers import QuantLinear, set_module
from quant.methods import Method, make_method
from quant.plan import LayerSpec, Plan
from quant.stats import collect_hessians, input_groups, relative_output_error
from quant.traverse import BlockRun, capture_block_inputs, find_blocks


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
    recipe: dict | None = None  # {name, file, overrides} when run from a recipe (the report)


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


def calibration_matmuls(name: str, device: torch.device, method: Method) -> torch.dtype:
    """The dtype of the block forwards' matmuls on a CPU (torch autocast; weights, norms,
    residuals and statistics stay fp32). bf16 matmuls are faster where the CPU has native
    bf16 (AVX512-BF16/AMX), and a method whose own error is far above bf16 rounding
    (`Calibration.bf16_matmuls`) uses them by default there."""
    if device.type != "cpu":
        if name != "auto":
            raise ConfigError("--matmul-dtype applies to CPU runs (a GPU calibrates in fp16)")
        return torch.float16
    if name == "auto":
        fast = method.calibration.bf16_matmuls and native_bf16_cpu()
        return torch.bfloat16 if fast else torch.float32
    return MATMUL_DTYPES[name]


def calibration_autocast(matmuls: torch.dtype):
    """The context the pipeline runs the model in: CPU bf16 autocast when `matmuls` asks
    for it (calibration_matmuls), else nothing changes."""
    return torch.autocast("cpu", torch.bfloat16, enabled=matmuls == torch.bfloat16)


def default_out(model_spec: str | None, method: Method) -> Path:
    name = Path(model_spec.rstrip("/")).name if model_spec else "smollm2-135m"
    return Path(f"{name}-{method.label()}")


def check_output(out: Path, overwrite: bool, explicit: bool) -> None:
    """Refuse to replace an existing directory unless asked and it is ours; an auto-named
    one that is a lowbit checkpoint is replaced without asking."""
    if not explicit and checkpoint.is_lowbit_checkpoint(out):
        return
    checkpoint.check_replaceable(out, overwrite)


@dataclass
class Prepared:
    """A job with everything it names looked up and checked, before any weight is read."""

    job: QuantizeJob
    method: Method
    calib: CalibConfig        # nsamples filled in from the method's default
    device: torch.device
    matmuls: torch.dtype      # of the calibration forwards (calibration_matmuls)
    source: Path              # the fp model's directory
    out: Path
    plan: Plan

    def fingerprint(self, dtype: torch.dtype) -> dict:
        """The settings a staged block was made with (--resume requires the same)."""
        return {"source": str(self.source.resolve()), "method": self.job.method,
                "options": dataclasses.asdict(self.method.config),
                "calibration": dataclasses.asdict(self.calib), "dtype": str(dtype),
                "matmuls": str(self.matmuls)}


def prepare(job: QuantizeJob) -> Prepared:
    """Check the job and plan every layer from the model's config alone."""
    method = make_method(job.method, **job.method_options)
    calib = job.calib.with_default_nsamples(method.calibration.nsamples).validate()
    device = resolve_device(job.device)
    matmuls = calibration_matmuls(job.matmul_dtype, device, method)
    out = Path(job.out or default_out(job.model, method))
    check_output(out, job.overwrite, explicit=job.out is not None)
    source = models.resolve(job.model)
    models.check_weights(source, job.allow_pickle)
    return Prepared(job, method, calib, device, matmuls, source, out,
                    plans.for_source(source, method))


def quantize(job: QuantizeJob) -> Path:
    """Quantize `job.model` with `job.method`; returns the checkpoint directory."""
    started = time.time()
    run = prepare(job)
    dtype = torch.float32 if run.device.type == "cpu" else torch.float16
    staging = checkpoint.Staging(run.out)
    staging.check(run.fingerprint(dtype), job.resume, job.overwrite)

    tokenizer = models.load_tokenizer(run.source)
    sampled = self_count(run.calib.dataset) is not None  # needs the model; text does not
    input_ids = None if sampled else calibration_windows(run.calib, tokenizer)
    model = models.load_fp(run.source, dtype, job.allow_pickle)
    if sampled:
        input_ids = calibration_windows(run.calib, tokenizer, model)
    prefix, blocks = find_blocks(model)
    done = staging.open(run.fingerprint(dtype), job.resume, job.overwrite)

    inputs = capture_block_inputs(model, blocks, input_ids,
                                  max(1, job.batch_tokens // run.calib.seqlen))
    layers, block_seconds = {}, []
    bar = tqdm(range(len(blocks)), desc=f"quantize ({job.method})", unit="block",
               disable=not job.progress)
    for i in bar:
        tick = time.time()
        block = BlockRun(blocks[i].to(run.device), inputs, i, run.device, f"{prefix}.{i}",
                         on_step=bar.set_postfix_str)
        specs = block_specs(run.plan, block.name)
        with calibration_autocast(run.matmuls):
            if i < done:
                report = restore_block(block, specs, staging)
                propagate(block)
            else:
                report = quantize_block(block, specs, run.method)
                staging.save_block(i, quantized_tensors(block), named(block, specs, "config"),
                                   named(block, report))
        blocks[i] = block.block.to("cpu")
        layers.update(named(block, report))
        block_seconds.append(round(time.time() - tick, 2))
    distilled = distill(run, model, input_ids)

    quant_config = {
        "quant_method": checkpoint.QUANT_METHOD, "format_version": checkpoint.FORMAT_VERSION,
        "packing": {"int": PACKING}, "modules": run.plan.modules(),
        "modules_to_not_convert": [n for n, _ in model.named_modules()
                                   if n.split(".")[-1] in plans.NOT_CONVERTED],
        "calibration": {**dataclasses.asdict(run.calib),
                        "tokens": run.calib.nsamples * run.calib.seqlen},
        "lowbit_version": version(),
    }
    summary = {"model": job.model or "smollm2-135m", "source": str(run.source),
               "method": job.method, "options": dataclasses.asdict(run.method.config),
               "device": str(run.device), "matmul_dtype": str(run.matmuls).removeprefix("torch."),
               "quantize_seconds": round(time.time() - started, 2),
               "block_seconds": block_seconds, **distilled,
               **({"recipe": job.recipe} if job.recipe else {})}
    write_checkpoint(staging, model, tokenizer, run, quant_config, layers, summary)
    return run.out


def block_specs(plan: Plan, block_name: str) -> dict[str, LayerSpec]:
    """The plan's layers inside one block, by name relative to the block."""
    prefix = block_name + "."
    return {name[len(prefix):]: spec for name, spec in plan.layers.items()
            if name.startswith(prefix)}


def named(block: BlockRun, entries: dict, attribute: str | None = None) -> dict:
    """`entries` keyed by full module name (and reduced to one attribute of each)."""
    return {f"{block.name}.{name}": entry if attribute is None else getattr(entry, attribute)
            for name, entry in entries.items()}


def distill(run: Prepared, model, input_ids: torch.Tensor) -> dict:
    """The model fine-tuning stage a method asks for (`Stages.distill`): the quantized
    model learns the fp model's next-token distributions. Returns its report entry."""
    config = run.method.stages.distill
    if config is None:
        return {}
    tick = time.time()
    teacher = models.load_fp(run.source, model.dtype).to(run.device).eval()
    model.to(run.device)
    bar = partial(tqdm, desc="distill", unit="step", disable=not run.job.progress)
    with calibration_autocast(run.matmuls):
        result = finetune_model(model, teacher, input_ids, config, run.device, run.calib.seed,
                                bar)
    model.to("cpu")
    if result is None:
        return {}
    return {"distill": {"steps": config.steps, "lr": config.lr, "sequences": config.sequences,
                        **result, "seconds": round(time.time() - tick, 2)}}


# ---- one block ---------------------------------------------------------------------------

def quantize_block(run: BlockRun, specs: dict[str, LayerSpec], method: Method) -> dict:
    """Quantize one block in place as `specs` plan it and advance its inputs; returns the
    report entry of each layer.

    Methods that need the Hessian get it per group of linears sharing an input; with
    true-sequential each group's inputs come through the already quantized groups."""
    linears = {name: run.block.get_submodule(name) for name in specs}
    calibration, tuning = method.calibration, method.stages.finetune
    report, reference = {}, {}
    targets = block_outputs(run) if tuning else None
    with run.replaying(linears) as replay:
        if calibration.hessian:
            with replay.learning_tails():
                groups = input_groups(run, linears)
            steps = [[g] for g in groups] if calibration.true_sequential else [groups]
        else:
            groups, steps = [], [[[name] for name in linears]]
        for step in steps:
            # in true-sequential order everything upstream of a step is final
            recording = (replay.recording_tail_inputs(sum(step, [])) if len(steps) > 1
                         else contextlib.nullcontext())
            with recording:
                hessians = collect_hessians(run, step, calibration.hessian_dtype) \
                    if groups else {}
            for group in step:
                run.on_step(",".join(name.split(".")[-1] for name in group))
                quantized = quantize_linears(run.name, {n: (linears[n], specs[n]) for n in group},
                                             method, hessians.get(group[0]))
                for name, (fmt, dense, entry) in quantized.items():
                    layer = QuantLinear.from_weight(fmt, linears[name].bias)
                    layer.pin_dense(dense)
                    set_module(run.block, name, layer)
                    reference[name] = linears[name]
                    report[name] = entry
        if not tuning:
            measured = propagate(run, None if groups else reference)
    if tuning:  # after the replay: tuning changes what the finished children compute
        tuned = finetune_block(run, targets, tuning)
        run.advance(tuned["outputs"])
        measured = {}
        for name in reference:
            report[name]["block_finetune"] = {
                "steps": tuning.steps, "rel_block_output_mse_before": tuned["before"],
                "rel_block_output_mse_after": tuned["after"]}
    for name in reference:
        run.block.get_submodule(name).pin_dense(None)
    for name, err in measured.items():
        report[name]["rel_output_mse"] = err
    return report


@torch.autocast("cpu", enabled=False)  # the method's own math is fp32 (or fp64)
def quantize_linears(where: str, linears: dict[str, tuple[torch.nn.Linear, LayerSpec]],
                     method: Method, hessian) -> dict[str, tuple]:
    """{name: (format, fp32 dequantized weight, report entry)} for linears sharing one
    input (and Hessian), each as its spec plans it."""
    weights, specs = {}, [spec for _, spec in linears.values()]
    for name, (linear, _) in linears.items():
        weights[name] = linear.weight.data.float()
        if not torch.isfinite(weights[name]).all():
            raise ModelError(f"{where}.{name}: the weight contains NaN or inf; "
                             "the source checkpoint is corrupt")
    tick = time.time()
    results = method.quantize_group(list(weights.values()), hessian, specs)
    seconds = time.time() - tick
    rows = sum(w.shape[0] for w in weights.values())
    out = {}
    for (name, weight), spec, (fmt, info) in zip(weights.items(), specs, results):
        if fmt.config != spec.config:
            raise ModelError(f"{where}.{name}: method {method.name} made a {fmt.config} layer "
                             f"where it planned {spec.config}")
        dequantized = fmt.dequantize(torch.float32)
        if not torch.isfinite(dequantized).all():
            raise ModelError(f"{where}.{name}: quantization produced non-finite values")
        entry = {"scheme": spec.scheme, "shape": [spec.out_features, spec.in_features],
                 "bits_per_weight": round(spec.bits_per_weight(), 4),
                 "rel_weight_mse": float((dequantized - weight).pow(2).sum() / weight.pow(2).sum()),
                 "seconds": round(seconds * weight.shape[0] / rows, 3), **info}
        if hessian is not None:  # exact on the inputs the layer was quantized with
            entry["rel_output_mse"] = relative_output_error(weight, dequantized, hessian)
        out[name] = (fmt, dequantized, entry)
    return out


def propagate(run: BlockRun, reference: dict[str, torch.nn.Linear] | None = None
              ) -> dict[str, float]:
    """Run the (quantized) block on every batch, its outputs becoming the next block's
    inputs. With `reference` (fp linears by name), also returns each quantized layer's
    relative output error ||(W_q - W) x||^2 / ||W x||^2 over the batches it saw."""
    sums = {name: [0.0, 0.0] for name in reference or {}}

    def measure(name):
        def hook(module, args, output):
            ref = reference[name]
            expected = F.linear(args[0], ref.weight.to(args[0].dtype),
                                None if ref.bias is None else ref.bias.to(args[0].dtype))
            sums[name][0] += float(torch.linalg.vector_norm(output - expected)) ** 2
            sums[name][1] += float(torch.linalg.vector_norm(expected)) ** 2
        return hook

    handles = [run.block.get_submodule(name).register_forward_hook(measure(name))
               for name in sums]
    try:
        with torch.no_grad():
            run.advance(list(run.batches()))
    finally:
        for handle in handles:
            handle.remove()
    return {name: num / max(den, 1e-30) for name, (num, den) in sums.items()}


def quantized_tensors(run: BlockRun) -> dict[str, torch.Tensor]:
    """What a finished block changed, by full name: its QuantLinears' tensors and (block
    fine-tuning tunes them) its norms."""
    block, norms = run.block, {id(p) for p in norm_parameters(run.block)}
    return {f"{run.name}.{name}": t.detach()
            for name, t in block.state_dict(keep_vars=True).items()
            if _is_quantized_tensor(block, name) or id(t) in norms}


def _is_quantized_tensor(block, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = block.get_submodule(owner) if owner else block
    return isinstance(module, QuantLinear)


def restore_block(run: BlockRun, specs: dict[str, LayerSpec], staging) -> dict:
    """Install the QuantLinears a previous run persisted for this block; returns their
    report entries."""
    tensors, modules, report = staging.load_block(run.index)
    if modules != named(run, specs, "config"):
        raise ConfigError(f"the unfinished run in {staging.root} planned {run.name} "
                          "differently; pass --overwrite to start over")
    prefix = run.name + "."
    for name, spec in specs.items():
        full = prefix + name
        linear = run.block.get_submodule(name)
        own = {k[len(full) + 1:]: v for k, v in tensors.items() if k.startswith(full + ".")}
        bias = own.pop("bias", None)
        fmt = format_class(spec.config).from_state_dict(own, spec.config, spec.out_features,
                                                        spec.in_features, where=full)
        set_module(run.block, name,
                   QuantLinear.from_weight(fmt, bias).to(linear.weight.device))
    with torch.no_grad():  # the norms, as block fine-tuning left them
        for full, tensor in tensors.items():
            if not any(full.startswith(f"{prefix}{name}.") for name in specs):
                run.block.get_parameter(full[len(prefix):]).copy_(tensor)
    return {full[len(prefix):]: entry for full, entry in report.items()}


# ---- the checkpoint ----------------------------------------------------------------------

def write_checkpoint(staging, model, tokenizer, run: Prepared, quant_config: dict,
                     layers: dict, summary: dict) -> None:
    """Write the checkpoint the plan describes into the staging area, check its files
    against the plan, then publish it."""
    final = staging.final_dir()
    config = checkpoint.read_model_config(run.source)
    config["quantization_config"] = quant_config
    checkpoint.write_json(final / "config.json", config)
    for extra in ("generation_config.json",):
        if (run.source / extra).exists():
            shutil.copy(run.source / extra, final / extra)
    tokenizer.save_pretrained(final)

    state = model.state_dict()
    tensors = {}
    for name, spec in run.plan.stored_tensors().items():
        if name not in state or tuple(state[name].shape) != spec.shape:
            raise ModelError(f"{name}: the quantized model does not hold the tensor its plan "
                             f"expects ({spec.dtype} {list(spec.shape)})")
        tensors[name] = state[name].to(spec.dtype)
    files = checkpoint.save_weights(final, tensors)
    run.plan.check_tensors(plans.file_tensors(final), final)

    report = {**summary, "calibration": quant_config["calibration"],
              "totals": {"quantized_layers": len(run.plan.layers),
                         "bits_per_weight": round(run.plan.bits_per_weight(), 4),
                         "bytes_on_disk": sum(f["bytes"] for f in files.values())},
              "files": files, "layers": layers}
    checkpoint.write_json(final / checkpoint.REPORT, report)
    staging.publish()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lowbit")
    except PackageNotFoundError:
        return "0+unknown"
