"""Round-to-nearest: each group of input columns on its own min/max grid; no statistics."""

from __future__ import annotations

from dataclasses import dataclass

from quant.formats.int_weight import IntWeight, check_int_config
from quant.methods.base import register_method
from quant.methods.intgrid import IntGridOptions, effective_group_size, quantize_groups


@dataclass(frozen=True)
class RTNConfig(IntGridOptions):
    """RTN takes only the shared integer-grid options."""


@register_method("rtn")
class RTN:
    Config = RTNConfig
    needs_hessian = False
    default_nsamples = 32  # RTN uses calibration only to report each layer's output error

    def __init__(self, config: RTNConfig):
        self.config = config

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        check_int_config(self.config.bits, self.group_size(in_features), in_features)

    def group_size(self, in_features: int) -> int:
        return effective_group_size(self.config.group_size, in_features)

    def quantize(self, weight, hessian=None, name: str = "") -> tuple[IntWeight, dict]:
        bits, sym = self.config.bits, self.config.sym
        group_size = self.group_size(weight.shape[1])
        q, zeros, scales = quantize_groups(weight, bits, group_size, sym)
        return IntWeight.from_ints(q, zeros, scales, bits=bits, group_size=group_size,
                                   sym=sym), {}
