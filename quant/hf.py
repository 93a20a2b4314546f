"""The transformers adapter: a `QuantizationConfig` and an `HfQuantizer` registered under
"lowbit", so `AutoModelForCausalLM.from_pretrained(checkpoint)` swaps each listed
nn.Linear for an empty QuantLinear on the meta device (parameter names equal checkpoint
keys) and transformers loads the packed tensors into it.

Relied-on hooks (tested in tests/test_hf.py): register_quantization_config,
register_quantizer and HfQuantizer._process_model_before_weight_loading; the loader keeps
the dtypes of our empty parameters (int32 packs, fp16 scales) whatever `dtype` asks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from quant import checkpoint
from quant import plan as plans
from quant.errors import CheckpointError
from quant.layers import QuantLinear, replace_linears, set_kernel_preference

METHOD = checkpoint.QUANT_METHOD


class LowbitConfig(QuantizationConfigMixin):
    """The `quantization_config` of a lowbit checkpoint (see DESIGN.md)."""

    def __init__(self, modules: dict | None = None, modules_to_not_convert: list | None = None,
                 format_version: int = checkpoint.FORMAT_VERSION, **kwargs):
        self.quant_method = METHOD
        self.format_version = format_version
        self.modules = modules or {}
        self.modules_to_not_convert = modules_to_not_convert or []
        for key, value in kwargs.items():  # packing, calibration, lowbit_version, ...
            setattr(self, key, value)


class LowbitHfQuantizer(HfQuantizer):
    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.format_version > checkpoint.FORMAT_VERSION:
            raise CheckpointError("this checkpoint was written by a newer lowbit; upgrade lowbit")

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_linears(model, self.quantization_config.modules)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    # Idempotent so re-imports (importlib.reload, test collection) stay harmless.
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(LowbitConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(LowbitHfQuantizer)


_register()


def load(directory, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True, kernels: str = "auto"):
    """Load a lowbit checkpoint with transformers, checking that our quantizer really ran
    (transformers silently skips an unknown quant_method). `kernels` picks the matmul
    implementation: auto (Triton on CUDA, torch on CPU), torch, or triton. Also reads
    checkpoints in the aqlm layout (`quant export --format aqlm`, AQLM hub models)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    extra = {}
    quantization = checkpoint.read_model_config(directory).get("quantization_config") or {}
    if quantization.get("quant_method") == "aqlm":  # an aqlm export: run it on our layers
        from transformers import AutoConfig

        from quant.export import lowbit_config_for_aqlm

        for path in checkpoint.weight_files(directory):
            checkpoint.check_safetensors_file(path)
        config = AutoConfig.from_pretrained(directory)
        config.quantization_config = lowbit_config_for_aqlm(directory, config)
        expected, extra = config.quantization_config["modules"], {"config": config}
    else:
        expected = plans.checked(directory, checksums=verify).layers
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=str(device),
                                                 **extra)
    found = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if found != set(expected):
        raise CheckpointError(
            f"{directory}: the lowbit quantizer did not build the quantized layers "
            f"({len(found)} of {len(expected)}); is `quant` imported and transformers "
            "in the supported range?")
    set_kernel_preference(model, kernels)
    return model.eval()
