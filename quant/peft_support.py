"""LoRA on lowbit models (QLoRA) through peft's extension point for custom layers: a LoRA
layer over a QuantLinear adds the adapter's low-rank update to the quantized layer's
output; the quantized tensors stay frozen."""

from __future__ import annotations

import functools

import torch
from torch import nn

from quant.layers import QuantLinear


@functools.cache
def lora_layer_class():
    """The peft LoRA layer for QuantLinear (peft imported only when LoRA is used)."""
    from peft.tuners.lora import LoraLayer

    class LoraQuantLinear(nn.Module, LoraLayer):
        def __init__(self, base_layer: QuantLinear, adapter_name: str, config, r: int = 0,
                     lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                update = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
                result = result + (update * self.scaling[name]).to(result.dtype)
            return result

    return LoraQuantLinear


def lora_config(model: nn.Module, rank: int = 8, **options):
    """A peft LoraConfig of `rank` on peft's default targets for the model's architecture
    (every linear of the decoder blocks where peft has none), QuantLinear included."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=options.pop("lora_alpha", 2 * rank),
                        lora_dropout=options.pop("lora_dropout", 0.0),
                        target_modules=options.pop("target_modules", None) or targets(model),
                        **options)
    config._register_custom_module({QuantLinear: lora_layer_class()})
    return config


def targets(model: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from quant.traverse import find_blocks

    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        getattr(model.config, "model_type", None))
    if known:
        return list(known)
    _, blocks = find_blocks(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear))})
