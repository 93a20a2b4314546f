"""Weight bytes of a model under a quantization scheme, for the fits calculator.

lowbit's own schemes (fp16/bf16/fp32, int8, gptq:4g128, rtn:3g64, aqlm:1x16g8, aqlm:2, a
checkpoint directory) are counted exactly by a Plan of the meta-device skeleton: the same
tensors the checkpoint and the runtime hold. Schemes of other tools that users compare
with are estimates from each tool's documented storage rule, applied to the same skeleton:
bitsandbytes int8 and nf4, GGUF Q8_0/Q4_0/Q4_K_M (llama.cpp's tensor-type rule), EXL2 at a
given bits per weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant import plan as plans
from quant.errors import ConfigError
from quant.methods import make_method
from quant.plan import Plan
from quant.traverse import find_blocks

DENSE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# GGUF block types: (weights per block, bytes per block)
GGUF_BLOCKS = {"q4_0": (32, 18), "q5_0": (32, 22), "q8_0": (32, 34), "q4_k": (256, 144),
               "q5_k": (256, 176), "q6_k": (256, 210), "f16": (1, 2)}
FOREIGN = ("bnb-int8", "nf4", "nf4-dq", "q8_0", "q4_0", "q4_k_m", "exl2:BPW")
EXL2_HEAD_BITS = 6  # exllamav2's default bits for the output layer


@dataclass
class Weights:
    """What a scheme stores for a model: total bytes, whether they are exact (a lowbit
    Plan) or a documented estimate, and the plan when there is one."""

    bytes: int
    exact: bool
    plan: Plan | None = None
    how: str = ""
    embedding_bytes: int = 0           # a decode step reads one row per token of it...
    tied: bool = False                 # ...unless it is also the output layer

    @property
    def quantized_specs(self) -> list:
        """The plan's LayerSpecs (none for other tools' schemes)."""
        return list(self.plan.layers.values()) if self.plan is not None else []

    @property
    def largest_linear(self) -> int:
        """out x in of the largest quantized linear."""
        return max((s.weights for s in self.quantized_specs), default=0)

    @property
    def read_per_step(self) -> int:
        """The weight bytes one decode step reads."""
        return self.bytes if self.tied else self.bytes - self.embedding_bytes


def lowbit_method(scheme: str):
    """The method and options a lowbit scheme name stands for, or None."""
    if scheme == "int8":
        return make_method("rtn", bits=8, group_size=128)
    match = re.fullmatch(r"(gptq|rtn|awq):(\d)g(\d+|c)(-act)?", scheme)
    if match:
        method, bits, group, act = match.groups()
        options = {"bits": int(bits), "group_size": -1 if group == "c" else int(group)}
        if method == "gptq":
            options["act_order"] = bool(act)
        elif act:
            raise ConfigError(f"--quant {scheme}: -act applies to gptq only")
        return make_method("rtn" if method == "awq" else method, **options)
    match = re.fullmatch(r"aqlm:(\d+)x(\d+)g(\d+)", scheme)
    if match:
        m, b, g = match.groups()
        return make_method("aqlm", codebooks=f"{m}x{b}", in_group=int(g))
    match = re.fullmatch(r"aqlm:(\d)", scheme)
    if match:
        return make_method("aqlm", bits=int(match[1]))
    return None


def weights(model: nn.Module, scheme: str, dtype: torch.dtype) -> Weights:
    """Bytes of `model`'s weights under `scheme`; kept tensors in `dtype` (the runtime's)."""
    if Path(scheme).is_dir():
        return _from_plan(plans.checked(Path(scheme), checksums=False), model, dtype,
                          "the checkpoint's plan (exact)")
    scheme = scheme.strip().lower()
    if scheme in DENSE:
        return _from_plan(plans.build(model, {}, DENSE[scheme]), model, DENSE[scheme],
                          "every tensor in " + scheme)
    if scheme == "mixed" or scheme.startswith("mixed:"):
        raise ConfigError("--quant mixed: per-layer bit allocation (--method mixed) is not "
                          "built yet; plan a uniform scheme")
    method = lowbit_method(scheme)
    if method is not None:
        return _from_plan(plans.for_method(model, method, dtype), model, dtype,
                          "lowbit plan (exact)")
    return _foreign(model, scheme, dtype)


def _from_plan(plan: Plan, model: nn.Module, dtype, how: str) -> Weights:
    if any(t.dtype.is_floating_point and t.dtype != dtype for t in plan.kept.values()):
        plan = Plan(plan.layers, {n: type(t)(t.shape, dtype if t.dtype.is_floating_point
                                             else t.dtype, t.tied_to)
                                  for n, t in plan.kept.items()})
    embedding, tied = _embedding(model, plan)
    return Weights(plan.checkpoint_bytes(), True, plan, how, embedding, tied)


def _embedding(model: nn.Module, plan: Plan) -> tuple[int, bool]:
    """(bytes of the input embedding as the plan stores it, whether the output layer is
    tied to it)."""
    stored = plan.stored_tensors()
    emb_name = _param_name(model, model.get_input_embeddings())
    head = model.get_output_embeddings()
    head_name = _param_name(model, head) if head is not None else emb_name
    kept = plan.kept.get(head_name)
    tied = head_name == emb_name or (kept is not None and kept.tied_to == emb_name)
    return (stored[emb_name].nbytes if emb_name in stored else 0), tied


def _param_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight"
    raise ConfigError("the model's embedding is not one of its modules")


# ---- other tools' schemes (estimates) ----------------------------------------------------

def _foreign(model: nn.Module, scheme: str, dtype) -> Weights:
    base = plans.build(model, {}, dtype)
    linears = plans.quantizable_linears(model)
    linear_bytes = {f"{name}.weight": (m.out_features, m.in_features)
                    for name, m in linears.items()}
    if scheme in ("bnb-int8", "nf4", "nf4-dq"):
        per_linear, how = _bnb(scheme)
        total = _kept_bytes(base, skip=linear_bytes) + sum(
            per_linear(o, i) for o, i in linear_bytes.values())
    elif scheme in ("q8_0", "q4_0", "q4_k_m"):
        total, how = _gguf(model, base, scheme)
    elif scheme.startswith("exl2:"):
        total, how = _exl2(model, base, linear_bytes, scheme)
    else:
        raise ConfigError(f"unknown --quant {scheme!r}: lowbit schemes are fp16, bf16, fp32, "
                          "int8, gptq:4g128[-act], rtn:BITSgGROUP, awq:4g128, aqlm:MxBgG, "
                          f"aqlm:BITS or a checkpoint directory; estimates: {', '.join(FOREIGN)}")
    embedding, tied = _embedding(model, base)
    return Weights(int(total), False, None, how, embedding, tied)


def _kept_bytes(plan: Plan, skip=()) -> int:
    return sum(spec.nbytes for name, spec in plan.stored_tensors().items() if name not in skip)


def _bnb(scheme: str):
    if scheme == "bnb-int8":  # LLM.int8: int8 weight and an fp32 scale per output row
        return (lambda o, i: o * i + 4 * o,
                "bitsandbytes LLM.int8 on the decoder linears (int8 + fp32 row scales), "
                "the rest fp16 (estimate)")
    if scheme == "nf4":  # two 4-bit values a byte, an fp32 absmax per 64 weights
        return (lambda o, i: o * i // 2 + o * i // 64 * 4,
                "bitsandbytes nf4 on the decoder linears (4.5 bits), the rest fp16 (estimate)")
    return (lambda o, i: o * i // 2 + o * i // 64 + o * i // (64 * 256) * 4,
            "bitsandbytes nf4 with double quantization (~4.13 bits), the rest fp16 (estimate)")


def _gguf_bytes(kind: str, n: int, row: int) -> int:
    """Bytes of n weights of rows of `row` weights in a GGUF type, with llama.cpp's
    fallback where the row is not a whole number of blocks (K-quants need 256)."""
    fallback = {"q4_k": "q5_0", "q5_k": "q5_0", "q6_k": "q8_0"}
    if row % GGUF_BLOCKS[kind][0]:
        kind = fallback.get(kind, "f16")
        if row % GGUF_BLOCKS[kind][0]:
            kind = "f16"
    per_block, size = GGUF_BLOCKS[kind]
    return n // per_block * size


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf(model: nn.Module, base: Plan, scheme: str) -> tuple[int, str]:
    """llama.cpp's tensor types: 2-D weights in the scheme's type (Q4_K_M: attn_v and
    ffn_down in Q6_K on the first and last eighth of the layers and every third between,
    the output layer in Q6_K), 1-D tensors (norms, biases) in F32."""
    prefix, blocks = find_blocks(model)
    n_layer = len(blocks)
    stored = base.stored_tensors()
    head = model.get_output_embeddings()
    head_name = _param_name(model, head) if head is not None else None
    if head_name not in stored:  # tied: the embedding is the output layer
        head_name = _param_name(model, model.get_input_embeddings())
    base_kind = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k"}[scheme]
    total = 0
    for name, spec in stored.items():
        numel, row = math.prod(spec.shape), spec.shape[-1]
        if len(spec.shape) < 2:
            total += 4 * numel
            continue
        kind = base_kind
        layer = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        if scheme == "q4_k_m":
            if name == head_name:
                kind = "q6_k"
            elif layer and re.search(r"(v_proj|down_proj)\.weight$", name) and \
                    _use_more_bits(int(layer[1]), n_layer):
                kind = "q6_k"
        total += _gguf_bytes(kind, numel, row)
    return total, f"GGUF {scheme.upper()} by llama.cpp's tensor-type rule (estimate)"


def _exl2(model: nn.Module, base: Plan, linear_bytes: dict, scheme: str) -> tuple[int, str]:
    try:
        bpw = float(scheme.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"--quant {scheme}: give exl2's bits per weight, e.g. "
                          "exl2:4.65") from None
    head = model.get_output_embeddings()
    head_name = _param_name(model, head) if head is not None else None
    stored = base.stored_tensors()
    total = _kept_bytes(base, skip={*linear_bytes, head_name})
    total += sum(o * i for o, i in linear_bytes.values()) * bpw / 8
    if head_name in stored:
        total += math.prod(stored[head_name].shape) * EXL2_HEAD_BITS / 8
    return int(total), (f"EXL2 at {bpw} bits per weight on the decoder linears, the output "
                        f"layer at {EXL2_HEAD_BITS} bits, the rest fp16 (estimate)")
