"""Block fine-tuning, a pipeline stage after a block's linears are quantized: with the
discrete parts (codes) frozen, Adam tunes the continuous parts of each quantized layer's
format (AQLM codebooks and scales) and the block's norms so that the block reproduces the
fp block's outputs on the calibration batches.

A format takes part when it has `tunable()` (fp32 copies of its continuous tensors),
`dequantize_tunable(parts)` (the dense weight, differentiable in the parts) and
`with_tunable(parts)` (a new format with the parts rounded to their stored dtypes).
"""

from __future__ import annotations

import torch

from quant.layers import QuantLinear
from quant.methods.base import FinetuneConfig
from quant.traverse import BlockInputs, run_batches, run_block


def block_outputs(block, inputs: BlockInputs, index: int, device) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch, on the CPU (the fp targets)."""
    with torch.no_grad():
        return [out.to("cpu") for out in run_batches(block, inputs, index, device)]


def relative_error(block, inputs: BlockInputs, index: int, device,
                   targets: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """(sum ||block(x) - target||^2 / sum ||target||^2 over every calibration batch, the
    block's outputs)."""
    num = den = 0.0
    outputs = []
    with torch.no_grad():
        for out, target in zip(run_batches(block, inputs, index, device), targets):
            target = target.to(out.device, out.dtype)
            num += float((out - target).float().pow(2).sum())
            den += float(target.float().pow(2).sum())
            outputs.append(out)
    return num / max(den, 1e-30), outputs


def tunable_layers(block) -> dict[str, QuantLinear]:
    return {name: m for name, m in block.named_modules()
            if isinstance(m, QuantLinear) and hasattr(m.quantized_weight(), "tunable")}


def norm_parameters(block) -> list[torch.nn.Parameter]:
    """The block's 1-D float parameters outside its quantized layers: the norms' weights
    (and biases)."""
    quantized = {id(p) for m in block.modules() if isinstance(m, QuantLinear)
                 for p in m.parameters()}
    return [p for p in block.parameters()
            if id(p) not in quantized and p.is_floating_point() and p.dim() == 1]


def finetune_block(block, inputs: BlockInputs, index: int, device,
                   targets: list[torch.Tensor], config: FinetuneConfig) -> dict:
    """Tune the block in place; returns the relative output errors "before" and "after"
    and the tuned block's "outputs" for every batch. When tuning made the error worse (it
    minimises the error before rounding to the stored dtypes), everything is put back."""
    layers = tunable_layers(block)
    norms = norm_parameters(block)
    before, outputs = relative_error(block, inputs, index, device, targets)
    if not layers:
        return {"before": before, "after": before, "outputs": outputs}
    formats = {name: layer.quantized_weight() for name, layer in layers.items()}
    saved_norms = [p.detach().clone() for p in norms]
    tuned = _adam(block, layers, norms, formats, inputs, index, device, targets, config)
    for name, layer in layers.items():
        _install(layer, tuned[name])
    after, tuned_outputs = relative_error(block, inputs, index, device, targets)
    if after > before:
        for name, layer in layers.items():
            _install(layer, formats[name])
        with torch.no_grad():
            for p, old in zip(norms, saved_norms):
                p.copy_(old)
        return {"before": before, "after": before, "outputs": outputs}
    return {"before": before, "after": after, "outputs": tuned_outputs}


def _adam(block, layers, norms, formats, inputs, index, device, targets, config) -> dict:
    """The formats (rounded to storage) after `config.steps` Adam steps; the norms are
    tuned in place."""
    on_device = {name: fmt.to(device) for name, fmt in formats.items()}
    parts = {name: {k: v.to(device).requires_grad_() for k, v in fmt.tunable().items()}
             for name, fmt in formats.items()}
    params = [t for p in parts.values() for t in p.values()] + norms
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.95))
    for p in norms:
        p.requires_grad_(True)
    try:
        for step in range(config.steps):
            b = step % len(inputs.hidden)
            for name, layer in layers.items():
                layer.pin_dense(on_device[name].dequantize_tunable(parts[name]))
            out = run_block(block, inputs.hidden[b], inputs.calls[index][b], device)
            target = targets[b].to(out.device, out.dtype)
            loss = (out - target).float().pow(2).sum() / target.float().pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in norms:
            p.requires_grad_(False)
    return {name: formats[name].with_tunable({k: v.detach() for k, v in parts[name].items()})
            for name in layers}


def _install(layer: QuantLinear, fmt) -> None:
    """Point the layer's stored tensors at `fmt`'s and pin its dequantized weight."""
    for name, tensor in fmt.state_dict().items():
        getattr(layer, name).data = tensor.to(getattr(layer, name).device)
    layer.pin_dense(fmt.dequantize(torch.float32))
