"""What every quantized weight format shares: tensor specs, size accounting, registry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quant.errors import CheckpointError
from quant.registry import Registry


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def stored_bits(specs: dict[str, TensorSpec]) -> int:
    """Every bit a layer stores on disk: the one size-accounting function."""
    return 8 * sum(spec.nbytes for spec in specs.values())


def check_state_dict(tensors: dict[str, torch.Tensor], specs: dict[str, TensorSpec],
                     where: str) -> None:
    """Raise CheckpointError unless `tensors` has exactly the spec'd names, shapes and dtypes."""
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing tensors {', '.join(missing)}")
    for name, spec in specs.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise CheckpointError(
                f"{where}.{name}: expected {spec.dtype} {list(spec.shape)}, "
                f"found {t.dtype} {list(t.shape)}")


FORMATS = Registry("format", "format_name")
register_format = FORMATS.register


def format_class(module_config: dict):
    name = module_config.get("format")
    if name not in FORMATS:
        raise CheckpointError(f"unknown weight format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]
