"""The fits-on-my-GPU calculator (`quant fits`): how much memory a model needs for a job,
split as gpu_poor splits it, whether it fits a GPU, the largest context and batch that do,
and a decode speed estimate.

Exact where arithmetic can be: weights from a Plan of the meta-device skeleton (every
lowbit format, tied and untied embeddings; estimates for other tools' schemes, see
eval/schemes.py) and the KV cache from the config (key/value heads, head size, layers,
sliding windows). Measured where it cannot: activations from per-phase coefficients in
recipes/memory.toml, checked against quant.eval.memory's measurements; the CUDA context
and allocator overhead from a checkpoint's measured eval.json results, else documented
defaults (recipes/memory.toml [gpu]).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant import assets, checkpoint, models, recipes
from quant.errors import ConfigError, LowbitError
from quant.eval import schemes
from quant.eval.evaluate import recorded
from quant.eval.memory import TRAIN_MODES, WORKLOADS

RUNTIMES = ("hf", "vllm", "llama.cpp")
KV_DTYPES = {"fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "fp32": 4}  # bytes per element
DTYPES = schemes.DENSE  # the runtime dtypes --dtype names
ATTENTION = ("sdpa", "eager")
CANDIDATES = {  # the table `quant fits` prints without --quant, by job
    "inference": ("fp16", "int8", "gptq:4g128", "aqlm:2", "nf4", "q4_k_m"),
    "lora": ("fp16",), "full": ("fp32", "bf16"),
    "qlora": ("int8", "gptq:4g128", "aqlm:2", "nf4"),
}


@dataclass(frozen=True)
class FitsJob:
    model: str | None = None
    gpu: str | None = None
    vram: str | None = None
    context: int = 4096              # prompt tokens per sequence
    new_tokens: int = 0              # generated tokens per sequence
    batch: int = 1
    quant: str | None = None         # None: a table of candidates
    kv_dtype: str = "auto"           # auto: the runtime's dtype
    runtime: str = "hf"
    workload: str = "generate"
    attention: str = "sdpa"
    train: str | None = None
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    dtype: str = "auto"              # the runtime's: auto = the model's 16-bit dtype
    device: str = "cuda"             # cuda, or cpu (what quant eval --memory measures there)

    def validate(self) -> "FitsJob":
        if self.batch < 1 or self.context < 1 or self.new_tokens < 0:
            raise ConfigError("--batch and --context must be positive, --new-tokens >= 0")
        for value, allowed, flag in [(self.kv_dtype, ("auto", *KV_DTYPES), "--kv-dtype"),
                                     (self.runtime, RUNTIMES, "--runtime"),
                                     (self.workload, WORKLOADS, "--workload"),
                                     (self.attention, ATTENTION, "--attention"),
                                     (self.dtype, ("auto", *DTYPES), "--dtype"),
                                     (self.device, ("cuda", "cpu"), "--device")]:
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)} (got {value!r})")
        if self.train is not None and self.train not in TRAIN_MODES:
            raise ConfigError(f"--train must be one of {', '.join(TRAIN_MODES)}")
        if self.train and self.runtime != "hf":
            raise ConfigError("--train estimates transformers (--runtime hf) training")
        if self.gpu and self.vram:
            raise ConfigError("give --gpu or --vram, not both")
        return self


# ---- the model --------------------------------------------------------------------------

@dataclass
class Model:
    """The model as the calculator sees it: its config and meta-device skeleton."""

    name: str
    config: object                   # transformers config (its text part)
    skeleton: torch.nn.Module
    checkpoint: Path | None = None   # a lowbit checkpoint, when MODEL is one
    weights: dict = field(default_factory=dict, repr=False)  # (scheme, dtype) -> Weights

    def weights_for(self, scheme: str, dtype: torch.dtype):
        key = (scheme, dtype)
        if key not in self.weights:
            self.weights[key] = schemes.weights(self.skeleton, scheme, dtype)
        return self.weights[key]


def load_model(spec: str | None) -> Model:
    """A known model name, a local model or checkpoint directory (or its config.json), or a
    hub id (config.json only, when online)."""
    spec = spec or assets.DEFAULT_MODEL
    known = recipes.find_model(spec)
    if known is not None:
        config = known.transformers_config()
        return Model(known.name, config, models.skeleton(Path(known.name), config))
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir() and "/" not in spec:
        raise ConfigError(f"unknown model {spec!r}"
                          f"{recipes.suggestions(recipes.known_models(), spec)}")
    name = str(path) if path.is_dir() else spec
    directory = models.resolve(name, config_only=True)
    skeleton = models.skeleton(directory)
    lowbit = path.is_dir() and checkpoint.is_lowbit_checkpoint(directory)
    return Model(name, _text_config(skeleton.config), skeleton, directory if lowbit else None)


def _text_config(config):
    return config.get_text_config(decoder=True)


def features(config) -> dict:
    """The numbers the activation model is written in (see recipes/memory.toml)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or 4 * h
    experts = getattr(config, "num_local_experts", None)
    if experts:  # the experts run one after another on their share of the tokens
        inter = inter * getattr(config, "num_experts_per_tok", 2) / experts + h / 3
    f = {"h": h, "I": inter, "q": heads * d, "kv": kv_heads * d, "V": config.vocab_size,
         "L": layers, "d": d, "one": 1,
         "h_prev": h if layers > 1 else 0}  # a block's input, apart from the embeddings
    f.update({f"L_{k}": layers * f[k] for k in ("h", "I", "q", "kv")})
    return f


def phase_peak(phases: dict, f: dict) -> float:
    """The largest phase: max over phases of sum(coefficient x feature) (elements per token)."""
    return max(sum(c * f[k] for k, c in terms.items()) for terms in phases.values())


# ---- KV cache ---------------------------------------------------------------------------

def kv_layers(config) -> list[int | None]:
    """Each decoder layer's attention window (None: the whole context), as transformers'
    caches read the config."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    return [k.get("sliding_window") if t in ("sliding_attention", "chunked_attention",
                                            "hybrid_sliding") else (0 if t == "dummy" else None)
            for t, k in zip(types, kwargs)]


def kv_bytes(config, tokens: int, batch: int, kv_bytes_per: int, windowed: bool = True) -> int:
    """Keys and values of `tokens` tokens for `batch` sequences, `kv_bytes_per` bytes an
    element; a sliding-window layer keeps its window when `windowed` (a transformers
    DynamicCache keeps the whole prefill until the first decode step)."""
    f = features(config)
    per_token = 2 * f["kv"] * kv_bytes_per * batch
    total = 0
    for window in kv_layers(config):
        kept = tokens if window is None or not windowed else min(tokens, max(window - 1, 0))
        total += per_token * kept
    return total


# ---- the estimate -----------------------------------------------------------------------

def _hf() -> dict:
    """recipes/memory.toml's [hf] tables: the transformers runtime's coefficients."""
    return recipes.memory_constants()["hf"]


def runtime_dtype(job: FitsJob, config) -> torch.dtype:
    if job.device == "cpu":
        return torch.float32
    if job.dtype != "auto":
        return DTYPES[job.dtype]
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return own if own in (torch.float16, torch.bfloat16) else torch.float16


def estimate(job: FitsJob, model: Model, quant: str | None) -> dict:
    """Memory of `job` on `model` with weights stored as `quant` (default: the checkpoint's
    plan, or fp16)."""
    dtype = runtime_dtype(job, model.config)
    scheme = quant or (str(model.checkpoint) if model.checkpoint else "fp16")
    weights = model.weights_for(scheme, dtype)
    b = torch.finfo(dtype).bits // 8
    kvb = b if job.kv_dtype == "auto" else KV_DTYPES[job.kv_dtype]
    f = features(model.config)
    tokens = job.context + job.new_tokens
    parts = {"weights": weights.bytes, "kv_cache": 0, "activations": 0, "gradients": 0,
             "optimizer": 0}
    if job.train:
        trained = training(job, model, weights, f, b)
        parts["weights"] += trained.pop("adapter_bytes")
        parts.update(trained)
    elif job.runtime == "hf":
        parts.update(hf_inference(job, model, weights, f, b, kvb))
    elif job.runtime == "vllm":
        parts.update(vllm_inference(job, model, f, b, kvb))
    else:
        parts.update(llamacpp_inference(job, model, f, kvb))
    info = {k: parts.pop(k) for k in ("peak_phase", "trainable_parameters") if k in parts}
    overhead = overheads(job, model, sum(parts.values()))
    parts["overhead"] = overhead["bytes"]
    return {"scheme": scheme, "weights_exact": weights.exact, "weights_how": weights.how,
            "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, **info,
            "breakdown": parts, "total_bytes": sum(parts.values()),
            "overhead_how": overhead["how"], "_weights": weights}


def hf_inference(job: FitsJob, model: Model, weights, f: dict, b: int, kvb: int) -> dict:
    """transformers: the prefill's peak (activations of its largest phase, the whole
    prefill's KV), or the last decode step's (the grown KV, plus one layer's KV twice while
    the cache concatenates)."""
    table = _hf()[job.workload]["phases"]
    tokens = job.batch * job.context
    phases = [phase_peak(table, f) * b * tokens, dequant_phase(job, weights, f, b, tokens)]
    if job.attention == "eager":  # the attention phase with its scores and fp32 softmax
        phases.append(phase_peak({"a": table["attention"]}, f) * b * tokens +
                      job.batch * (f["q"] // f["d"]) * job.context ** 2 * (b + 4))
    act = max(phases) + 8 * tokens + job.context * (2 * f["d"] * b + 8)  # + ids, rotary
    if job.workload == "forward":
        return {"activations": int(act), "kv_cache": 0}
    prefill_kv = kv_bytes(model.config, job.context, job.batch, kvb, windowed=False)
    end = job.context + job.new_tokens
    decode_kv = kv_bytes(model.config, end, job.batch, kvb)
    decode_act = (phase_peak({"mlp": table["mlp"]}, f) * b + f["V"] * b) * job.batch + \
        2 * f["kv"] * kvb * job.batch * end + dequant_transient(job, weights, job.batch)
    if job.new_tokens and decode_kv + decode_act > prefill_kv + act:
        return {"activations": int(decode_act), "kv_cache": decode_kv, "peak_phase": "decode"}
    return {"activations": int(act), "kv_cache": prefill_kv, "peak_phase": "prefill"}


def dequant_phase(job: FitsJob, weights, f: dict, b: int, tokens: int) -> int:
    """The live activations while the largest quantized layer dequantizes (recipes/
    memory.toml [hf.dequant]) plus its temporaries."""
    transient = dequant_transient(job, weights, tokens)
    if not transient:
        return 0
    live = sum(c * f[k] for k, c in _hf()["dequant"].items())
    return int(live * b * tokens + transient)


def dequant_transient(job: FitsJob, weights, rows: int) -> int:
    """Quantized layers dequantize on the fly: on a CPU the torch reference builds the
    whole fp32 weight of the layer (and its integer temporaries; measured per format on a
    small layer); on a GPU the fused kernels need nothing, the dequantize + matmul path
    (many rows) one weight in the activation dtype."""
    if not weights.quantized_specs:
        return 0
    if job.device == "cpu":
        return max(int(reference_transient_ratio(json.dumps(s.config, sort_keys=True),
                                                 s.in_features) * s.weights * 4)
                   for s in weights.quantized_specs)
    return weights.largest_linear * 2 if rows > 64 else 0


@functools.cache
def reference_transient_ratio(config_json: str, in_features: int) -> float:
    """Bytes the CPU reference path allocates beyond x and y, per fp32 weight element,
    measured with the memory tracker on a 64-row layer of this format (zero tensors)."""
    from quant.eval.memory import CpuTracker
    from quant.formats import format_class
    from quant.kernels import reference

    config = json.loads(config_json)
    fmt_cls = format_class(config)
    specs = fmt_cls.tensor_specs(64, in_features, config)
    tensors = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in specs.items()}
    fmt = fmt_cls.from_state_dict(tensors, config, 64, in_features)
    x = torch.zeros(1, in_features)
    with torch.no_grad(), CpuTracker(*tensors.values(), x) as tracker:
        reference.matmul_reference(x, fmt)
        peak = tracker.peak()["Total"]
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return max(0.0, (peak - stored - 4 * in_features - 4 * 64) / (64 * in_features * 4))


def training(job: FitsJob, model: Model, weights, f: dict, b: int) -> dict:
    """One optimizer step (AdamW): the peak of the backward (weights, optimizer state,
    saved activations of the fitted phases) or of the optimizer step (weights, gradients,
    optimizer state and the step's temporaries)."""
    mode = "lora" if job.train == "qlora" else job.train
    key = mode + ("+gc" if job.gradient_checkpointing else "")
    table = _hf()["train"].get(key)
    if table is None:
        raise ConfigError(f"no fitted training constants for {key}")
    trainable, largest = trainable_parameters(job, model, f)
    param_bytes = 4 if mode == "lora" else b   # peft keeps adapters in fp32
    grads = trainable * param_bytes
    optimizer = 2 * trainable * param_bytes
    tokens = job.batch * job.context
    act = phase_peak(table["phases"], f) * b * tokens + dequant_transient(job, weights, tokens)
    step_temp = 2 * largest * param_bytes if job.device == "cpu" else grads  # foreach on GPUs
    common = {"optimizer": optimizer, "trainable_parameters": trainable,
              "adapter_bytes": grads if mode == "lora" else 0}
    if act >= grads + step_temp:
        return {"activations": int(act), "gradients": 0, "peak_phase": "backward", **common}
    return {"activations": int(step_temp), "gradients": grads, "peak_phase": "optimizer step",
            **common}


def trainable_parameters(job: FitsJob, model: Model, f: dict) -> tuple[int, int]:
    """(trainable parameters, the largest trainable tensor's elements)."""
    if job.train == "full":
        sizes = [p.numel() for p in model.skeleton.parameters()]
        return sum(sizes), max(sizes)
    from quant.peft_support import targets
    from quant.plan import quantizable_linears

    wanted = set(targets(model.skeleton))
    shapes = [(m.in_features, m.out_features) for name, m in
              quantizable_linears(model.skeleton).items() if name.rsplit(".", 1)[-1] in wanted]
    sizes = [job.lora_rank * i for i, _ in shapes] + [job.lora_rank * o for _, o in shapes]
    return sum(sizes), max(sizes, default=0)


def vllm_inference(job: FitsJob, model: Model, f: dict, b: int, kvb: int) -> dict:
    """vLLM (estimate): its profiling forward over max_num_batched_tokens (8192) tokens, a
    sampler over 256 sequences' fp32 logits, paged KV (16-token blocks, sliding layers
    their window) for the asked sequences."""
    profile = 8192
    act = phase_peak(_hf()["generate"]["phases"], f) * b * profile + \
        256 * f["V"] * 4
    tokens = math.ceil((job.context + job.new_tokens) / 16) * 16
    return {"activations": int(act), "kv_cache": kv_bytes(model.config, tokens, job.batch, kvb)}


def llamacpp_inference(job: FitsJob, model: Model, f: dict, kvb: int) -> dict:
    """llama.cpp (estimate): KV for the whole context (sliding layers their window), a
    compute buffer for a 512-token micro-batch in fp32 with flash attention, and the fp32
    logits of the last token of each sequence."""
    tokens = job.context + job.new_tokens
    act = phase_peak(_hf()["generate"]["phases"], f) * 4 * 512 + \
        job.batch * f["V"] * 4
    return {"activations": int(act), "kv_cache": kv_bytes(model.config, tokens, job.batch, kvb)}


def overheads(job: FitsJob, model: Model, allocated: int) -> dict:
    """The CUDA context and the caching allocator's reserve beyond what tensors use: from
    the checkpoint's measured eval.json memory results where there are some, else the
    documented defaults (recipes/memory.toml [gpu])."""
    if job.device == "cpu":
        return {"bytes": 0, "how": "none: the CPU figures are live tensor bytes"}
    measured = measured_overheads(model.checkpoint)
    if measured:
        context, ratio = measured
        how = "measured (eval.json)"
    else:
        defaults = recipes.memory_constants()["gpu"]
        context, ratio = int(defaults["context_mib"] * 2**20), defaults["reserved_ratio"]
        how = (f"defaults: {defaults['context_mib']} MiB CUDA context, allocator reserve "
               f"{ratio - 1:.0%} of the tensors")
    return {"bytes": int(context + allocated * (ratio - 1)), "how": how}


def measured_overheads(directory: Path | None) -> tuple[int, float] | None:
    found = [r for r in recorded(directory, "memory") if r.get("cuda_context_bytes") is not None]
    if not found:
        return None
    last = found[-1]
    return last["cuda_context_bytes"], last["reserved_peak_bytes"] / max(last["peak_bytes"], 1)


# ---- questions: does it fit, how far, how fast -------------------------------------------

def budget_bytes(job: FitsJob) -> tuple[int | None, recipes.GPU | None]:
    if job.gpu:
        gpu = recipes.find_gpu(job.gpu)
        return gpu.memory_bytes, gpu
    if job.vram:
        return parse_size(job.vram), None
    return None, None


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ConfigError(f"--vram {text!r}: give a size like 24GB, 24GiB or 80")
    value, unit = float(match[1]), match[2] or "gib"
    scale = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    return int(value * scale)


def largest(job: FitsJob, model: Model, quant: str | None, budget: int, field: str,
            limit: int) -> int:
    """The largest context (or batch) whose estimate fits `budget`, 0 when none does."""
    def total(value: int) -> int:
        return estimate(dataclasses.replace(job, **{field: value}), model, quant)["total_bytes"]

    if total(1) > budget:
        return 0
    low, high = 1, 2
    while high <= limit and total(high) <= budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid)
    return low


def decode_speed(job: FitsJob, result: dict, gpu: recipes.GPU | None) -> dict | None:
    """Tokens/s of decoding from the bytes each step reads (every weight but the
    embedding table's unused rows, and the KV cache) over the GPU's bandwidth."""
    if gpu is None or job.train:
        return None
    read = result["_weights"].read_per_step + result["breakdown"]["kv_cache"]
    seconds = read / (gpu.bandwidth_gbs * 1e9)
    return {"tokens_per_s": round(job.batch / seconds, 1),
            "how": f"{gpu.bandwidth_gbs:.0f} GB/s roofline (bytes per step / bandwidth); "
                   "lowbit's kernels have no GPU measurement yet, so no efficiency factor"}


def fits(job: FitsJob) -> dict:
    """The answer to `quant fits`: one estimate, or a table of candidate schemes."""
    job.validate()
    model = load_model(job.model)
    budget, gpu = budget_bytes(job)
    warnings = context_warnings(job, model)
    quants = [job.quant] if job.quant or model.checkpoint else \
        list(CANDIDATES[job.train or "inference"])
    if job.train == "full" and job.quant and job.quant not in schemes.DENSE:
        raise ConfigError("--train full trains every weight: --quant must be fp16, bf16 or "
                          "fp32 (--train qlora trains LoRA adapters on a quantized model)")
    warnings += unquantized_warning(model)
    rows = []
    for quant in quants:
        try:
            result = estimate(job, model, quant)
        except LowbitError as exc:
            if len(quants) == 1:
                raise
            rows.append({"scheme": quant, "error": str(exc)})
            continue
        result.update(answer(job, model, quant, result, budget, gpu))
        rows.append(result)
    best = [r for r in rows if r.get("fits")]
    if len(rows) > 1 and best:
        max(best, key=lambda r: r["breakdown"]["weights"])["best"] = True
    for r in rows:
        r.pop("_weights", None)
    return {"model": model.name, "gpu": gpu.name if gpu else None, "budget_bytes": budget,
            "job": {k: v for k, v in dataclasses.asdict(job).items() if v is not None},
            "warnings": warnings, "results": rows}


def answer(job: FitsJob, model: Model, quant: str | None, result: dict, budget: int | None,
           gpu) -> dict:
    out = {"gpu_poor": gpu_poor_keys(result["breakdown"])}
    scheme_dir = Path(result["scheme"])
    quality = measured_quality(scheme_dir) if scheme_dir.is_dir() else []
    if quality:
        out["quality"] = quality
    if budget is not None:
        out.update(fits=result["total_bytes"] <= budget,
                   headroom_bytes=budget - result["total_bytes"],
                   largest_context=largest(job, model, quant, budget, "context",
                                           max_context(model.config)),
                   largest_batch=largest(job, model, quant, budget, "batch", 4096))
    speed = decode_speed(job, result, gpu)
    if speed:
        out["decode"] = speed
    return out


def measured_quality(directory: Path) -> list[dict]:
    """The perplexities `quant eval` recorded for a checkpoint (eval.json)."""
    return [{"dataset": r.get("dataset"), "seqlen": r.get("seqlen"), "ppl": r.get("ppl")}
            for r in recorded(directory, "perplexity")]


def gpu_poor_keys(parts: dict) -> dict:
    mib = 2**20
    keys = {"Model Size": parts["weights"], "KV Cache": parts["kv_cache"],
            "Activation Memory": parts["activations"],
            "Grad & Optimizer memory": parts["gradients"] + parts["optimizer"],
            "cuda + other overhead": parts["overhead"]}
    keys["Total"] = sum(keys.values())
    return {k: round(v / mib) for k, v in keys.items()}


def max_context(config) -> int:
    native = getattr(config, "max_position_embeddings", None) or 2**17
    scaling = getattr(config, "rope_scaling", None) or {}
    return int(native * (scaling.get("factor", 1) if isinstance(scaling, dict) else 1))


def unquantized_warning(model: Model) -> list[str]:
    """Weights outside nn.Linear layers (fused MoE experts) that lowbit's methods and
    bitsandbytes leave unquantized."""
    from quant.plan import quantizable_linears

    skeleton = model.skeleton
    linears = {f"{n}.weight" for n in quantizable_linears(skeleton)}
    ends = {id(m.weight) for m in (skeleton.get_input_embeddings(),
                                   skeleton.get_output_embeddings()) if m is not None}
    other = {n: p.numel() for n, p in skeleton.named_parameters()
             if p.dim() >= 2 and n not in linears and id(p) not in ends}
    total = sum(p.numel() for p in skeleton.parameters())
    if sum(other.values()) > 0.05 * total:
        example = max(other, key=other.get)
        return [f"{sum(other.values()) / total:.0%} of the weights (e.g. {example}) "
                "are not nn.Linear layers: lowbit's methods and bitsandbytes keep them in "
                "16 bits; GGUF quantizes them"]
    return []


def context_warnings(job: FitsJob, model: Model) -> list[str]:
    native = getattr(model.config, "max_position_embeddings", None)
    if native and job.context + job.new_tokens > native:
        return [f"{job.context + job.new_tokens} tokens is beyond the model's "
                f"max_position_embeddings ({native}); quality past it needs RoPE scaling"]
    return []
