"""lowbit: Triton-kernel quantization toolkit for LLMs (import root `quant`).

Importing registers the `lowbit` quantizer with transformers, so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` builds quantized layers.
"""

from quant import formats, methods  # noqa: F401  (register formats and methods)
from quant.hf import load

__all__ = ["load"]
