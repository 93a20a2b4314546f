"""The per-layer plan (DESIGN.md §3a): what every layer of a model will be and what it
costs, decided on the meta-device skeleton before any weight is read.

A `Plan` maps each quantized linear to a `LayerSpec` (format config and shape) and lists
every other tensor the checkpoint holds, with its dtype, ties recognised. The pipeline
executes a plan; a checkpoint's `quantization_config.modules` is its specs; `quant plan`,
`quant info`, `quant export` and the fits calculator read it. Bits and bytes of quantized
layers are counted here and in the format classes, nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from quant import checkpoint
from quant.errors import CheckpointError, ConfigError, ModelError
from quant.formats import TensorSpec, format_class, stored_bits
from quant.traverse import find_blocks, find_linears

if TYPE_CHECKING:
    from quant.methods.base import Method

NOT_CONVERTED = ("lm_head",)  # linears inside decoder blocks never quantized by name
PLAN_VERSION = 1
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.float64: "F64", torch.int8: "I8", torch.int16: "I16",
                      torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
                      torch.bool: "BOOL"}


@dataclass(frozen=True)
class LayerSpec:
    """One quantized linear: its shape and the module config its format reads (the entry
    of the checkpoint's `quantization_config.modules`)."""

    out_features: int
    in_features: int
    config: dict
    note: str = ""  # why the method chose this config, when it chose among several

    @property
    def format(self) -> str:
        return self.config["format"]

    @property
    def scheme(self) -> str:
        return format_class(self.config).describe(self.config)

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return format_class(self.config).tensor_specs(self.out_features, self.in_features,
                                                      self.config)

    def stored_bits(self, tensors: list[str] | None = None) -> int:
        """Every bit the layer stores, or those of the named tensors only."""
        specs = self.tensor_specs()
        return stored_bits({k: v for k, v in specs.items() if tensors is None or k in tensors})

    def bits_per_weight(self) -> float:
        return self.stored_bits() / self.weights

    def to_json(self) -> dict:
        entry = {"shape": [self.out_features, self.in_features], "config": self.config}
        return {**entry, "note": self.note} if self.note else entry

    @classmethod
    def from_json(cls, entry: dict) -> "LayerSpec":
        out_features, in_features = entry["shape"]
        return cls(int(out_features), int(in_features), dict(entry["config"]),
                   entry.get("note", ""))


@dataclass(frozen=True)
class KeptTensor:
    """A tensor the checkpoint holds as it is (embeddings, norms, biases, lm_head): stored
    once, under the name it is `tied_to` when it shares another's storage."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str | None = None

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)


@dataclass
class Plan:
    layers: dict[str, LayerSpec]   # quantized linears by full module name, in model order
    kept: dict[str, KeptTensor]    # every other state_dict entry, in model order

    # ---- what the checkpoint holds -------------------------------------------------------
    def modules(self) -> dict[str, dict]:
        """The checkpoint's `quantization_config.modules`."""
        return {name: dict(spec.config) for name, spec in self.layers.items()}

    def stored_tensors(self) -> dict[str, TensorSpec]:
        """Every tensor the checkpoint files hold, by name (a tied tensor once)."""
        tensors = {name: t.spec for name, t in self.kept.items() if t.tied_to is None}
        for name, spec in self.layers.items():
            tensors.update({f"{name}.{k}": v for k, v in spec.tensor_specs().items()})
        return tensors

    def checkpoint_bytes(self) -> int:
        """The tensor bytes of the checkpoint files (each file adds its header)."""
        return sum(spec.nbytes for spec in self.stored_tensors().values())

    # ---- bits -------------------------------------------------------------------------
    def quantized_weights(self) -> int:
        return sum(spec.weights for spec in self.layers.values())

    def bits_per_weight(self) -> float:
        """Stored bits per weight over the quantized linears (the papers' convention:
        codes, scales, zeros, codebooks and g_idx counted; biases are kept tensors)."""
        weights = self.quantized_weights()
        return sum(s.stored_bits() for s in self.layers.values()) / weights if weights else 0.0

    def parameters(self) -> int:
        """Weights of the model as stored: quantized linears plus kept tensors (tied once)."""
        kept = sum(math.prod(t.shape) for t in self.kept.values() if t.tied_to is None)
        return self.quantized_weights() + kept

    def model_bits_per_weight(self) -> float:
        return 8 * self.checkpoint_bytes() / max(self.parameters(), 1)

    def summary(self) -> dict:
        """The per-layer table and totals `quant plan` and `quant info` print."""
        layers = [{"name": name, "scheme": spec.scheme, "shape": [spec.out_features,
                   spec.in_features], "bits": spec.stored_bits(),
                   "bits_per_weight": spec.bits_per_weight(), **spec.config,
                   **({"note": spec.note} if spec.note else {})}
                  for name, spec in self.layers.items()]
        return {"quantized_layers": len(layers), "layers": layers,
                "quantized_bits_per_weight": self.bits_per_weight(),
                "model_bits_per_weight": self.model_bits_per_weight(),
                "parameters": self.parameters(), "checkpoint_bytes": self.checkpoint_bytes(),
                "kept_dtypes": sorted({str(t.dtype).removeprefix("torch.")
                                       for t in self.kept.values()})}

    # ---- checking files against the plan -------------------------------------------------
    def check_tensors(self, found: dict[str, tuple[str, list[int]]], where: Path) -> None:
        """Raise CheckpointError naming the first tensor of `found` ({name: (safetensors
        dtype, shape)}) that the plan does not expect, or the first one it misses."""
        expected = self.stored_tensors()
        for name, spec in expected.items():
            if name not in found:
                raise CheckpointError(f"{where}: tensor {name} is missing; the checkpoint is "
                                      "incomplete or its config.json does not match it")
            dtype, shape = found[name]
            want = SAFETENSORS_DTYPES.get(spec.dtype, str(spec.dtype))
            if dtype != want or list(shape) != list(spec.shape):
                raise CheckpointError(f"{where}: tensor {name} is {dtype} {list(shape)}, its "
                                      f"config says {want} {list(spec.shape)}")
        extra = [name for name in found if name not in expected]
        if extra:
            raise CheckpointError(f"{where}: tensor {extra[0]} is not in its config.json's "
                                  "plan; the checkpoint and its config do not match")

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"plan_version": PLAN_VERSION,
                "layers": {name: spec.to_json() for name, spec in self.layers.items()},
                "kept": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix(
                    "torch."), **({"tied_to": t.tied_to} if t.tied_to else {})}
                         for name, t in self.kept.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        try:
            if data["plan_version"] != PLAN_VERSION:
                raise ConfigError(f"plan version {data['plan_version']} is not {PLAN_VERSION}")
            layers = {name: LayerSpec.from_json(e) for name, e in data["layers"].items()}
            kept = {name: KeptTensor(tuple(e["shape"]), getattr(torch, e["dtype"]),
                                     e.get("tied_to")) for name, e in data["kept"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"not a lowbit plan: {type(exc).__name__} {exc}") from None
        return cls(layers, kept)


# ---- building plans ----------------------------------------------------------------------

def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears a method plans: every nn.Linear inside the decoder blocks, by full name."""
    prefix, blocks = find_blocks(model)
    linears = {f"{prefix}.{i}.{name}": linear for i, block in enumerate(blocks)
               for name, linear in find_linears(block, skip=NOT_CONVERTED).items()}
    if not linears:
        raise ModelError("the model's decoder blocks contain no nn.Linear layers to quantize")
    return linears


def build(model: nn.Module, layers: dict[str, LayerSpec], dtype: torch.dtype) -> Plan:
    """The plan quantizing `layers` of `model` (a meta skeleton is enough) and keeping the
    rest of its state dict, floating-point tensors in `dtype`."""
    for name, spec in layers.items():
        spec.tensor_specs()  # the format accepts the config for this shape
    replaced = {f"{name}.weight" for name in layers}
    kept, first_of = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in replaced:
            continue
        tied_to = first_of.setdefault(id(tensor), name)
        kept[name] = KeptTensor(tuple(tensor.shape),
                                dtype if tensor.is_floating_point() else tensor.dtype,
                                None if tied_to == name else tied_to)
    return Plan(dict(layers), kept)


def for_method(model: nn.Module, method: "Method", dtype: torch.dtype) -> Plan:
    """The plan `method` makes for `model`; a layer it cannot quantize raises ConfigError
    naming the layer."""
    layers = {}
    for name, linear in quantizable_linears(model).items():
        try:
            layers[name] = method.plan_layer(name, linear.out_features, linear.in_features)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if (layers[name].out_features, layers[name].in_features) != \
                (linear.out_features, linear.in_features):
            raise ConfigError(f"{name}: method {method.name} planned a "
                              f"{layers[name].out_features}x{layers[name].in_features} layer "
                              f"for a {linear.out_features}x{linear.in_features} linear")
    return build(model, layers, dtype)


def checkpoint_dtype(model_config: dict) -> torch.dtype:
    """The dtype kept floating-point tensors are stored in: the source model's."""
    dtype = getattr(torch, str(model_config.get("dtype") or model_config.get("torch_dtype")),
                    None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float16


def for_source(directory: Path, method: "Method") -> Plan:
    """The plan of `method` for the model in `directory` (only its config.json is read)."""
    from quant import models

    return for_method(models.skeleton(directory),
                      method, checkpoint_dtype(checkpoint.read_model_config(directory)))


def for_checkpoint(directory: Path, modules: dict | None = None) -> Plan:
    """The plan a checkpoint directory was written from: its config.json's model and
    `quantization_config.modules` (or `modules`)."""
    from quant import models

    directory = Path(directory)
    config = checkpoint.read_model_config(directory)
    if modules is None:
        modules = checkpoint.read_quant_config(directory)["modules"]
    model = models.skeleton(directory)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = {}
    for name, module_config in modules.items():
        if name not in linears:
            raise CheckpointError(f"{directory}: config.json quantizes {name}, which is not a "
                                  "linear layer of this model")
        linear = linears[name]
        try:
            layers[name] = LayerSpec(linear.out_features, linear.in_features, module_config)
            layers[name].tensor_specs()
        except (ConfigError, CheckpointError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory}: {name}: invalid module config "
                                  f"{module_config!r} ({exc})") from None
    return build(model, layers, checkpoint_dtype(config))


def file_tensors(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (safetensors dtype, shape)} of every tensor in a directory's weight files."""
    found = {}
    for path in checkpoint.weight_files(Path(directory)):
        found.update({name: (entry["dtype"], entry["shape"]) for name, entry in
                      checkpoint.check_safetensors_file(path).items()})
    return found


def checked(directory: Path, checksums: bool = True) -> Plan:
    """The plan of a checkpoint whose files are complete (and match their recorded sha256
    when `checksums`) and hold exactly the tensors the plan expects."""
    directory = Path(directory)
    checkpoint.verify(directory, checksums)
    plan = for_checkpoint(directory)
    plan.check_tensors(file_tensors(directory), directory)
    return plan


