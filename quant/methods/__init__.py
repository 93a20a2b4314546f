"""Quantization methods, registered by name (DESIGN.md §2)."""

# Registration order is the order of --help; the integer methods come first.
from quant.methods import gptq, rtn  # noqa: F401, I001
from quant.methods import aqlm  # noqa: F401, E402
from quant.methods.base import (METHODS, Calibration, FinetuneConfig, Method, Stages,
                                get_method, make_method, register_method)

__all__ = ["METHODS", "Calibration", "FinetuneConfig", "Method", "Stages", "get_method",
           "make_method", "register_method"]
