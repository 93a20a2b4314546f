"""Memory measurement (DESIGN.md §6): what a model holds while it runs one job, split into
weights, KV cache, activations, gradients, optimizer state and overhead.

On the CPU the figures are live tensor bytes from PyTorch's dispatch-mode tracker
(`MemTracker`: every storage the job creates or touches, by kind), with the process's
peak resident set size beside them. On CUDA they come from the caching allocator's
statistics (peak allocated and reserved) and the driver's free memory around context
creation. Results are JSON records like perplexity results (`quant eval --memory`); the
fits calculator (`quant.eval.fits`) predicts the same split and is checked against them.

Jobs:
- generate (the default): a prefill of `context` tokens computing only the last
  position's logits, as `generate()` does, then `new_tokens` greedy decode steps on a
  DynamicCache;
- forward: one forward over `context` tokens with every position's logits, without a
  cache (perplexity and log-likelihood evaluation);
- train lora | qlora | full: one optimizer step (AdamW, its moments already there: the
  steady state) of a causal-LM loss over `context` tokens; LoRA adapters (peft) of rank
  `lora_rank` on peft's default targets.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass

import torch

from quant.errors import ConfigError

WORKLOADS = ("generate", "forward")
TRAIN_MODES = ("lora", "qlora", "full")
RUNTIMES = ("hf",)


@dataclass(frozen=True)
class MemoryJob:
    context: int = 2048
    batch: int = 1
    new_tokens: int = 16
    runtime: str = "hf"
    workload: str = "generate"
    train: str | None = None
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    seed: int = 0

    def validate(self) -> "MemoryJob":
        if self.context < 1 or self.batch < 1 or self.new_tokens < 0 or self.lora_rank < 1:
            raise ConfigError("--context, --batch and --lora-rank must be positive and "
                              "--new-tokens at least 0")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r}: measured runtimes are "
                              f"{', '.join(RUNTIMES)}")
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}")
        if self.train is not None and self.train not in TRAIN_MODES:
            raise ConfigError(f"--train must be one of {', '.join(TRAIN_MODES)}")
        return self

    def fits_job(self, device: str):
        """The same job as the fits calculator's question, for a `device` ("cpu"/"cuda")
        running in the dtype quant eval loads models in there."""
        from quant.eval.fits import FitsJob

        return FitsJob(context=self.context, batch=self.batch, new_tokens=self.new_tokens,
                       workload=self.workload, train=self.train,
                       gradient_checkpointing=self.gradient_checkpointing,
                       lora_rank=self.lora_rank, device=device,
                       dtype="fp32" if device == "cpu" else "fp16")


# ---- exact sizes -------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared ones, e.g. tied weights,
    once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def weights_bytes(model: torch.nn.Module) -> int:
    """Every parameter and buffer of the model, each storage once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers Cache holds."""
    if cache is None:
        return 0
    return tensor_bytes(t for layer in cache.layers
                        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(t, torch.Tensor))


def rss_peak_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- trackers ----------------------------------------------------------------------------

class _NoHook:
    def remove(self) -> None:
        pass


def _mem_tracker():
    """torch's MemTracker, taught that a frozen parameter (LoRA's base weights) gets no
    gradient: it would register a gradient hook on every parameter, which torch refuses
    for tensors that do not require grad."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenAwareTracker()


class CpuTracker:
    """Live tensor bytes by kind, through torch's MemTracker (a TorchDispatchMode)."""

    def __init__(self, *external):
        self.device = torch.device("cpu")
        self.tracker = _mem_tracker()
        self.tracker.track_external(*external)

    def __enter__(self):
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)

    def next_call(self) -> None:
        """Before each further model call: the tracker's per-module statistics cover one
        call (the device totals and the peak go on)."""
        self.tracker.reset_mod_stats()

    def peak(self) -> dict[str, int]:
        """{kind: bytes} at the peak so far ("Total" included)."""
        snapshot = self.tracker.get_tracker_snapshot("peak")
        found = snapshot.get(self.device, {})
        return {str(getattr(k, "value", k)): int(v) for k, v in found.items()}


class CudaTracker:
    """The caching allocator's peak statistics of one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)

    def next_call(self) -> None:
        pass

    def peak(self) -> dict[str, int]:
        return {"Total": torch.cuda.max_memory_allocated(self.device),
                "Reserved": torch.cuda.max_memory_reserved(self.device)}


def tracker_for(device: torch.device, *external):
    return CudaTracker(device) if device.type == "cuda" else CpuTracker(*external)


def cuda_context_bytes(device: torch.device) -> int | None:
    """Device memory in use that the allocator does not account for: the CUDA context
    (plus any other process on the device), from the driver's free memory."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


# ---- jobs --------------------------------------------------------------------------------

def random_ids(model, job: MemoryJob, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(job.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (job.batch, job.context), generator=generator).to(device)


def measure_generate(model, job: MemoryJob, device: torch.device) -> dict:
    """A prefill computing the last position's logits, then greedy decode steps."""
    ids = random_ids(model, job, device)
    with torch.no_grad(), tracker_for(device, model, ids) as tracker:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, prefill = out.past_key_values, tracker.peak()
        kv_prefill = cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        del out
        for _ in range(job.new_tokens):
            tracker.next_call()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            del out
        overall = tracker.peak()
    kv_end = cache_bytes(cache)
    decode_peaks = overall["Total"] > prefill["Total"]
    return {"peak": overall, "prefill_peak_bytes": prefill["Total"],
            "kv_cache_bytes": kv_end if decode_peaks else kv_prefill,
            "kv_cache_prefill_bytes": kv_prefill, "kv_cache_end_bytes": kv_end,
            "peak_phase": "decode" if decode_peaks else "prefill"}


def measure_forward(model, job: MemoryJob, device: torch.device) -> dict:
    """One forward with every position's logits and no cache."""
    ids = random_ids(model, job, device)
    with torch.no_grad(), tracker_for(device, model, ids) as tracker:
        model(input_ids=ids, use_cache=False)
        peak = tracker.peak()
    return {"peak": peak, "kv_cache_bytes": 0, "peak_phase": "forward"}


def measure_train(model, job: MemoryJob, device: torch.device) -> dict:
    """One AdamW step of the causal-LM loss in the steady state: the optimizer's moments
    exist before it (AdamW creates them in its first step)."""
    model.train()
    if job.gradient_checkpointing:
        model.activation_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for p in trainable:
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    ids = random_ids(model, job, device)
    with tracker_for(device, model, optimizer, ids) as tracker:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        peak = tracker.peak()
    optimizer_bytes = tensor_bytes(t for state in optimizer.state.values()
                                   for t in state.values() if isinstance(t, torch.Tensor))
    return {"peak": peak, "kv_cache_bytes": 0, "peak_phase": "train",
            "trainable_parameters": sum(p.numel() for p in trainable),
            "optimizer_bytes": optimizer_bytes,
            "gradient_bytes": tensor_bytes(trainable)}


def add_lora(model, rank: int):
    """The model with peft LoRA adapters of `rank` on peft's default targets for its
    architecture (lowbit's quantized layers included)."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("--train lora/qlora needs peft: pip install 'lowbit[train]'") from None
    from quant.peft_support import lora_config

    return get_peft_model(model, lora_config(model, rank))


def measure(model, job: MemoryJob, device: torch.device) -> dict:
    """Run `job` on `model` (already on `device`) and split its peak memory."""
    job.validate()
    if job.train in ("lora", "qlora"):
        model = add_lora(model, job.lora_rank)
    elif job.train == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    weights = weights_bytes(model)
    run = measure_train if job.train else (
        measure_forward if job.workload == "forward" else measure_generate)
    return split(run(model, job, device), weights, device)


def split(found: dict, weights: int, device: torch.device) -> dict:
    """The measured peak as weights / KV cache / gradients / optimizer / activations (the
    rest of the peak), and overheads beside it."""
    peak = found.pop("peak")
    total = peak["Total"]
    if device.type == "cpu":  # the tracker's own split at the peak moment
        grads, optim = peak.get("Gradient", 0), peak.get("Optstate", 0)
    else:
        grads, optim = found.get("gradient_bytes", 0), found.get("optimizer_bytes", 0)
    parts = {"weights": weights, "kv_cache": found.pop("kv_cache_bytes"), "gradients": grads,
             "optimizer": optim}
    parts["activations"] = max(0, total - sum(parts.values()))
    result = {"device": str(device), "peak_bytes": total, "breakdown": parts, **found}
    if device.type == "cuda":
        result["reserved_peak_bytes"] = peak["Reserved"]
        result["cuda_context_bytes"] = cuda_context_bytes(device)
        result["breakdown"]["overhead"] = peak["Reserved"] - total + (
            result["cuda_context_bytes"] or 0)
    else:
        result["tracker_kinds"] = peak
        result["rss_peak_bytes"] = rss_peak_bytes()
    return result


def describe_job(job: MemoryJob) -> dict:
    return {k: v for k, v in dataclasses.asdict(job).items() if v is not None}
