"""Quantized weight formats: plain classes holding tensors (DESIGN.md §1)."""

from quant.formats.base import FORMATS, TensorSpec, format_class, stored_bits
from quant.formats.codebook_weight import CodebookWeight
from quant.formats.int_weight import IntWeight

__all__ = ["FORMATS", "CodebookWeight", "IntWeight", "TensorSpec", "format_class", "stored_bits"]
