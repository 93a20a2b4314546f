"""`QuantLinear`: an nn.Module holding one format's tensors under their checkpoint names.

The tensor names, shapes and dtypes come from the format class, so the writer, the
transformers loader and the module agree by construction. Forward goes through
`quant.kernels.ops`, which picks the implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.formats import format_class
from quant.kernels import ops, reference


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: dict, bias: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, dict(config)
        self.format_cls = format_class(config)
        self.tensor_names = []
        for name, spec in self.format_cls.tensor_specs(out_features, in_features, config).items():
            data = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            self.register_parameter(name, nn.Parameter(data, requires_grad=False))
            self.tensor_names.append(name)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.kernel_preference = "auto"  # auto | torch | triton (quant.kernels.ops)
        self._weight_cache = (None, None)
        self._pinned = None  # a dense fp32 weight, only while the pipeline works on a block

    @classmethod
    def from_weight(cls, weight, bias: torch.Tensor | None = None) -> "QuantLinear":
        layer = cls(weight.in_features, weight.out_features, weight.config, bias is not None,
                    device="meta")
        for name, tensor in weight.state_dict().items():
            setattr(layer, name, nn.Parameter(tensor, requires_grad=False))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def quantized_weight(self):
        """The format object over this module's tensors (no copies), rebuilt only when the
        tensors move: decode calls this for every layer and token."""
        tensors = {name: getattr(self, name).data for name in self.tensor_names}
        key = tuple((t.data_ptr(), t.device) for t in tensors.values())
        if self._weight_cache[0] != key:
            weight = self.format_cls.from_state_dict(tensors, self.config, self.out_features,
                                                     self.in_features, where="QuantLinear")
            self._weight_cache = (key, weight)
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pinned is not None and self._pinned.device == x.device:
            return ops.add_bias(reference.dense_matmul(x, self._pinned), self.bias)
        return ops.linear(x, self.quantized_weight(), self.bias, self.kernel_preference)

    def pin_dense(self, weight: torch.Tensor | None) -> None:
        """Compute with this fp32 dequantized weight until unpinned with None: the pipeline
        runs each block over every calibration batch several times, and dequantizing for
        each call (a gather per weight with act-order) would dominate on a CPU."""
        self._pinned = None if weight is None else weight.float()

    def _apply(self, fn, recurse=True):
        # Casting the model (.half(), .to(bf16)) must not round the stored tensors: they
        # keep their on-disk dtypes and only follow device moves.
        stored = {name: self._parameters.pop(name) for name in self.tensor_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, param in stored.items():
                device = fn(torch.empty(0, dtype=param.dtype, device=param.device)).device
                if param.device != device:
                    param = nn.Parameter(param.data.to(device), requires_grad=False)
                self._parameters[name] = param
        return self

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {options}"


def set_kernel_preference(model: nn.Module, preference: str) -> None:
    """Route every QuantLinear of `model` through `auto`, `torch` or `triton` kernels."""
    ops.check_preference(preference)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernel_preference = preference


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linears(model: nn.Module, modules: dict[str, dict], device="meta") -> list[str]:
    """Swap each nn.Linear named in `modules` for an empty QuantLinear; returns the names."""
    replaced = []
    for name, config in modules.items():
        linear = model.get_submodule(name)
        layer = QuantLinear(linear.in_features, linear.out_features, config,
                            bias=linear.bias is not None, device=device,
                            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float16)
        set_module(model, name, layer)
        replaced.append(name)
    return replaced
