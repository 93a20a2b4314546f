"""Round-to-nearest: each group of input columns on its own min/max grid; no statistics."""

from __future__ import annotations

from dataclasses import dataclass

from quant.formats.int_weight import IntWeight
from quant.methods.base import Calibration, LayerSpec, register_method
from quant.methods.intgrid import IntGridMethod, IntGridOptions, quantize_groups


@dataclass(frozen=True)
class RTNConfig(IntGridOptions):
    """RTN takes only the shared integer-grid options."""


@register_method("rtn")
class RTN(IntGridMethod):
    Config = RTNConfig

    @property
    def calibration(self) -> Calibration:
        # RTN reads no statistics: calibration only measures each layer's output error
        return Calibration(nsamples=32)

    def quantize(self, weight, stats, spec: LayerSpec) -> tuple[IntWeight, dict]:
        c = spec.config
        q, zeros, scales = quantize_groups(weight, c["bits"], c["group_size"], c["sym"])
        return IntWeight.from_ints(q, zeros, scales, bits=c["bits"],
                                   group_size=c["group_size"], sym=c["sym"]), {}
