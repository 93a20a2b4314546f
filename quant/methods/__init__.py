"""Quantization methods, registered by name (DESIGN.md §2)."""

from quant.methods import rtn  # noqa: F401  (registers "rtn")
from quant.methods.base import METHODS, get_method, make_method, register_method

__all__ = ["METHODS", "get_method", "make_method", "register_method"]
