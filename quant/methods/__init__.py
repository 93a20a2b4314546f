"""Quantization methods, registered by name (DESIGN.md §2)."""

from quant.methods import gptq, rtn  # noqa: F401  (register "gptq", "rtn")
from quant.methods.base import METHODS, get_method, make_method, register_method

__all__ = ["METHODS", "get_method", "make_method", "register_method"]
