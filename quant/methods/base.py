"""The method contract and registry: a quantization method plans each linear (`plan_layer`)
and turns (weight, statistics) into that plan's format (`quantize`).

A method declares what it needs from the pipeline as data: the calibration statistics
(`Calibration`) and the fine-tuning stages (`Stages`). It never runs the model: the
pipeline does. Methods register by name; third-party ones through the entry-point group
`lowbit.methods` (each entry point names a `Method` subclass) and pass the same checks.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import torch

from quant.errors import ConfigError
from quant.plan import LayerSpec
from quant.registry import Registry


@dataclass(frozen=True)
class FinetuneConfig:
    """A method's request for one of the pipeline's fine-tuning stages (quant.finetune):
    block by block, or the whole model by distillation."""

    steps: int  # Adam steps, cycling through the calibration sequences
    lr: float  # the peak rate: held, then decayed over the last DECAY_FRACTION of the steps
    sequences: int = 2  # calibration sequences (windows) per step

    DECAY_FRACTION = 0.3  # ending on small steps keeps the result from swinging
    SCHEDULE = f"it falls linearly to zero over the last {DECAY_FRACTION:.0%} of the steps"

    def lr_factor(self, step: int) -> float:
        """The fraction of `lr` Adam's step `step` (0-based) uses: 1, then falling linearly
        over the last DECAY_FRACTION of the steps to 1/decay_steps."""
        decay_steps = max(1, round(self.DECAY_FRACTION * self.steps))
        return min(1.0, (self.steps - step) / decay_steps)

    @classmethod
    def requested(cls, steps: int, lr: float) -> FinetuneConfig | None:
        """The stage's config, or None when a method's options turn it off (0 steps)."""
        return cls(steps, lr) if steps else None


@dataclass(frozen=True)
class Calibration:
    """What a method asks of the calibration pass."""

    nsamples: int = 128          # calibration windows when the job does not say
    hessian: bool = False        # H = 2/n X X^T of each linear's input is its statistic
    hessian_dtype: torch.dtype = torch.float32
    true_sequential: bool = True  # each input group's H after the groups upstream are quantized
    bf16_matmuls: bool = False   # its error is far above bf16 rounding: CPU forwards may use bf16


@dataclass(frozen=True)
class Stages:
    """The pipeline stages a method asks for beyond quantizing each linear."""

    finetune: FinetuneConfig | None = None  # each block against the fp block's outputs
    distill: FinetuneConfig | None = None   # the whole model against the fp model (KL)


class Method(ABC):
    """A configured quantization method. Subclasses set `Config` (a frozen dataclass with
    `validate()`), implement `calibration`, `plan_layer` and `quantize`, and may override
    the rest."""

    name: ClassVar[str]    # set by the registry
    Config: ClassVar[type]

    def __init__(self, config):
        self.config = config

    @property
    @abstractmethod
    def calibration(self) -> Calibration:
        """The statistics and calibration defaults this method needs."""

    @property
    def stages(self) -> Stages:
        return Stages()

    @abstractmethod
    def plan_layer(self, name: str, out_features: int, in_features: int) -> LayerSpec:
        """The layer `name`'s format and config; raises ConfigError when it cannot be
        quantized with these options (the message says why)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: torch.Tensor | None,
                 spec: LayerSpec) -> tuple[object, dict]:
        """(format object with `spec`'s config, report entry) for one fp32 weight [out, in]
        and its statistic (H when `calibration.hessian`, else None)."""

    def quantize_group(self, weights: list[torch.Tensor], stats: torch.Tensor | None,
                       specs: list[LayerSpec]) -> list[tuple[object, dict]]:
        """Linears sharing one input (and statistic), quantized together where a method can
        do that faster; by default one at a time."""
        return [self.quantize(w, stats, spec) for w, spec in zip(weights, specs)]

    def caution(self) -> str | None:
        """One line for the user when these options are known to ruin most models."""
        return None

    def label(self) -> str:
        """A short name of the method and its main option, for default output paths."""
        return self.name


METHODS = Registry("method", "name")


def check_method_class(cls, origin: str) -> type:
    """`cls` itself when it implements the contract, else ConfigError naming what is missing."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"{origin}: {cls!r} is not a lowbit Method subclass")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError(f"{origin}: {cls.__name__} does not implement {missing}")
    config = getattr(cls, "Config", None)
    if not (dataclasses.is_dataclass(config) and callable(getattr(config, "validate", None))):
        raise ConfigError(f"{origin}: {cls.__name__}.Config must be a dataclass with validate()")
    return cls


def register_method(name: str):
    """Class decorator: register a Method subclass under `name` (refusing duplicates)."""
    def add(cls):
        check_method_class(cls, f"method {name!r}")
        return METHODS.register(name)(cls)
    return add


def _load_entry_points() -> None:
    for ep in entry_points(group="lowbit.methods"):
        if ep.name not in METHODS:
            cls = check_method_class(ep.load(), f"entry point {ep.name!r} ({ep.value})")
            METHODS.register(ep.name)(cls)


def get_method(name: str) -> type:
    if name not in METHODS:
        _load_entry_points()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


def make_method(name: str, **options) -> Method:
    """A configured method instance; unknown or invalid options raise ConfigError."""
    cls = get_method(name)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise ConfigError(f"{flags} does not apply to method {name}")
    return cls(cls.Config(**options).validate())


__all__ = ["Calibration", "FinetuneConfig", "LayerSpec", "METHODS", "Method", "Stages",
           "get_method", "make_method", "register_method"]
